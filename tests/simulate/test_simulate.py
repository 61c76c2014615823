import json
from dataclasses import replace

import pytest

from helpers import assert_user_error
from cost_models import MeshplanError, parse_cluster
from cost_models.comm import CommModel
from planner.plan import Plan
from planner.simulate import Execution, simulate
from planner.torch_compat import traces_attention_core
from planner.zoo import load_model

MODEL = "gpt3-1.3b"
CLUSTER = "a100-sxm-80gb:2x8"


def sim(**kw):
    base = dict(dp=16, global_batch=64, micro_batch=1, seq=1024)
    base.update(kw)
    return simulate(Plan(**base), MODEL, CLUSTER)


def test_single_gpu_result_is_consistent():
    r = simulate(Plan(global_batch=4, micro_batch=2, seq=512), "gpt3-125m", "h100:1x1")
    assert r.step_time_s > 0 and r.fits
    assert r.tokens_per_s == pytest.approx(4 * 512 / r.step_time_s)
    assert 0 < r.mfu < 1 and r.hfu == pytest.approx(r.mfu)   # nothing recomputed
    m = r.worst_stage
    assert m.peak_reserved_bytes > m.peak_allocated_bytes > m.params_bytes + m.optimizer_bytes + m.activations_bytes
    assert r.phases["pipeline_bubble_s"] == pytest.approx(0, abs=1e-9)


def test_zero_stages_shrink_model_states():
    states = [sim(zero=z).worst_stage for z in (0, 1, 2, 3)]
    totals = [s.params_bytes + s.grads_bytes + s.optimizer_bytes for s in states]
    # FSDP2 shards parameters for ZeRO-2 and -3 alike; ZeRO-2 keeps them gathered from
    # forward to backward instead, which shows in the peak
    assert totals[0] > totals[1] > totals[2] == totals[3]
    assert states[2].peak_allocated_bytes > states[3].peak_allocated_bytes
    assert states[1].optimizer_bytes == pytest.approx(states[0].optimizer_bytes / 16)


def test_tensor_parallel_splits_parameters_and_adds_communication():
    dp16, tp2 = sim(), sim(dp=8, tp=2)
    assert tp2.worst_stage.params_bytes == pytest.approx(dp16.worst_stage.params_bytes / 2, rel=0.05)
    assert tp2.worst_stage.activations_bytes < dp16.worst_stage.activations_bytes


def test_checkpointing_trades_memory_for_time():
    none, full = sim(), sim(checkpoint=["full"] * 24)
    assert full.worst_stage.activations_bytes < none.worst_stage.activations_bytes / 3
    assert full.step_time_s > none.step_time_s
    assert full.hfu > full.mfu


def test_pipeline_has_a_bubble_that_interleaving_shrinks():
    plain = sim(dp=8, pp=2, global_batch=64)
    interleaved = sim(dp=8, pp=2, global_batch=64, schedule="interleaved", interleave=2)
    assert plain.phases["pipeline_bubble_s"] > 0
    assert interleaved.phases["pipeline_bubble_s"] < plain.phases["pipeline_bubble_s"]
    assert len(plain.stages) == 2


def test_more_data_parallel_gpus_train_faster():
    small = simulate(Plan(dp=4, global_batch=64, seq=1024), MODEL, "a100-sxm-80gb:1x4")
    big = simulate(Plan(dp=16, global_batch=64, seq=1024), MODEL, CLUSTER)
    assert big.step_time_s < small.step_time_s
    assert big.tokens_per_s > 3 * small.tokens_per_s


def test_too_big_does_not_fit():
    r = simulate(Plan(dp=1, global_batch=1, seq=2048), "llama3-70b", "h100:1x1")
    assert not r.fits and r.worst_stage.peak_allocated_bytes > 80e9


def test_plan_must_match_cluster():
    with pytest.raises(MeshplanError, match="cluster has 16 devices"):
        sim(dp=8)


def test_cli_simulate_json_and_trace(cli, tmp_path):
    trace = tmp_path / "trace.json"
    proc = cli("simulate", "--model", "gpt3-125m", "--cluster", "a100-sxm-80gb:1x8", "--seq", "512",
               "--global-batch", "16", "--dp", "4", "--pp", "2", "--json", "--trace", trace)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu", "mfu", "fits"):
        assert key in out
    assert set(out["memory"]["breakdown"]) == {"params_bytes", "grads_bytes", "optimizer_bytes",
                                               "activations_bytes", "transient_bytes"}
    events = json.loads(trace.read_text())["traceEvents"]
    # per pipeline stage a compute track (forward, backward, optimizer) and a communication track
    assert {e["tid"] for e in events if e["ph"] == "X" and e["cat"] in ("F", "B", "optimizer")} == {0, 2}
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} == {
        "stage 0: compute", "stage 0: communication", "stage 1: compute", "stage 1: communication"}
    again = cli("simulate", "--model", "gpt3-125m", "--cluster", "a100-sxm-80gb:1x8", "--seq", "512",
                "--global-batch", "16", "--dp", "4", "--pp", "2", "--trace", trace)
    assert_user_error(again, "already exists")


