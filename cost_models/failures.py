"""Failures, checkpoints and preemption: how much of a run's wall time trains the model.

A job on N GPUs fails at rate N x lambda (hardware; the default lambda from the Llama 3 run
below) plus, on spot capacity, nodes x rho (preemptions); its mean time between
interruptions is M = 1 / that. It writes a checkpoint of delta seconds every tau seconds of
work and, after an interruption, restarts (R seconds) and redoes the work since the last
checkpoint. To first order (Young 1974, "A first order approximation to the optimum
checkpoint interval", CACM 17(9); Daly 2006, FGCS 22(3)):

    wall W for useful work U:  W = U (1 + delta / tau) + (W / M) (R + (tau + delta) / 2)
    =>  W = U (1 + delta / tau) / (1 - (R + (tau + delta) / 2) / M)
    goodput = U / W,  and the interval that maximises it  tau* = sqrt(2 delta M).

When (R + (tau + delta) / 2) >= M the job loses work as fast as it makes it: no finite W.

Defaults (each overridable per cluster, `reliability:` in a cluster file):
- GPU_FAILURE_RATE_PER_HOUR: Llama 3 (Dubey et al. 2024, "The Llama 3 Herd of Models",
  Sec. 3.3.4): 419 unexpected interruptions in a 54-day snapshot of pre-training on 16,384
  H100s -> 419 / (54 x 24 x 16,384) = 1.97e-5 per GPU-hour (one every ~3 h at that scale).
- CHECKPOINT_WRITE_BYTES_PER_S_PER_GPU: the same paper's storage (Sec. 3.3.1, Tectonic):
  2 TB/s sustained for the 16,384 GPUs -> 122 MB/s per GPU; every rank writes its own
  shard (torch.distributed.checkpoint), so a checkpoint takes bytes / (GPUs x that).
- RESTART_S: 10 minutes to reschedule, reload and rejoin. An assumption, not a measurement:
  set `restart_s` for your site.
A checkpoint holds fp32 weights and AdamW's two fp32 moments (CHECKPOINT_BYTES_PER_PARAM),
what the runtime's DCP save of the model and optimizer writes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cost_models.errors import MeshplanError
from cost_models.inputs import finite_number, shown
from cost_models.units import SECONDS_PER_HOUR

# 78% of the 419 were hardware (GPUs, HBM, NICs, hosts); one GPU fails about every 50,700
# hours, a job on N GPUs every 50,700 / N hours (16,384 GPUs: every 3.1 h, as the paper says).
# The runtime's `--checkpoint-every auto` (runtime/cadence.py) uses the same rate.
GPU_FAILURE_RATE_PER_HOUR = 419 / (54 * 24 * 16384)
CHECKPOINT_WRITE_BYTES_PER_S_PER_GPU = 2e12 / 16384
RESTART_S = 600.0
CHECKPOINT_BYTES_PER_PARAM = 4 + 8


def young_daly_interval_s(save_s: float, mtbf_s: float) -> float:
    """Compute time between checkpoints that minimises the expected time lost: sqrt(2 x save
    time x mean time between failures). Young's first-order optimum (J. W. Young, "A first
    order approximation to the optimum checkpoint interval", CACM 17(9), 1974), which Daly
    (FGCS 22(3), 2006) shows is the leading term of the exact optimum when save << MTBF.

    Example: a 60 s save on a job that fails every 3 hours (10,800 s) checkpoints every
    sqrt(2 x 60 x 10,800) = 1,138 s. An infinite MTBF (no failures) gives an infinite interval."""
    for name, value in (("save time", save_s), ("mean time between failures", mtbf_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise MeshplanError(f"the checkpoint interval needs a number for the {name}, got {value!r}")
    if not 0 < save_s < math.inf:
        raise MeshplanError(f"the checkpoint save time must be a finite number of seconds > 0, got {save_s!r}")
    if not mtbf_s > 0:
        raise MeshplanError(f"the mean time between failures must be > 0 seconds, got {mtbf_s!r}")
    return math.sqrt(2.0 * save_s * mtbf_s)


@dataclass(frozen=True)
class Reliability:
    """What interrupts a cluster's jobs and what a restart costs (a cluster file's `reliability:`)."""

    failure_rate_per_gpu_hour: float = GPU_FAILURE_RATE_PER_HOUR
    checkpoint_write_bytes_per_s_per_gpu: float = CHECKPOINT_WRITE_BYTES_PER_S_PER_GPU
    restart_s: float = RESTART_S
    spot_price_usd_per_gpu_hour: float | None = None     # None: no spot capacity priced
    preemption_rate_per_node_hour: float | None = None   # spot preemptions per node-hour

    def __post_init__(self):
        finite_number(self.failure_rate_per_gpu_hour, "reliability failure_rate_per_gpu_hour", low=0)
        finite_number(self.checkpoint_write_bytes_per_s_per_gpu, "reliability checkpoint write bandwidth",
                      low=0, low_open=True)
        finite_number(self.restart_s, "reliability restart_s", low=0)
        if self.spot_price_usd_per_gpu_hour is not None:
            finite_number(self.spot_price_usd_per_gpu_hour, "reliability spot_price_usd_per_gpu_hour", low=0)
            if self.preemption_rate_per_node_hour is None:
                raise MeshplanError("a spot price needs a preemption rate: give preemption_rate_per_node_hour "
                                    "(or --preemption-rate GPU=RATE)")
        if self.preemption_rate_per_node_hour is not None:
            finite_number(self.preemption_rate_per_node_hour, "reliability preemption_rate_per_node_hour", low=0)

    def to_dict(self) -> dict:
        return asdict(self)


RELIABILITY_KEYS = {"failure_rate_per_gpu_hour": "failure_rate_per_gpu_hour",
                    "checkpoint_write_GBps_per_gpu": "checkpoint_write_bytes_per_s_per_gpu",
                    "restart_s": "restart_s", "spot_price_usd_per_gpu_hour": "spot_price_usd_per_gpu_hour",
                    "preemption_rate_per_node_hour": "preemption_rate_per_node_hour"}


def reliability_from_dict(data, where: str) -> Reliability:
    """A cluster file's `reliability:` mapping (checkpoint bandwidth in GB/s per GPU)."""
    if data is None:
        return Reliability()
    if not isinstance(data, dict):
        raise MeshplanError(f"{where} must be a mapping of {', '.join(RELIABILITY_KEYS)}, not {shown(data)}")
    unknown = sorted(map(str, set(data) - set(RELIABILITY_KEYS)))
    if unknown:
        raise MeshplanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(RELIABILITY_KEYS)}")
    values = {}
    for key, field in RELIABILITY_KEYS.items():
        if key in data:
            number = finite_number(data[key], f"{where}.{key}", low=0)
            values[field] = number * 1e9 if key == "checkpoint_write_GBps_per_gpu" else number
    return Reliability(**values)


