"""The simulator's communication volume is what the runtime sends.

Each plan trains gpt-tiny (or llama-tiny) on 4 gloo ranks; a second step runs under a
TorchDispatchMode that records every collective and point-to-point op with its buffer
size (nccl-tests' convention, the one CommModel prices: all-reduce's buffer, all-gather's
output, reduce-scatter's input, a send's message). Per rank and per group those bytes must
equal `SimResult.comm_bytes` of the same plan: tensor-parallel collectives (functional
collectives, from DTensor, including those it issues inside its own dispatch such as
loss_parallel's per-token statistics), the data-parallel all-reduce / all-gather / reduce-scatter of
replicate (ZeRO 0) and FSDP2 (ZeRO 1-3), pipeline sends, and the all-reduce that keeps a tied
embedding equal on the first and last stage, expert parallelism's all-to-alls (the
tokens' and the per-expert counts') and its experts' reductions over edp, and context
parallelism's K/V all-gathers and dK/dV reduce-scatters over cp (runtime.context_parallel).
Scalars the runtime reduces for gradient
clipping, loss logging and fp16 overflow checks (a few bytes each) are not part of a plan's
cost and are left out, under SMALL_BYTES.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from planner.plan import Plan
from planner.simulate import prepare
from runtime_helpers import run_ranks

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]   # runtime: needs torch >= the runtime's floor (planner/torch_compat.py)

WORLD = 4
SMALL_BYTES = 64
BASE = dict(seq=32, global_batch=8)
PLANS = {
    "ddp-dp4": ("gpt-tiny", dict(dp=4, micro_batch=1)),
    # ZeRO-1 (Megatron's distributed optimizer on FSDP2): one all-gather and one
    # reduce-scatter a step, with or without tensor and pipeline parallelism
    "zero1-dp4": ("gpt-tiny", dict(dp=4, zero=1, micro_batch=1, precision="fp32")),
    "zero1-dp2xtp2-bf16": ("gpt-tiny", dict(dp=2, tp=2, zero=1, micro_batch=1)),
    "zero1-pp2xdp2": ("gpt-tiny", dict(pp=2, dp=2, zero=1, micro_batch=1, precision="fp32")),
    "zero2-dp4-bf16": ("gpt-tiny", dict(dp=4, zero=2, micro_batch=1)),
    "zero3-dp4": ("gpt-tiny", dict(dp=4, zero=3, micro_batch=2, precision="fp32")),
    "pp2xdp2": ("gpt-tiny", dict(pp=2, dp=2, micro_batch=1, schedule="1f1b")),
    "dp2xtp2-full-ckpt": ("gpt-tiny", dict(dp=2, tp=2, micro_batch=2, checkpoint=["full"] * 4)),
    "pp2xtp2-sp": ("llama-tiny", dict(pp=2, tp=2, micro_batch=2, sequence_parallel=True)),
    # under a pipeline FSDP gathers once a step (ZeRO-3: again for backwards after a
    # resharding forward) and reduce-scatters once, after the stage's last backward
    "pp2xdp2-zero2": ("gpt-tiny", dict(pp=2, dp=2, zero=2, micro_batch=1, precision="fp32")),
    "pp2xdp2-zero3": ("gpt-tiny", dict(pp=2, dp=2, zero=3, micro_batch=1, precision="fp32")),
    "pp2xdp2-zero3-interleaved-bf16": ("gpt-tiny", dict(pp=2, dp=2, zero=3, micro_batch=1, schedule="interleaved",
                                                         interleave=2)),
    # expert parallelism (runtime.expert_parallel): per MoE block and micro-batch an all-to-all
    # of the E counts, then the tokens' dispatch and combine, each again backward (and
    # forward again under a full recompute); the experts' reductions over edp (none at edp 1)
    "moe-ep2xdp4-zero0": ("moe-tiny", dict(dp=4, ep=2, micro_batch=1, precision="fp32")),
    "moe-ep2xdp4-zero3-bf16": ("moe-tiny", dict(dp=4, ep=2, zero=3, micro_batch=1)),
    "moe-ep4-zero2-full-ckpt": ("moe-tiny", dict(dp=4, ep=4, zero=2, micro_batch=2, precision="fp32",
                                                 checkpoint=["full"] * 4)),
    "moe-ep2xpp2": ("moe-tiny", dict(pp=2, dp=2, ep=2, micro_batch=1, precision="fp32")),
    # context parallelism: per attention layer and micro-batch K and V gathered forward and
    # again backward (re-gathered when unpacked, or by a recompute's forward), dK and dV
    # reduce-scattered; gradients reduced over dp x cp (the same buffers as over dp alone)
    "cp2xdp2": ("gpt-tiny", dict(cp=2, dp=2, micro_batch=1, precision="fp32")),
    "llama-cp2xdp2-zero3-full-ckpt-bf16": ("llama-tiny", dict(cp=2, dp=2, zero=3, micro_batch=2,
                                                               checkpoint=["full"] * 4)),
}
# An all-to-all's send buffer (what nccl-tests counts) is this rank's tokens going out in the
# dispatch, but in the combine the rows its experts received - as many as the router sent
# them, data-dependent. Summed over the ranks of a pipeline stage both are the balanced
# volume the simulator charges each rank, so "ep/all_to_all" is compared as that sum.
ROUTED = "ep/all_to_all"


# c10d op -> (group, collective, which argument is the nccl-tests buffer). A c10d all-reduce
# is the DP gradient reduction or the tied embedding's (compared with their sum).
C10D_OPS = {"allreduce_": ("c10d", "all_reduce", 0), "_allgather_base_": ("dp", "all_gather", 0),
            "_reduce_scatter_base_": ("dp", "reduce_scatter", 1),
            "send": ("pp", "send", 0)}


def _nbytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return value.numel() * value.element_size()


def _group_name(args) -> str | None:
    """The name of the process group among a c10d op's arguments (a boxed ProcessGroup)."""
    from torch.distributed import ProcessGroup
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(a).group_name
            except RuntimeError:    # another boxed object (a ReduceOp)
                continue
    return None


