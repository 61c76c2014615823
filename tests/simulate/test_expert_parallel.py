"""Expert parallelism in the simulator: the all-to-alls' volume and place on the topology,
the experts' GEMMs and states under ep, the load imbalance, the search, and the CLI."""
import json
import math

import pytest

from helpers import assert_user_error
from planner.plan import Plan
from planner.simulate import prepare, simulate
from planner.simulate.traces import _trace_spec, trace_spec
from planner.zoo import load_model

BASE = dict(global_batch=8, seq=32, micro_batch=1, precision="fp32")
TINY = load_model("moe-tiny").config
MOE_BLOCKS = TINY.layers - TINY.dense_layers


def _expert_params_per_block(cfg) -> int:
    return 3 * cfg.experts * cfg.hidden * cfg.expert_ffn   # w_gate, w_up, w_down


def test_all_to_all_bytes_follow_the_mechanism():
    """Per MoE block and micro-batch: the counts (E int64), then dispatch and combine of the
    T * top_k routed rows in forward and both again in backward; the routed experts'
    gradients all-reduced over the dp/ep ranks holding the same experts."""
    plan = Plan(dp=4, ep=2, **BASE)
    volume = simulate(plan, "moe-tiny", "cpu:1x4").comm_bytes[0]
    micro_batches = plan.grad_accum
    rows = plan.micro_batch * plan.seq * TINY.top_k
    tokens = MOE_BLOCKS * micro_batches * 4 * rows * TINY.hidden * 4
    assert volume["ep"] == {"all_to_all": tokens, "all_to_all_counts": MOE_BLOCKS * micro_batches * TINY.experts * 8}
    expert_grads = MOE_BLOCKS * _expert_params_per_block(TINY) / plan.ep * 4
    assert volume["edp"] == {"all_reduce": expert_grads}
    dense = simulate(Plan(dp=4, **BASE), "moe-tiny", "cpu:1x4").comm_bytes[0]
    assert "ep" not in dense and "edp" not in dense
    assert volume["dp"]["all_reduce"] == dense["dp"]["all_reduce"] - MOE_BLOCKS * _expert_params_per_block(TINY) * 4


def test_ep_spanning_all_dp_ranks_has_no_expert_data_parallel_reduction():
    volume = simulate(Plan(dp=4, ep=4, zero=2, **BASE), "moe-tiny", "cpu:1x4").comm_bytes[0]
    assert "edp" not in volume and volume["ep"]["all_to_all"] > 0


def test_pipeline_ranks_send_their_own_blocks_all_to_alls():
    plan = Plan(dp=2, pp=2, ep=2, **BASE)
    volume = simulate(plan, "moe-tiny", "cpu:1x4").comm_bytes
    per_block = plan.grad_accum * 4 * plan.seq * TINY.top_k * TINY.hidden * 4
    # 4 blocks over 2 stages: the first holds the dense block and one MoE block
    assert [v["ep"]["all_to_all"] for v in volume] == [1 * per_block, 2 * per_block]


def test_full_recompute_dispatches_and_combines_again():
    plain = simulate(Plan(dp=4, ep=2, **BASE), "moe-tiny", "cpu:1x4")
    full = simulate(Plan(dp=4, ep=2, checkpoint=["full"] * TINY.layers, **BASE), "moe-tiny", "cpu:1x4")
    assert full.comm_bytes[0]["ep"]["all_to_all"] == pytest.approx(1.5 * plain.comm_bytes[0]["ep"]["all_to_all"])


def test_a_dispatch_inside_a_node_costs_less_than_one_spanning_nodes():
    plan = Plan(dp=4, ep=4, **BASE)
    inside = simulate(plan, "moe-tiny", "h100-sxm-80gb:1x4")
    spanning = simulate(plan, "moe-tiny", "h100-sxm-80gb:2x2")
    assert spanning.phases["exposed_ep_comm_s"] > inside.phases["exposed_ep_comm_s"] > 0
    assert spanning.step_time_s > inside.step_time_s
    # where bandwidth matters, the network's share of the peers sets the pace
    big = 64 * 2 ** 20
    near = prepare(plan, "moe-tiny", "h100-sxm-80gb:1x4")
    far = prepare(plan, "moe-tiny", "h100-sxm-80gb:2x2")
    assert not near.ep_group.crosses_nodes and far.ep_group.crosses_nodes
    assert far.comm.all_to_all_s(big, far.ep_group) > 3 * near.comm.all_to_all_s(big, near.ep_group)