def test_cli_simulate_batch(cli, tmp_path):
    cases = tmp_path / "cases.jsonl"
    good = {"model": "gpt3-125m", "cluster": "a100-sxm-80gb:1x8", "seq": 512, "global_batch": 16, "dp": 8}
    bad = dict(good, dp=2)
    inline = dict(good, model={"arch": "llama", "layers": 2, "hidden": 256, "heads": 4, "vocab": 1000})
    cases.write_text("\n".join(json.dumps(c) for c in (good, bad, inline)) + "\nnot json\n")
    proc = cli("simulate", "--batch", cases)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 4
    assert "step_time_s" in lines[0] and "step_time_s" in lines[2]
    assert "error" in lines[1] and "make the product 8" in lines[1]["error"]
    assert "not valid JSON" in lines[3]["error"]


def test_cli_checkpoint_attention_and_a_bad_mode(cli, tmp_path):
    """--checkpoint attention recomputes each block's attention core: an unfused core's
    s x s scores are no longer kept, the step pays for rerunning it; in a --batch case too.
    A mode that does not exist is one line and exit 2, on the flag and in a batch case."""
    model = tmp_path / "megatron-gpt.json"
    model.write_text(json.dumps({"arch": "gpt", "layers": 4, "hidden": 1024, "heads": 16, "vocab": 51200,
                                 "max_seq": 2048, "attention": "unfused", "dropout": 0.1}))
    flags = ["--model", model, "--cluster", "a100-sxm-80gb:1x1", "--seq", "2048", "--global-batch", "4"]
    if not traces_attention_core():   # a torch that cannot label the core refuses the mode in one line
        assert_user_error(cli("simulate", *flags, "--checkpoint", "attention"), "torch.fx.traceback.annotate")
        return
    results = {}
    for mode in ("none", "attention"):
        proc = cli("simulate", *flags, "--checkpoint", mode, "--json")
        assert proc.returncode == 0, proc.stderr
        results[mode] = json.loads(proc.stdout)
    none, attention = results["none"], results["attention"]
    assert attention["phases"]["recompute_s"] > 0 == none["phases"]["recompute_s"]
    assert attention["step_time_s"] > none["step_time_s"] and attention["hfu"] > attention["mfu"]
    saved = none["memory"]["breakdown"]["activations_bytes"] - attention["memory"]["breakdown"]["activations_bytes"]
    assert saved >= 4 * 5 * 16 * 2048 ** 2   # 5as^2b bytes a layer at least (Korthikanti et al. 2022)
    assert_user_error(cli("simulate", *flags, "--checkpoint", "bogus"), "invalid choice: 'bogus'")
    cases = tmp_path / "cases.jsonl"
    case = {"model": "gpt3-125m", "cluster": "a100-sxm-80gb:1x8", "seq": 512, "global_batch": 16, "dp": 8}
    cases.write_text("\n".join(json.dumps(dict(case, checkpoint=m)) for m in ("attention", "bogus")) + "\n")
    proc = cli("simulate", "--batch", cases)
    assert proc.returncode == 0, proc.stderr
    good, bad = (json.loads(line) for line in proc.stdout.splitlines())
    assert good["phases"]["recompute_s"] > 0
    assert "plan checkpoint has 'bogus'; each layer takes one of none, attention, selective, full" in bad["error"]


def test_profiled_calibration_drives_the_simulation(cli, tmp_path):
    calibration = tmp_path / "cpu.json"
    proc = cli("profile", "--device", "cpu", "--quick", "--out", calibration, timeout=300)
    assert proc.returncode == 0, proc.stderr
    args = ["simulate", "--model", "gpt-tiny", "--cluster", "cpu:1x1", "--seq", "64", "--global-batch", "2",
            "--micro-batch", "2", "--precision", "fp32", "--json"]
    default = json.loads(cli(*args).stdout)
    measured = json.loads(cli(*args, "--calibration", calibration).stdout)
    assert measured["step_time_s"] != default["step_time_s"]
    # the text report names the calibration behind its numbers
    text = cli(*args[:-1], "--calibration", calibration).stdout
    assert "calibration: cpu, meshplan profile --quick on" in text
    text = cli("simulate", "--model", "gpt3-125m", "--cluster", "dgx-a100-40gb:1", "--seq", "512",
               "--global-batch", "16", "--dp", "8").stdout
    assert "calibration: a100-sxm-40gb, transferred from the a100-sxm-80gb calibration" in text
    assert_user_error(cli(*args, "--cluster", "h100:1x1", "--calibration", calibration), "profile this GPU")


