"""Calibrations: the empirical constants of the compute and communication models.

A calibration holds, for one GPU model, what the first-principles formulas cannot know:
how close to the datasheet peak real kernels get. It is fitted from measurements
(GEMMs over a shape grid, flash attention forward/backward, a device copy, optionally
collectives) and stored as JSON:

- shipped ones live in `cost_models/data/<catalogue name>.json`; the H100 one is built
  by `benchmarks/fit_h100_compute.py` from `shared/reference/h100/measured.jsonl`;
- `meshplan profile` (`main` / `profile_device` here) measures the current machine
  and writes one; `Calibration.load` reads it back for `ComputeModel`/`CommModel`. A GPU
  profile keeps the constants only whole training steps can fit (GEMM derating under
  sustained load, host time per op, host/device overlap) from the GPU's shipped calibration
  (`training_constants_like`).

A GPU without its own calibration gets the H100 one *transferred*: every efficiency is
a fraction of a peak (FLOP/s fraction of the precision's datasheet peak, copy bandwidth
as a fraction of HBM bandwidth), so it carries over by scaling with the other GPU's
datasheet; fixed times (kernel overhead, attention call overhead) carry over as seconds.

The model forms, fitted per calibration (all fitted constants are empirical):
  GEMM       t = kernel_overhead_s + max(flops / (peak * peak_fraction * sustained)
                 + traffic_weight * min_bytes / copy_bytes_per_s, min_bytes / copy_bytes_per_s)
             (sustained: the share of the microbenchmarked rate kept in whole training steps)
  attention  t = fixed_s + flops / (peak * peak_fraction)       (per direction)
  copy       t = kernel_overhead_s + bytes_moved / copy_bytes_per_s
  scores     t = kernel_overhead_s + bytes_moved / (copy_bytes_per_s * score_bandwidth_fraction)
             (softmax, mask, dropout over an unfused attention's seq x seq scores)
`compute.py` owns the first-principles parts (FLOP and byte counts).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from cost_models.errors import MeshplanError
from cost_models.hardware import PRECISIONS, GPUSpec, get_gpu
from cost_models.units import GB

FORMAT = "meshplan-calibration"
VERSION = 1
REFERENCE_GPU = "h100-sxm-80gb"   # the GPU whose shipped calibration is the default curve
# The GPU whose shipped calibration fitted score_bandwidth_fraction (on vTrain's Megatron runs,
# benchmarks/fit_a100.py): GPUs that neither fitted nor measured their own use its value.
SCORE_FIT_GPU = "a100-sxm-80gb"

# Where a precision without its own GEMM fit borrows one, nearest first. fp8 was not
# measured anywhere: it borrows the 16-bit tensor-core fit (an assumption).
PRECISION_FALLBACK = {"fp8": ("bf16", "fp16"), "bf16": ("fp16",), "fp16": ("bf16",),
                      "tf32": ("bf16", "fp16"), "fp32": ("tf32",)}


@dataclass(frozen=True)
class GemmFit:
    """Empirical GEMM efficiency for one precision.

    peak_fraction: fraction of the precision's peak that the math part reaches (<= 1).
    traffic_weight: multiplier on the minimum DRAM traffic time (read A and B, write C
    once at the achieved copy bandwidth) that is *not* hidden behind the math; it is
    what makes thin GEMMs (small K, small M*N) slower than their FLOPs alone.
    """

    peak_fraction: float
    traffic_weight: float
    # The fraction of the microbenchmarked math rate that GEMMs keep inside whole training
    # steps (a step holds the GPU at its power and thermal limits for hundreds of ms, where
    # a microbenchmark's few back-to-back launches do not). Fitted on measured training
    # steps where a calibration has them (benchmarks/fit_h100_compute.py); 1 = not derated.
    sustained: float = 1.0

    def __post_init__(self):
        _check_fraction(self.peak_fraction, "GEMM peak_fraction")
        _positive(self.traffic_weight, "GEMM traffic_weight", zero_ok=True)
        _check_fraction(self.sustained, "GEMM sustained")


@dataclass(frozen=True)
class AttentionFit:
    """Empirical flash-attention cost for one direction (forward or backward).

    fixed_s: per-call time that does not scale with FLOPs (launches, prologue and
    epilogue, short-sequence inefficiency; in single-shot measurements also host
    dispatch). peak_fraction: fraction of the peak the FLOP-proportional part reaches.
    """

    peak_fraction: float
    fixed_s: float

    def __post_init__(self):
        _check_fraction(self.peak_fraction, "attention peak_fraction")
        _positive(self.fixed_s, "attention fixed_s", zero_ok=True)


@dataclass(frozen=True)
class Calibration:
    """Fitted constants for one GPU model (catalogue name in `gpu`)."""

    gpu: str
    kernel_overhead_s: float
    copy_bytes_per_s: float
    gemm: dict                       # precision -> GemmFit
    attention_fwd: AttentionFit
    attention_bwd: AttentionFit
    peak_flops: dict                 # precision -> the FLOP/s the fractions refer to
    memory_bw_bytes_per_s: float     # HBM peak of the measured GPU (to transfer copy_bytes_per_s)
    comm_bw_efficiency: dict = field(default_factory=dict)   # link kind -> achieved fraction
    comm_latency_s: dict = field(default_factory=dict)       # link kind -> alpha per step
    # Host time per launched aten op in eager PyTorch (a property of the host CPU and the
    # framework more than of the GPU): layers whose kernels are shorter are host-bound.
    host_s_per_op: float = 0.0
    # How host and device time of a layer combine: (device^p + host^p)^(1/p). The GPU runs
    # ahead of the host only as far as the layer's ops let it (short kernels after long ones
    # wait for their launch), so near the crossover the two add partly. 0 = plain max.
    host_overlap_exponent: float = 0.0
    # One GPU's share of the host's CPU AdamW rate, in bytes of AdamW traffic per second
    # (memory.adamw_bytes_per_param per parameter): what optimizer offload runs at. A
    # property of the host; 0 = not measured (compute.HOST_ADAMW_BYTES_PER_S is assumed).
    host_adamw_bytes_per_s: float = 0.0
    # Achieved bandwidth of the memory-bound kernels that run over an unfused attention's
    # score tensor (batch x heads x seq x seq: scale-mask-softmax, dropout) as a fraction of
    # copy_bytes_per_s: each softmax row is a reduction held in one warp's registers, and the
    # dropout draws a random number per score, so they stream slower than a copy. None = not
    # fitted or measured for this GPU: SCORE_FIT_GPU's value is used (empirical, see
    # ComputeModel.score_bw_bytes_per_s).
    score_bandwidth_fraction: float | None = None
    source: str = ""
    device_name: str = ""
    measurements: dict = field(default_factory=dict)         # raw rows, for refits and provenance
    fit_quality: dict = field(default_factory=dict)          # MAPEs of the fit on its own data

    def gemm_fit(self, precision: str) -> GemmFit:
        """This precision's GEMM fit, or the nearest measured precision's (see PRECISION_FALLBACK)."""
        for name in (precision, *PRECISION_FALLBACK.get(precision, ())):
            if name in self.gemm:
                return self.gemm[name]
        return next(iter(self.gemm.values()))

    def at_burst(self) -> "Calibration":
        """This calibration as its microbenchmarks saw the GPU: GEMMs not derated for
        sustained training load (what its own GEMM measurements are scored against)."""
        return replace(self, gemm={p: replace(f, sustained=1.0) for p, f in self.gemm.items()})

    def transferred_to(self, gpu: GPUSpec) -> "Calibration":
        """This calibration's efficiencies applied to another GPU's datasheet.

        Fractions of peak and fixed times carry over; the copy bandwidth is scaled by
        the ratio of HBM bandwidths; raw measurements stay behind (they are not of `gpu`).
        """
        scale = gpu.memory_bw_bytes_per_s / self.memory_bw_bytes_per_s
        return replace(self, gpu=gpu.name, copy_bytes_per_s=self.copy_bytes_per_s * scale,
                       peak_flops=dict(gpu.peak_flops), memory_bw_bytes_per_s=gpu.memory_bw_bytes_per_s,
                       source=f"transferred from the {self.gpu} calibration (fractions of peak); "
                              f"run `meshplan profile --gpu {gpu.name}` on one to measure it",
                       device_name="", measurements={}, fit_quality={})

    def to_dict(self) -> dict:
        """A JSON-ready copy: editing it never changes this (possibly cached, shared) calibration."""
        return copy.deepcopy({
            "format": FORMAT, "version": VERSION, "gpu": self.gpu, "device_name": self.device_name,
            "source": self.source, "kernel_overhead_s": self.kernel_overhead_s,
            "copy_bytes_per_s": self.copy_bytes_per_s,
            "memory_bw_bytes_per_s": self.memory_bw_bytes_per_s, "peak_flops": self.peak_flops,
            "gemm": {p: asdict(f) for p, f in self.gemm.items()},
            "attention": {"fwd": asdict(self.attention_fwd), "bwd": asdict(self.attention_bwd)},
            "comm": {"bw_efficiency": self.comm_bw_efficiency, "latency_s": self.comm_latency_s},
            "host_s_per_op": self.host_s_per_op, "host_overlap_exponent": self.host_overlap_exponent,
            "host_adamw_bytes_per_s": self.host_adamw_bytes_per_s,
            "score_bandwidth_fraction": self.score_bandwidth_fraction,
            "fit_quality": self.fit_quality, "measurements": self.measurements,
        })

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration") -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MeshplanError(f"{where} is not a meshplan calibration (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise MeshplanError(f"{where} has calibration version {data.get('version')!r}; "
                                f"this meshplan reads version {VERSION}: re-run `meshplan profile`")
        try:
            comm = data.get("comm", {})
            return cls(
                gpu=str(data["gpu"]), kernel_overhead_s=_positive(data["kernel_overhead_s"], "kernel_overhead_s", zero_ok=True),
                copy_bytes_per_s=_positive(data["copy_bytes_per_s"], "copy_bytes_per_s"),
                gemm={p: GemmFit(**f) for p, f in data["gemm"].items()},
                attention_fwd=AttentionFit(**data["attention"]["fwd"]),
                attention_bwd=AttentionFit(**data["attention"]["bwd"]),
                peak_flops={p: float(v) for p, v in data["peak_flops"].items()},
                memory_bw_bytes_per_s=_positive(data["memory_bw_bytes_per_s"], "memory_bw_bytes_per_s"),
                comm_bw_efficiency=dict(comm.get("bw_efficiency", {})),
                comm_latency_s=dict(comm.get("latency_s", {})),
                host_s_per_op=_positive(data.get("host_s_per_op", 0.0), "host_s_per_op", zero_ok=True),
                host_overlap_exponent=_positive(data.get("host_overlap_exponent", 0.0), "host_overlap_exponent",
                                                zero_ok=True),
                host_adamw_bytes_per_s=_positive(data.get("host_adamw_bytes_per_s", 0.0), "host_adamw_bytes_per_s",
                                                 zero_ok=True),
                score_bandwidth_fraction=_optional_fraction(data.get("score_bandwidth_fraction"),
                                                            "score_bandwidth_fraction"),
                source=str(data.get("source", "")), device_name=str(data.get("device_name", "")),
                measurements=dict(data.get("measurements", {})),
                fit_quality=dict(data.get("fit_quality", {})))
        except (KeyError, TypeError) as exc:
            raise MeshplanError(f"{where} is missing or has a malformed field ({exc}); "
                                f"re-create it with `meshplan profile`") from None

    @classmethod
    def load(cls, path) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MeshplanError(f"calibration file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MeshplanError(f"calibration file {str(path)!r} is not readable JSON: "
                                f"{str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, where=f"calibration file {str(path)!r}")

    def save(self, path, force: bool = False) -> Path:
        """Write JSON; refuses to replace an existing file unless `force`."""
        path = Path(path)
        if not path.parent.is_dir():
            raise MeshplanError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        try:
            with open(path, "w" if force else "x") as f:
                f.write(text)
        except FileExistsError:
            raise MeshplanError(f"{str(path)!r} exists; pass --force to overwrite it") from None
        return path


def _check_fraction(value, name: str) -> None:
    if not 0 < float(value) <= 1:
        raise MeshplanError(f"calibration field {name} must be in (0, 1], got {value}")


def _positive(value, name: str, zero_ok: bool = False) -> float:
    value = float(value)
    if value < 0 or (value == 0 and not zero_ok):
        raise MeshplanError(f"calibration field {name} must be {'>= 0' if zero_ok else '> 0'}, got {value}")
    return value


def _optional_fraction(value, name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not 0 < value <= 1:
        raise MeshplanError(f"calibration field {name} must be in (0, 1] or null, got {value}")
    return value


def score_fraction_fallback() -> float:
    """score_bandwidth_fraction for a GPU without its own: SCORE_FIT_GPU's fitted value (1.0,
    a copy's rate, if that is missing too)."""
    fitted = shipped_calibration(SCORE_FIT_GPU)
    return fitted.score_bandwidth_fraction if fitted and fitted.score_bandwidth_fraction else 1.0