def test_all_to_alls_are_on_the_critical_path():
    """The phase is exactly the priced all-to-alls of every MoE block and micro-batch."""
    plan = Plan(dp=4, ep=2, **BASE)
    sim = prepare(plan, "moe-tiny", "h100-sxm-80gb:1x4")
    result = sim.run()
    t = sim.timing(sim.traced.blocks[-1])
    per_block = sum(sim.comm.all_to_all_s(nbytes, sim.ep_group) for _, _, nbytes in t.ep_comm_fwd + t.ep_comm_bwd)
    assert result.phases["exposed_ep_comm_s"] == pytest.approx(MOE_BLOCKS * plan.grad_accum * per_block)
    assert math.isclose(sum(v for k, v in result.phases.items() if k != "recompute_s"), result.step_time_s,
                        rel_tol=1e-9)


def test_ep_raises_step_time_where_the_tokens_outweigh_the_experts():
    """Small experts, many tokens, one GPU a node: the all-to-alls over the network cost more
    than the taller GEMMs and the fewer launches save. (moe-tiny itself runs faster with ep on
    an H100: its eager loop over experts is launch-bound, and ep launches 1/ep of it.)"""
    model = {"arch": "moe", "layers": 2, "hidden": 1024, "heads": 8, "vocab": 256, "max_seq": 512,
             "experts": 2, "top_k": 2, "expert_ffn": 256}
    plan = dict(global_batch=8, seq=512, micro_batch=4, precision="bf16")
    unsplit = simulate(Plan(dp=2, **plan), model, "h100-sxm-80gb:2x1")
    split = simulate(Plan(dp=2, ep=2, **plan), model, "h100-sxm-80gb:2x1")
    assert split.step_time_s > unsplit.step_time_s


def test_ep_cuts_expert_states_by_ep():
    expert = MOE_BLOCKS * _expert_params_per_block(TINY)
    states = {}
    for ep in (1, 2, 4):
        stage = simulate(Plan(dp=4, ep=ep, **BASE), "moe-tiny", "cpu:1x4").stages[0]
        states[ep] = stage.params_bytes + stage.grads_bytes + stage.optimizer_bytes
    # ZeRO 0: fp32 parameters and gradients, two AdamW moments: 16 bytes a parameter
    assert states[1] - states[2] == pytest.approx(16 * expert / 2)
    assert states[1] - states[4] == pytest.approx(16 * expert * 3 / 4)
    # ZeRO 3: the experts sharded over the dp/ep ranks with the same slice = 1/dp of them, as without ep
    zero3 = [simulate(Plan(dp=4, ep=ep, zero=3, **BASE), "moe-tiny", "cpu:1x4").stages[0] for ep in (1, 2)]
    assert zero3[0].optimizer_bytes == pytest.approx(zero3[1].optimizer_bytes)


def test_imbalance_scales_the_busiest_ranks_all_to_alls_and_experts():
    plan = Plan(dp=4, ep=2, **BASE)
    balanced = prepare(plan, "moe-tiny", "h100-sxm-80gb:1x4")
    skewed = prepare(plan, "moe-tiny", "h100-sxm-80gb:1x4", moe_imbalance=2.0)
    block = balanced.traced.blocks[-1]
    a, b = balanced.timing(block), skewed.timing(block)
    gemms = [op for op in balanced.coster.traced.cost_of(block).ops if op.module_path.endswith(".experts")]
    assert gemms   # the routed experts' ops
    assert b.fwd_s > a.fwd_s   # taller expert GEMMs on the busiest rank
    # and twice the rows' SwiGLU activations: input (h) and four f-wide tensors, fp32
    rows = plan.micro_batch * plan.seq * TINY.top_k
    assert b.saved_bytes - a.saved_bytes == pytest.approx(rows * (TINY.hidden + 4 * TINY.expert_ffn) * 4)
    ra, rb = balanced.run(), skewed.run()
    assert rb.phases["exposed_ep_comm_s"] > ra.phases["exposed_ep_comm_s"]
    assert rb.step_time_s > ra.step_time_s
    assert rb.comm_bytes == ra.comm_bytes   # the balanced volume is what every rank sends on average
    # without expert parallelism one rank runs every expert: no busiest rank
    alone = Plan(dp=4, **BASE)
    assert simulate(alone, "moe-tiny", "cpu:1x4", moe_imbalance=3.0).step_time_s == \
        simulate(alone, "moe-tiny", "cpu:1x4").step_time_s


def test_mfu_counts_the_active_experts_flops():
    """The traced FLOPs route each token through top_k experts, not all of them, and ep does
    not change the work: MFU x step time is the same."""
    traced = trace_spec(load_model("moe-tiny"), 1, 32, "fp32")
    block = traced.cost_of(traced.layers[traced.blocks[-1]])
    expert_flops = sum(op.fwd_flops for op in block.ops if op.module_path.endswith(".experts"))
    assert expert_flops == 2 * 32 * TINY.top_k * TINY.hidden * TINY.expert_ffn * 3
    one, two = (simulate(Plan(dp=4, ep=ep, **BASE), "moe-tiny", "cpu:1x4") for ep in (1, 2))
    assert one.mfu * one.step_time_s == pytest.approx(two.mfu * two.step_time_s)


