"""Calibration files and `meshplan profile`: a real (quick) CPU profile, JSON round trips, errors."""
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

from helpers import REPO

from cost_models import MeshplanError, get_gpu, parse_cluster
from cost_models.calibration import Calibration, default_calibration, shipped_calibration
from cost_models.comm import CommModel, group_placement
from cost_models.compute import ComputeModel, gemm_flops
from cost_models.fitting import nnls
from planner.cli.profile import main
from cost_models.profiling import profile_device, summary_lines

CPU = get_gpu("cpu")


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    """One real quick profile of this machine's CPU (a few seconds), shared by the tests.

    Profiled with one thread: on a small shared CI machine, multi-threaded GEMMs stall
    whenever another process takes a core, which makes timings noisy by 10x and more.
    """
    torch = pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("profile") / "cpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calibration = profile_device("cpu", out, quick=True)
    finally:
        torch.set_num_threads(threads)
    return out, calibration


def test_cpu_profile_measures_and_writes_a_loadable_calibration(cpu_profile):
    out, calibration = cpu_profile
    loaded = Calibration.load(out)
    assert loaded.to_dict() == calibration.to_dict()
    assert loaded.gpu == "cpu" and "meshplan profile --quick" in loaded.source
    matmul = loaded.measurements["matmul"]
    assert {r["precision"] for r in matmul} == {"fp32", "bf16"} and len(matmul) == 10
    assert all(r["seconds"] > 0 for r in matmul)
    bigger = [r["seconds"] for r in matmul if r["precision"] == "fp32" and r["m"] == r["k"] == r["n"]]
    assert bigger[0] > bigger[-1]                 # 384^3 took longer than 64^3: it really ran
    assert loaded.measurements["copy"][0]["seconds"] > 0
    assert all(r["fwd_s"] > 0 and r["bwd_s"] > 0 for r in loaded.measurements["attention"])
    scores = loaded.measurements["score_kernels"]
    assert {r["kernel"] for r in scores} == {"softmax", "dropout"} and all(r["seconds"] > 0 for r in scores)
    assert 0 < loaded.score_bandwidth_fraction <= 1
    assert "collectives" not in loaded.measurements          # one process: no collectives
    adamw = loaded.measurements["host_adamw"][0]
    assert adamw["seconds"] > 0 and loaded.host_adamw_bytes_per_s == pytest.approx(
        adamw["params"] * 28 / adamw["seconds"])          # fp32 AdamW moves 28 bytes a parameter
    assert loaded.copy_bytes_per_s > 0 and loaded.kernel_overhead_s >= 0
    assert set(loaded.fit_quality) == {"matmul_mape_pct", "attention_fwd_mape_pct", "attention_bwd_mape_pct"}
    grouped = loaded.measurements["grouped_gemm"]      # routed experts' GEMMs, one torch.mm per expert
    assert [(r["experts"], r["m"]) for r in grouped] == [(4, 64), (8, 32)] and all(r["seconds"] > 0 for r in grouped)
    model = ComputeModel(get_gpu("cpu"), loaded.at_burst())
    ratios = sorted(r["seconds"] / (r["experts"] * model.matmul_time_s(r["m"], r["k"], r["n"], r["precision"]))
                    for r in grouped)
    assert loaded.grouped_gemm_factor == pytest.approx(ratios[1])
    assert any("grouped GEMMs (routed experts" in x for x in summary_lines(loaded))
    saves = loaded.measurements["checkpoint_save"]      # a real DCP save, timed beside --out, then removed
    assert len(saves) == 3 and all(r["bytes"] == 16 * 2 ** 20 and r["seconds"] > 0 for r in saves)
    assert loaded.checkpoint_write_bytes_per_s == pytest.approx(
        sorted(r["bytes"] / r["seconds"] for r in saves)[1])
    assert sorted(p.name for p in out.parent.iterdir()) == ["cpu.json"]
    line = next(x for x in summary_lines(loaded) if "checkpoint save" in x)
    rate = re.search(r"checkpoint_write_GBps_per_gpu: (\S+)\}", line)[1]
    from cost_models.failures import reliability_from_dict    # the line's value is what a cluster file takes
    assert reliability_from_dict({"checkpoint_write_GBps_per_gpu": float(rate)}, "r").checkpoint_write_bytes_per_s_per_gpu \
        == pytest.approx(loaded.checkpoint_write_bytes_per_s, rel=1e-2)


