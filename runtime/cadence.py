"""When a run saves: every K steps, or `--checkpoint-every auto` (Young/Daly), and at the end.

auto: the run saves after its first step and measures how long training waited for that
save (the whole save, or with --async-checkpoint only the copy to CPU memory); the interval
is then young_daly_interval_s(that time, the job's MTBF) of training time after the end of
each save (cost_models.failures), where the job's MTBF is 1 / (failure rate per GPU-hour x
GPUs). Rank 0's clock decides; its "save now" travels to the other ranks in the per-step
all-reduce (runtime.train), so every rank saves at the same step.
"""
from __future__ import annotations

import math
import time

from cost_models.errors import MeshplanError
from cost_models.failures import GPU_FAILURE_RATE_PER_HOUR, young_daly_interval_s


def parse_every(text) -> int | str:
    """--checkpoint-every: a whole number of steps >= 0 (0: only at the end), or 'auto'."""
    value = str(text).strip()
    if value == "auto":
        return "auto"
    if not value.isdigit():
        raise MeshplanError(f"--checkpoint-every must be a whole number of steps >= 0 or 'auto', got {text!r}")
    return int(value)


def parse_rate(value) -> float:
    """--failure-rate-per-gpu-hour: a finite number >= 0 (0: no failures, saves only at the end)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise MeshplanError(f"--failure-rate-per-gpu-hour must be a finite number >= 0 (failures per GPU "
                            f"per hour; default {GPU_FAILURE_RATE_PER_HOUR:.3g}), got {value!r}")
    return float(value)


class Cadence:
    def __init__(self, every: int | str, steps: int, gpus: int, rate_per_gpu_hour: float | None = None):
        self.every, self.steps, self.gpus = every, steps, gpus
        self.rate = GPU_FAILURE_RATE_PER_HOUR if rate_per_gpu_hour is None else rate_per_gpu_hour
        self.interval_s: float | None = None        # auto, once the first save was measured
        self.since = time.perf_counter()            # end of the last save

    @property
    def mtbf_s(self) -> float:
        failures_per_s = self.rate * self.gpus / 3600.0
        return math.inf if failures_per_s == 0 else 1.0 / failures_per_s

    def due(self, step: int) -> bool:
        """Save after `step`? (auto: rank 0's answer; the all-reduce shares it.)"""
        if step == self.steps:
            return True
        if self.every == "auto":
            return self.interval_s is None or time.perf_counter() - self.since >= self.interval_s
        return bool(self.every) and step % self.every == 0

    def saved(self, blocked_s: float) -> str | None:
        """A save ended, training having waited blocked_s for it; the line that states the
        auto interval after the first one."""
        self.since = time.perf_counter()
        if self.every != "auto" or self.interval_s is not None:
            return None
        save_s = max(blocked_s, 1e-6)
        self.interval_s = young_daly_interval_s(save_s, self.mtbf_s)
        return (f"--checkpoint-every auto: a checkpoint every {self.interval_s:.6g} s of training = "
                f"sqrt(2 x {save_s:.6g} s save x {self.mtbf_s:.6g} s MTBF) (Young/Daly; MTBF = 1 / "
                f"({self.rate:.6g} failures per GPU-hour x {self.gpus} GPUs))")
