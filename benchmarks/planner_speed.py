"""How long `meshplan plan` takes at 1000-GPU scale (issue bars: 175B <= 5 s, 1T <= 30 s).

Each case runs `python -m planner.cli plan ... --json` in a fresh interpreter REPEATS
times (cold: every trace and cost is computed anew) and prints the median of the search's
own time (`search.search_s`: tracing, pruning, partitioning, ILPs, simulations) and of
the whole command's wall time (which adds Python start-up and `import torch`, ~2 s here).

    python benchmarks/planner_speed.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (model, cluster, global batch, seq, bar in s): GPT-3 175B as in the issue; Megatron's 1T
# row of shared/reference/megatron_sc21_table1.json (3072 GPUs, global batch 3072).
CASES = [("gpt3-175b", "a100-sxm-80gb:128x8", 1536, 2048, 5.0),
         ("megatron-1t", "a100-sxm-80gb:384x8", 3072, 2048, 30.0)]


def run_once(model, cluster, global_batch, seq) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "planner.cli", "plan", "--model", model, "--cluster", cluster,
           "--global-batch", str(global_batch), "--seq", str(seq), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    wall_s = time.perf_counter() - start
    data = json.loads(proc.stdout)
    return data["search"]["search_s"], wall_s, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':<12} {'cluster':<22} {'search s':>9} {'wall s':>7} {'bar s':>6}  ok   best plan, search stats")
    for model, cluster, gb, seq, bar in CASES:
        runs = [run_once(model, cluster, gb, seq) for _ in range(args.repeats)]
        search_s = statistics.median(r[0] for r in runs)
        wall_s = statistics.median(r[1] for r in runs)
        data = runs[-1][2]
        best, stats = data["plans"][0], data["search"]
        summary = (f"dp{best['dp']} tp{best['tp']} pp{best['pp']} zero{best['zero']} mb{best['micro_batch']} "
                   f"{best['schedule']}, {best['result']['tflops_per_gpu']:.0f} TFLOP/s/GPU; "
                   f"{stats['candidates']} candidates, {stats['pruned_model_states']} pruned by model states, "
                   f"{stats['pruned_bound']} by bound, {stats['partitioned']} partitioned, "
                   f"{stats['simulated']} simulated, {stats['tp_ilp_solves']} TP ILPs in {stats['tp_ilp_s']:.2f} s")
        print(f"{model:<12} {cluster:<22} {search_s:>9.2f} {wall_s:>7.2f} {bar:>6.0f}  "
              f"{'yes' if search_s <= bar else 'NO ':<4} {summary}")
    print(f"(medians of {args.repeats} cold runs each; search s = plan()'s own time, wall = the whole command)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
