"""Context parallelism in the simulator (planner.simulate.context): a micro-batch traced at
seq / cp, its attention priced over the full causal range, the K/V exchange on the cp group,
gradients and ZeRO over dp x cp, the engines that cannot, the search and the CLI."""
import json
from dataclasses import replace

import pytest

from cost_models import MeshplanError
from cost_models.compute import ComputeModel
from cost_models.cluster import parse_cluster
from helpers import assert_user_error
from planner.models import ModelConfig
from planner.plan import Plan
from planner.search import plan as search
from planner.simulate import model_key, prepare, simulate, trace_cached
from planner.zoo import ModelSpec, load_model

TINY = load_model("llama-tiny").config
HEAD_DIM = TINY.hidden // TINY.heads
BASE = dict(global_batch=8, seq=64, micro_batch=1, precision="bf16")
# two Llama blocks with room for long sequences (K and V of MBs, where bandwidth, not latency, counts)
LONG_CONFIG = ModelConfig("llama", 2, 1024, 8, 32000, kv_heads=4, ffn=2816, max_seq=131072, name="long-2l")
LONG = ModelSpec(LONG_CONFIG.name, LONG_CONFIG)


def _kv_bytes(plan: Plan, tp: int = 1) -> int:
    """One rank's K (or V) of one block and micro-batch, in bf16: b x seq/cp x kv_heads/tp x head_dim."""
    return plan.micro_batch * (plan.seq // plan.cp) * (TINY.kv_heads // tp) * HEAD_DIM * 2


@pytest.mark.parametrize("tp", [1, 2])
def test_kv_exchange_bytes_follow_the_protocol(tp):
    """Per block and micro-batch: forward all-gathers K and V (each gather's output is the
    whole sequence's K for this rank's heads); backward gathers them again and
    reduce-scatters dK and dV; under full recomputation the rerun's gather is backward's
    (runtime.context_parallel: tests/parity/test_comm_volume.py measures it)."""
    plan = Plan(dp=2 // tp, cp=2, tp=tp, **{**BASE, "global_batch": 4})
    full = plan.cp * _kv_bytes(plan, tp)
    n = TINY.layers * plan.grad_accum
    volume = simulate(plan, "llama-tiny", "cpu:1x4").comm_bytes[0]
    assert volume["cp"] == {"all_gather": n * 4 * full, "reduce_scatter": n * 2 * full}
    again = simulate(replace(plan, checkpoint=["full"] * TINY.layers), "llama-tiny", "cpu:1x4").comm_bytes[0]
    assert again["cp"] == {"all_gather": n * 4 * full, "reduce_scatter": n * 2 * full}
    assert "cp" not in simulate(Plan(dp=4 // tp, tp=tp, **{**BASE, "global_batch": 4}), "llama-tiny",
                                "cpu:1x4").comm_bytes[0]


def test_activations_fall_by_cp():
    """Each cp rank keeps the activations of seq / cp tokens (the sdpa kernel saves its output
    and log-sum-exp, linear in the queries)."""
    saved = {}
    for cp in (1, 2, 4):
        sim = prepare(Plan(cp=cp, **{**BASE, "global_batch": 1}), "llama-tiny", f"cpu:1x{cp}")
        saved[cp] = sum(sim.timing(i).saved_bytes for i in sim.traced.blocks)
    assert saved[2] == pytest.approx(saved[1] / 2, rel=0.01)
    assert saved[4] == pytest.approx(saved[1] / 4, rel=0.01)


def test_attention_per_rank_is_the_full_causal_attention_over_cp():
    """The trace runs seq / cp queries over seq / cp keys; each rank's kernel is priced as the
    whole sequence's causal attention / cp (load-balanced chunks), and MFU's FLOPs are those
    of the whole sequences."""
    cp, seq = 4, 128
    plan = Plan(cp=cp, **{**BASE, "global_batch": 1, "seq": seq})
    sim = prepare(plan, "llama-tiny", "h100-sxm-80gb:1x4")
    compute = sim.compute
    full = compute.attention_time_s(1, TINY.heads, seq, seq, HEAD_DIM, "bf16", True)
    full_bwd = compute.attention_time_s(1, TINY.heads, seq, seq, HEAD_DIM, "bf16", True, backward=True)
    kernel = sim.timing(sim.traced.blocks[0]).attention_kernel_s
    assert kernel == pytest.approx((full / cp, full_bwd / cp))
    result = sim.run()
    model_flops = result.mfu * result.step_time_s * 4 * sim.cluster.gpu.peak_flops_for("bf16")
    whole = trace_cached(model_key(load_model("llama-tiny")), 1, seq, "bf16", sim.traced.cast)
    assert model_flops == pytest.approx(sum(whole.flop_counter_flops()), rel=1e-9)
    assert result.mfu_causal < result.mfu


def test_gradients_and_zero_over_dp_x_cp():
    """Every cp rank holds its stage's parameters: ZeRO shards and gradients reduce over dp x cp."""
    cp_plan = Plan(dp=2, cp=2, zero=3, **BASE)
    sim = prepare(cp_plan, "llama-tiny", "cpu:1x4")
    assert (sim.dp_group.size, sim.cp_group.size) == (4, 2)
    with_cp = sim.run().worst_stage
    dp_only = simulate(Plan(dp=4, zero=3, **BASE), "llama-tiny", "cpu:1x4").worst_stage
    assert (with_cp.params_bytes, with_cp.optimizer_bytes) == (dp_only.params_bytes, dp_only.optimizer_bytes)
    ddp = simulate(Plan(dp=2, cp=2, **BASE), "llama-tiny", "cpu:1x4").comm_bytes[0]["dp"]
    assert ddp == simulate(Plan(dp=4, **BASE), "llama-tiny", "cpu:1x4").comm_bytes[0]["dp"]


def test_cp_across_nodes_is_slower_than_inside_one():
    """cp just outside tp keeps the group on NVLink; ordered outermost it crosses nodes."""
    plan = Plan(dp=2, cp=4, **{**BASE, "seq": 32768, "global_batch": 2})
    inside = prepare(plan, LONG, "h100-sxm-80gb:2x4")
    across = prepare(replace(plan, rank_order=["pp", "cp", "dp", "tp"]), LONG, "h100-sxm-80gb:2x4")
    assert not inside.cp_group.crosses_nodes and across.cp_group.crosses_nodes
    assert across.run().phases["exposed_cp_comm_s"] > inside.run().phases["exposed_cp_comm_s"] > 0


def test_megatron_ring_hides_the_exchange_under_attention():
    """Megatron-LM's TE p2p ring overlaps the exchange with the attention kernels: only what
    exceeds them is exposed; torchtitan's all-gathers are all exposed."""
    plan = Plan(dp=1, cp=4, **{**BASE, "seq": 128, "global_batch": 2})
    titan = prepare(replace(plan, engine="torchtitan", zero=3), "llama-tiny", "h100-sxm-80gb:1x4")
    megatron = prepare(replace(plan, engine="megatron-lm"), "llama-tiny", "h100-sxm-80gb:1x4")
    block = titan.traced.blocks[0]
    t = megatron.timing(block)
    gathers = sum(titan.comm.time_s(kind, nbytes, titan.cp_group) for kind, nbytes in t.cp_comm_fwd)
    assert titan.cp_comm_s(titan.timing(block))[0] == pytest.approx(gathers)
    assert megatron.cp_comm_s(t)[0] == pytest.approx(max(0.0, gathers - t.attention_kernel_s[0]))


@pytest.mark.parametrize("engine, fragment", [
    ("deepspeed", "Ulysses"), ("megatron-lm@2021", "predates --context-parallel-size")])
def test_engines_without_context_parallelism_refuse(engine, fragment):
    with pytest.raises(MeshplanError, match=fragment):
        simulate(Plan(dp=2, cp=2, engine=engine, **BASE), "llama-tiny", "cpu:1x4")


def test_torchtitan_shards_over_dp_x_cp():
    """torchtitan applies FSDP whenever cp > 1 (distributed/parallel_dims.py): no ZeRO 0."""
    with pytest.raises(MeshplanError, match="ZeRO 2 or 3, not 0"):
        simulate(Plan(dp=2, cp=2, engine="torchtitan", **BASE), "llama-tiny", "cpu:1x4")


def test_cp_needs_the_fused_attention_kernel():
    with pytest.raises(MeshplanError, match="fused attention kernel"):
        simulate(Plan(dp=2, cp=2, engine="megatron-lm", engine_options={"attention_backend": "unfused"}, **BASE),
                 "llama-tiny", "h100-sxm-80gb:1x4")


def test_search_splits_a_long_sequence_that_does_not_fit():
    """At 128K tokens the logits and activations of one sequence overflow a 40 GB A100 even fully
    recomputed; splitting it over cp ranks fits."""
    plans = search(LONG, "a100-sxm-40gb:1x4", 4, 131072, top_k=2, tp=1, pp=1, micro_batch=1,
                   zero=3)
    assert plans[0].cp > 1 and plans[0].result.fits
    assert any(r.family.startswith("dp4 tp1") and r.reason == "memory" for r in plans.rejections)


def test_short_sequences_search_no_cp():
    """Below CP_MIN_SEQ tokens cp is searched only when pinned: one family of dp 4 here."""
    plans = search("llama-tiny", "cpu:1x4", 8, 64, top_k=1, tp=1, pp=1, micro_batch=2, zero=0)
    assert plans.stats.families == 1 and plans[0].cp == 1


def test_cli_cp_flag_cases_and_json(cli, tmp_path):
    common = ("--model", "llama-tiny", "--cluster", "cpu:1x4", "--global-batch", "8", "--seq", "64")
    one = cli("simulate", *common, "--dp", "2", "--cp", "2", "--json")
    assert one.returncode == 0, one.stderr
    out = json.loads(one.stdout)
    assert out["plan"]["cp"] == 2 and "exposed_cp_comm_s" in out["phases"]
    words = cli("simulate", *common, "--dp", "2", "--cp", "2").stdout
    assert "dp=2 cp=2 tp=1 pp=1" in words and "context-parallel KV exchange" in words
    cases = tmp_path / "cases.jsonl"
    case = dict(model="llama-tiny", cluster="cpu:1x4", dp=2, cp=2, global_batch=8, seq=64)
    cases.write_text(json.dumps(case) + "\n" + json.dumps({**case, "seq": 66}) + "\n")
    lines = [json.loads(x) for x in cli("simulate", "--batch", cases).stdout.splitlines()]
    assert lines[0]["step_time_s"] == out["step_time_s"] and lines[0]["plan"]["cp"] == 2
    assert "2 x cp = 4" in lines[1]["error"]
    planned = cli("plan", *common, "--cp", "2", "--top", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    assert {p["cp"] for p in json.loads(planned.stdout)["plans"]} == {2}
    header = next(line for line in cli("plan", *common, "--cp", "2", "--top", "1", "--wide").stdout.splitlines()
                  if line.lstrip().startswith("#"))
    assert header.split()[1:5] == ["dp", "cp", "tp", "pp"]
    out_file = tmp_path / "p.json"
    assert cli("plan", *common, "--cp", "2", "--top", "1", "--out", out_file).returncode == 0
    assert json.loads(out_file.read_text())["cp"] == 2


@pytest.mark.parametrize("args, fragments", [
    (("plan", "--model", "llama-tiny", "--cluster", "cpu:1x4", "--seq", "64", "--cp", "3"), ("2 x cp = 6",)),
    (("simulate", "--model", "llama-tiny", "--cluster", "cpu:1x4", "--seq", "66", "--dp", "2", "--cp", "2"),
     ("2 x cp = 4",)),
    (("plan", "--model", "llama-tiny", "--cluster", "cpu:1x4", "--seq", "64", "--cp", "2", "--engine", "deepspeed"),
     ("deepspeed", "context parallelism")),
    (("simulate", "--model", "llama-tiny", "--cluster", "cpu:1x4", "--seq", "64", "--dp", "2", "--cp", "2",
      "--engine", "megatron-lm@2021"), ("context parallelism",)),
    (("compare", "--model", "llama-tiny", "--clusters", "cpu:1x4", "--tokens", "1e6", "--seq", "64", "--cp", "3"),
     ("2 x cp = 6",)),
    (("plan", "--model", "moe-tiny", "--cluster", "cpu:1x4", "--seq", "64", "--cp", "2", "--ep", "2"), ("ep",)),
    (("plan", "--model", "llama-tiny", "--cluster", "cpu:1x4", "--seq", "64", "--cp", "2", "--zero", "0",
      "--engine", "torchtitan"), ("ZeRO 2, 3", "not 0")),
])
def test_bad_context_parallel_input_is_one_line(cli, args, fragments):
    assert_user_error(cli(*args, "--global-batch", "8"), *fragments)


def test_float8_gathers_shard_over_dp_x_cp():
    """Under the FSDP2 float8 all-gather each rank casts and amax-reduces its shard of the
    float8 weights: 1 / (dp x cp) of them, as with dp alone on as many ranks."""
    fields = dict(BASE, precision="fp8", zero=3, global_batch=4)
    with_cp = simulate(Plan(dp=2, cp=2, **fields), "llama-tiny", "h100-sxm-80gb:1x4")
    dp_only = simulate(Plan(dp=4, **fields), "llama-tiny", "h100-sxm-80gb:1x4")
    assert with_cp.phases["optimizer_s"] == pytest.approx(dp_only.phases["optimizer_s"], rel=1e-12)