def test_breakdown_adds_up_to_the_peak():
    for kw in (dict(), dict(zero=3), dict(dp=8, pp=2, checkpoint=["full"] * 24), dict(dp=8, tp=2)):
        for m in sim(**kw).stages:
            parts = m.params_bytes + m.grads_bytes + m.optimizer_bytes + m.activations_bytes + m.transient_bytes
            assert parts == pytest.approx(m.peak_allocated_bytes), kw


def test_cli_pictures(cli, tmp_path):
    timeline, memory = tmp_path / "t.png", tmp_path / "m.png"
    args = ["simulate", "--model", "gpt3-125m", "--cluster", "a100-sxm-80gb:1x8", "--seq", "512",
            "--global-batch", "32", "--dp", "2", "--pp", "4", "--schedule", "interleaved", "--interleave", "2"]
    proc = cli(*args, "--timeline", timeline, "--memory-plot", memory)
    assert proc.returncode == 0, proc.stderr
    for png in (timeline, memory):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    before = timeline.read_bytes()
    assert_user_error(cli(*args, "--timeline", timeline), "already exists")
    assert timeline.read_bytes() == before


def test_gradient_reduction_after_backward_is_fully_exposed():
    plan = Plan(dp=16, global_batch=16, seq=1024)
    overlapped = simulate(plan, MODEL, CLUSTER)
    after = simulate(plan, MODEL, CLUSTER, execution=Execution(overlap_dp_comm=False))
    assert after.phases["exposed_dp_comm_s"] > overlapped.phases["exposed_dp_comm_s"]
    assert after.step_time_s - overlapped.step_time_s == pytest.approx(
        after.phases["exposed_dp_comm_s"] - overlapped.phases["exposed_dp_comm_s"])


def test_optimizer_offload_moves_states_to_host_and_costs_step_time():
    base = dict(dp=8, zero=3, micro_batch=1, global_batch=8, seq=1024)
    on_gpu = simulate(Plan(**base), "gpt3-1.3b", "a100-sxm-80gb:1x8")
    offloaded = simulate(Plan(**base, offload_optimizer=True), "gpt3-1.3b", "a100-sxm-80gb:1x8")
    assert offloaded.worst_stage.optimizer_bytes == 0 < on_gpu.worst_stage.optimizer_bytes
    assert offloaded.worst_stage.host_bytes > 0
    # PCIe both ways plus a CPU AdamW step is slower than a fused GPU step
    assert offloaded.phases["optimizer_s"] > 10 * on_gpu.phases["optimizer_s"]
    assert offloaded.step_time_s > on_gpu.step_time_s


def test_gradient_accumulation_adds_each_extra_micro_batchs_gradients():
    """Four micro-batches on one GPU cost four times one, plus three gradient additions:
    read the accumulated and the new fp32 gradients, write the sum (12 bytes a parameter)."""
    from planner.simulate import prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=256, heads=4, vocab=512, max_seq=64))
    runs = {}
    for n in (1, 4):
        sim = prepare(Plan(micro_batch=2, global_batch=2 * n, seq=64), spec, "h100-sxm-80gb:1x1")
        result = sim.run()
        runs[n] = result.step_time_s - result.phases["optimizer_s"]
        params = sum(sim.timing(layer.index).params_per_gpu for layer in sim.traced.layers)
    added = sim.compute.memory_bound_time_s(3 * params * 4)
    assert runs[4] == pytest.approx(4 * runs[1] + 3 * added, rel=1e-9)
    assert added > 0


def test_fsdp_accumulates_only_its_gradient_shard():
    """ZeRO 2/3 reduce-scatter each micro-batch's gradients (the runtime keeps FSDP2's
    gradient sync on), so the addition covers this rank's 1/dp shard; ZeRO 1 adds whole
    gradients (they are all-reduced after the last micro-batch)."""
    from planner.simulate import prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=256, heads=4, vocab=512, max_seq=64))
    sims = {z: prepare(Plan(dp=4, zero=z, micro_batch=2, global_batch=32, seq=64), spec, "h100-sxm-80gb:1x4")
            for z in (1, 3)}
    params = 1e8
    whole = sims[1].compute.memory_bound_time_s(3 * params * 4) * 3 / 4
    shard = sims[3].compute.memory_bound_time_s(3 * params / 4 * 4) * 3 / 4
    assert sims[1].grad_accumulation_s(params) == pytest.approx(whole)
    assert sims[3].grad_accumulation_s(params) == pytest.approx(shard)
    assert shard < whole


class _FreeCollectives(CommModel):
    """Every collective and transfer takes no time: what a step would cost with free links."""

    def time_s(self, kind, nbytes, group, algorithm=None):
        return 0.0

    def p2p_s(self, nbytes, cross_node):
        return 0.0


