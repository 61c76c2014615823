"""Fitting a calibration from raw measurements: relative-error least squares for GEMMs,
attention, copies, score kernels, host AdamW and collectives, and the fit's error on its data."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cost_models.calibration import AttentionFit, Calibration, GemmFit
from cost_models.cluster import default_intra_link
from cost_models.compute import ComputeModel, attention_flops, gemm_bytes, gemm_flops, scaled_gemm_bytes
from cost_models.errors import MeshplanError
from cost_models.hardware import PRECISIONS, GPUSpec
from cost_models.memory import adamw_bytes_per_param


def measurements_from_reference(path) -> tuple[dict, str]:
    """shared/reference/h100/measured.jsonl rows in the calibration's measurement format,
    and the device name (used by benchmarks/fit_h100_compute.py and the tests)."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    device = next(r["device"] for r in rows if r.get("kind") == "env")
    matmul = [dict(precision=r["dtype"], m=r["M"], k=r["K"], n=r["N"], batch=1, seconds=r["seconds"])
              for r in rows if r.get("kind") == "matmul"]
    copy = [dict(bytes=r["bytes"], seconds=r["seconds"]) for r in rows if r.get("kind") == "copy"]
    attention = [dict(precision="bf16", batch=r["B"], heads=r["heads"], seq_q=r["T"], seq_kv=r["T"],
                      head_dim=r["D"], causal=True, fwd_s=r["fwd_s"], bwd_s=r["fwd_bwd_s"] - r["fwd_s"])
                 for r in rows if r.get("kind") == "sdpa_causal_bf16"]
    return dict(matmul=matmul, copy=copy, attention=attention), device



