"""Expert parallelism computes what one process computes (runtime.expert_parallel).

moe-tiny (a dense first block, then 4 routed experts top-2 and a shared one per block)
takes one step on the same global batch in one process and under 4-rank ep plans - ep
folded into dp 4 (ep2 x edp2, ep4) and into dp 2 under a 2-stage pipeline, under ZeRO 0,
2 and 3, with a full and a selective recompute (whose backward runs the all-to-alls
again). Every parameter's gradient (gathered whole: an expert slice is a DTensor over (edp, ep)) must equal the single
process's to the tolerance of the tensor-parallel check (tests/parity/test_tp_collectives.py:
rtol 1e-5, atol 1e-6; measured on gloo, 2.10 and 2.13: <= 6e-7 of the largest gradient),
so each expert slice reduces over edp divided by dp, not edp; and the loss and the global
gradient norm to the equivalence tests' 1e-5. Clipping is off, so the gradients are raw.

A checkpoint of an ep plan resumes under the same plan bit for bit, and under ep4 and
ep 1 (DCP reshards the (E, ...) expert tensors) to the same step-3 loss. A file.py:factory
model made of planner.arch.moe blocks trains under ep2 x pp2 - cut by runtime.split - as in
one process (on torch < 2.13, whose pipelines cannot pass its integer targets, under ep2 x
dp4).
"""
from __future__ import annotations

import functools

import pytest
import torch

from cost_models.errors import MeshplanError
from helpers import FIXTURES, REPO
from planner.plan import Plan
from planner.torch_compat import pipeline_passes_integer_tensors
from planner.zoo import load_model
from runtime_helpers import drop_checkpoints_after, read_jsonl, run_ranks, train_many, write_plan

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]   # runtime: needs torch >= the runtime's floor (planner/torch_compat.py)

BASE = dict(seq=32, global_batch=8, precision="fp32")
REFERENCE = dict(micro_batch=2)
CASES = {
    # selective recompute: the experts' replicate hooks inside the checkpointed block (torch_compat)
    "ep2xdp4-zero0-selective": dict(dp=4, ep=2, micro_batch=1, checkpoint=["selective"] * 4),
    "ep2xdp4-zero2-full-recompute": dict(dp=4, ep=2, zero=2, micro_batch=1, checkpoint=["full"] * 4),
    "ep4-zero3": dict(dp=4, ep=4, zero=3, micro_batch=2),
    "ep2xpp2-1f1b": dict(pp=2, dp=2, ep=2, micro_batch=1, schedule="1f1b"),
    "ep2xpp2-zero3": dict(pp=2, dp=2, ep=2, zero=3, micro_batch=1),
}
BOUND = 1e-5


def _one_step(rank: int, cases: dict, out_dir: str):
    """Worker body: for each plan, one step on this rank's rows of one global batch; saves
    the loss, the gradient norm and every gradient this rank holds, gathered whole."""
    from torch.distributed.tensor import DTensor
    from runtime import mesh
    from runtime.config import TrainingConfig
    from runtime.engine import Engine
    for name, fields in cases.items():
        plan = Plan(**BASE, **fields)
        rt = mesh.setup(plan, "cpu")
        engine = Engine(load_model("moe-tiny"), plan, rt, TrainingConfig(seed=3, lr=1e-3, weight_decay=0.0, warmup=0,
                                                                         steps=1, min_lr=1e-4, clip=0.0))
        rows = torch.randint(0, 256, (plan.global_batch, plan.seq + 1), generator=torch.Generator().manual_seed(0))
        per = plan.global_batch // plan.dp
        mine = rows[rt.coords["dp"] * per:(rt.coords["dp"] + 1) * per]
        names = {id(p): n for module in engine.modules.values() for n, p in module.named_parameters()}
        grads = {}

        def keep(optimizer, *_):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:   # full_tensor: a collective over the same params on each rank
                        grads[names[id(p)]] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()

        for optimizer in engine.optimizers:
            optimizer.register_step_pre_hook(keep)
        result = engine.step(mine[:, :-1], mine[:, 1:], plan.micro_batch)
        torch.save(dict(loss=result["loss"], grad_norm=result["grad_norm"], grads=grads), f"{out_dir}/{name}-{rank}.pt")
        if rt.distributed:
            torch.distributed.barrier()


def _one_step_then_train(rank: int, cases: dict, out_dir: str, runs: list):
    _one_step(rank, cases, out_dir)
    train_many(rank, runs)


def _train_args(plan, log, extra=(), model="moe-tiny"):
    return ["--model", model, "--plan", str(plan), "--steps", "3", "--log-json", str(log), "--quiet",
            "--device", "cpu", "--seed", "3", "--lr", "1e-2", *map(str, extra)]