PHASE_PARTS = ("compute_s", "exposed_tp_comm_s", "exposed_dp_comm_s", "pipeline_bubble_s", "optimizer_s")


@pytest.mark.parametrize("kw", [dict(dp=8, tp=2), dict(dp=4, tp=2, pp=2, checkpoint=["full"] * 24),
                                dict(dp=4, pp=4, schedule="interleaved", interleave=2, global_batch=32),
                                dict(zero=3), dict(dp=8, tp=2, zero=2, checkpoint=["selective"] * 24)])
def test_phases_add_up_to_the_step(kw):
    result = sim(**kw)
    assert sum(result.phases[k] for k in PHASE_PARTS) == pytest.approx(result.step_time_s, rel=1e-9)
    assert all(v >= 0 for v in result.phases.values())
    assert result.phases["recompute_s"] <= result.phases["compute_s"]
    assert (result.phases["exposed_tp_comm_s"] > 0) == (kw.get("tp", 1) > 1)


def test_exposed_communication_is_what_free_links_would_save():
    """One node, no pipeline: TP all-reduces are the only communication of a tp plan, and
    FSDP's gathers and reduce-scatters (plus nothing else) of a ZeRO-3 plan."""
    cluster = parse_cluster("a100-sxm-80gb:1x8")
    for kw, phase in ((dict(dp=1, tp=8, global_batch=8, checkpoint=["full"] * 24), "exposed_tp_comm_s"),
                      (dict(dp=8, zero=3, micro_batch=4, global_batch=64), "exposed_dp_comm_s")):
        plan = Plan(seq=1024, **{"micro_batch": 1, **kw})
        real = simulate(plan, MODEL, cluster)
        free = simulate(plan, MODEL, cluster, comm=_FreeCollectives(cluster))
        assert real.phases[phase] > 0.01 * real.step_time_s
        assert real.step_time_s - free.step_time_s == pytest.approx(real.phases[phase], rel=1e-6)
        assert free.phases["compute_s"] == pytest.approx(real.phases["compute_s"], rel=1e-9)


@pytest.mark.parametrize("cluster, cross_node", [("a100-sxm-80gb:1x4", False), ("a100-sxm-80gb:2x2", True)])
def test_tied_embedding_gradient_is_summed_between_first_and_last_stage(cluster, cross_node):
    """GPT ties its head to the token embedding; with pipeline stages the two copies (first
    and last stage) all-reduce their gradient after backward, split over TP when the
    embedding is vocabulary-parallel. A Llama (untied) has no such reduction."""
    from cost_models.comm import pair_group
    from planner.simulate import prepare
    shape = dict(layers=4, hidden=256, heads=4, vocab=512, max_seq=64)
    tied, untied = (load_model(dict(arch=arch, **shape)) for arch in ("gpt", "llama"))
    plan = Plan(tp=2, pp=2, micro_batch=2, global_batch=8, seq=64)
    sims = {name: prepare(plan, spec, cluster) for name, spec in (("tied", tied), ("untied", untied))}
    expected = sims["tied"].comm.all_reduce_s(512 * 256 / 2 * 4, pair_group(cross_node))
    assert expected > 0
    assert [sims["tied"].tied_grad_s(rank) for rank in (0, 1)] == [pytest.approx(expected)] * 2
    assert [sims["untied"].tied_grad_s(rank) for rank in (0, 1)] == [0.0, 0.0]
    result = sims["tied"].run()
    assert result.phases["exposed_dp_comm_s"] == pytest.approx(expected)   # dp 1: nothing else to reduce
    single_stage = prepare(replace(plan, pp=1, dp=2), tied, cluster)
    assert single_stage.tied_grad_s(0) == 0.0


def test_replicated_embedding_and_head_when_tp_does_not_divide_the_vocabulary():
    """As the runtime's default layout: GPT-2's 50257-token vocabulary stays whole on every TP
    rank, so neither the embedding nor the head is split or reduces anything."""
    from planner.simulate import prepare
    spec = load_model(dict(arch="gpt", layers=2, hidden=256, heads=4, vocab=501, max_seq=64))
    sim = prepare(Plan(tp=2, micro_batch=2, global_batch=2, seq=64), spec, "a100-sxm-80gb:1x2")
    top = [layer for layer in sim.traced.layers if layer.kind != "block"]
    assert top and all(not sim.timing(layer.index).tp_comm_fwd + sim.timing(layer.index).tp_comm_bwd
                       for layer in top)
    block = sim.timing(sim.traced.blocks[0])
    assert len(block.tp_comm_fwd) == len(block.tp_comm_bwd) == 2
    head_params = sum(sim.timing(layer.index).params_per_gpu for layer in top)
    assert head_params >= 501 * 256   # the whole vocabulary table