@dataclass(frozen=True)
class Forecast:
    """A run's wall time with interruptions, checkpoints and restarts."""

    work_s: float              # failure-free time to train
    mtbf_s: float              # mean time between the job's interruptions
    checkpoint_s: float        # one checkpoint save
    interval_s: float          # work between saves (Young/Daly)
    restart_s: float
    wall_s: float              # expected wall time (inf: failures outpace progress)

    @property
    def goodput(self) -> float:
        return self.work_s / self.wall_s if math.isfinite(self.wall_s) else 0.0

    @property
    def interruptions(self) -> float:
        return self.wall_s / self.mtbf_s if math.isfinite(self.mtbf_s) else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "goodput": self.goodput, "interruptions": self.interruptions}


def forecast(work_s: float, gpus: int, nodes: int, checkpoint_bytes: float, reliability: Reliability,
             spot: bool = False) -> Forecast:
    """Expected wall time of `work_s` of training on `gpus` GPUs in `nodes` nodes, checkpointing
    `checkpoint_bytes` at the Young/Daly interval; `spot` adds the preemption rate."""
    finite_number(work_s, "failure-free training time", low=0, low_open=True)
    finite_number(checkpoint_bytes, "checkpoint bytes", low=0)
    per_hour = gpus * reliability.failure_rate_per_gpu_hour
    if spot:
        per_hour += nodes * (reliability.preemption_rate_per_node_hour or 0.0)
    save_s = checkpoint_bytes / (gpus * reliability.checkpoint_write_bytes_per_s_per_gpu)
    if per_hour == 0:
        return Forecast(work_s, math.inf, save_s, math.inf, reliability.restart_s, work_s)
    mtbf_s = SECONDS_PER_HOUR / per_hour
    interval_s = young_daly_interval_s(save_s, mtbf_s)
    lost = (reliability.restart_s + (interval_s + save_s) / 2) / mtbf_s
    overhead = 1 + save_s / interval_s if interval_s > 0 else 1.0
    wall_s = work_s * overhead / (1 - lost) if lost < 1 else math.inf
    return Forecast(work_s, mtbf_s, save_s, interval_s, reliability.restart_s, wall_s)
