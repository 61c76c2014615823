"""Predicted vs published torch.compile gain (a check: nothing is fitted to these).

    python benchmarks/compile_gain.py

Source: pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Dec 2024), Tables 1
and 3: Llama 3.1 8B, FSDP (ZeRO-3, bf16), local batch 2, selective (op) activation
checkpointing, 8 and 128 H100 GPUs, tokens/s per GPU "FSDP" and "FSDP + torch.compile"
(compile per TransformerBlock, torchtitan's apply_compile). Sequence 8192 (its
llama3_8b config). Their GPUs are Grand Teton's H100 96 GB HBM2e (2.4 TB/s) at 500 W, priced
here as the catalogue's h100-sxm-80gb (HBM3, 3.35 TB/s): the absolute tokens/s are not
comparable (see published_runs.py for that check), the gain - compiled over eager, the same
GEMMs in both - is. meshplan's selective mode is torchtitan's op-level SAC policy.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from planner.plan import Plan  # noqa: E402
from planner.simulate import prepare  # noqa: E402

SEQ, LOCAL_BATCH, LAYERS = 8192, 2, 32
# (GPUs, cluster, published eager and compiled tokens/s per GPU)
RUNS = ((8, "h100-sxm-80gb:1x8", 5762, 6667), (128, "h100-sxm-80gb:16x8", 5605, 6514))


def predicted_tokens_per_gpu_s(gpus: int, cluster: str, compiled: bool) -> float:
    plan = Plan(dp=gpus, zero=3, micro_batch=LOCAL_BATCH, global_batch=gpus * LOCAL_BATCH, seq=SEQ,
                precision="bf16", checkpoint=["selective"] * LAYERS, engine="torchtitan", compile=compiled)
    sim = prepare(plan, "llama3-8b", cluster)
    return plan.global_batch * plan.seq / sim.run().step_time_s / gpus


def main() -> int:
    print(f"{'run':34} {'published':>20} {'predicted':>20}   (tokens/s per GPU: eager -> compiled, gain)")
    for gpus, cluster, eager, compiled in RUNS:
        p_eager, p_compiled = (predicted_tokens_per_gpu_s(gpus, cluster, c) for c in (False, True))
        print(f"{f'llama3-8b FSDP selective, {gpus} H100':34} {eager:6,} -> {compiled:6,} {compiled / eager - 1:+6.1%}"
              f" {p_eager:6,.0f} -> {p_compiled:6,.0f} {p_compiled / p_eager - 1:+6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