def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by enumerating supports (exact; fine for <= 12 unknowns).

    The optimum is the unconstrained least-squares solution on its own support, so the
    best feasible support solution is the global optimum. numpy only (no SciPy dependency).
    """
    n = a.shape[1]
    if n > 12:
        raise MeshplanError(f"too many unknowns ({n}) for the calibration fit")
    best, best_err = np.zeros(n), float(np.sum(b ** 2))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x_s = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if np.any(x_s < 0):
                continue
            err = float(np.sum((a[:, cols] @ x_s - b) ** 2))
            if err < best_err - 1e-15:
                best, best_err = np.zeros(n), err
                best[cols] = x_s
    return best


def fit_copy(rows: list) -> float:
    """Achieved copy bandwidth (bytes read + written per second) from the largest copy measured."""
    if not rows:
        raise MeshplanError("no copy measurement to calibrate memory bandwidth from")
    row = max(rows, key=lambda r: r["bytes"])
    return 2 * row["bytes"] / row["seconds"]


def fit_host_adamw(rows: list) -> float:
    """AdamW traffic per second of the host's optimizer step: the fastest measurement's rate
    (0 when nothing was measured)."""
    rates = [r["params"] * adamw_bytes_per_param() / r["seconds"] for r in rows if r["seconds"] > 0]
    return max(rates, default=0.0)


def fit_gemm(rows: list, peak_flops: dict, copy_bytes_per_s: float) -> tuple[float, dict]:
    """Fit one shared kernel overhead and a GemmFit per precision, minimising relative error.

    Unknowns (all >= 0): overhead c, and per precision a (1/peak_fraction = 1 + a) and w
    (traffic weight); each row gives t = c + (1 + a) F/P + w Bmin/bw, divided by t.
    """
    precisions = sorted({r["precision"] for r in rows}, key=PRECISIONS.index)
    if not precisions:
        raise MeshplanError("no GEMM measurement to calibrate from")
    a_rows, b = [], []
    for r in rows:
        t = r["seconds"]
        math_s = gemm_flops(r["m"], r["k"], r["n"], r.get("batch", 1)) / peak_flops[r["precision"]]
        traffic_s = _gemm_row_bytes(r) / copy_bytes_per_s
        row = np.zeros(1 + 2 * len(precisions))
        j = 1 + 2 * precisions.index(r["precision"])
        row[0], row[j], row[j + 1] = 1 / t, math_s / t, traffic_s / t
        a_rows.append(row)
        b.append(1 - math_s / t)
    x = nnls(np.array(a_rows), np.array(b))
    fits = {p: GemmFit(peak_fraction=1 / (1 + x[1 + 2 * i]), traffic_weight=float(x[2 + 2 * i]))
            for i, p in enumerate(precisions)}
    return float(x[0]), fits


def fit_attention(rows: list, peak_flops: dict, direction: str) -> AttentionFit:
    """Fit fixed_s and peak_fraction of one direction ("fwd" or "bwd") by relative error."""
    if not rows:
        raise MeshplanError("no attention measurement to calibrate from")
    a_rows, b = [], []
    for r in rows:
        t = r[f"{direction}_s"]
        flops = attention_flops(r["batch"], r["heads"], r["seq_q"], r["seq_kv"], r["head_dim"],
                                r["causal"], backward=direction == "bwd")
        math_s = flops / peak_flops[r["precision"]]
        a_rows.append([1 / t, math_s / t])
        b.append(1 - math_s / t)
    fixed_s, extra = nnls(np.array(a_rows), np.array(b))
    return AttentionFit(peak_fraction=float(1 / (1 + extra)), fixed_s=float(fixed_s))


def calibrated_peaks(gpu: GPUSpec, matmul_rows: list) -> dict:
    """Datasheet peaks, raised to the best measured rate where a measurement beat them.

    Only plausible for the `cpu` catalogue entry, whose figures are guesses; a GPU never
    beats its datasheet, so for GPUs this returns the datasheet peaks unchanged.
    """
    peaks = dict(gpu.peak_flops)
    for r in matmul_rows:
        rate = gemm_flops(r["m"], r["k"], r["n"], r.get("batch", 1)) / r["seconds"]
        peaks[r["precision"]] = max(peaks.get(r["precision"], 0.0), rate)
    return peaks


def build_calibration(gpu: GPUSpec, measurements: dict, source: str, device_name: str = "",
                      comm: tuple[dict, dict] = ({}, {})) -> Calibration:
    """Fit every constant from raw measurements (see `profile_device` for the row formats)."""
    copy_bps = fit_copy(measurements.get("copy", []))
    peaks = calibrated_peaks(gpu, measurements.get("matmul", []))
    overhead_s, gemm = fit_gemm(measurements.get("matmul", []), peaks, copy_bps)
    attention_rows = measurements.get("attention", [])
    calibration = Calibration(
        gpu=gpu.name, kernel_overhead_s=overhead_s, copy_bytes_per_s=copy_bps, gemm=gemm,
        attention_fwd=fit_attention(attention_rows, peaks, "fwd"),
        attention_bwd=fit_attention(attention_rows, peaks, "bwd"),
        peak_flops=peaks, memory_bw_bytes_per_s=gpu.memory_bw_bytes_per_s,
        comm_bw_efficiency=dict(comm[0]), comm_latency_s=dict(comm[1]),
        host_adamw_bytes_per_s=fit_host_adamw(measurements.get("host_adamw", [])),
        score_bandwidth_fraction=fit_score_fraction(measurements.get("score_kernels", []), copy_bps),
        checkpoint_write_bytes_per_s=fit_checkpoint_write(measurements.get("checkpoint_save", [])),
        source=source, device_name=device_name, measurements=measurements)
    calibration = replace(calibration, grouped_gemm_factor=fit_grouped_gemm(
        calibration, gpu, measurements.get("grouped_gemm", [])))
    return replace(calibration, fit_quality=fit_quality(calibration, gpu))


def fit_grouped_gemm(calibration: Calibration, gpu: GPUSpec, rows: list) -> float | None:
    """The median over the grouped cases of measured time / the dense fit's time for the same
    per-expert GEMMs (None when none was measured)."""
    if not rows:
        return None
    model = ComputeModel(gpu, calibration.at_burst())
    ratios = sorted(r["seconds"] / (r["experts"] * model.matmul_time_s(r["m"], r["k"], r["n"], r["precision"]))
                    for r in rows)
    return ratios[len(ratios) // 2]


def fit_checkpoint_write(rows: list) -> float:
    """The median of the measured saves' bytes per second (0 when none was measured)."""
    rates = sorted(r["bytes"] / r["seconds"] for r in rows if r.get("seconds", 0) > 0)
    return rates[len(rates) // 2] if rates else 0.0


def fit_quality(calibration: Calibration, gpu: GPUSpec) -> dict:
    """Mean absolute percentage errors of the calibration on its own measurements."""
    model = ComputeModel(gpu, calibration.at_burst())
    out = {}
    matmul = calibration.measurements.get("matmul", [])
    if matmul:
        out["matmul_mape_pct"] = mape([predict_matmul_row(model, r) for r in matmul],
                                      [r["seconds"] for r in matmul])
    rows = calibration.measurements.get("attention", [])
    for direction in ("fwd", "bwd") if rows else ():
        predicted = [predict_attention_row(model, r, backward=direction == "bwd") for r in rows]
        out[f"attention_{direction}_mape_pct"] = mape(predicted, [r[f"{direction}_s"] for r in rows])
    return out


def _gemm_row_bytes(r: dict) -> float:
    """A measured GEMM's minimum traffic: a float8 one (torch._scaled_mm) writes bf16."""
    if r["precision"] == "fp8":
        return scaled_gemm_bytes(r["m"], r["k"], r["n"], r.get("batch", 1))
    return gemm_bytes(r["m"], r["k"], r["n"], r["precision"], r.get("batch", 1))


def predict_matmul_row(model, row: dict) -> float:
    """The model's time for one measured GEMM row."""
    if row["precision"] == "fp8":
        return model.scaled_matmul_time_s(row["m"], row["k"], row["n"], row.get("batch", 1))
    return model.matmul_time_s(row["m"], row["k"], row["n"], row["precision"], row.get("batch", 1))


def predict_attention_row(model, row: dict, backward: bool) -> float:
    """The model's time for one measured attention row, in one direction."""
    return model.attention_time_s(row["batch"], row["heads"], row["seq_q"], row["seq_kv"], row["head_dim"],
                                  row["precision"], causal=row["causal"], backward=backward)


def mape(predicted, measured) -> float:
    """Mean absolute percentage error, in percent."""
    errors = [abs(p / m - 1) for p, m in zip(predicted, measured)]
    return 100 * sum(errors) / len(errors)


def fit_comm(rows: list, gpu: GPUSpec, single_host: bool) -> tuple[dict, dict]:
    """Achieved-bandwidth fraction and per-step latency of the intra-node link from all-reduces.

    Only single-host runs are fitted: then every byte crossed the intra-node link, whose
    peak is the catalogue's (`default_intra_link`). busbw = 2(n-1)/n * bytes / t (the
    nccl-tests convention); latency = smallest all-reduce time / (2(n-1)) ring steps.
    Multi-host measurements are kept raw in the calibration only.
    """
    all_reduce = [r for r in rows if r["op"] == "all_reduce" and r["world_size"] > 1]
    if not single_host or not all_reduce:
        return {}, {}
    link = default_intra_link(gpu)
    n = all_reduce[0]["world_size"]
    busbw = max(2 * (n - 1) / n * r["bytes"] / r["seconds"] for r in all_reduce)
    smallest = min(all_reduce, key=lambda r: r["bytes"])
    return ({link.kind: busbw / link.bandwidth_bytes_per_s},
            {link.kind: smallest["seconds"] / (2 * (n - 1))})



def fit_score_fraction(rows: list, copy_bytes_per_s: float) -> float | None:
    """score_bandwidth_fraction: the score kernels' bytes over their time, as a fraction of
    the copy rate (capped at 1), or None when nothing was measured."""
    seconds = sum(r["seconds"] for r in rows)
    if not rows or seconds <= 0:
        return None
    return min(1.0, sum(r["bytes"] for r in rows) / seconds / copy_bytes_per_s)
