"""Time, money, energy and CO2 of a whole training run, from a simulated step.

First principles: time-to-train = tokens / (tokens per second); GPU-hours = GPUs x hours;
cost = GPU-hours x price per GPU-hour; energy = GPUs x average GPU power x time x PUE;
CO2 = energy x grid carbon intensity.

Assumptions, all overridable (they are not measurements of any one site):
- A GPU draws `IDLE_POWER_FRACTION` of its TDP when idle and rises linearly with the
  fraction of the step its compute stream is busy, up to TDP. (Idle draw of A100/H100
  boards is roughly 50-100 W against 400-700 W TDP.)
- `DEFAULT_PUE` 1.2: cooling and power delivery on top of IT power, typical of modern
  data centres (hyperscale sites report 1.1-1.2).
- `DEFAULT_GRID_KG_PER_KWH` 0.4 kg CO2e/kWh: the order of the world average grid intensity.
Only GPU power is counted; CPUs, memory, NICs and switches add to it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cost_models.errors import MeshplanError
from cost_models.units import SECONDS_PER_HOUR

IDLE_POWER_FRACTION = 0.15
DEFAULT_PUE = 1.2
DEFAULT_GRID_KG_PER_KWH = 0.4
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class RunCost:
    time_to_train_s: float
    gpu_hours: float
    cost_usd: float
    avg_gpu_power_w: float
    energy_kwh: float
    co2_kg: float

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_power_w(tdp_w: float, busy_fraction: float, idle_fraction: float = IDLE_POWER_FRACTION) -> float:
    """Average board power at a compute-busy fraction of the step, linear between idle and TDP."""
    if not 0 <= busy_fraction <= 1.0 + 1e-9:
        raise MeshplanError(f"busy fraction must be between 0 and 1, got {busy_fraction!r}")
    return tdp_w * (idle_fraction + (1 - idle_fraction) * min(busy_fraction, 1.0))


def run_cost(tokens: float, tokens_per_s: float, gpus: int, price_usd_per_gpu_hour: float, tdp_w: float,
             busy_fraction: float, pue: float = DEFAULT_PUE,
             grid_kg_per_kwh: float = DEFAULT_GRID_KG_PER_KWH) -> RunCost:
    if tokens <= 0 or tokens_per_s <= 0:
        raise MeshplanError("tokens and throughput must be positive")
    if pue < 1:
        raise MeshplanError(f"PUE is at least 1 (IT power included), got {pue}")
    if grid_kg_per_kwh < 0 or price_usd_per_gpu_hour < 0:
        raise MeshplanError("grid intensity and price must not be negative")
    seconds = tokens / tokens_per_s
    gpu_hours = gpus * seconds / SECONDS_PER_HOUR
    power = gpu_power_w(tdp_w, busy_fraction)
    energy_kwh = gpus * power * seconds * pue / JOULES_PER_KWH
    return RunCost(seconds, gpu_hours, gpu_hours * price_usd_per_gpu_hour, power, energy_kwh,
                   energy_kwh * grid_kg_per_kwh)
