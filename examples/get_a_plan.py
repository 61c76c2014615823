"""Get a plan from Python: the best ways to train a model on a cluster, then save the winner.

    python examples/get_a_plan.py                                  # Llama-3 8B on one DGX H100
    python examples/get_a_plan.py gpt3-13b a100-sxm-80gb:4x8 256 plan.json

The saved file is what `meshplan simulate --plan` and `meshplan train --plan` read.
"""
import sys

from cost_models.units import GIB
from planner import plan


def main(model="llama3-8b", cluster="dgx-h100", global_batch="64", out=None):
    plans = plan(model, cluster, global_batch=int(global_batch), seq=2048, top_k=3)
    for rank, p in enumerate(plans, 1):
        r = p.result
        print(f"#{rank} dp={p.dp} tp={p.tp} pp={p.pp} zero={p.zero} micro-batch={p.micro_batch} "
              f"{p.schedule}: {r.step_time_s:.3f} s/step, {r.tokens_per_s:,.0f} tokens/s, MFU {100 * r.mfu:.1f}%, "
              f"peak {r.worst_stage.peak_reserved_bytes / GIB:.1f} GiB")
    s = plans.stats
    print(f"searched {s.candidates} candidates in {s.search_s:.1f} s ({s.simulated} simulated)")
    if out:
        plans[0].save(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
