"""Hugging Face families the runtime splits with tensor parallelism (2 gloo ranks): a Qwen3
config (per-head q/k norms, whose replicated weights see only local heads), a Phi config
(attention and MLP side by side on one norm) and a Gemma 2 config (norms on the branch
outputs, softcapped scores and vocabulary-parallel logits) give the unsplit model's loss and
gradients, and issue exactly the collectives the simulator prices."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.hf_configs import SMALL, write_config
from planner.zoo import load_model

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]


def _rank(rank: int, out_dir: str, model: str, sp: bool):
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel
    from parity.test_tp_collectives import _sharded, assert_matches_unsplit
    cfg, sharded = _sharded(model, sp)
    reference = load_model(model).build("cpu").init_weights(0)
    torch.manual_seed(1)
    x, y = torch.randint(0, cfg.vocab, (2, 16)), torch.randint(0, cfg.vocab, (2, 16))
    with CommDebugMode() as comms, loss_parallel():
        loss = sharded(x, y)
        loss.to_local().backward()
    assert_matches_unsplit(loss, sharded, reference, x, y)
    counts = {str(op).rsplit(".", 1)[-1]: n for op, n in comms.get_comm_counts().items()}
    if rank == 0:
        (Path(out_dir) / "counts.json").write_text(json.dumps(counts))


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("family, forward, backward", [("qwen3", 2, 2), ("phi", 2, 1), ("gemma2", 2, 2)])
def test_hf_family_splits_as_the_simulator_prices(tmp_path, family, forward, backward, sp):
    """Per block, Qwen3 and Gemma 2 reduce once per region each way (as Llama); Phi's two
    regions reduce their outputs apart in forward but their one shared input once in backward."""
    from parity.test_tp_collectives import simulated_counts
    from runtime_helpers import run_ranks
    model = str(write_config(tmp_path / family, SMALL[family][0]))
    run_ranks(2, _rank, str(tmp_path), model, sp)
    counts = json.loads((tmp_path / "counts.json").read_text())
    layers = SMALL[family][0]["num_hidden_layers"]
    if sp:   # an all-reduce is a reduce-scatter (output side) or all-gather (input side) and its mirror
        assert (forward + backward) * layers <= counts["reduce_scatter_tensor"] <= (forward + backward) * layers + 2
        assert (forward + backward) * layers <= counts["all_gather_into_tensor"] <= (forward + backward) * layers + 2
    else:
        assert (forward + backward) * layers + 2 <= counts["all_reduce"] <= (forward + backward) * layers + 5
    assert simulated_counts(model, sp) == counts
