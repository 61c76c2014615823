"""precision fp8 in the runtime: torchao's float8 linears, trained for real on gloo ranks.

The block linears become torchao Float8Linear (the embedding and head do not), and a tiny
Llama trains 5 steps under fp8 plans - one process, FSDP2 dp2 with the tensorwise float8
all-gather (ZeRO 3) and rowwise (ZeRO 2), tensor parallelism tp2 - against the same batch in
bf16 in one process. torch._scaled_mm runs float8 GEMMs on CPU (torch >= 2.13), so the
casts, scales and float8 all-gathers are the ones a GPU runs. Bound: each step's loss within
a relative FP8_BOUND of bf16's: e4m3 keeps 3 mantissa bits (a relative rounding error of up to
2^-4 an element), which the GEMMs' sums average down; measured on CPU/gloo: <= 4.4e-3 (rowwise ZeRO 2), so 2e-2 leaves room without
letting a bf16-sized error (or a broken cast) pass unnoticed: the losses must differ from bf16's too.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from runtime_helpers import run_ranks, step_losses, train_many, write_plan

torchao = pytest.importorskip("torchao.float8")
pytestmark = [pytest.mark.runtime, pytest.mark.distributed]


def _cpu_scaled_mm() -> bool:
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


if not _cpu_scaled_mm():
    pytest.skip(f"torch {torch.__version__} has no float8 GEMM on CPU (torch._scaled_mm; 2.13 has)",
                allow_module_level=True)

STEPS = 5
BASE = dict(seq=32, global_batch=8)
MODEL = "llama-tiny"
FP8_BOUND = 2e-2
LINEARS_PER_BLOCK = 7   # q, k, v, o; gate, up, down

# name: (ranks, plan fields)
PLANS = {
    "tensorwise-1": (1, dict(micro_batch=2, precision="fp8")),
    "rowwise-1": (1, dict(micro_batch=2, precision="fp8", fp8_recipe="rowwise")),
    "tensorwise-zero3-dp2": (2, dict(dp=2, zero=3, micro_batch=2, precision="fp8")),
    "rowwise-zero2-dp2": (2, dict(dp=2, zero=2, micro_batch=2, precision="fp8", fp8_recipe="rowwise")),
    "tensorwise-tp2": (2, dict(tp=2, micro_batch=2, precision="fp8")),
}


def _args(plan, log):
    return ["--model", MODEL, "--plan", str(plan), "--steps", str(STEPS), "--log-json", str(log), "--quiet",
            "--device", "cpu", "--seed", "3", "--lr", "1e-2"]


def _inspect_then_train(rank: int, plans: dict, out_dir: str, runs: list):
    """Build each plan's Engine and record which modules are Float8Linear; then train."""
    from planner.plan import Plan
    from planner.zoo import load_model
    from runtime import mesh
    from runtime.config import TrainingConfig
    from runtime.engine import Engine
    from torch.distributed.tensor.debug import CommDebugMode
    for name, path in plans.items():
        plan = Plan.load(path)
        rt = mesh.setup(plan, "cpu")
        engine = Engine(load_model(MODEL), plan, rt, TrainingConfig(steps=1))
        kinds = {n: type(m).__name__ for part in engine.parts.values() for n, m in part.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
        gathered = [type(p.to_local() if hasattr(p, "to_local") else p).__name__
                    for part in engine.parts.values() for n, p in part.named_parameters() if n.endswith("q.weight")]
        counts = {}
        if plan.tp > 1:   # the collectives one step issues (CommDebugMode's module tracker: TP plans only)
            # one micro-batch (the tracker loses its module stack across several backwards)
            rows = torch.randint(0, 256, (plan.micro_batch, plan.seq + 1), generator=torch.Generator().manual_seed(0))
            with CommDebugMode() as comm:
                engine.step(rows[:, :-1], rows[:, 1:], plan.micro_batch)
            counts = {str(k).rsplit(".", 1)[-1]: v for k, v in comm.get_comm_counts().items()}
        with open(f"{out_dir}/{name}-{rank}.json", "w") as f:
            json.dump(dict(kinds=kinds, linears=engine.fp8_linears, weights=gathered, comm=counts), f)
    train_many(rank, runs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    ref = write_plan(d / "bf16.json", micro_batch=2, precision="bf16", **BASE)
    paths = {name: write_plan(d / f"{name}.json", **fields, **BASE) for name, (_, fields) in PLANS.items()}
    paths["bf16-tp2"] = write_plan(d / "bf16-tp2.json", tp=2, micro_batch=2, precision="bf16", **BASE)
    for world in (1, 2):
        names = [n for n, (ranks, _) in PLANS.items() if ranks == world] + (["bf16-tp2"] if world == 2 else [])
        jobs = ([_args(ref, d / "bf16.jsonl")] if world == 1 else []) + [_args(paths[n], d / f"{n}.jsonl")
                                                                          for n in names if n in PLANS]
        run_ranks(world, _inspect_then_train, {n: str(paths[n]) for n in names}, str(d), jobs, timeout=300)
    return d


def _losses(path):
    return step_losses(path, STEPS)


@pytest.mark.parametrize("name", list(PLANS))
def test_fp8_losses_follow_bf16(runs, name):
    expected, got = _losses(runs / "bf16.jsonl"), _losses(runs / f"{name}.jsonl")
    diffs = [abs(a - b) / abs(b) for a, b in zip(got, expected)]
    print(f"{name}: max relative loss difference to bf16 {max(diffs):.2e}")
    assert max(diffs) <= FP8_BOUND, f"{name}: per-step relative differences {diffs} exceed {FP8_BOUND}"
    assert got != expected          # float8 GEMMs ran: the losses are not bf16's bit for bit


@pytest.mark.parametrize("name", list(PLANS))
def test_block_linears_are_float8_and_the_rest_is_not(runs, name):
    ranks = PLANS[name][0]
    for rank in range(ranks):
        seen = json.loads((runs / f"{name}-{rank}.json").read_text())
        kinds = seen["kinds"]
        blocks = {n: k for n, k in kinds.items() if n.startswith("blocks.")}
        outside = {n: k for n, k in kinds.items() if not n.startswith("blocks.")}
        assert blocks and set(blocks.values()) == {"Float8Linear"}, blocks
        assert outside and "Float8Linear" not in outside.values(), outside   # embedding and head stay bf16
        assert seen["linears"] == len(blocks) == 4 * LINEARS_PER_BLOCK
        if name.startswith("tensorwise-zero"):   # FSDP2 gathers these weights in float8
            assert set(seen["weights"]) == {"WeightWithDynamicFloat8CastTensor"}


def test_tensor_parallel_amax_all_reduces_are_the_simulators(runs):
    """The all-reduces a tp2 float8 micro-batch adds over bf16's are the simulator's amax
    reductions (planner.simulate.fp8.TP_AMAX_ALL_REDUCES) for its 28 float8 linears."""
    from planner.simulate.fp8 import TP_AMAX_ALL_REDUCES
    seen = {n: json.loads((runs / f"{n}-0.json").read_text())["comm"] for n in ("tensorwise-tp2", "bf16-tp2")}
    extra = seen["tensorwise-tp2"]["all_reduce"] - seen["bf16-tp2"]["all_reduce"]
    assert extra == sum(TP_AMAX_ALL_REDUCES["tensorwise"]) * 4 * LINEARS_PER_BLOCK


def test_train_refuses_fp8_without_torchao_or_on_a_gpu_without_it(tmp_path, capsys, monkeypatch):
    """One line, exit 2, before any process group: torchao missing (`pip install 'meshplan[fp8]'`),
    or --gpu naming a GPU without float8 tensor cores."""
    from runtime.train import main
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = write_plan(tmp_path / "fp8.json", micro_batch=2, precision="fp8", **BASE)
    args = ["--model", MODEL, "--plan", str(plan), "--steps", "1", "--quiet"]
    for argv, fragment in (([*args, "--gpu", "a100"], "no float8 tensor cores"),
                           (args, "torchao")):
        if fragment == "torchao":
            monkeypatch.setitem(sys.modules, "torchao.float8", None)   # import torchao.float8 -> ImportError
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("meshplan: error: ") and fragment in err[0], err
