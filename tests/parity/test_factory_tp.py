"""Tensor parallelism of a file.py:factory model (2 ranks, gloo): the layout the TP-layout ILP
picks for the residual MLP's blocks, applied as the runtime applies it (DTensor on the
linears it names), trains the same loss and gradients as the unsplit model, and issues
exactly the collectives the simulator charges (planner.simulate.factory_tp)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from cost_models import MeshplanError
from cost_models.cluster import parse_cluster
from cost_models.comm import CommModel
from cost_models.compute import ComputeModel
from helpers import REPO
from planner.plan import Plan
from planner.search.tp_ilp import layouts_for
from planner.simulate import prepare
from planner.trace import trace_model
from planner.zoo import load_model
from runtime_helpers import run_ranks

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]

TP = 2
MLP = f"{REPO}/examples/mlp.py:factory"
FUNCTIONAL_NAMES = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
                    "reduce_scatter": "reduce_scatter_tensor"}


def ilp_layout() -> dict:
    """What the planner puts in a tp 2 plan of the MLP, solved where splitting pays: the same
    blocks at A100 width (examples/mlp.py:wide), whose module paths the small model shares."""
    cluster = parse_cluster("a100-sxm-80gb:1x2")
    comm = CommModel(cluster)
    traced = trace_model(f"{REPO}/examples/mlp.py:wide", 64, 1, "bf16")
    blocks = layouts_for(traced, ComputeModel(cluster.gpu), comm, comm.group({"tp": TP}, "tp"), factory=True)
    return {k: v for k, v in blocks.plan_layout().items() if v != "replicate"}


def _plan(layout: dict) -> Plan:
    return Plan(tp=TP, micro_batch=4, global_batch=4, seq=1, precision="fp32", tp_layout=layout)


def _rank(rank: int, out_dir: str, layout: dict):
    from torch.distributed.tensor.debug import CommDebugMode
    from runtime.modules import FactoryModel
    spec, plan = load_model(MLP), _plan(layout)
    sharded, reference = FactoryModel(spec, plan, "cpu", 0), FactoryModel(spec, plan, "cpu", 0)
    sharded.tensor_parallel(sharded.module, init_device_mesh("cpu", (TP,)))
    args, _ = sharded.example
    with CommDebugMode() as comms:
        loss = sharded.module(*args)
        loss.backward()
    expected = reference.module(*args)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    split = 0
    params = dict(sharded.module.named_parameters())
    for name, p in reference.module.named_parameters():
        got = params[name].grad
        split += isinstance(got, DTensor) and got.placements[0].is_shard()
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    counts = {str(op).rsplit(".", 1)[-1]: n for op, n in comms.get_comm_counts().items()}
    if rank == 0:
        (Path(out_dir) / "counts.json").write_text(json.dumps(dict(counts=counts, split=split)))


def simulated_counts(layout: dict) -> dict:
    sim = prepare(_plan(layout), MLP, f"cpu:1x{TP}")
    counts = Counter()
    for layer in sim.traced.layers:
        timing = sim.timing(layer.index)
        counts.update(FUNCTIONAL_NAMES[kind] for kind, _ in timing.tp_comm_fwd + timing.tp_comm_bwd)
    return dict(counts)


def test_ilp_layout_runs_as_simulated(tmp_path):
    layout = ilp_layout()
    assert layout == {"fc1": "colwise", "fc2": "rowwise"}   # Megatron's MLP split, found for a factory
    run_ranks(TP, _rank, str(tmp_path), layout)
    got = json.loads((tmp_path / "counts.json").read_text())
    blocks = 8
    assert got["split"] == 3 * blocks   # fc1 weight and bias, fc2 weight: DTensor shards on every rank
    # one all-reduce forward (fc2's partial sums) and one backward (fc1's input gradient) per block
    assert got["counts"] == {"all_reduce": 2 * blocks}
    assert simulated_counts(layout) == got["counts"]


def test_simulated_time_and_memory_follow_the_split():
    """The split block keeps fewer parameters per GPU than the whole one, and communicates."""
    layout = {"fc1": "colwise", "fc2": "rowwise"}
    split = prepare(_plan(layout), MLP, f"cpu:1x{TP}")
    whole = prepare(Plan(dp=TP, micro_batch=4, global_batch=8, seq=1, precision="fp32"), MLP, f"cpu:1x{TP}")
    block = split.traced.blocks[0]
    a, b = split.timing(block), whole.timing(block)
    width = 64
    fc_params = 2 * 4 * width * width + 4 * width + width
    assert b.params_per_gpu - a.params_per_gpu == pytest.approx((fc_params - width) / TP)   # fc2's bias stays whole
    assert not b.tp_comm_fwd and not b.tp_comm_bwd
    assert [k for k, _ in a.tp_comm_fwd] == ["all_reduce"] and [k for k, _ in a.tp_comm_bwd] == ["all_reduce"]
    assert a.tp_comm_fwd[0][1] == 4 * width * 4   # micro-batch 4 x width, fp32


@pytest.mark.parametrize("layout,fragment", [
    ({}, "needs a tp_layout"), ({"fc3": "colwise"}, "'fc3' names no linear"),
    ({"norm": "colwise"}, "'norm' names no linear"), ({"fc1": "vocab"}, "not a style the runtime applies"),
])
def test_simulate_refuses_a_layout_the_runtime_cannot_apply(layout, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        prepare(_plan(layout), MLP, f"cpu:1x{TP}")