def test_loaded_cpu_calibration_changes_predictions_towards_the_measurements(cpu_profile):
    out, _ = cpu_profile
    calibrated, default = ComputeModel(CPU, Calibration.load(out)), ComputeModel(CPU)
    rows = Calibration.load(out).measurements["matmul"]

    def rms_relative_error(model):
        """What the fit minimises, so the fitted model must win even on a noisy, busy machine."""
        return float(np.sqrt(np.mean([(model.matmul_time_s(r["m"], r["k"], r["n"], r["precision"])
                                       / r["seconds"] - 1) ** 2 for r in rows])))

    for precision in ("fp32", "bf16"):
        assert calibrated.matmul_time_s(256, 256, 256, precision) != default.matmul_time_s(256, 256, 256, precision)
    assert rms_relative_error(calibrated) < rms_relative_error(default)
    for r in rows:                                # a measured rate above the guessed peak raises it
        assert calibrated.peak_flops(r["precision"]) >= gemm_flops(r["m"], r["k"], r["n"]) / r["seconds"]


def test_profile_never_overwrites_without_force(cpu_profile, tmp_path):
    out, calibration = cpu_profile
    before = out.read_text()
    with pytest.raises(MeshplanError, match="--force"):
        main(["--device", "cpu", "--out", str(out), "--quick"])
    with pytest.raises(MeshplanError, match="--force"):
        calibration.save(out)
    assert out.read_text() == before
    calibration.save(out, force=True)
    assert Calibration.load(out).to_dict() == calibration.to_dict()


@pytest.mark.parametrize("argv, fragment", [
    (["--device", "tpu", "--out", "x.json"], "unknown device"),
    (["--device", "cpu", "--out", "x.json", "--gpu", "z100"], "unknown GPU"),
    (["--device", "cpu"], "--out"),
    (["--device", "cpu", "--out", "no/such/folder/x.json"], "does not exist"),
    (["--device", "cpu", "--out", "x.json", "--fast"], "unrecognized arguments"),
    (["--device", "cpu", "--out", "x.json", "--save-dir", "nowhere"], "--save-dir 'nowhere' is not a directory"),
])
def test_profile_mistakes_are_one_line_user_errors(argv, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MeshplanError, match=fragment) as err:
        main(argv)
    assert "\n" not in str(err.value)


