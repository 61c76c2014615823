"""Training engines (planner/engines): each profile changes what its engine does differently,
in the direction the engine's code says; plans an engine cannot run are refused in one
line and never proposed; --engine reaches simulate, plan, compare and batch cases."""
import json

import pytest

from cost_models.errors import MeshplanError
from helpers import assert_user_error, run_cli_in_process
from planner.engines import ENGINES, MEGATRON_2021, get_engine
from planner.plan import CHECKPOINT_MODES, PRECISIONS, SCHEDULES, Plan
from planner.search import plan
from planner.simulate import simulate

MODEL, CLUSTER = "gpt2-124m", "a100-sxm-80gb:1x8"
SHAPE = dict(dp=2, tp=2, pp=2, micro_batch=2, global_batch=16, seq=256, precision="bf16")


def step(engine="meshplan", options=None, **fields):
    return simulate(Plan(**{**SHAPE, **fields}, engine=engine, engine_options=options or {}), MODEL, CLUSTER)


def test_every_engine_declares_only_the_plan_vocabulary():
    for engine in ENGINES.values():
        assert set(engine.schedules) <= set(SCHEDULES) and set(engine.precisions) <= set(PRECISIONS)
        assert set(engine.recompute) <= set(CHECKPOINT_MODES) - {"none"}
        assert set(engine.pipeline_zero) <= set(engine.zero) <= {0, 1, 2, 3}


def test_megatron_2021_is_megatron_core_with_unfused_attention_and_scatter_gather_sends():
    """megatron-lm@2021 = Megatron-Core run with --attention-backend unfused, but for the
    2021 scatter/gather of pipeline sends: the same compute, only the bubble moves."""
    old, core = step("megatron-lm@2021"), step("megatron-lm", {"attention_backend": "unfused"})
    assert old.phases["compute_s"] == pytest.approx(core.phases["compute_s"], rel=1e-12)
    assert old.phases["pipeline_bubble_s"] != core.phases["pipeline_bubble_s"]
    assert get_engine("megatron-lm@2021").execution == MEGATRON_2021
    # without pipeline or TP there are no sends to scatter: the two are the same step
    flat = dict(tp=1, pp=1, dp=8, global_batch=16, micro_batch=1)
    assert step("megatron-lm@2021", **flat).step_time_s == pytest.approx(
        step("megatron-lm", {"attention_backend": "unfused"}, **flat).step_time_s, rel=1e-12)


def test_flash_attention_is_faster_than_the_unfused_core():
    assert step("megatron-lm").phases["compute_s"] < step("megatron-lm@2021").phases["compute_s"]


@pytest.mark.parametrize("engine, options", [("megatron-lm", {"overlap_grad_reduce": True}),
                                             ("megatron-lm@2021", {"ddp_impl": "torch"}),
                                             ("deepspeed", {"overlap_comm": True})])
def test_overlapping_the_gradient_reduction_hides_data_parallel_communication(engine, options):
    after, during = step(engine), step(engine, options)
    assert during.phases["exposed_dp_comm_s"] < after.phases["exposed_dp_comm_s"]
    assert during.phases["compute_s"] == after.phases["compute_s"]


def test_deepspeed_overlaps_by_default_only_at_stage_3():
    """deepspeed/runtime/zero/config.py overlap_comm_valid: unset means stage == 3."""
    engine = get_engine("deepspeed")
    assert engine.execution_for({}, zero=3).overlap_dp_comm
    assert not engine.execution_for({}, zero=1).overlap_dp_comm
    assert not engine.execution_for({"overlap_comm": False}, zero=3).overlap_dp_comm


def test_megatron_holds_parameters_in_low_precision_where_meshplan_autocasts():
    """ZeRO 0: Megatron's Float16Module (bf16 weights, no per-op casts) vs meshplan's autocast."""
    meshplan, megatron = step(), step("megatron-lm", {"attention_backend": "unfused"})
    assert megatron.worst_stage.peak_reserved_bytes < meshplan.worst_stage.peak_reserved_bytes


def test_torchtitan_runs_what_it_offers_as_meshplan_does():
    assert step("torchtitan", zero=3).step_time_s == step(zero=3).step_time_s


