"""Tensor parallelism as the runtime applies it (2 ranks, gloo): a vocabulary-parallel head
keeps its logits split and its loss equals the unsplit model's, gradients included; each
block issues the collectives Megatron-LM does, and the simulator charges, no more."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from planner.plan import Plan
from planner.simulate import prepare
from planner.zoo import load_model
from runtime.parallelize import resolve_layout, tensor_parallel, vocab_parallel_loss
from runtime_helpers import run_ranks

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]   # runtime: needs torch >= the runtime's floor (planner/torch_compat.py)

TP = 2


def _sharded(model: str, sp: bool = False):
    """(config, the model built with seed 0 and split over TP ranks as the runtime splits it)."""
    spec = load_model(model)
    cfg = spec.config
    plan = Plan(tp=TP, micro_batch=2, global_batch=2, seq=16, sequence_parallel=sp)
    layout = resolve_layout(cfg, plan)
    assert vocab_parallel_loss(layout)
    part = spec.build("cpu").init_weights(0)
    tensor_parallel(part, init_device_mesh("cpu", (TP,)), layout, cfg, plan, first_stage=True, last_stage=True)
    return cfg, part


def assert_matches_unsplit(loss, sharded, reference, x, y) -> None:
    """The tensor-parallel model's loss (backward already run) and every parameter's
    gradient equal the unsplit `reference` model's on the same batch."""
    expected = reference(x, y)
    expected.backward()
    torch.testing.assert_close(loss.to_local(), expected, rtol=1e-6, atol=1e-6)
    sharded_params = dict(sharded.named_parameters())
    for name, p in reference.named_parameters():
        got = sharded_params[name].grad
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def _check_rank(rank: int, out_dir: str):
    from torch.distributed.tensor.parallel import loss_parallel
    cfg, sharded = _sharded("gpt-tiny")
    reference = load_model("gpt-tiny").build("cpu").init_weights(0)

    torch.manual_seed(1)
    x = torch.randint(0, cfg.vocab, (2, 16))
    y = torch.randint(0, cfg.vocab, (2, 16))
    logits = sharded(x)
    assert isinstance(logits, DTensor) and tuple(logits.placements) == (Shard(2),)
    assert logits.to_local().shape[-1] == cfg.vocab // TP   # never gathered onto one rank
    with loss_parallel():
        loss = sharded(x, y)
        loss.to_local().backward()
    assert_matches_unsplit(loss, sharded, reference, x, y)
    (Path(out_dir) / f"ok-{rank}").touch()   # the parent sees every rank get here


def test_vocab_parallel_head_and_loss_match_the_unsplit_model(tmp_path):
    run_ranks(TP, _check_rank, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok-{r}" for r in range(TP)]


def _count_rank(rank: int, out_dir: str, model: str, sp: bool):
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import loss_parallel
    cfg, part = _sharded(model, sp)
    x = torch.randint(0, cfg.vocab, (2, 16))
    with CommDebugMode() as comms, loss_parallel():
        part(x, x).to_local().backward()
    counts = {str(op).rsplit(".", 1)[-1]: n for op, n in comms.get_comm_counts().items()}
    if rank == 0:
        (Path(out_dir) / "counts.json").write_text(json.dumps(dict(counts=counts, layers=cfg.layers)))


# CommDebugMode's names for the collectives the simulator prices (planner.simulate.costing)
FUNCTIONAL_NAMES = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
                    "reduce_scatter": "reduce_scatter_tensor"}


def simulated_counts(model: str, sp: bool) -> dict:
    """The TP collectives the simulator charges for one micro-batch's forward and backward."""
    plan = Plan(tp=TP, micro_batch=2, global_batch=2, seq=16, sequence_parallel=sp)
    sim = prepare(plan, model, f"cpu:1x{TP}")
    counts = Counter()
    for layer in sim.traced.layers:
        timing = sim.timing(layer.index)
        counts.update(FUNCTIONAL_NAMES[kind] for kind, _ in timing.tp_comm_fwd + timing.tp_comm_bwd)
    return dict(counts)


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
def test_each_block_reduces_once_per_region_each_way(tmp_path, model, sp):
    """Megatron's count: per block one collective forward and one backward for each of
    attention and MLP (a Llama's q, k, v and gate, up share theirs); beyond the blocks the
    vocabulary-parallel embedding's and head's reductions and loss_parallel's three per-token
    statistics. The simulator charges exactly the collectives the runtime issues."""
    run_ranks(TP, _count_rank, str(tmp_path), model, sp)
    got = json.loads((tmp_path / "counts.json").read_text())
    per_block = 2 * 2 * got["layers"]   # 2 regions x (forward + backward)
    counts = got["counts"]
    if sp:   # each all-reduce becomes a reduce-scatter + an all-gather
        assert per_block <= counts["all_gather_into_tensor"] <= per_block + 2
        assert per_block <= counts["reduce_scatter_tensor"] <= per_block + 2
        assert counts["all_reduce"] <= 4
    else:
        assert per_block + 2 <= counts["all_reduce"] <= per_block + 5
        assert set(counts) == {"all_reduce"}
    assert simulated_counts(model, sp) == counts
