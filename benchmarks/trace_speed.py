"""Measured bars of the tracer (planner.trace); prints numbers, asserts nothing.

1. GPT-3 175B (96 layers, seq 2048, micro-batch 1, bf16): wall time to build the model on
   the meta device and to trace it, and the process's peak RSS - measured in a fresh
   interpreter so nothing else inflates it. Bars: trace <= 10 s, peak RSS <= 2 GB.
2. Every zoo preset (micro-batch 1, seq = min(2048, max_seq)): forward and backward FLOPs
   of the trace against torch's FlopCounterMode run on the meta device, compared in
   FlopCounterMode's convention (attention backward 2x forward). Bar: within 1 %.

    python benchmarks/trace_speed.py [--presets gpt-tiny,llama2-7b] [--skip-175b]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_175b() -> dict:
    """Runs inside the fresh interpreter: build, trace, report times and peak RSS."""
    start = time.perf_counter()
    from planner.trace import trace_model
    from planner.zoo import load_model
    imported = time.perf_counter()
    model = load_model("gpt3-175b").build("meta")
    built = time.perf_counter()
    traced = trace_model(model, 1, 2048, "bf16")
    done = time.perf_counter()
    block = traced.cost_of(traced.blocks[0])
    return {
        "import_s": imported - start, "build_s": built - imported, "trace_s": done - built,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "layers": len(traced.layers), "signatures": len(traced.costs), "route": traced.route,
        "params": traced.param_count, "block_saved_mib": block.saved_bytes / 2**20,
        "block_full_ckpt_mib": block.saved_bytes_full_ckpt / 2**20,
        "block_selective_mib": block.saved_bytes_selective / 2**20,
        "block_param_copies_mib": block.saved_param_copy_bytes / 2**20,
        "fwd_tflops": traced.fwd_flops / 1e12, "bwd_tflops": traced.bwd_flops / 1e12,
    }


def bench_175b():
    proc = subprocess.run([sys.executable, __file__, "--child-175b"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    if proc.returncode:
        print(proc.stderr)
        raise SystemExit("the GPT-3 175B child run failed")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print("GPT-3 175B, micro-batch 1, seq 2048, bf16 (fresh interpreter)")
    print(f"  import {r['import_s']:.2f} s   build on meta {r['build_s']:.2f} s   "
          f"trace {r['trace_s']:.2f} s (bar 10 s)   build+trace {r['build_s'] + r['trace_s']:.2f} s")
    print(f"  peak RSS {r['peak_rss_mb']:.0f} MB (bar 2048 MB)")
    print(f"  {r['layers']} layers, {r['signatures']} costed signatures, route {r['route']}, "
          f"{r['params'] / 1e9:.2f} B parameters")
    print(f"  block activations: {r['block_saved_mib']:.1f} MiB, full ckpt {r['block_full_ckpt_mib']:.1f} MiB, "
          f"selective {r['block_selective_mib']:.1f} MiB; bf16 weight copies {r['block_param_copies_mib']:.1f} MiB")
    print(f"  step FLOPs: forward {r['fwd_tflops']:.1f} TFLOP, backward {r['bwd_tflops']:.1f} TFLOP")


def bench_flops(names):
    from planner.trace import flop_counter_reference, trace_model
    from planner.zoo import PRESETS

    print()
    print("FLOPs vs FlopCounterMode (meta), micro-batch 1, FlopCounterMode's convention")
    print(f"  {'preset':<15}{'seq':>6}{'trace s':>9}{'fwd TFLOP':>12}{'fwd err':>10}{'bwd TFLOP':>12}"
          f"{'bwd err':>10}{'sigs':>6}")
    worst = 0.0
    for name in names:
        seq = min(2048, PRESETS[name].max_seq)
        start = time.perf_counter()
        traced = trace_model(name, 1, seq, "bf16")
        elapsed = time.perf_counter() - start
        fwd, bwd = traced.flop_counter_flops()
        ref_fwd, ref_bwd = flop_counter_reference(name, 1, seq)
        fwd_err, bwd_err = fwd / ref_fwd - 1, bwd / ref_bwd - 1
        worst = max(worst, abs(fwd_err), abs(bwd_err))
        print(f"  {name:<15}{seq:>6}{elapsed:>9.2f}{fwd / 1e12:>12.4f}{fwd_err:>10.2e}{bwd / 1e12:>12.4f}"
              f"{bwd_err:>10.2e}{len(traced.costs):>6}")
    print(f"  worst relative error: {worst:.2e} (bar 1e-02)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", help="comma-separated presets for the FLOP table (default: all)")
    parser.add_argument("--skip-175b", action="store_true")
    parser.add_argument("--child-175b", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_175b:
        print(json.dumps(one_175b()))
        return
    if not args.skip_175b:
        bench_175b()
    from planner.zoo import PRESETS
    bench_flops(args.presets.split(",") if args.presets else list(PRESETS))


if __name__ == "__main__":
    main()