@pytest.mark.parametrize("engine, fields, fragment", [
    ("megatron-lm", dict(zero=3), "offers ZeRO 0 or 1, not 3"),
    ("megatron-lm@2021", dict(zero=1), "offers ZeRO 0, not 1"),
    ("megatron-lm@2021", dict(sequence_parallel=True), "no sequence parallelism"),
    ("megatron-lm", dict(schedule="gpipe"), "not gpipe"),
    ("megatron-lm", dict(checkpoint=["selective"] * 12), "not selective"),
    ("torchtitan", dict(zero=1), "not 1"),
    ("torchtitan", dict(precision="fp16"), "not fp16"),
    ("deepspeed", dict(zero=2), "with pipeline parallelism, not 2"),
    ("deepspeed", dict(interleave=2, schedule="interleaved", global_batch=32), "not interleaved"),
])
def test_a_plan_the_engine_cannot_run_is_refused_in_one_line(engine, fields, fragment):
    with pytest.raises(MeshplanError) as err:
        step(engine, **fields)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, fragment", [({"overlap_grad_reduce": 1}, "takes false, true"),
                                               ({"ddp_impl": "torch"}, "has no option 'ddp_impl'"),
                                               (["x"], "JSON object")])
def test_engine_options_are_checked(options, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        Plan(engine="megatron-lm", engine_options=options)


def test_the_search_proposes_only_plans_the_engine_runs():
    plans = plan("megatron-1.7b", "dgx-a100:1", 64, 2048, top_k=5, engine="megatron-lm@2021",
                 engine_options={"ddp_impl": "torch"})
    assert plans and all(p.engine == "megatron-lm@2021" and p.engine_options == {"ddp_impl": "torch"}
                         for p in plans)
    engine = get_engine("megatron-lm@2021")
    assert all(engine.refusal(p) is None and not p.tp_layout for p in plans)
    # each plan's reported result is the engine's simulation of it
    best = plans[0]
    assert simulate(best, "megatron-1.7b", "dgx-a100:1").step_time_s == pytest.approx(best.result.step_time_s)
    with pytest.raises(MeshplanError, match="not gpipe"):
        plan("megatron-1.7b", "dgx-a100:1", 64, 2048, engine="megatron-lm", schedule="gpipe")


def test_the_engine_travels_in_plan_json(tmp_path):
    p = Plan(**SHAPE, engine="deepspeed", engine_options={"overlap_comm": True})
    p.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert (loaded.engine, loaded.engine_options) == ("deepspeed", {"overlap_comm": True})
    # a plan written before engines existed runs on meshplan's runtime
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["engine"], data["engine_options"]
    assert Plan.from_dict(data).engine == "meshplan"


@pytest.mark.cli
def test_engine_flags_on_simulate_plan_and_batch(tmp_path):
    args = ["--model", MODEL, "--cluster", CLUSTER, "--global-batch", "16", "--seq", "256"]
    proc = run_cli_in_process("simulate", *args, "--dp", "8", "--engine", "megatron-lm",
                              "--engine-option", "overlap_grad_reduce=true", "--json")
    assert proc.returncode == 0, proc.stderr
    flags = json.loads(proc.stdout)["step_time_s"]
    expected = simulate(Plan(dp=8, global_batch=16, seq=256, engine="megatron-lm",
                             engine_options={"overlap_grad_reduce": True}), MODEL, CLUSTER).step_time_s
    assert flags == pytest.approx(expected)
    cases = tmp_path / "cases.jsonl"
    cluster = {"gpu": "a100-sxm-80gb", "nodes": 1, "gpus_per_node": 8}
    cases.write_text(json.dumps(dict(model=MODEL, cluster=cluster, dp=8, global_batch=16, seq=256,
                                     engine="megatron-lm", engine_options={"overlap_grad_reduce": True})) + "\n"
                     + json.dumps(dict(model=MODEL, cluster=CLUSTER, dp=8, global_batch=16, seq=256,
                                       engine="megatron-lm", zero=2)) + "\n")
    proc = run_cli_in_process("simulate", "--batch", cases)
    first, second = map(json.loads, proc.stdout.splitlines())
    assert first["step_time_s"] == pytest.approx(expected)
    assert "offers ZeRO 0 or 1, not 2" in second["error"]
    proc = run_cli_in_process("plan", *args, "--engine", "deepspeed", "--top", "2", "--json")
    assert proc.returncode == 0 and {p["engine"] for p in json.loads(proc.stdout)["plans"]} == {"deepspeed"}


@pytest.mark.cli
@pytest.mark.parametrize("extra, fragment", [
    (["--engine", "megatron"], "invalid choice: 'megatron'"),
    (["--engine", "megatron-lm", "--engine-option", "overlap_grad_reduce"], "write KEY=VALUE"),
    (["--engine", "megatron-lm", "--engine-option", "overlap_grad_reduce=maybe"], "takes false, true"),
    (["--engine", "torchtitan", "--zero", "1"], "torchtitan offers ZeRO 0, 2 or 3, not 1"),
])
def test_bad_engine_flags_exit_2_in_one_line(extra, fragment):
    assert_user_error(run_cli_in_process("simulate", "--model", MODEL, "--cluster", CLUSTER, "--global-batch", "16",
                                         "--seq", "256", "--dp", "8", *extra), fragment)
