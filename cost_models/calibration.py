"""The calibration record: the empirical constants of the compute and communication models
(data, validation, JSON, the shipped files); fitted in fitting.py, measured in profiling.py.

A calibration holds, for one GPU model, what the first-principles formulas cannot know:
how close to the datasheet peak real kernels get. It is fitted from measurements
(GEMMs over a shape grid, flash attention forward/backward, a device copy, optionally
collectives) and stored as JSON:

- shipped ones live in `cost_models/data/<catalogue name>.json`; the H100 one is built
  by `benchmarks/fit_h100_compute.py` from `shared/reference/h100/measured.jsonl`;
- `meshplan profile` (`planner/cli/profile.py`, `profiling.profile_device`) measures the current
  machine and writes one; `Calibration.load` reads it back for `ComputeModel`/`CommModel`. A GPU
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

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cost_models.errors import MeshplanError
from cost_models.hardware import GPUSpec
from cost_models.inputs import finite_number, parse_json, read_text, shown

FORMAT = "meshplan-calibration"
VERSION = 1
REFERENCE_GPU = "h100-sxm-80gb"   # the GPU whose shipped calibration is the default curve
TRANSFERRED = "transferred from"   # how a transferred calibration's source begins (Calibration.transferred_to)
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
        _fraction(self.peak_fraction, "GEMM peak_fraction")
        _positive(self.traffic_weight, "GEMM traffic_weight", zero_ok=True)
        _fraction(self.sustained, "GEMM sustained")


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
        _fraction(self.peak_fraction, "attention peak_fraction")
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
    # One rank's rate of writing a torch.distributed.checkpoint save to the profiled directory
    # (bytes of state per second, from the device): the checkpoint write bandwidth a cluster
    # file's `reliability: checkpoint_write_GBps_per_gpu` takes (cost_models.failures). 0 = not
    # measured.
    checkpoint_write_bytes_per_s: float = 0.0
    # Routed experts' GEMMs as an MoE layer launches them (one per expert, on the rows each
    # received: planner.arch.moe.Experts) against the dense GEMM fit of the same shapes: their
    # time is this factor times the fit's (measured by `meshplan profile`, the median over its
    # grouped cases). None = not measured: the dense fit is used, and the calibration line
    # says it is transferred.
    grouped_gemm_factor: float | None = None
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

    @property
    def measured(self) -> bool:
        """Fitted on this GPU's own measurements, not transferred from another GPU's (transferred_to)."""
        return not self.source.startswith(TRANSFERRED)

    def transferred_to(self, gpu: GPUSpec) -> "Calibration":
        """This calibration's efficiencies applied to another GPU's datasheet.

        Fractions of peak and fixed times carry over; the copy bandwidth is scaled by
        the ratio of HBM bandwidths; raw measurements stay behind (they are not of `gpu`).
        """
        scale = gpu.memory_bw_bytes_per_s / self.memory_bw_bytes_per_s
        return replace(self, gpu=gpu.name, copy_bytes_per_s=self.copy_bytes_per_s * scale,
                       peak_flops=dict(gpu.peak_flops), memory_bw_bytes_per_s=gpu.memory_bw_bytes_per_s,
                       source=f"{TRANSFERRED} the {self.gpu} calibration (fractions of peak); "
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
            "checkpoint_write_bytes_per_s": self.checkpoint_write_bytes_per_s,
            "grouped_gemm_factor": self.grouped_gemm_factor,
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
            comm = _mapping(data.get("comm", {}), "comm")
            gemm = _mapping(data["gemm"], "gemm")
            if not gemm:
                raise MeshplanError("calibration field gemm holds no precision's fit")
            attention = _mapping(data["attention"], "attention")
            return cls(
                gpu=_text(data["gpu"], "gpu"),
                kernel_overhead_s=_positive(data["kernel_overhead_s"], "kernel_overhead_s", zero_ok=True),
                copy_bytes_per_s=_positive(data["copy_bytes_per_s"], "copy_bytes_per_s"),
                gemm={p: GemmFit(**_mapping(f, f"gemm.{p}")) for p, f in gemm.items()},
                attention_fwd=AttentionFit(**_mapping(attention["fwd"], "attention.fwd")),
                attention_bwd=AttentionFit(**_mapping(attention["bwd"], "attention.bwd")),
                peak_flops={p: _positive(v, f"peak_flops.{p}")
                            for p, v in _mapping(data["peak_flops"], "peak_flops").items()},
                memory_bw_bytes_per_s=_positive(data["memory_bw_bytes_per_s"], "memory_bw_bytes_per_s"),
                comm_bw_efficiency={k: _fraction(v, f"comm.bw_efficiency.{k}") for k, v in
                                    _mapping(comm.get("bw_efficiency", {}), "comm.bw_efficiency").items()},
                comm_latency_s={k: _positive(v, f"comm.latency_s.{k}", zero_ok=True) for k, v in
                                _mapping(comm.get("latency_s", {}), "comm.latency_s").items()},
                host_s_per_op=_positive(data.get("host_s_per_op", 0.0), "host_s_per_op", zero_ok=True),
                host_overlap_exponent=_positive(data.get("host_overlap_exponent", 0.0), "host_overlap_exponent",
                                                zero_ok=True),
                host_adamw_bytes_per_s=_positive(data.get("host_adamw_bytes_per_s", 0.0), "host_adamw_bytes_per_s",
                                                 zero_ok=True),
                score_bandwidth_fraction=_optional_fraction(data.get("score_bandwidth_fraction"),
                                                            "score_bandwidth_fraction"),
                checkpoint_write_bytes_per_s=_positive(data.get("checkpoint_write_bytes_per_s", 0.0),
                                                       "checkpoint_write_bytes_per_s", zero_ok=True),
                grouped_gemm_factor=(None if data.get("grouped_gemm_factor") is None else
                                     _positive(data["grouped_gemm_factor"], "grouped_gemm_factor")),
                source=_text(data.get("source", ""), "source"),
                device_name=_text(data.get("device_name", ""), "device_name"),
                measurements=_mapping(data.get("measurements", {}), "measurements"),
                fit_quality=_mapping(data.get("fit_quality", {}), "fit_quality"))
        except (KeyError, TypeError) as exc:
            raise MeshplanError(f"{where} is missing or has a malformed field ({shown(str(exc))}); "
                                f"re-create it with `meshplan profile`") from None
        except MeshplanError as exc:
            raise MeshplanError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path) -> "Calibration":
        path = Path(path)
        data = parse_json(read_text(path, "calibration file"), f"calibration file {str(path)!r}")
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


def _fraction(value, name: str) -> float:
    return finite_number(value, f"calibration field {name}", low=0, low_open=True, high=1)


def _positive(value, name: str, zero_ok: bool = False) -> float:
    return finite_number(value, f"calibration field {name}", low=0, low_open=not zero_ok)


def _optional_fraction(value, name: str) -> float | None:
    return None if value is None else _fraction(value, name)


def _mapping(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise MeshplanError(f"calibration field {name} must be a JSON object, got {shown(value)}")
    return dict(value)


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise MeshplanError(f"calibration field {name} must be text, got {shown(value)}")
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


# Mixture-of-Experts GEMMs (one per expert, or one grouped kernel in Megatron-Core's
# TEGroupedMLP and torchtitan's GroupedExperts) are priced per expert at the dense GEMM fit of
# their shape: no grouped-GEMM kernel has been measured yet.
GROUPED_GEMM_NOTE = "grouped GEMMs: the dense GEMM fit, transferred"
GROUPED_GEMM_MEASURED = "grouped GEMMs: measured, {factor:.2f} x the dense GEMM fit"


# float8 GEMMs (precision fp8) are priced at the fp8 peak times the calibration's "fp8" GEMM fit,
# which only `meshplan profile --device cuda` on a GPU with float8 measures (torch._scaled_mm);
# until then the 16-bit fit is transferred (PRECISION_FALLBACK).
FP8_GEMM_NOTE = "fp8 GEMMs: the bf16 GEMM fit at the fp8 peak, transferred"
FP8_GEMM_MEASURED = "fp8 GEMMs: measured"


def calibration_line(calibration: Calibration, experts: bool = False, fp8: bool = False) -> str:
    """'calibration: GPU, source': where a report's compute numbers come from; for a model
    with routed experts (`experts`), how their GEMMs are priced too; under precision fp8
    (`fp8`), whether its float8 GEMM fit was measured or transferred."""
    grouped = (GROUPED_GEMM_MEASURED.format(factor=calibration.grouped_gemm_factor)
               if calibration.grouped_gemm_factor else GROUPED_GEMM_NOTE)
    scaled = FP8_GEMM_MEASURED if "fp8" in calibration.gemm else FP8_GEMM_NOTE
    return (f"calibration: {calibration.gpu}, {calibration.source}" + (f"; {grouped}" if experts else "")
            + (f"; {scaled}" if fp8 else ""))


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