def test_cuda_profile_without_a_gpu_is_a_user_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(MeshplanError, match="no CUDA GPU"):
        profile_device("cuda", tmp_path / "x.json", gpu="h100")


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("text, fragment", [
    ("not json", "not valid JSON"),
    ("{\"format\": \"other\"}", "not a meshplan calibration"),
    ("{\"format\": \"meshplan-calibration\", \"version\": 99}", "version 99"),
    ("{\"format\": \"meshplan-calibration\", \"version\": 1, \"gpu\": \"h100\"}", "missing or has a malformed field"),
])
def test_bad_calibration_files_are_user_errors(tmp_path, text, fragment):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(MeshplanError, match=fragment):
        Calibration.load(path)
    with pytest.raises(MeshplanError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_negative_constants_are_refused(tmp_path):
    data = shipped_calibration("h100-sxm-80gb").to_dict()
    data["copy_bytes_per_s"] = -1
    with pytest.raises(MeshplanError, match="copy_bytes_per_s"):
        Calibration.from_dict(data)


def test_json_round_trip_and_transfer():
    h100 = shipped_calibration("h100-sxm-80gb")
    assert Calibration.from_dict(json.loads(json.dumps(h100.to_dict()))) == h100
    a100 = get_gpu("a100")
    moved = h100.transferred_to(a100)
    assert moved.gpu == a100.name and moved.measurements == {}
    assert moved.gemm == h100.gemm and moved.attention_fwd == h100.attention_fwd
    assert moved.copy_bytes_per_s / a100.memory_bw_bytes_per_s == pytest.approx(
        h100.copy_bytes_per_s / h100.memory_bw_bytes_per_s)
    assert default_calibration(get_gpu("h100")) is h100


def test_a100_40gb_takes_the_a100_80gb_efficiencies_not_the_h100s():
    """Same chip and power limit, other HBM: the 40GB part gets the fitted A100 calibration
    transferred to its datasheet (its copy bandwidth scaled to its HBM), so an A100 40GB
    runs a GEMM at the A100's fitted rate, where the H100's transfer would have it slower."""
    a100, a100_40gb = shipped_calibration("a100-sxm-80gb"), get_gpu("a100-sxm-40gb")
    chosen = default_calibration(a100_40gb)
    assert chosen.gemm == a100.gemm and chosen.host_s_per_op == a100.host_s_per_op
    assert chosen.copy_bytes_per_s == pytest.approx(
        a100.copy_bytes_per_s * a100_40gb.memory_bw_bytes_per_s / a100.memory_bw_bytes_per_s)
    gemm_s = ComputeModel(a100_40gb, chosen).matmul_time_s(8192, 8192, 8192, "bf16")
    gemm_80gb_s = ComputeModel(get_gpu("a100-sxm-80gb")).matmul_time_s(8192, 8192, 8192, "bf16")
    assert gemm_80gb_s <= gemm_s < 1.01 * gemm_80gb_s   # only the traffic term sees the slower HBM
    h100_transfer = shipped_calibration("h100-sxm-80gb").transferred_to(a100_40gb)
    assert ComputeModel(a100_40gb, h100_transfer).matmul_time_s(8192, 8192, 8192, "bf16") > 1.1 * gemm_s


def test_a100_training_rate_is_stored_as_burst_times_sustained():
    """The A100's 16-bit GEMM rate is fitted on training steps; it is stored as a burst
    fraction times a sustained share below 1, so a profile of an A100 (which measures the
    burst rate) is derated by that share like an H100's (training_constants_like)."""
    from cost_models.calibration import training_constants_like
    a100 = shipped_calibration("a100-sxm-80gb")
    for precision in ("bf16", "fp16"):
        fit = a100.gemm[precision]
        assert fit.sustained < 1.0 and fit.peak_fraction * fit.sustained == pytest.approx(0.775)
    profiled = replace(a100, gemm={p: replace(f, sustained=1.0) for p, f in a100.gemm.items()})
    assert training_constants_like(profiled, a100).gemm == a100.gemm


def test_offload_runs_at_the_measured_host_adamw_rate(cpu_profile):
    """A profiled host's AdamW rate replaces the assumed one in the offloaded optimizer step."""
    from cost_models.compute import HOST_ADAMW_BYTES_PER_S
    out, _ = cpu_profile
    measured = Calibration.load(out)
    params = 1e9
    pcie = 2 * params * 4 / CPU.host_link_bw_bytes_per_s
    assert ComputeModel(CPU, measured).offloaded_optimizer_step_time_s(params) == pytest.approx(
        pcie + params * 28 / measured.host_adamw_bytes_per_s)
    unmeasured = replace(measured, host_adamw_bytes_per_s=0.0)
    assert ComputeModel(CPU, unmeasured).offloaded_optimizer_step_time_s(params) == pytest.approx(
        pcie + params * 28 / HOST_ADAMW_BYTES_PER_S)


def test_missing_precisions_borrow_the_nearest_fit():
    h100 = shipped_calibration("h100-sxm-80gb")
    assert "fp8" not in h100.gemm
    assert h100.gemm_fit("fp8") == h100.gemm["bf16"]


def test_nnls_matches_a_known_solution():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1.0, size=(30, 4))
    truth = np.array([0.5, 0.0, 2.0, 1.0])
    assert nnls(a, a @ truth) == pytest.approx(truth, abs=1e-9)
    # a negative unconstrained optimum is clamped to zero
    b = a @ np.array([1.0, -0.5, 0.0, 0.0])
    assert nnls(a, b).min() >= 0


# --------------------------------------------------------------------------- collectives

_WORKER = textwrap.dedent("""
    import datetime, json, os, sys
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from cost_models.fitting import fit_comm
    from cost_models.profiling import measure_collectives, _single_host
    from cost_models.hardware import get_gpu

    def run(rank, store, out):
        # a file rendezvous: no port to lose to another process between choosing and binding it;
        # a timeout turns a stuck collective into an error the test prints
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        rows = measure_collectives("cpu", (4096, 1 << 20), 0.01)
        fit = fit_comm(rows, get_gpu("cpu"), _single_host())
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"rows": rows, "fit": fit}, f)
        # torch 2.7's gloo destroy_process_group hangs now and then (2 of 20 runs here, even
        # after a barrier; CI's 2.7 part timed out on it): the ranks meet, then leave at once
        dist.barrier()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""")