# --------------------------------------------------------------------------- shipped data

def _data_file(name: str):
    return resources.files("cost_models") / "data" / f"{name}.json"


@lru_cache(maxsize=None)
def shipped_calibration(gpu_name: str) -> Calibration | None:
    """The calibration shipped in cost_models/data for this catalogue name, if any."""
    file = _data_file(gpu_name)
    if not file.is_file():
        return None
    return Calibration.from_dict(json.loads(file.read_text()), where=f"shipped calibration {gpu_name}")


# Catalogue GPUs without a calibration of their own that share a calibrated one's chip, power
# limit and software (same peaks per datasheet): they take its efficiencies, transferred to
# their own datasheet (the A100 40GB differs from the 80GB in HBM size and bandwidth only),
# rather than the H100's.
SAME_CHIP = {"a100-sxm-40gb": "a100-sxm-80gb"}


def default_calibration(gpu: GPUSpec) -> Calibration:
    """The shipped calibration for `gpu`, else its SAME_CHIP sibling's, else the H100 one,
    transferred to its datasheet.

    A shipped calibration whose datasheet figures differ from `gpu`'s (a custom GPU that
    reuses a catalogue name with other peaks) is transferred too, never used as is.
    """
    own = shipped_calibration(gpu.name)
    if own is not None and own.peak_flops == gpu.peak_flops and \
            own.memory_bw_bytes_per_s == gpu.memory_bw_bytes_per_s:
        return own
    if own is not None:
        return own.transferred_to(gpu)
    sibling = shipped_calibration(SAME_CHIP[gpu.name]) if gpu.name in SAME_CHIP else None
    if sibling is not None:
        return sibling.transferred_to(gpu)
    reference = shipped_calibration(REFERENCE_GPU)
    if reference is None:
        raise MeshplanError(f"the shipped {REFERENCE_GPU} calibration is missing from cost_models/data; "
                            f"reinstall meshplan or run benchmarks/fit_h100_compute.py")
    return reference.transferred_to(gpu)