def test_the_batched_expert_trace_prices_as_the_experts_loop():
    from cost_models.cluster import parse_cluster
    from cost_models.compute import ComputeModel
    from planner.simulate.costing import LayerCoster
    spec = load_model("moe-tiny")
    loop, batched = _trace_spec(spec, 2, 32, "bf16", "autocast"), trace_spec(spec, 2, 32, "bf16", "autocast")
    compute = ComputeModel(parse_cluster("h100-sxm-80gb:1x8").gpu)
    block = loop.blocks[-1]
    for ep in (1, 2, 4):
        a = LayerCoster(loop, compute, TINY.hidden, TINY.experts).timing(block, ep=ep, imbalance=1.5)
        b = LayerCoster(batched, compute, TINY.hidden, TINY.experts).timing(block, ep=ep, imbalance=1.5)
        assert (a.fwd_s, a.bwd_s, a.params_per_gpu, a.saved_bytes, a.expert_params_per_gpu) == pytest.approx(
            (b.fwd_s, b.bwd_s, b.params_per_gpu, b.saved_bytes, b.expert_params_per_gpu))


def test_search_splits_experts_that_do_not_fit_unsplit():
    """8 experts of 400M parameters a block: 16 bytes a parameter replicated (ZeRO 0) is
    ~50 GiB per GPU; split over 8 ranks it fits a 24 GiB A10."""
    from planner.search import plan
    from cost_models.errors import MeshplanError
    model = {"arch": "moe", "layers": 8, "hidden": 2048, "heads": 16, "vocab": 1024, "max_seq": 512,
             "experts": 8, "top_k": 2, "expert_ffn": 8192}
    plans = plan(model, "a10:1x8", 8, 512, top_k=2, zero=0, pp=1)
    assert plans[0].ep > 1 and plans[0].result.fits
    with pytest.raises(MeshplanError):
        plan(model, "a10:1x8", 8, 512, top_k=1, zero=0, pp=1, ep=1)


def test_dense_models_keep_ep_1():
    from planner.search import plan
    plans = plan("gpt-tiny", "cpu:1x4", 8, 32, top_k=3)
    assert {p.ep for p in plans} == {1}


def test_engines_that_do_not_run_ep_refuse_it_in_one_line(cli):
    common = ("simulate", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--dp", "4", "--ep", "2",
              "--global-batch", "8", "--seq", "32")
    assert_user_error(cli(*common, "--engine", "deepspeed"), "deepspeed", "ep 1")
    assert_user_error(cli(*common, "--engine", "torchtitan"), "ZeRO 2 or 3", "not 0")
    ok = cli(*common, "--engine", "torchtitan", "--zero", "2", "--precision", "bf16", "--json")
    assert ok.returncode == 0, ok.stderr


