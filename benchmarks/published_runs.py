"""Predicted vs published throughput of FSDP2 runs (a check: nothing is fitted to these).

    python benchmarks/published_runs.py

Source: torchtitan docs/performance.md, "Llama 3 performance numbers": Llama 3 8B and 70B
with FSDP2 (ZeRO-3, bf16) on 64 A100-80GB GPUs, local batch 1 (global 64), torchtitan's
default sequence length for these models (8192, its train_configs/llama3_*.toml), tokens per
second per GPU ("WPS"). Their "selective op" activation checkpointing is meshplan's "selective": torchtitan's
op-level SAC policy, which saves the outputs of all compute ops except every second mm (of a
Llama block's q, k, v, o, w1, w3, w2 that is k, o and w3 recomputed), as meshplan's runtime
and simulator run it (planner.arch.layers.every_other_product_policy).
"""
from __future__ import annotations

import statistics
import sys

from planner.plan import Plan
from planner.simulate import prepare

GPUS = 64
CLUSTER = "a100-sxm-80gb:8x8"
SEQ = 8192
# (preset, layers, checkpoint mode, published tokens/s per GPU)
RUNS = (("llama3-8b", 32, "selective", 2973), ("llama3-70b", 80, "full", 331))


def predicted_tokens_per_gpu_s(preset: str, layers: int, mode: str) -> float:
    plan = Plan(dp=GPUS, zero=3, micro_batch=1, global_batch=GPUS, seq=SEQ, precision="bf16",
                checkpoint=[mode] * layers)
    sim = prepare(plan, preset, CLUSTER)
    step_s = sim.run().step_time_s
    return plan.global_batch * plan.seq / step_s / GPUS


def main() -> int:
    errors = []
    print(f"{'run':38} {'published':>10} {'predicted':>10} {'err %':>7}   (tokens/s per GPU)")
    for preset, layers, mode, published in RUNS:
        predicted = predicted_tokens_per_gpu_s(preset, layers, mode)
        errors.append(predicted / published - 1)
        print(f"{preset + ' FSDP2 ' + mode + ' AC, 64 A100':38} {published:10.0f} {predicted:10.0f} {100 * errors[-1]:+7.1f}")
    print(f"MAPE {100 * statistics.mean(map(abs, errors)):.1f}% over {len(errors)} published runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
