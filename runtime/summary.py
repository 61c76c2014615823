"""The line a run ends with: measured step time and peak memory beside the plan's prediction.

The prediction is `planner.simulate` of the same plan and model on the cluster the run had:
the catalogue GPU of this device (or --gpu; `cpu` for a CPU run) x the processes per node x
the nodes (torchrun's LOCAL_WORLD_SIZE), e.g. `cpu:1x4` for 4 CPU processes. Measured: the
median step time of this run's steps after its first (warm-up: allocator, first collectives)
and the peak memory of the worst rank - CUDA's allocator peak, which the simulator's
"allocated" predicts; on CPU the process's peak RSS (Python and torch included), which the
prediction leaves out, so only CUDA runs compare like with like.
"""
from __future__ import annotations

import os
import statistics

from cost_models.units import GIB


def cluster_text(gpu: str | None, world: int) -> str | None:
    """GPU:NODESxPER of this run, or None when the GPU is not in the catalogue."""
    if gpu is None:
        return None
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    per_node = per_node if per_node >= 1 and world % per_node == 0 else world
    return f"{gpu}:{world // per_node}x{per_node}"


def measured(records: list[dict]) -> tuple[float, int]:
    """(median step time s, peak memory bytes) of this run's records."""
    timed = records[1:] if len(records) > 1 else records
    return statistics.median(r["step_time_s"] for r in timed), max(r["peak_mem_bytes"] for r in records)


def summary_line(records: list[dict], plan, spec, gpu: str | None, world: int, device_type: str) -> str:
    if not records:
        return "summary: no steps run"
    step_s, mem_bytes = measured(records)
    memory_kind = "allocator peak" if device_type == "cuda" else "peak RSS of the process"
    where = cluster_text(gpu, world)
    predicted_step = predicted_mem = ""
    note = ""
    if where is None:
        note = " | no prediction: this GPU is not in the catalogue (give --gpu)"
    else:
        try:
            from cost_models import parse_cluster
            from planner.simulate import simulate
            result = simulate(plan, spec, parse_cluster(where))
            predicted_step = f" vs {result.step_time_s:.4g} s predicted"
            predicted_mem = f" vs {result.worst_stage.peak_allocated_bytes / GIB:.3g} GiB predicted (allocated)"
            note = f" | predicted by meshplan simulate on {where}"
        except Exception as exc:        # a run that trained must still end with its measurements
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            note = f" | no prediction on {where}: {first[:200]}"
    return (f"summary: {len(records)} step(s) | step time {step_s:.4g} s measured (median){predicted_step} | "
            f"peak memory {mem_bytes / GIB:.3g} GiB measured ({memory_kind}){predicted_mem}{note}")
