"""The simulator's model-state bytes are what a runtime rank holds.

Each plan trains gpt-tiny (moe-tiny under expert parallelism) on 4 gloo ranks. In the second step every rank adds up the
storages it really holds - its parameters (FSDP: the sharded ones), FSDP's unsharded
parameters, every gradient buffer (`.grad`, FSDP's unsharded and accumulated ones) and
the optimizer's state - at the end of its last backward: just before a pipeline stage's
once-a-step gradient reduction (`PipelineStage.perform_reduce_grad`), and just before
the optimizer step. The larger of the two moments must equal
`_Simulation.held_states` of the rank's pipeline stage, part by part.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from planner.plan import Plan
from planner.simulate import prepare
from planner.torch_compat import fsdp_param_groups
from runtime_helpers import run_ranks

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]   # runtime: needs torch >= the runtime's floor (planner/torch_compat.py)
WORLD = 4
BASE = dict(seq=32, global_batch=8, micro_batch=1)
PLANS = {
    "dp4-zero0": dict(dp=4, precision="fp32"),
    "dp4-zero1-bf16": dict(dp=4, zero=1),
    "dp2xtp2-zero1": dict(dp=2, tp=2, zero=1, precision="fp32"),
    "pp2xdp2-zero1": dict(pp=2, dp=2, zero=1, precision="fp32"),
    "dp4-zero2-bf16": dict(dp=4, zero=2),
    "dp4-zero3": dict(dp=4, zero=3, precision="fp32"),
    "pp2xdp2-zero0": dict(pp=2, dp=2, precision="fp32"),
    "pp2xdp2-zero2-bf16": dict(pp=2, dp=2, zero=2),
    "pp2xdp2-zero3": dict(pp=2, dp=2, zero=3, precision="fp32"),
    "pp2xdp2-zero3-interleaved": dict(pp=2, dp=2, zero=3, schedule="interleaved", interleave=2, precision="fp32"),
    # expert parallelism: each rank holds E/ep experts, sharded further over edp by ZeRO
    "moe-ep2xdp4-zero0": dict(dp=4, ep=2, precision="fp32"),
    "moe-ep2xdp4-zero3": dict(dp=4, ep=2, zero=3, precision="fp32"),
    "moe-ep4-zero1-bf16": dict(dp=4, ep=4, zero=1),
    "moe-ep2xpp2-zero2": dict(pp=2, dp=2, ep=2, zero=2, precision="fp32"),
}


def _model(name: str) -> str:
    return "moe-tiny" if name.startswith("moe-") else "gpt-tiny"


class StateBytes:
    """Live storage bytes of one engine's model states, by part, at its largest moment."""

    def __init__(self, engine):
        self.engine, self.peak = engine, Counter()

    def snapshot(self):
        seen, held = set(), Counter()

        def add(part, tensor):
            if tensor is None:
                return
            local = tensor._local_tensor if isinstance(tensor, DTensor) else tensor
            storage = local.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held[part] += storage.nbytes()

        for module in self.engine.modules.values():
            # FSDP registers whichever of its sharded and unsharded parameters is current:
            # name both from its own records first
            for sub in module.modules():
                for fsdp_param in _fsdp_params(sub):
                    add("params_bytes", fsdp_param.sharded_param)
                    add("grads_bytes", fsdp_param.sharded_param.grad)
                    unsharded = getattr(fsdp_param, "_unsharded_param", None)
                    add("unsharded_bytes", unsharded)
                    add("grads_bytes", fsdp_param.unsharded_accumulated_grad)
                    add("grads_bytes", None if unsharded is None else unsharded.grad)
            for p in module.parameters():
                add("params_bytes", p)
                add("grads_bytes", p.grad)
        for optimizer in self.engine.optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.dim():   # not the scalar step counts
                        add("optimizer_bytes", value)
        if sum(held.values()) > sum(self.peak.values()):
            self.peak = held

    def watch(self):
        """Snapshot before each micro-batch's forward, each pipeline stage's gradient
        reduction and each optimizer step."""
        for module in self.engine.modules.values():
            module.register_forward_pre_hook(lambda *_: self.snapshot())
        for stage in getattr(self.engine, "stages", []) or []:
            reduce = stage.perform_reduce_grad

            def before_reduce(*args, _reduce=reduce, **kwargs):
                self.snapshot()
                return _reduce(*args, **kwargs)
            stage.perform_reduce_grad = before_reduce
        for optimizer in self.engine.optimizers:
            optimizer.register_step_pre_hook(lambda *_: self.snapshot())


def _fsdp_params(module):
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(module, FSDPModule):
        return []
    state = module._get_fsdp_state()
    return [p for group in fsdp_param_groups(state) for p in group.fsdp_params]


def _measure_rank(rank: int, out_dir: str):
    from planner.zoo import load_model
    from runtime import mesh
    from runtime.config import TrainingConfig
    from runtime.engine import Engine
    for name, fields in PLANS.items():
        plan = Plan(**BASE, **fields)
        rt = mesh.setup(plan, "cpu")
        engine = Engine(load_model(_model(name)), plan, rt, TrainingConfig(seed=0, lr=1e-3, weight_decay=0.0,
                                                                         warmup=0, steps=2, min_lr=1e-4, clip=1.0))
        rows = plan.global_batch // plan.dp
        inputs, targets = (torch.randint(0, 256, (rows, plan.seq)) for _ in range(2))
        engine.step(inputs, targets, plan.micro_batch)   # the first step creates the optimizer state
        measured = StateBytes(engine)
        measured.watch()
        engine.step(inputs, targets, plan.micro_batch)
        Path(out_dir, f"{name}-{rank}.json").write_text(json.dumps(dict(pp=rt.coords["pp"], bytes=measured.peak)))
        torch.distributed.barrier()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("states")
    run_ranks(WORLD, _measure_rank, str(out), timeout=400.0)
    return out


@pytest.mark.parametrize("name", PLANS)
def test_simulated_model_states_are_what_each_rank_holds(measured, name):
    plan = Plan(**BASE, **PLANS[name])
    sim = prepare(plan, _model(name), f"cpu:1x{WORLD}")
    stages = sim.stage_layers()
    for rank in range(WORLD):
        got = json.loads((measured / f"{name}-{rank}.json").read_text())
        expected = sim.held_states(got["pp"], stages)._asdict()
        assert {k: v for k, v in got["bytes"].items() if v} == {k: pytest.approx(v) for k, v in expected.items() if v}, \
            (rank, got, expected)