def cost_models_for(cluster, path=None) -> tuple:
    """(compute, comm, calibration) for the CLI: with `path`, models built on that
    `meshplan profile` file; without, (None, None) - the simulator's own defaults - and the
    calibration those use, whose source the report names."""
    if not path:
        return None, None, default_calibration(cluster.gpu)
    from cost_models.comm import CommModel
    from cost_models.compute import ComputeModel
    calibration = Calibration.load(path)
    return ComputeModel(cluster.gpu, calibration), CommModel(cluster, calibration), calibration


def calibration_line(calibration: Calibration) -> str:
    """'calibration: GPU, source': where a report's compute numbers come from."""
    return f"calibration: {calibration.gpu}, {calibration.source}"


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


# --------------------------------------------------------------------------- fitting

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
    from cost_models.memory import adamw_bytes_per_param
    rates = [r["params"] * adamw_bytes_per_param() / r["seconds"] for r in rows if r["seconds"] > 0]
    return max(rates, default=0.0)


def fit_gemm(rows: list, peak_flops: dict, copy_bytes_per_s: float) -> tuple[float, dict]:
    """Fit one shared kernel overhead and a GemmFit per precision, minimising relative error.

    Unknowns (all >= 0): overhead c, and per precision a (1/peak_fraction = 1 + a) and w
    (traffic weight); each row gives t = c + (1 + a) F/P + w Bmin/bw, divided by t.
    """
    from cost_models.compute import gemm_bytes, gemm_flops
    precisions = sorted({r["precision"] for r in rows}, key=PRECISIONS.index)
    if not precisions:
        raise MeshplanError("no GEMM measurement to calibrate from")
    a_rows, b = [], []
    for r in rows:
        t = r["seconds"]
        math_s = gemm_flops(r["m"], r["k"], r["n"], r.get("batch", 1)) / peak_flops[r["precision"]]
        traffic_s = gemm_bytes(r["m"], r["k"], r["n"], r["precision"], r.get("batch", 1)) / copy_bytes_per_s
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
    from cost_models.compute import attention_flops
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
    from cost_models.compute import gemm_flops
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
        source=source, device_name=device_name, measurements=measurements)
    return replace(calibration, fit_quality=fit_quality(calibration, gpu))


