"""The search on file.py:factory models: it plans the example MLP and ResNet on a DGX A100,
skips the candidates a model cannot take (more stages than blocks, tp that splits nothing,
a pipeline torch.fx cannot cut) instead of aborting, says in one line why when nothing is
left, and gives a factory tensor parallelism where the TP-layout ILP splits its linears."""
from __future__ import annotations

import pytest

from helpers import FIXTURES, REPO, assert_user_error
from planner import plan
from planner.plan import Plan

MLP = f"{REPO}/examples/mlp.py:factory"
RESNET = f"{REPO}/examples/resnet.py:factory"
BLOCKS = {MLP: 8, RESNET: 6}


@pytest.mark.parametrize("model", [MLP, RESNET])
def test_factory_plans_on_dgx_a100(cli, tmp_path, model):
    out = tmp_path / "plan.json"
    r = cli("plan", "--model", model, "--cluster", "dgx-a100", "--global-batch", "256", "--seq", "1",
            "--top", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "searched" in r.stdout
    best = Plan.load(out)
    assert best.world_size == 8 and best.virtual_stages <= BLOCKS[model]
    assert len(best.checkpoint) in (0, BLOCKS[model]) and not best.sequence_parallel


def test_small_mlp_tp_candidates_are_skipped_not_fatal():
    """At width 64 the ILP keeps every linear whole, so each tp > 1 candidate is skipped."""
    plans = plan(MLP, "dgx-a100", global_batch=64, seq=1, top_k=1, dp=4)
    assert plans[0].tp == 1
    skipped = [r for r in plans.rejections if r.reason == "cannot take"]
    assert skipped and all(" tp2 " in r.family for r in skipped)
    assert plans.stats.skipped == len(skipped) and plans.stats.tp_ilp_solves > 0


def test_wide_mlp_gets_the_ilp_layout():
    plans = plan(f"{REPO}/examples/mlp.py:wide", "dgx-a100", global_batch=64, seq=1, top_k=1, tp=2)
    best = plans[0]
    assert best.tp == 2 and best.tp_layout == {"fc1": "colwise", "fc2": "rowwise"}
    assert best.result.phases["exposed_tp_comm_s"] > 0


@pytest.mark.parametrize("model,pins,fragments", [
    (MLP, ["--pp", "8", "--schedule", "interleaved", "--interleave", "2"], ["exceeds the model's 8 blocks"]),
    (RESNET, ["--tp", "2"], ["tp 2 divides no feature count", "splits linears only"]),
    (f"{FIXTURES}/mlp_model.py:mlp", ["--pp", "2"], ["pp 2 exceeds the model's 0 blocks"]),
    (f"{FIXTURES}/branchy_model.py:branchy", ["--pp", "2"], ["torch.fx.symbolic_trace", "make_fx"]),
    (MLP, ["--sequence-parallel"], ["sequence_parallel needs a preset"]),
])
def test_a_pin_the_model_cannot_take_is_one_line(cli, model, pins, fragments):
    args = ["plan", "--model", model, "--cluster", "dgx-a100", "--global-batch", "48", "--seq", "1", *pins]
    assert_user_error(cli(*args), *fragments)