FACTORY = f"{FIXTURES}/moe_factory.py:factory"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("expert_parallel")
    alone = write_plan(d / "factory-1.json", micro_batch=2, **BASE)
    run_ranks(1, _one_step_then_train, {"reference": REFERENCE}, str(d),
              [_train_args(alone, d / "factory-1.jsonl", model=FACTORY)], timeout=120)
    split = dict(pp=2, dp=2, ep=2, schedule="1f1b") if pipeline_passes_integer_tensors() else dict(dp=4, ep=2)
    factory = write_plan(d / "factory-ep.json", micro_batch=1, **split, **BASE)
    # Checkpoints: ep2 x dp4 ZeRO 2 saves at step 2; steps 3 again from it under the same plan,
    # under ep4 ZeRO 3 and under plain dp4 (ep 1).
    saving = write_plan(d / "ep2-zero2.json", dp=4, ep=2, zero=2, micro_batch=1, **BASE)
    resumes = {"same": saving, "ep4-zero3": write_plan(d / "ep4-zero3.json", dp=4, ep=4, zero=3, micro_batch=2, **BASE),
               "ep1": write_plan(d / "dp4.json", dp=4, micro_batch=1, **BASE)}
    ckpt = d / "ckpt"
    jobs = [_train_args(factory, d / "factory-ep.jsonl", model=FACTORY),
            _train_args(saving, d / "straight.jsonl", ("--checkpoint-dir", ckpt, "--checkpoint-every", "2"))]
    for name, plan in resumes.items():
        jobs += [functools.partial(drop_checkpoints_after, ckpt, 2),
                 _train_args(plan, d / f"resume-{name}.jsonl", ("--checkpoint-dir", ckpt, "--resume"))]
    run_ranks(4, _one_step_then_train, CASES, str(d), jobs, timeout=300)
    return d


@pytest.mark.parametrize("name", list(CASES))
def test_ep_step_equals_one_process(runs, name):
    ref = torch.load(runs / "reference-0.pt")
    covered = set()
    for rank in range(4):
        got = torch.load(runs / f"{name}-{rank}.pt")
        assert abs(got["loss"] - ref["loss"]) <= BOUND * abs(ref["loss"]), (rank, got["loss"], ref["loss"])
        assert abs(got["grad_norm"] - ref["grad_norm"]) <= BOUND * ref["grad_norm"], (rank, got["grad_norm"])
        for param, grad in got["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][param], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, p=param, r=rank: f"rank {r}, gradient of {p}: {m}")
        covered |= set(got["grads"])
    assert covered == set(ref["grads"])
    assert any(".moe.experts." in p for p in covered) and any(".moe.shared." in p for p in covered)


def test_ep_checkpoint_resumes_under_any_ep(runs):
    straight = read_jsonl(runs / "straight.jsonl")
    assert [r["step"] for r in straight] == [1, 2, 3]
    assert straight[1]["loss"] != straight[2]["loss"]   # lr 1e-2: step 3 depends on what was restored
    same = read_jsonl(runs / "resume-same.jsonl")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in same] == \
        [(3, straight[2]["loss"], straight[2]["grad_norm"])]
    for name in ("ep4-zero3", "ep1"):
        (resumed,) = read_jsonl(runs / f"resume-{name}.jsonl")
        assert resumed["step"] == 3
        assert resumed["loss"] == pytest.approx(straight[2]["loss"], rel=BOUND), name
        assert resumed["grad_norm"] == pytest.approx(straight[2]["grad_norm"], rel=BOUND), name


def test_a_factory_moe_model_trains_under_ep_as_in_one_process(runs):
    alone, split = read_jsonl(runs / "factory-1.jsonl"), read_jsonl(runs / "factory-ep.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3]
    for a, b in zip(split, alone):
        assert a["loss"] == pytest.approx(b["loss"], rel=BOUND)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=BOUND)


@pytest.mark.parametrize("model, fields, words", [
    ("gpt-tiny", dict(dp=4, ep=2), "needs a Mixture-of-Experts model"),
    (f"{REPO}/examples/mlp.py:factory", dict(dp=4, ep=2, seq=1), "needs a Mixture-of-Experts model"),
    ("moe-tiny", dict(dp=8, ep=8), "must divide the model's 4 experts"),
])
def test_ep_plans_the_runtime_cannot_run_are_refused_in_one_line(model, fields, words):
    from runtime.engine import check_plan
    with pytest.raises(MeshplanError, match=words) as info:
        check_plan(load_model(model), Plan(**{**BASE, "micro_batch": 1, **fields}))
    assert "\n" not in str(info.value)