def fit_quality(calibration: Calibration, gpu: GPUSpec) -> dict:
    """Mean absolute percentage errors of the calibration on its own measurements."""
    from cost_models.compute import ComputeModel
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


def predict_matmul_row(model, row: dict) -> float:
    """The model's time for one measured GEMM row."""
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
    from cost_models.cluster import default_intra_link
    all_reduce = [r for r in rows if r["op"] == "all_reduce" and r["world_size"] > 1]
    if not single_host or not all_reduce:
        return {}, {}
    link = default_intra_link(gpu)
    n = all_reduce[0]["world_size"]
    busbw = max(2 * (n - 1) / n * r["bytes"] / r["seconds"] for r in all_reduce)
    smallest = min(all_reduce, key=lambda r: r["bytes"])
    return ({link.kind: busbw / link.bandwidth_bytes_per_s},
            {link.kind: smallest["seconds"] / (2 * (n - 1))})


# --------------------------------------------------------------------------- measuring

# Shape grids (M, K, N). The full grid is the reference H100 grid plus smaller shapes, so
# a profile of any GPU is comparable with shared/reference/h100/measured.jsonl.
FULL_GEMM_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096), (16384, 1024, 4096), (16384, 4096, 1024),
                    (8192, 2048, 8192), (2048, 2048, 2048), (32768, 1600, 6400), (4096, 768, 3072),
                    (4096, 768, 50304), (1024, 1024, 1024), (512, 512, 512), (4096, 512, 1024))