class CollectiveRecorder(TorchDispatchMode):
    """{"group/collective": bytes} of the collectives dispatched while active. Functional
    collectives are DTensor's (tensor parallelism) and expert parallelism's all-to-alls;
    c10d ops are replicate's, FSDP2's, the pipeline's and the runtime's own. `labels`:
    {process group name: group} for c10d groups named apart (the experts' "edp")."""

    def __init__(self, labels: dict | None = None):
        super().__init__()
        self.bytes = Counter()
        self.labels = labels or {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # let DTensor run the op with this mode still active, so the collectives it
            # issues inside its own dispatch (loss_parallel's statistics) are recorded too
            return NotImplemented
        namespace, op = str(func).split(".")[:2]
        entry = None
        if namespace == "_c10d_functional":
            if op == "all_reduce":
                entry = ("tp", "all_reduce", _nbytes(args[0]))
            elif op == "all_gather_into_tensor":   # (input, group size, group name): the output is size x input
                entry = ("tp", "all_gather", _nbytes(args[0]) * int(args[1]))
            elif op == "reduce_scatter_tensor":
                entry = ("tp", "reduce_scatter", _nbytes(args[0]))
            elif op == "all_to_all_single":   # (input, output splits, input splits, group name)
                counts = not args[0].is_floating_point()   # the E per-expert counts: a plan's cost, however small
                entry = ("ep", "all_to_all_counts" if counts else "all_to_all", _nbytes(args[0]))
                if counts:
                    self.bytes["/".join(entry[:2])] += entry[2]
                    entry = None
        elif namespace == "c10d" and op in C10D_OPS:
            group, kind, position = C10D_OPS[op]
            group = self.labels.get(_group_name(args), group)
            entry = (group, kind, _nbytes(args[position]))
        if entry is not None and entry[2] >= SMALL_BYTES:
            self.bytes[f"{entry[0]}/{entry[1]}"] += entry[2]
        return func(*args, **(kwargs or {}))


def _record_rank(rank: int, out_dir: str):
    from planner.zoo import load_model
    from runtime import mesh
    from runtime.config import TrainingConfig
    from runtime.engine import Engine
    for name, (model, fields) in PLANS.items():
        plan = Plan(**BASE, **fields)
        rt = mesh.setup(plan, "cpu")
        engine = Engine(load_model(model), plan, rt, TrainingConfig(seed=0, lr=1e-3, weight_decay=0.0, warmup=0,
                                                                    steps=2, min_lr=1e-4, clip=1.0))
        rows = plan.global_batch // plan.dp
        generator = torch.Generator().manual_seed(rt.coords["dp"])
        inputs, targets = (torch.randint(0, 256, (rows, plan.seq), generator=generator) for _ in range(2))
        engine.step(inputs, targets, plan.micro_batch)   # the first step builds lazy state (FSDP, ZeRO)
        labels = {rt.expert_mesh.get_group("edp").group_name: "edp"} if plan.ep > 1 and plan.dp > plan.ep else {}
        if plan.cp > 1:
            labels[rt.group("cp").group_name] = "cp"
        recorder = CollectiveRecorder(labels)
        with recorder:
            engine.step(inputs, targets, plan.micro_batch)
        record = dict(pp=rt.coords["pp"], bytes=dict(recorder.bytes))
        Path(out_dir, f"{name}-{rank}.json").write_text(json.dumps(record))
        torch.distributed.barrier()


def simulated(model: str, plan: Plan, pp_rank: int) -> dict:
    """SimResult.comm_bytes of `pp_rank` in the recorder's keys."""
    volume = prepare(plan, model, f"cpu:1x{WORLD}").run().comm_bytes[pp_rank]
    flat = Counter()
    for group, kinds in volume.items():
        for kind, nbytes in kinds.items():
            # c10d all-reduces are DP's or the tied embedding's
            key = ("c10d" if group in ("dp", "tied") and kind == "all_reduce" else group, kind)
            flat["/".join(key)] += nbytes
    return dict(flat)


def cp_protocol(model: str, plan: Plan) -> dict:
    """The bytes per rank of the cp attention protocol (docs: /work/lc-plan.md; runtime.
    context_parallel), nccl-tests' buffers: per layer and micro-batch four all-gathers
    (K and V forward, again for backward) whose output is a whole sequence's K (or V) of
    the rank's kv heads, and two reduce-scatters (dK, dV) of that size."""
    from planner.zoo import load_model
    cfg = load_model(model).config
    width = 4 if plan.precision == "fp32" else 2
    whole = plan.micro_batch * plan.seq * cfg.kv_heads // plan.tp * cfg.head_dim * width
    times = cfg.layers // plan.pp * plan.grad_accum
    return {"cp/all_gather": 4 * whole * times, "cp/reduce_scatter": 2 * whole * times}


def expected_bytes(model: str, plan: Plan, pp_rank: int) -> dict:
    """The simulator's bytes; a cp plan's cp keys are also the protocol's. (Until the
    simulator prices cp - the cp planner's branch - they are the protocol's alone.)"""
    expected = simulated(model, plan, pp_rank)
    if plan.cp > 1:
        for key, nbytes in cp_protocol(model, plan).items():
            assert expected.setdefault(key, nbytes) == pytest.approx(nbytes, rel=1e-9), (key, expected)
    return expected


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("volume")
    run_ranks(WORLD, _record_rank, str(out), timeout=400.0)
    return out


@pytest.mark.parametrize("name", PLANS)
def test_simulated_communication_is_what_the_runtime_sends(recorded, name):
    model, fields = PLANS[name]
    plan = Plan(**BASE, **fields)
    routed, routed_expected = Counter(), Counter()
    for rank in range(WORLD):
        got = json.loads((recorded / f"{name}-{rank}.json").read_text())
        expected = expected_bytes(model, plan, got["pp"])
        assert set(got["bytes"]) == set(expected), (rank, got["bytes"], expected)
        for key, nbytes in got["bytes"].items():
            if key == ROUTED:
                routed[got["pp"]] += nbytes
                routed_expected[got["pp"]] += expected[key]
                continue
            assert nbytes == pytest.approx(expected[key], rel=1e-9), \
                (rank, key, got["bytes"], expected)
    for stage, nbytes in routed.items():
        assert nbytes == pytest.approx(routed_expected[stage], rel=1e-9), (stage, dict(routed), dict(routed_expected))
