"""How often GPUs fail, and how often to checkpoint against it (Young/Daly).

The one measured failure rate for large GPU jobs in the literature, and the checkpoint
interval that minimises the time lost to checkpoints plus the work redone after a failure.
The planner's forecast and the runtime's `--checkpoint-every auto` both use these.
"""
from __future__ import annotations

import math

from cost_models.errors import MeshplanError

# Unexpected job interruptions per GPU-hour. Llama 3 (Dubey et al. 2024, "The Llama 3 Herd
# of Models", arXiv:2407.21783, section 3.3.4 and table 5): 419 unexpected interruptions in
# a 54-day snapshot of pre-training on 16,384 H100 GPUs (78% of them hardware: GPUs, HBM,
# NICs, hosts). 419 / (54 days x 24 h x 16,384 GPUs) = 419 / 21,233,664 GPU-hours
# = 1.97e-5 per GPU-hour: one GPU fails about every 50,700 hours (5.8 years), and a job on
# N GPUs every 50,700 / N hours (16,384 GPUs: every 3.1 hours, as the paper reports).
GPU_FAILURE_RATE_PER_HOUR = 419 / (54 * 24 * 16384)


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