QUICK_GEMM_SHAPES = ((4096, 4096, 4096), (2048, 2048, 2048), (4096, 768, 3072), (1024, 1024, 1024),
                     (512, 512, 512))
CPU_GEMM_SHAPES = ((1024, 1024, 1024), (512, 512, 512), (1024, 256, 1024), (256, 256, 256),
                   (512, 128, 256), (128, 128, 128), (64, 64, 64))
CPU_QUICK_GEMM_SHAPES = ((384, 384, 384), (256, 256, 256), (256, 64, 256), (128, 128, 128), (64, 64, 64))
# (batch, heads, seq, head_dim): the reference flash-attention cases, and small ones for CPUs.
FULL_ATTENTION = ((16, 12, 1024, 64), (8, 20, 2048, 64), (4, 32, 2048, 128), (2, 16, 4096, 128))
QUICK_ATTENTION = ((16, 12, 1024, 64), (4, 32, 2048, 128))
CPU_ATTENTION = ((2, 4, 512, 64), (1, 8, 1024, 64), (2, 4, 256, 128))
CPU_QUICK_ATTENTION = ((1, 4, 128, 64), (2, 4, 256, 64))
# Unfused attention score tensors, (batch x heads, seq): softmax and dropout over them.
FULL_SCORES = ((192, 1024), (96, 2048), (32, 4096))
QUICK_SCORES = ((96, 2048),)
CPU_SCORES = ((8, 512), (4, 1024))
CPU_QUICK_SCORES = ((4, 256),)
SCORE_DROPOUT = 0.1   # Megatron-LM's attention dropout
COLLECTIVE_SIZES_BYTES = (2 ** 12, 2 ** 16, 2 ** 20, 2 ** 24, 2 ** 27)
QUICK_COLLECTIVE_SIZES_BYTES = (2 ** 12, 2 ** 20, 2 ** 23)
# (parameters, tensors) of the host AdamW measurement: 64M parameters (1 GB of fp32
# parameters, gradients and moments) stream through memory like a large layer's shard;
# the quick one (4M) fits in the caches of big CPUs, so it reads high.
HOST_ADAMW = (64 * 2 ** 20, 8)
QUICK_HOST_ADAMW = (4 * 2 ** 20, 4)


def _torch():
    import torch
    return torch


def _sync_fn(device: str):
    torch = _torch()
    return (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)


def seconds_per_call(fn, sync, min_time_s: float, repeats: int = 7, max_iters: int = 10_000) -> float:
    """Fastest of `repeats` batches of back-to-back calls, each batch about `min_time_s` long.

    Back-to-back calls measure steady-state device time (the host queues ahead), which is
    what a training step sees for all but the tiniest kernels. The minimum, not the mean:
    other load on the machine only ever slows a batch down.
    """
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    one_s = max(time.perf_counter() - start, 1e-7)
    iters = max(1, min(max_iters, int(min_time_s / one_s)))
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / iters)
    return min(samples)


_TORCH_DTYPES = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def profile_precisions(device: str, gpu: GPUSpec) -> list:
    """Precisions to measure: those the GPU has (fp8 needs scaled-mm kernels: not measured)."""
    wanted = ("fp32", "bf16") if device == "cpu" else ("bf16", "fp16", "fp32", "tf32")
    return [p for p in wanted if p in gpu.peak_flops]


def measure_gemms(device: str, precisions, shapes, min_time_s: float) -> list:
    torch = _torch()
    sync, rows = _sync_fn(device), []
    for precision in precisions:
        dtype = getattr(torch, _TORCH_DTYPES[precision])
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            for m, k, n in shapes:
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                out = torch.empty(m, n, device=device, dtype=dtype)
                seconds = seconds_per_call(lambda: torch.mm(a, b, out=out), sync, min_time_s)
                rows.append(dict(precision=precision, m=m, k=k, n=n, batch=1, seconds=seconds))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return rows