@pytest.mark.distributed
def test_collectives_are_measured_across_two_gloo_ranks(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "comm.json"
    script.write_text(_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(out)], capture_output=True,
                          text=True, timeout=240, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ops = {r["op"] for r in result["rows"]}
    assert {"all_reduce", "all_gather"} <= ops
    assert all(r["world_size"] == 2 and r["seconds"] > 0 for r in result["rows"])
    efficiency, latency = result["fit"]
    assert efficiency["shm"] > 0 and latency["shm"] > 0
    # the fitted figures drive the comm model of a CPU cluster
    calibration = Calibration.from_dict({**shipped_calibration("h100-sxm-80gb").to_dict(), "gpu": "cpu",
                                         "comm": {"bw_efficiency": efficiency, "latency_s": latency}})
    cluster = parse_cluster("cpu:1x2")
    group = group_placement(cluster, {"dp": 2}, "dp")
    model = CommModel(cluster, calibration)
    assert model.bw_efficiency["shm"] == efficiency["shm"]
    assert model.all_reduce_s(1 << 20, group) != CommModel(cluster).all_reduce_s(1 << 20, group)


def test_sustained_gemm_rate_slows_only_the_math():
    """GemmFit.sustained divides the math rate; the traffic term and the overhead stay."""
    h100 = shipped_calibration("h100-sxm-80gb")
    burst = h100.at_burst()
    assert all(f.sustained == 1.0 for f in burst.gemm.values())
    halved = replace(burst, gemm={p: replace(f, sustained=0.5) for p, f in burst.gemm.items()})
    gpu = get_gpu("h100")
    m, k, n = 8192, 8192, 8192
    math_s = gemm_flops(m, k, n) / (gpu.peak_flops["bf16"] * burst.gemm["bf16"].peak_fraction)
    fast = ComputeModel(gpu, burst).matmul_time_s(m, k, n, "bf16")
    slow = ComputeModel(gpu, halved).matmul_time_s(m, k, n, "bf16")
    assert slow - fast == pytest.approx(math_s, rel=1e-9)
    # a GEMV is bandwidth-bound: no math rate changes it
    assert ComputeModel(gpu, halved).matmul_time_s(1, 8192, 8192, "bf16") == pytest.approx(
        ComputeModel(gpu, burst).matmul_time_s(1, 8192, 8192, "bf16"))


def test_sustained_rate_is_validated_and_optional_in_json():
    data = shipped_calibration("h100-sxm-80gb").to_dict()
    data["gemm"]["bf16"]["sustained"] = 1.5
    with pytest.raises(MeshplanError, match="sustained"):
        Calibration.from_dict(data)
    del data["gemm"]["bf16"]["sustained"]   # files written before the field: not derated
    assert Calibration.from_dict(data).gemm["bf16"].sustained == 1.0


def test_gpu_profile_takes_the_training_step_constants_from_the_shipped_calibration(cpu_profile):
    """A profile times kernels back to back in bursts; for a GPU, the constants only whole
    training steps show - GEMM derating per precision, host time per op, host/device
    overlap - come from the GPU's shipped (or transferred H100) calibration, the way
    profile_device applies them; everything measured stays as measured."""
    from cost_models.calibration import training_constants_like
    _, measured = cpu_profile
    assert all(f.sustained == 1.0 for f in measured.gemm.values())   # a CPU profile stays as measured
    assert measured.host_s_per_op == 0.0 == measured.host_overlap_exponent
    measured = replace(measured, gemm={"fp32": measured.gemm_fit("fp32"), "bf16": measured.gemm_fit("bf16")})
    h100 = shipped_calibration("h100-sxm-80gb")
    as_gpu = training_constants_like(measured, h100)
    assert as_gpu.gemm["bf16"].sustained < 1.0 == as_gpu.gemm["fp32"].sustained
    for precision, fit in as_gpu.gemm.items():
        assert fit.sustained == h100.gemm_fit(precision).sustained
        assert fit.peak_fraction == measured.gemm[precision].peak_fraction
    assert (as_gpu.host_s_per_op, as_gpu.host_overlap_exponent) == (h100.host_s_per_op, h100.host_overlap_exponent)
    assert as_gpu.copy_bytes_per_s == measured.copy_bytes_per_s and as_gpu.attention_fwd == measured.attention_fwd
    # and the compute model charges it: eager ops cost host time under the GPU calibration
    cpu = get_gpu(measured.gpu)
    assert ComputeModel(cpu, as_gpu).host_s_per_op == h100.host_s_per_op > 0
    assert ComputeModel(cpu, measured).host_s_per_op == 0.0