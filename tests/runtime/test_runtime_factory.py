"""Any nn.Module as --model (file.py:factory): the example MLP and ResNet train 20 steps on 4
gloo ranks with a data-parallel and a pipeline plan that `meshplan plan` wrote, and a
factory plan the runtime cannot run ends in one line and exit code 2.

Both plans of one model see the same weights (built from the seed) and the same global
batches (example_inputs seeded by step), so in fp32 the MLP's losses must agree step for
step whatever the layout; the ResNet trains in bf16 - under ZeRO 1 (FSDP holds 16-bit
parameters and casts the inputs, BatchNorm kept in fp32) and under autocast across four
pipeline stages - where BatchNorm's statistics over other micro-batch sizes make the
two runs close, not equal.
"""
from __future__ import annotations

import math

import pytest

from helpers import FIXTURES, REPO
from planner.torch_compat import pipeline_passes_integer_tensors
from runtime.train import main
from runtime_helpers import planned, read_jsonl, run_ranks, train_many, write_plan

pytestmark = [pytest.mark.runtime, pytest.mark.distributed]

MLP = f"{REPO}/examples/mlp.py:factory"
RESNET = f"{REPO}/examples/resnet.py:factory"
STEPS = 20


def _train_both(tmp_path, model: str, plans: dict) -> dict:
    """Each plan trained in turn in one 4-rank job; {name: per-step records}."""
    runs = [["--model", model, "--plan", path, "--steps", STEPS, "--lr", 3e-3, "--device", "cpu", "--quiet",
             "--log-json", tmp_path / f"{name}.jsonl"] for name, path in plans.items()]
    run_ranks(4, train_many, [[str(a) for a in run] for run in runs])
    return {name: read_jsonl(tmp_path / f"{name}.jsonl") for name in plans}


def _falls(losses: list) -> bool:
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def _refuses_pipelines_before_2_13(tmp_path, model: str, plan) -> None:
    """torch 2.10-2.12 cannot pass the factories' integer labels between stages: one line, exit 2."""
    args = ["--model", model, "--plan", str(plan), "--steps", "1", "--device", "cpu"]
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "runtime.train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "torch >= 2.13" in lines[0], proc.stderr


def test_mlp_trains_the_same_with_a_dp_and_a_pp_plan(tmp_path):
    """And with tp x pp: the ILP's MLP split (tests/parity/test_factory_tp.py) on pipeline stages."""
    common = dict(micro_batch=4, global_batch=32, seq=1, precision="fp32")
    if not pipeline_passes_integer_tensors():
        _refuses_pipelines_before_2_13(tmp_path, MLP, planned(tmp_path / "pp.json", MLP, pp=4, schedule="1f1b",
                                                              **common))
        dp = [r["loss"] for r in _train_both(tmp_path, MLP, {"dp": planned(tmp_path / "dp.json", MLP, dp=4, zero=0,
                                                                           **common)})["dp"]]
        assert len(dp) == STEPS and _falls(dp)
        return
    records = _train_both(tmp_path, MLP, {
        "dp": planned(tmp_path / "dp.json", MLP, dp=4, zero=0, **common),
        "pp": planned(tmp_path / "pp.json", MLP, pp=4, schedule="1f1b", **common),
        "tp_pp": write_plan(tmp_path / "tp_pp.json", tp=2, pp=2, tp_layout={"fc1": "colwise", "fc2": "rowwise"},
                            **common),
    })
    dp, pp, tp_pp = ([r["loss"] for r in records[k]] for k in ("dp", "pp", "tp_pp"))
    assert len(dp) == len(pp) == len(tp_pp) == STEPS
    assert pp == pytest.approx(dp, rel=1e-4)   # measured: equal to 1e-6
    assert tp_pp == pytest.approx(dp, rel=1e-4)
    assert _falls(dp)


def test_resnet_trains_in_bf16_with_a_dp_and_a_pp_plan(tmp_path):
    if not pipeline_passes_integer_tensors():
        _refuses_pipelines_before_2_13(tmp_path, RESNET, planned(
            tmp_path / "pp.json", RESNET, pp=4, schedule="1f1b", micro_batch=4, global_batch=32, seq=1, precision="bf16"))
        return
    records = _train_both(tmp_path, RESNET, {
        "dp": planned(tmp_path / "dp.json", RESNET, dp=4, zero=1, micro_batch=8, global_batch=32, seq=1,
                      precision="bf16"),
        "pp": planned(tmp_path / "pp.json", RESNET, pp=4, schedule="1f1b", micro_batch=4, global_batch=32, seq=1,
                      precision="bf16"),
    })
    for name, recs in records.items():
        losses = [r["loss"] for r in recs]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), name
        assert _falls(losses), (name, losses)
    # one set of weights, one first batch: the first losses differ by BatchNorm's batch size only
    assert records["pp"][0]["loss"] == pytest.approx(records["dp"][0]["loss"], rel=0.02)


@pytest.mark.parametrize("model,fields,fragments", [
    (f"{FIXTURES}/mlp_model.py:mlp", {}, ["not a scalar loss", "return the loss"]),
    (MLP, dict(dp=1, tp=2), ["needs a tp_layout", "meshplan plan"]),
    (RESNET, dict(tp=2, tp_layout={"conv1": "colwise"}), ["is a Conv2d", "nn.Linear"]),
    (MLP, dict(tp=2, tp_layout={"fc3": "colwise"}), ["'fc3' names no module"]),
    (f"{FIXTURES}/branchy_model.py:branchy", dict(pp=3, micro_batch=1, global_batch=3),
     ["torch.fx", "use pp 1"]),
    (MLP, dict(pp=9, global_batch=36), ["9", "8 layers"]),
    (MLP, dict(tp=2, sequence_parallel=True, tp_layout={"fc1": "colwise", "fc2": "rowwise"}),
     ["sequence parallelism needs a preset"]),
])
def test_a_factory_plan_the_runtime_cannot_run_is_one_line(tmp_path, capsys, model, fields, fragments):
    plan = write_plan(tmp_path / "plan.json", **{**dict(micro_batch=4, global_batch=8, seq=1, precision="fp32"),
                                                 **fields})
    assert main(["--model", model, "--plan", str(plan), "--steps", "1", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshplan: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