def measure_copy(device: str, size_bytes: int, min_time_s: float) -> list:
    torch = _torch()
    x = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    x.fill_(1)
    y = torch.empty_like(x)
    seconds = seconds_per_call(lambda: y.copy_(x), _sync_fn(device), min_time_s)
    return [dict(bytes=size_bytes, seconds=seconds)]


def measure_host_adamw(param_count: int, tensors: int, min_time_s: float) -> list:
    """torch.optim.AdamW steps on CPU tensors, as FSDP2's CPUOffloadPolicy runs them: fp32
    parameters and gradients in host memory, the optimizer's default CPU implementation.
    Run under torchrun with one rank per GPU, every rank steps at once, so the rate is one
    GPU's share of the host (memory bandwidth and cores are shared, as in training)."""
    torch = _torch()
    size = param_count // tensors
    params = [torch.zeros(size, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(size)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    seconds = seconds_per_call(optimizer.step, lambda: None, min_time_s, repeats=3)
    return [dict(params=size * tensors, tensors=tensors, seconds=seconds)]


def measure_attention(device: str, precision: str, cases, min_time_s: float) -> list:
    """SDPA (causal) forward, and backward as (forward + backward) - forward.

    Gradients come from torch.autograd.grad, so no .grad accumulation kernels are timed.
    """
    torch = _torch()
    import torch.nn.functional as F
    sync, dtype, rows = _sync_fn(device), getattr(torch, _TORCH_DTYPES[precision]), []
    for batch, heads, seq, head_dim in cases:
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        fwd_s = seconds_per_call(forward, sync, min_time_s)
        both_s = seconds_per_call(lambda: torch.autograd.grad(forward(), (q, k, v), grad_out), sync, min_time_s)
        rows.append(dict(precision=precision, batch=batch, heads=heads, seq_q=seq, seq_kv=seq,
                         head_dim=head_dim, causal=True, fwd_s=fwd_s, bwd_s=max(both_s - fwd_s, 0.01 * both_s)))
    return rows


def measure_score_kernels(device: str, precision: str, cases, min_time_s: float) -> list:
    """Softmax and dropout over an unfused attention's (batch x heads, seq, seq) scores: each
    timed forward + backward together (`seconds`, the gradient from torch.autograd.grad) with
    the bytes that pair moves as the cost model counts them (score_bytes); the forward alone
    is kept as `fwd_s`."""
    torch = _torch()
    import torch.nn.functional as F
    sync, dtype, rows = _sync_fn(device), getattr(torch, _TORCH_DTYPES[precision]), []
    for batch_heads, seq in cases:
        scores = torch.randn(batch_heads, seq, seq, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(batch_heads, seq, seq, device=device, dtype=dtype)
        kernels = {"softmax": lambda: torch.softmax(scores, dim=-1),
                   "dropout": lambda: F.dropout(scores, SCORE_DROPOUT, training=True)}
        for name, forward in kernels.items():
            fwd_s = seconds_per_call(forward, sync, min_time_s)
            both_s = seconds_per_call(lambda: torch.autograd.grad(forward(), scores, grad), sync, min_time_s)
            rows.append(dict(kernel=name, precision=precision, batch_heads=batch_heads, seq=seq,
                             element_bytes=scores.element_size(), seconds=both_s,
                             bytes=score_bytes(name, batch_heads * seq * seq, scores.element_size()),
                             fwd_s=fwd_s))
    return rows


def score_bytes(kernel: str, elements: int, element_bytes: int) -> int:
    """Bytes a score kernel's forward + backward move: softmax reads x and writes y, then
    reads y and dy and writes dx; dropout writes a one-byte mask with its output and reads
    it back with dy."""
    if kernel == "softmax":
        return elements * element_bytes * (2 + 3)
    if kernel == "dropout":
        return elements * (2 * element_bytes + 1) * 2
    raise MeshplanError(f"unknown score kernel {kernel!r}; use softmax or dropout")


def fit_score_fraction(rows: list, copy_bytes_per_s: float) -> float | None:
    """score_bandwidth_fraction: the score kernels' bytes over their time, as a fraction of
    the copy rate (capped at 1), or None when nothing was measured."""
    seconds = sum(r["seconds"] for r in rows)
    if not rows or seconds <= 0:
        return None
    return min(1.0, sum(r["bytes"] for r in rows) / seconds / copy_bytes_per_s)


def measure_collectives(device: str, sizes_bytes, min_time_s: float) -> list:
    """all_reduce / all_gather / reduce_scatter over the initialised default group.

    Every rank runs the same number of calls (agreed by a MAX all-reduce, or the ranks
    would deadlock), and the time kept is the slowest rank's, as a training step waits
    for it. An operation the backend lacks (older gloo builds have no reduce_scatter) is skipped.
    """
    torch = _torch()
    import torch.distributed as dist
    n, rows = dist.get_world_size(), []
    # torch >= 2.10 names them *_single; older releases *_into_tensor / *_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ops = {"all_reduce": lambda full, part: dist.all_reduce(full),
           "all_gather": lambda full, part: gather(full, part),
           "reduce_scatter": lambda full, part: scatter(part, full)}
    for size in sizes_bytes:
        elems = max(n, size // 4 // n * n)
        full = torch.ones(elems, dtype=torch.float32, device=device)
        part = torch.ones(elems // n, dtype=torch.float32, device=device)
        for op, call in ops.items():
            try:
                seconds = _collective_seconds(lambda: call(full, part), device, min_time_s)
            except (RuntimeError, NotImplementedError, ValueError):
                continue
            rows.append(dict(op=op, bytes=elems * 4, seconds=_max_over_ranks(seconds, device), world_size=n))
    return rows


def _collective_seconds(call, device: str, min_time_s: float, repeats: int = 5, max_iters: int = 200) -> float:
    """Like `seconds_per_call`, with the iteration count agreed across ranks."""
    sync = _sync_fn(device)
    call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    one_s = _max_over_ranks(max(time.perf_counter() - start, 1e-7), device)
    iters = max(1, min(max_iters, int(min_time_s / one_s)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        sync()
        samples.append((time.perf_counter() - start) / iters)
    return min(samples)


def _max_over_ranks(value: float, device: str) -> float:
    torch = _torch()
    import torch.distributed as dist
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _single_host() -> bool:
    import torch.distributed as dist
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names)) == 1


def _check_device(device: str) -> str:
    torch = _torch()
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MeshplanError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
        if ":" not in device:
            return f"cuda:{torch.cuda.current_device()}"
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise MeshplanError(f"--device {device}: this machine has cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    raise MeshplanError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def _device_name(device: str) -> str:
    torch = _torch()
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{socket.gethostname()} CPU ({torch.get_num_threads()} threads)"


def _distributed_world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def measure_device(device: str, gpu: GPUSpec, quick: bool = False) -> tuple[dict, tuple]:
    """Every measurement `profile_device` makes, as raw rows, plus the fitted comm constants."""
    cpu = device == "cpu"
    min_time_s = 0.01 if quick else 0.1
    gemm_shapes = (CPU_QUICK_GEMM_SHAPES if quick else CPU_GEMM_SHAPES) if cpu else \
        (QUICK_GEMM_SHAPES if quick else FULL_GEMM_SHAPES)
    attention = (CPU_QUICK_ATTENTION if quick else CPU_ATTENTION) if cpu else \
        (QUICK_ATTENTION if quick else FULL_ATTENTION)
    copy_bytes = (64 if cpu else 256 if quick else 1024) * 2 ** 20
    attention_precision = "fp32" if cpu or "bf16" not in gpu.peak_flops else "bf16"
    scores = (CPU_QUICK_SCORES if quick else CPU_SCORES) if cpu else (QUICK_SCORES if quick else FULL_SCORES)
    measurements = {
        "matmul": measure_gemms(device, profile_precisions(device, gpu), gemm_shapes, min_time_s),
        "copy": measure_copy(device, copy_bytes, min_time_s),
        "attention": measure_attention(device, attention_precision, attention, min_time_s),
        "score_kernels": measure_score_kernels(device, attention_precision, scores, min_time_s),
        "host_adamw": measure_host_adamw(*(QUICK_HOST_ADAMW if quick else HOST_ADAMW), min_time_s),
    }
    comm = ({}, {})
    if _distributed_world() > 1:
        sizes = QUICK_COLLECTIVE_SIZES_BYTES if quick else COLLECTIVE_SIZES_BYTES
        measurements["collectives"] = measure_collectives(device, sizes, min_time_s)
        comm = fit_comm(measurements["collectives"], gpu, _single_host())
    return measurements, comm


def profile_device(device: str, out_path, quick: bool = False, gpu: str | None = None,
                   force: bool = False) -> Calibration:
    """Measure this machine, fit a calibration for catalogue GPU `gpu`, write it to `out_path`.

    Measures GEMMs over a shape grid, causal SDPA forward/backward, softmax and dropout over
    unfused attention scores (score_bandwidth_fraction, kept as measured), a device copy and, when
    torch.distributed is initialised with more than one rank, collectives. `quick` uses a
    small grid and short timings (seconds on a CPU). With several ranks only rank 0 writes.
    """
    device = _check_device(device)
    if gpu is None and device != "cpu":
        raise MeshplanError(f"give --gpu NAME: the catalogue name of this {_device_name(device)} "
                            f"(see `meshplan gpus`)")
    spec = get_gpu(gpu or "cpu")
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise MeshplanError(f"{str(out_path)!r} exists; pass --force to overwrite it")
    if not out_path.parent.is_dir():
        raise MeshplanError(f"cannot write {str(out_path)!r}: folder {str(out_path.parent)!r} does not exist")
    measurements, comm = measure_device(device, spec, quick)
    torch = _torch()
    source = (f"meshplan profile{' --quick' if quick else ''} on {_device_name(device)}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    calibration = build_calibration(spec, measurements, source, _device_name(device), comm)
    if device != "cpu":
        calibration = training_constants_like(calibration, default_calibration(spec))
    if _rank() == 0:
        calibration.save(out_path, force=force)
    return calibration


def training_constants_like(calibration: Calibration, reference: Calibration) -> Calibration:
    """`calibration` with the constants that only whole training steps can fit taken from
    `reference` (the GPU's shipped calibration, or the H100's): the GEMM derating under
    sustained load, eager PyTorch's host time per op and how host and device time overlap.
    A profile times kernels back to back in short bursts and sees none of them; without
    the host time, a profile of the very H100 the shipped calibration was fitted on predicts
    its 19 reference steps 4 % fast on average (MAPE 5.2 %, against 2.9 % with it)."""
    gemm = {p: replace(f, sustained=reference.gemm_fit(p).sustained) for p, f in calibration.gemm.items()}
    return replace(calibration, gemm=gemm, host_s_per_op=reference.host_s_per_op,
                   host_overlap_exponent=reference.host_overlap_exponent)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def summary_lines(calibration: Calibration) -> list:
    """A few lines that say what was measured and how well the fit reproduces it."""
    lines = [f"calibration for {calibration.gpu} ({calibration.device_name or 'no device'})",
             f"  kernel overhead {calibration.kernel_overhead_s * 1e6:.1f} us, "
             f"copy {calibration.copy_bytes_per_s / GB:.1f} GB/s (read+write)"]
    for precision, fit in calibration.gemm.items():
        lines.append(f"  GEMM {precision}: {fit.peak_fraction:.3f} of "
                     f"{calibration.peak_flops[precision] / 1e12:.3g} TFLOP/s, traffic weight {fit.traffic_weight:.2f}"
                     + (f", x{fit.sustained:.3f} sustained in training" if fit.sustained != 1.0 else ""))
    for name, fit in (("fwd", calibration.attention_fwd), ("bwd", calibration.attention_bwd)):
        lines.append(f"  attention {name}: {fit.peak_fraction:.3f} of peak + {fit.fixed_s * 1e6:.1f} us per call")
    if calibration.host_s_per_op:
        lines.append(f"  host {calibration.host_s_per_op * 1e6:.1f} us per eager op, host/device overlap exponent "
                     f"{calibration.host_overlap_exponent:g} (fitted on training steps)")
    if calibration.host_adamw_bytes_per_s:
        lines.append(f"  host AdamW (optimizer offload): {calibration.host_adamw_bytes_per_s / GB:.1f} GB/s "
                     f"of its traffic per GPU")
    for kind, eff in calibration.comm_bw_efficiency.items():
        lines.append(f"  {kind}: {eff:.2f} of link peak, {calibration.comm_latency_s.get(kind, 0) * 1e6:.1f} us per step")
    lines += [f"  fit {k}: {v:.1f}" for k, v in calibration.fit_quality.items()]
    return lines


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line MeshplanError instead of printing usage and exiting."""

    def error(self, message):
        raise MeshplanError(f"{message} (see `{self.prog} --help`)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `meshplan profile` options, for this module's parser or a CLI subparser."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--out", required=True, help="calibration file to write (.json)")
    parser.add_argument("--gpu", help="catalogue name this calibration belongs to (default: cpu for --device cpu)")
    parser.add_argument("--quick", action="store_true", help="small grid and short timings")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return parser


def build_parser(prog: str = "meshplan profile") -> argparse.ArgumentParser:
    return add_arguments(_Parser(prog=prog, description="Measure this machine and write a calibration JSON."))


def run(args: argparse.Namespace) -> int:
    """Handler for parsed `meshplan profile` arguments: profile, write, print a summary."""
    calibration = profile_device(args.device, args.out, quick=args.quick, gpu=args.gpu, force=args.force)
    print("\n".join(summary_lines(calibration)))
    if _rank() == 0:
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    """`meshplan profile` on its own: raises MeshplanError on user mistakes (the CLI prints them)."""
    return run(build_parser().parse_args(argv))
