"""Predicted vs published throughput of float8 training runs (a check: nothing is fitted to these).

    python benchmarks/fp8_runs.py

Source: torchtitan benchmarks/llama3_h100_202412_torchtitan.md (pytorch/torchtitan b5bcd76),
Tables 1 and 3: Llama 3.1 8B, FSDP (ZeRO 3), local batch 2, selective activation
checkpointing, torchtitan's default sequence length for it (8192), on 8 and 128 H100s of
Meta's Grand Teton hosts: "96GB HBM2e with 2.4 TB/sec peak memory bandwidth", NVLink inside
the host, 400 Gb/s RDMA per GPU, the default 500 W power limit (meshplan prices the 700 W
datasheet peak: its predictions run fast by what the lower clock costs). Tokens/s per GPU for
FSDP (bf16, eager), FSDP + torch.compile, FSDP + torch.compile + Float8 (torchao's float8
linears; at that date torchtitan's float8 was tensorwise with the FSDP float8 all-gather and
precomputed scales, `enable_fsdp_float8_all_gather` / `precompute_float8_dynamic_scale_for_fsdp`).
The GPU is the catalogue H100 with those memory figures (a custom GPU: its calibration is the
H100 one transferred). Selective AC as benchmarks/published_runs.py prices torchtitan's op SAC
(every second matmul of a block recomputed as well). MFU is not published: torchtitan notes it
is ill-defined once bf16 and fp8 tensor cores both run; meshplan reports it against the bf16 peak.
"""
from __future__ import annotations

import statistics
import sys

from cost_models.cluster import cluster_from_dict
from planner.plan import Plan
from planner.simulate import prepare

SEQ, LOCAL_BATCH, LAYERS = 8192, 2, 32
GPU = {"base": "h100-sxm-80gb", "name": "h100-96gb-hbm2e", "memory_GB": 96, "memory_bw_GBps": 2400}
# (GPUs, technique, plan fields, published tokens/s per GPU)
RUNS = ((8, "FSDP", dict(precision="bf16"), 5762),
        (8, "FSDP + compile", dict(precision="bf16", compile=True), 6667),
        (8, "FSDP + compile + Float8", dict(precision="fp8", compile=True), 8532),
        (128, "FSDP", dict(precision="bf16"), 5605),
        (128, "FSDP + compile", dict(precision="bf16", compile=True), 6514),
        (128, "FSDP + compile + Float8", dict(precision="fp8", compile=True), 8380))


def predicted_tokens_per_gpu_s(gpus: int, fields: dict) -> float:
    cluster = cluster_from_dict({"gpu": GPU, "nodes": gpus // 8, "gpus_per_node": 8, "name": f"grand-teton:{gpus}"})
    plan = Plan(dp=gpus, zero=3, micro_batch=LOCAL_BATCH, global_batch=LOCAL_BATCH * gpus, seq=SEQ,
                checkpoint=["selective"] * LAYERS, **fields)
    sim = prepare(plan, "llama3-8b", cluster)
    extra = 0.0
    for index in sim.traced.blocks:   # torchtitan's op SAC recomputes every second matmul too
        matmuls = [op for op in sim.traced.cost_of(sim.traced.layers[index]).ops if op.kind == "linear"]
        extra += sum(sim.coster.op_forward_s(op, in_block=True) for op in matmuls[1::2])
    step_s = sim.run().step_time_s + extra * plan.grad_accum
    return plan.global_batch * plan.seq / step_s / gpus


def main() -> int:
    errors, rows = [], {}
    print(f"{'run (Llama 3.1 8B, H100 96GB)':42} {'published':>10} {'predicted':>10} {'err %':>7}   (tokens/s per GPU)")
    for gpus, technique, fields, published in RUNS:
        predicted = predicted_tokens_per_gpu_s(gpus, fields)
        rows[gpus, technique] = (published, predicted)
        errors.append(predicted / published - 1)
        print(f"{f'{technique}, {gpus} GPUs':42} {published:10.0f} {predicted:10.0f} {100 * errors[-1]:+7.1f}")
    print(f"MAPE {100 * statistics.mean(map(abs, errors)):.1f}% over {len(errors)} published runs")
    for gpus in (8, 128):
        (p8, q8), (pc, qc) = rows[gpus, "FSDP + compile + Float8"], rows[gpus, "FSDP + compile"]
        print(f"Float8 speedup over compile, {gpus} GPUs: published {p8 / pc:.2f}x, predicted {q8 / qc:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
