"""Issue 24, the planning side: every bad input found by hand ends in one line and exit code 2
(in-process, through planner.cli.main) or a MeshplanError from the Python API - no hang, no
traceback, no exit 0 on wrong input, nothing existing overwritten. The property-based
version is test_bad_inputs_property.py."""
import json
import sys
import time
from dataclasses import fields

import pytest

from cost_models import MeshplanError
from helpers import assert_user_error

pytestmark = pytest.mark.cli

GPT_TINY = dict(arch="gpt", layers=4, hidden=64, heads=4, vocab=256, max_seq=128)
SIM = ("simulate", "--model", "gpt-tiny", "--cluster", "cpu:1x1", "--global-batch", "2", "--seq", "32")
PLAN = ("plan", "--model", "gpt-tiny", "--cluster", "cpu:1x4", "--global-batch", "8", "--seq", "64")


def _write(path, text):
    path.write_text(text)
    return path


def _model(tmp_path, **fields):
    return _write(tmp_path / "m.json", json.dumps({**GPT_TINY, **fields}))


def _cluster(tmp_path, text, name="c.yaml"):
    return _write(tmp_path / name, text)


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import what the commands import, so the bounds below time the work, not the imports."""
    import planner.cli.compare, planner.cli.plan, planner.cli.simulate  # noqa: F401,E401
    import planner.search  # noqa: F401


def _quick(cli, *args, bound_s=10.0):
    """cli(*args), bounded in CPU seconds (a hang burns CPU; a loaded machine does not)."""
    start = time.process_time()
    proc = cli(*args)
    assert time.process_time() - start < bound_s, args
    return proc


# --------------------------------------------------------------------------- hangs

@pytest.mark.parametrize("args, fragment", [
    (("plan", "--model", "gpt3-1.3b", "--cluster", "h100-sxm-80gb:1000000000x8", "--global-batch", "512"),
     "cluster nodes must be a whole number from 1 to"),
    (("compare", "--model", "gpt3-1.3b", "--clusters", "h100-sxm-80gb:1000000000x8", "--global-batch", "512",
      "--tokens", "1e9"), "cluster nodes"),
    (("plan", "--model", "gpt3-1.3b", "--cluster", "a100:4x8", "--global-batch", "1000000000000"), "global_batch"),
    (("simulate", "--model", "gpt3-1.3b", "--cluster", "a100:4x8", "--global-batch", "1000000000000", "--dp", "32"),
     "global_batch"),
    (("plan", "--model", "gpt3-1.3b", "--cluster", "h100:1x8", "--global-batch", "14414400"), "tokens per step"),
    (("simulate", "--model", "gpt-tiny", "--cluster", "cpu:1x1", "--global-batch", "8192", "--seq", "64"),
     "micro-batches per step"),
    (("plan", "--model", "gpt3-1.3b", "--cluster", "h100:100000x8", "--global-batch", "512"), "800,000 GPUs"),
    (PLAN + ("--top", "1000000"), "--top must be a whole number from 1 to 100"),
    (("compare", "--model", "gpt-tiny", "--clusters", ",".join(["cpu:1x4"] * 65), "--global-batch", "8",
      "--tokens", "1e9"), "65 clusters"),
    (("describe", "--model", "gpt-tiny", "--cluster", "h100:" + "9" * 5000 + "x8"), "digits"),
    (("describe", "--model", "gpt-tiny", "--cluster", "h100:8x100000"), "gpus_per_node"),
])
def test_huge_sizes_are_refused_before_any_work(cli, args, fragment):
    assert_user_error(_quick(cli, *args, bound_s=5), fragment)


@pytest.mark.parametrize("fields, fragment", [
    (dict(layers=10 ** 12), "model layers must be a whole number from 1 to"),
    (dict(hidden=10 ** 9), "model hidden"),
    (dict(vocab=10 ** 10), "model vocab"),
    (dict(max_seq=10 ** 10), "model max_seq"),
    (dict(ffn=10 ** 10), "model ffn"),
])
def test_huge_model_sizes(cli, tmp_path, fields, fragment):
    assert_user_error(_quick(cli, "describe", "--model", _model(tmp_path, **fields), "--cluster", "cpu:1x1"),
                      fragment)


def test_a_400_digit_integer_in_a_model(cli, tmp_path):
    path = _write(tmp_path / "m.json", json.dumps(GPT_TINY).replace('"layers": 4', '"layers": ' + "9" * 400))
    assert_user_error(_quick(cli, "describe", "--model", path, "--cluster", "cpu:1x1"), "about 10^")
    path.write_text(json.dumps(GPT_TINY).replace('"layers": 4', '"layers": ' + "9" * 5000))
    assert_user_error(_quick(cli, "describe", "--model", path, "--cluster", "cpu:1x1"), "not valid JSON")


@pytest.mark.parametrize("text", ["gpu: h100\nnodes: 100000000000000000000\n", "gpu: h100\nnodes: 1.0e+20\n",
                                  "gpu: h100\nnodes: 1e20\n", "gpu: h100\ngpus_per_node: 4096\n"])
def test_huge_cluster_files(cli, tmp_path, text):
    assert_user_error(_quick(cli, "describe", "--model", "gpt-tiny", "--cluster", _cluster(tmp_path, text)),
                      "must be a whole number from 1 to")


def test_yaml_alias_bomb(cli, tmp_path):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = _cluster(tmp_path, "gpu: h100\nnodes: 1\nname: [" + ", ".join(levels) + "]\n")
    for command in (("describe", "--model", "gpt-tiny"), PLAN[:3] + ("--global-batch", "8")):
        assert_user_error(_quick(cli, *command, "--cluster", path), "YAML aliases expanded")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_deep_nesting_in_every_file(cli, tmp_path, suffix):
    deep = "[" * 100_000 + "]" * 100_000
    path = _write(tmp_path / f"deep{suffix}", deep)
    assert_user_error(_quick(cli, "describe", "--model", "gpt-tiny", "--cluster", path), "nests deeper than")
    if suffix == ".json":
        assert_user_error(_quick(cli, "describe", "--model", path, "--cluster", "cpu:1x1"), "nests deeper than")
        assert_user_error(_quick(cli, "validate", "--plan", path), "nests deeper than")
        assert_user_error(_quick(cli, *SIM, "--calibration", path), "nests deeper than")


# --------------------------------------------------------------------------- tracebacks

@pytest.mark.parametrize("flag", ["--tp", "--pp", "--micro-batch", "--dp", "--interleave"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_zero_or_negative_degrees(cli, flag, value):
    assert_user_error(_quick(cli, *PLAN, flag, value), "must be a whole number")
    assert_user_error(_quick(cli, *SIM, flag, value), "must be a whole number")


@pytest.mark.parametrize("text, fragment", [
    ("gpu: {base: h100, memory_GB: .nan}\n", "memory_GB must be positive and finite"),
    ("gpu: {base: h100, bf16_tflops: 0}\n", "bf16_tflops must be positive"),
    ("gpu: {base: h100, memory_GB: true}\n", "got True"),
    ("gpu: {base: h100, memory_bw_GBps: .inf}\n", "memory_bw_GBps"),
    ("gpu: {base: h100, memory_GB: 1.0e+300}\n", "at most"),
    ("gpu: h100\nnodes: 2\ninter_node: {kind: infiniband, latency_us: .nan}\n", "latency_us"),
    ("gpu: h100\nintra_node: {bandwidth_GBps: .nan}\n", "bandwidth_GBps"),
    ("gpu: h100\nprice_usd_per_gpu_hour: .nan\n", "price_usd_per_gpu_hour"),
    ("gpu: h100\nnodes: true\n", "nodes"),
    ("gpu: [h100]\n", "`gpu` must be a catalogue name or a mapping"),
    ("gpu: {base: [h100]}\n", "unknown GPU"),
    ("gpu: h100\nintra_node: {kind: [nvlink]}\n", "unknown link kind"),
    ("system: [dgx-h100]\n", "unknown system"),
    ("gpu: h100\nname: {a: 1}\n", "name must be text"),
    ("- gpu\n", "must hold a mapping"),
])
def test_bad_cluster_file_values(cli, tmp_path, text, fragment):
    assert_user_error(_quick(cli, "describe", "--model", "gpt-tiny", "--cluster", _cluster(tmp_path, text)),
                      fragment)


@pytest.mark.parametrize("fields, fragment", [
    (dict(tie_embeddings="yes"), "tie_embeddings must be true or false"),
    (dict(norm_eps="abc"), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(rope_theta=-1), "rope_theta"),
    (dict(arch=["gpt"]), "arch must be text"),
    (dict(attention=["sdpa"]), "attention"),
    (dict(name=5), "name must be text"),
    (dict(layers=True), "layers"),
    (dict(heads=4.0), "heads"),
])
def test_bad_model_fields(cli, tmp_path, fields, fragment):
    assert_user_error(_quick(cli, "describe", "--model", _model(tmp_path, **fields), "--cluster", "cpu:1x1"),
                      fragment)


def test_a_factory_that_raises_or_needs_an_argument(cli, tmp_path):
    path = _write(tmp_path / "f.py", "def boom():\n    raise RuntimeError('no such layer')\n"
                                     "def needs(size):\n    return None\n")
    assert_user_error(cli("describe", "--model", f"{path}:boom", "--cluster", "cpu:1x1"), "RuntimeError",
                      "no such layer")
    assert_user_error(cli("describe", "--model", f"{path}:needs", "--cluster", "cpu:1x1"),
                      "called with no arguments")


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.update(copy_bytes_per_s=float("nan")), "copy_bytes_per_s"),
    (lambda d: d.update(kernel_overhead_s="fast"), "kernel_overhead_s"),
    (lambda d: d.update(gemm=[1, 2]), "gemm must be a JSON object"),
    (lambda d: d.update(gemm={}), "no precision"),
    (lambda d: d["gemm"]["bf16"].update(peak_fraction=float("nan")), "peak_fraction"),
    (lambda d: d.update(peak_flops={"bf16": "1e15"}), "peak_flops.bf16"),
    (lambda d: d.update(comm=[]), "comm must be a JSON object"),
    (lambda d: d.update(comm={"bw_efficiency": {"nvlink": float("nan")}}), "bw_efficiency.nvlink"),
    (lambda d: d.update(measurements=[]), "measurements"),
    (lambda d: d.update(gpu=7), "gpu must be text"),
    (lambda d: d.pop("attention"), "missing or has a malformed field"),
])
def test_bad_calibration_files(cli, tmp_path, mutate, fragment):
    from cost_models.calibration import shipped_calibration
    data = shipped_calibration("h100-sxm-80gb").to_dict()
    mutate(data)
    path = _write(tmp_path / "cal.json", json.dumps(data))
    assert_user_error(_quick(cli, *SIM, "--calibration", path), fragment)


def test_non_utf8_inputs(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{}")
    assert_user_error(cli("describe", "--model", bad, "--cluster", "cpu:1x1"), "not UTF-8")
    assert_user_error(cli("validate", "--plan", bad), "not UTF-8")


# --------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("args", [
    PLAN + ("--out", "{dir}/missing/p.json"),
    PLAN + ("--plot", "{dir}/p.bmp"),
    PLAN + ("--plot", "{dir}/noext"),
    PLAN + ("--out", "/proc/p.json"),
    PLAN + ("--out", "{dir}"),
    SIM + ("--trace", "/proc/t.json"),
    SIM + ("--timeline", "{dir}/t.txt"),
    SIM + ("--memory-plot", "{dir}/m.gif"),
    SIM + ("--timeline", "{dir}/same.png", "--memory-plot", "{dir}/same.png"),
    PLAN + ("--out", "{dir}/same.png", "--plot", "{dir}/same.png"),
    ("compare", "--model", "gpt-tiny", "--clusters", "cpu:1x4", "--global-batch", "8", "--seq", "64",
     "--tokens", "1e9", "--plot", "{dir}/c.csv"),
    ("profile", "--device", "cpu", "--quick", "--out", "/proc/cal.json"),
])
def test_outputs_are_checked_before_any_work(cli, tmp_path, args):
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    assert_user_error(_quick(cli, *args, bound_s=5))
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("args", [
    PLAN + ("--out", "{keep}"), PLAN + ("--plot", "{keep}"), SIM + ("--trace", "{keep}"),
    SIM + ("--timeline", "{keep}"), SIM + ("--memory-plot", "{keep}"),
    ("profile", "--device", "cpu", "--quick", "--out", "{keep}"),
])
def test_nothing_existing_is_overwritten(cli, tmp_path, args):
    keep = _write(tmp_path / "keep.png", "precious")
    proc = _quick(cli, *[a.replace("{keep}", str(keep)) for a in args], bound_s=5)
    assert_user_error(proc, "already exists")
    assert keep.read_text() == "precious"


def test_image_suffixes_are_ones_matplotlib_writes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from planner.cli.flags import IMAGE_SUFFIXES
    assert set(IMAGE_SUFFIXES) <= set(FigureCanvasAgg(Figure()).get_supported_filetypes())


# --------------------------------------------------------------------------- exit 0 on wrong input

@pytest.mark.parametrize("extra, fragment", [
    (("--interleave", "0"), "interleave must be a whole number"),
    (("--interleave", "2", "--schedule", "1f1b"), "needs schedule interleaved"),
    (("--schedule", "interleaved", "--interleave", "1"), "interleave >= 2"),
    (("--schedule", "interleaved", "--pp", "1"), "pp >= 2"),
    (("--sequence-parallel", "--tp", "1"), "sequence_parallel needs tp >= 2"),
    (("--offload-optimizer", "--zero", "1"), "zero 2 or 3"),
    (("--micro-batch", "3"), "not a multiple"),
    (("--reserve", "-1"), "--reserve"),
    (("--reserve", "nan"), "--reserve"),
    (("--reserve", "inf"), "--reserve"),
])
def test_contradictory_or_invalid_pins(cli, extra, fragment):
    assert_user_error(_quick(cli, *PLAN, *extra, bound_s=5), fragment)


def test_flags_beside_plan_or_batch_are_refused(cli, tmp_path):
    from planner.plan import Plan
    plan = tmp_path / "p.json"
    Plan(global_batch=2, seq=32, model="gpt-tiny", cluster="cpu:1x1").save(plan)
    for extra in (("--dp", "2"), ("--seq", "64"), ("--global-batch", "4"), ("--checkpoint", "full"),
                  ("--sequence-parallel",), ("--schedule", "gpipe")):
        assert_user_error(cli("simulate", "--plan", plan, *extra), "cannot be combined with --plan")
    cases = _write(tmp_path / "cases.jsonl", "{}\n")
    for extra in (("--model", "gpt-tiny"), ("--tp", "2"), ("--calibration", "x.json"), ("--plan", str(plan))):
        assert_user_error(cli("simulate", "--batch", cases, *extra), "cannot be combined with --batch")


@pytest.mark.parametrize("model, args, fragment", [
    (GPT_TINY, ("--cluster", "cpu:1x3", "--tp", "3", "--global-batch", "8", "--seq", "64"),
     "tp 3 does not divide the model's heads"),
    ({**GPT_TINY, "arch": "llama", "kv_heads": 2}, ("--cluster", "cpu:1x4", "--tp", "4", "--global-batch", "8",
                                                    "--seq", "64"), "kv_heads"),
    (GPT_TINY, ("--cluster", "cpu:1x2", "--tp", "2", "--global-batch", "8", "--seq", "63", "--sequence-parallel"),
     "sequence parallelism splits seq 63"),
    (GPT_TINY, ("--cluster", "cpu:1x4", "--pp", "4", "--global-batch", "2", "--seq", "64"), "1f1b schedule needs"),
    (GPT_TINY, ("--cluster", "cpu:1x1", "--global-batch", "2", "--seq", "256"), "exceeds the model's max_seq"),
])
def test_simulate_refuses_plans_the_runtime_cannot_run(cli, tmp_path, model, args, fragment):
    path = _write(tmp_path / "m.json", json.dumps(model))
    assert_user_error(cli("simulate", "--model", path, *args), fragment)


@pytest.mark.parametrize("fields, fragment", [
    (dict(seq=256), "exceeds the model's max_seq"),
    (dict(tp=3, dp=1, global_batch=3), "tp 3 does not divide"),
    (dict(tp=2, tp_layout={"attn.bogus": "colwise"}), "names no module"),
    (dict(tp=2, tp_layout={"blocks.99.fc1": "colwise"}), "the model has 4 blocks"),
    (dict(tp=2, tp_layout={"qkv": "colwise"}), "must be followed by a rowwise"),
    (dict(pp=2, dp=1, global_batch=1), "1f1b schedule needs"),
])
def test_validate_checks_what_the_runtime_checks(cli, tmp_path, fields, fragment):
    from planner.plan import Plan
    path = tmp_path / "p.json"
    base = dict(dp=1, tp=1, pp=1, global_batch=4, seq=64, model="gpt-tiny")
    Plan(**{**base, **fields}).save(path)
    world = fields.get("tp", 1) * fields.get("pp", 1)
    assert_user_error(cli("validate", "--plan", path, "--cluster", f"cpu:1x{world}"), fragment)


def test_batch_answers_each_bad_line_and_runs_the_rest(cli, tmp_path):
    good = {"model": "gpt-tiny", "cluster": "cpu:1x1", "global_batch": 2, "seq": 32}
    lines = [json.dumps({**good, "checkpoint": "bogus"}), json.dumps(good), "not json", "[1]",
             json.dumps({**good, "checkpoint": 5}), json.dumps({**good, "model": 7}),
             json.dumps({**good, "tp": 0}), json.dumps({**good, "cluster": "cpu:1x2", "tp": 2, "seq": 33,
                                                        "sequence_parallel": True}),
             "[" * 100_000, json.dumps({**good, "global_batch": 10 ** 30})]
    path = tmp_path / "cases.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    proc = cli("simulate", "--batch", path)
    assert proc.returncode == 0 and proc.stderr == ""
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == len(lines) + 1
    assert "step_time_s" in out[1]
    for number, entry in enumerate(out, 1):
        if number != 2:
            assert entry["error"].startswith(f"line {number}: ") and "\n" not in entry["error"], entry


# --------------------------------------------------------------------------- the Python API

def test_the_readme_python_api():
    from planner import Plan, compare, plan, simulate
    best = plan("gpt-tiny", "cpu:1x4", global_batch=8, seq=64, top_k=1)[0]
    assert simulate(best, "gpt-tiny", "cpu:1x4").step_time_s == pytest.approx(best.result.step_time_s)
    assert isinstance(Plan(dp=2, global_batch=4), Plan) and callable(compare)


def test_the_modules_behind_the_function_names_still_import():
    import planner
    import planner.plan
    import planner.simulate.step
    from planner.plan import Plan
    from planner.simulate import SimResult, simulate
    assert planner.simulate is simulate and callable(planner.plan)
    assert sys.modules["planner.plan"].Plan is Plan and sys.modules["planner.simulate"].SimResult is SimResult
    assert sys.modules["planner.simulate.step"].simulate is simulate


def _mutated_plan():
    from planner.plan import Plan
    p = Plan(dp=4, global_batch=8, seq=64)
    p.dp = "4"
    return p


@pytest.mark.parametrize("call, fragment", [
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", 8, 64, tp=0), "tp must be a whole number"),
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", 8, 64, compute="fast"), "compute must be a ComputeModel"),
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", 8, 64, reserve_bytes=-1), "memory reserve"),
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", "8", 64), "global_batch"),
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", 8, 64, sequence_parallel="yes"), "true or false"),
    (lambda api: api.plan("gpt-tiny", "cpu:1x4", 8, 64, bogus=1), "cannot pin"),
    (lambda api: api.plan(None, "cpu:1x4", 8, 64), "a model is a preset name"),
    (lambda api: api.plan(["gpt-tiny"], "cpu:1x4", 8, 64), "a model is a preset name"),
    (lambda api: api.plan("gpt-tiny", 5, 8, 64), "a cluster is a string"),
    (lambda api: api.simulate(None, "gpt-tiny", "cpu:1x1"), "simulate needs a planner.Plan"),
    (lambda api: api.simulate(api.Plan(), "gpt-tiny", "cpu:1x1", comm="x"), "comm must be a CommModel"),
    (lambda api: api.simulate(_mutated_plan(), "gpt-tiny", "cpu:1x4"), "plan dp must be a whole number"),
    (lambda api: api.prepare(api.Plan(seq=64, tp=3), "gpt-tiny", "cpu:1x3"), "tp 3 does not divide"),
    (lambda api: api.Plan(foo=1), "unknown field(s) ['foo']"),
    (lambda api: api.Plan(*[1] * (len(fields(api.Plan)) + 1)), "at most"),
    (lambda api: api.Plan(dp="4"), "plan dp must be a whole number"),
    (lambda api: api.Plan(model=5), "plan model must be text"),
    (lambda api: api.Plan(tp=2, tp_layout={1: "colwise"}), "module names"),
    (lambda api: api.compare("gpt-tiny", ["cpu:1x4"], 1e9, 8, 64, pue="1.2"), "--pue"),
    (lambda api: api.compare("gpt-tiny", ["cpu:1x4"], float("nan"), 8, 64), "--tokens"),
    (lambda api: api.compare("gpt-tiny", "cpu:1x4", 1e9, 8, 64, prices={"cpu": "1"}), "price"),
    (lambda api: api.compare("gpt-tiny", 5, 1e9, 8, 64), "clusters must be a list"),
    (lambda api: api.compare("gpt-tiny", ["cpu:1x4"], 1e9, 8, 64, tp=0), "tp must be a whole number"),
    (lambda api: api.load_model({"arch": "gpt"}), "missing key(s)"),
    (lambda api: api.load_model(3.5), "a model is a preset name"),
    (lambda api: api.parse_cluster(None), "a cluster is a string"),
    (lambda api: api.parse_cluster("h100:0x8"), "cluster nodes"),
])
def test_the_python_api_raises_meshplan_errors(call, fragment):
    import planner
    with pytest.raises(MeshplanError) as err:
        call(planner)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_api_and_the_cli_say_the_same(cli):
    import planner
    with pytest.raises(MeshplanError) as err:
        planner.plan("gpt-tiny", "cpu:1x4", 8, 64, tp=0)
    assert_user_error(cli(*PLAN, "--tp", "0"), str(err.value))