def test_cli_flags_and_batch_cases(cli, tmp_path):
    common = ("--model", "moe-tiny", "--cluster", "cpu:1x4", "--global-batch", "8", "--seq", "32")
    one = cli("simulate", *common, "--dp", "4", "--ep", "2", "--precision", "fp32", "--json")
    skew = cli("simulate", *common, "--dp", "4", "--ep", "2", "--precision", "fp32", "--moe-imbalance", "2", "--json")
    assert one.returncode == 0 and skew.returncode == 0, (one.stderr, skew.stderr)
    assert json.loads(skew.stdout)["step_time_s"] > json.loads(one.stdout)["step_time_s"]
    cases = tmp_path / "cases.jsonl"
    case = dict(model="moe-tiny", cluster="cpu:1x4", dp=4, ep=2, global_batch=8, seq=32, precision="fp32")
    cases.write_text(json.dumps(case) + "\n" + json.dumps({**case, "moe_imbalance": 2}) + "\n"
                     + json.dumps({**case, "ep": 3}) + "\n")
    lines = [json.loads(x) for x in cli("simulate", "--batch", cases).stdout.splitlines()]
    assert lines[0]["step_time_s"] == json.loads(one.stdout)["step_time_s"]
    assert lines[1]["step_time_s"] == json.loads(skew.stdout)["step_time_s"]
    assert "ep 3 must divide dp 4" in lines[2]["error"]
    planned = cli("plan", *common, "--ep", "2", "--top", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    assert {p["ep"] for p in json.loads(planned.stdout)["plans"]} == {2}
    table = cli("plan", *common, "--top", "1", "--wide").stdout
    header = next(line for line in table.splitlines() if line.lstrip().startswith("#"))
    assert header.split()[1:5] == ["dp", "tp", "pp", "ep"] and "grouped GEMMs: the dense GEMM fit" in table
    compared = cli("compare", "--model", "moe-tiny", "--clusters", "cpu:1x4", "--tokens", "1e6", *common[4:],
                   "--ep", "4", "--json")
    assert json.loads(compared.stdout)["clusters"][0]["plan"]["ep"] == 4, compared.stderr
    dense = cli("plan", "--model", "gpt-tiny", *common[2:], "--top", "1", "--wide").stdout
    assert " ep " not in dense and "grouped GEMMs" not in dense


@pytest.mark.parametrize("args,fragments", [
    (("simulate", "--model", "moe-tiny", "--cluster", "cpu:1x8", "--dp", "8", "--ep", "8"), ("divide", "4 experts")),
    (("plan", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--ep", "3"), ("ep 3", "4 experts")),
    (("plan", "--model", "tests/fixtures/qwen3_235b_a22b.json", "--cluster", "cpu:1x4", "--ep", "8"),
     ("ep 8", "4 GPUs")),
    (("plan", "--model", "gpt-tiny", "--cluster", "cpu:1x4", "--ep", "2"), ("no experts", "--ep")),
    (("simulate", "--model", "gpt-tiny", "--cluster", "cpu:1x4", "--dp", "4", "--ep", "2"), ("no experts",)),
    (("simulate", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--dp", "4", "--moe-imbalance", "0.5"),
     ("--moe-imbalance", ">= 1")),
    (("plan", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--moe-imbalance", "inf"), ("--moe-imbalance",)),
    (("compare", "--model", "moe-tiny", "--clusters", "cpu:1x4", "--tokens", "1e6", "--moe-imbalance", "nan"),
     ("--moe-imbalance",)),
    (("plan", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--ep", "2", "--tp", "2"), ("tp 2", "MoE models run with tp 1")),
    (("simulate", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--dp", "2", "--tp", "2"),
     ("tp 2", "MoE models run with tp 1")),
])
def test_bad_expert_parallel_input_is_one_line(cli, args, fragments):
    assert_user_error(cli(*args, "--global-batch", "8", "--seq", "32"), *fragments)


def test_nearest_fitting_changes_skip_those_ep_cannot_take():
    """Halving dp (the --tp/--pp x2 suggestions) leaves an ep that no longer divides it: such a
    change is not suggested, and the advice for a plan that does not fit still comes."""
    from planner.simulate.fit import nearest_fits
    changes = nearest_fits(Plan(dp=2, ep=2, **BASE), "moe-tiny", "cpu:1x2")
    assert changes and all(c.plan.dp % c.plan.ep == 0 for c in changes)
    assert not any("--dp 1" in c.flags for c in changes)


def test_a_measured_grouped_gemm_factor_prices_only_the_routed_experts():
    """Calibration.grouped_gemm_factor (meshplan profile's grouped cases) scales the routed
    experts' GEMMs and nothing else; the calibration line says it was measured."""
    from dataclasses import replace
    from cost_models import get_gpu, parse_cluster
    from cost_models.calibration import calibration_line, default_calibration
    from cost_models.compute import ComputeModel
    cluster = parse_cluster("h100-sxm-80gb:1x8")
    base = default_calibration(get_gpu("h100-sxm-80gb"))
    slow = replace(base, grouped_gemm_factor=3.0)
    plan = Plan(dp=8, ep=2, global_batch=16, seq=128, micro_batch=2, precision="bf16")
    dense = Plan(dp=8, global_batch=16, seq=128, micro_batch=2, precision="bf16")
    times = {}
    for name, calibration in (("base", base), ("slow", slow)):
        compute = ComputeModel(cluster.gpu, calibration)
        times[name] = (simulate(plan, "moe-tiny", cluster, compute=compute).phases["compute_s"],
                       simulate(dense, "llama-tiny", cluster, compute=compute).step_time_s)
    assert times["slow"][0] > times["base"][0]          # the experts' GEMMs took 3x
    assert times["slow"][1] == times["base"][1]         # a dense model does not change
    assert "grouped GEMMs: measured, 3.00 x the dense GEMM fit" in calibration_line(slow, experts=True)
    assert "grouped GEMMs: the dense GEMM fit, transferred" in calibration_line(base, experts=True)


def test_report_plan_words_name_ep_only_when_experts_are_split():
    from planner.report.pages import _plan_words
    assert _plan_words(Plan(dp=4, ep=2, **BASE)).startswith("dp=4 tp=1 pp=1 ep=2 zero=0,")
    assert _plan_words(Plan(dp=4, **BASE)).startswith("dp=4 tp=1 pp=1 zero=0,")
