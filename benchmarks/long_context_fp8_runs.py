"""Predicted vs published throughput of long-context (context-parallel) and FP8 training runs (a check: nothing is fitted to these).

    python benchmarks/long_context_fp8_runs.py                     # every row, then MAPE per source and per feature
    python benchmarks/long_context_fp8_runs.py --cases lc.jsonl    # keep the cases: meshplan simulate --batch lc.jsonl
    python benchmarks/long_context_fp8_runs.py --repo ../other     # run another meshplan checkout's CLI
    python benchmarks/long_context_fp8_runs.py --strict            # exit 1 if the CLI refuses any row

The rows (benchmarks/data/long_context_fp8_runs.json) are published Llama 2/3 pre-training
runs whose configuration is printed beside the measurement, each citing its source:
torchtitan's benchmarks (Float8, torch.compile, context parallelism to 262K tokens on
H100; Float8 tensorwise/rowwise vs bf16; H200), NeMo's FP8 summary of 24.07 and its
long-sequence table (Llama 2 7B, 4K-1M tokens, cp up to 32), Megatron-Bridge's FP8 H100 rows
(Llama 3.1 405B with cp 2) and the Llama 3 paper's Table 4 (405B at 8K and at 128K with cp 16).

Predictions come from the CLI alone: each row becomes one `meshplan simulate --batch` case
(the model config of the row, the cluster, the plan with `"cp"`, `"precision": "fp8"`,
`"fp8_recipe"` and `"compile"` where the run used them, the engine), and predicted tokens/s
per GPU = global batch x seq / step time / GPUs. Sources that print only model TFLOP/s per
GPU are turned into tokens/s by their own FLOP convention (benchmarks/flops_conventions.py).
Where a row names a `baseline` (the same run in bf16, or eager), the measured and predicted
speedups are printed side by side.

Not scored (kept in the data, listed with the reason): rows with a `status` (async TP,
Megatron-FSDP). A row the CLI refuses (a meshplan without `"cp"`, fp8 or `"compile"`) is
listed ('failed') with the CLI's one-line error and not scored.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops_conventions import tokens_per_s_per_gpu  # noqa: E402
from published_report import arguments, score, simulate_rows  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "long_context_fp8_runs.json"
# Plan fields a row's "plan" may carry, passed to the case as they are ...
PLAN_KEYS = ("dp", "tp", "pp", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
             "interleave", "sequence_parallel", "checkpoint")
# ... and the newer ones, passed only where they differ from the Plan's default (so a row
# that does not use a feature is priced by a meshplan that lacks it).
FEATURE_DEFAULTS = {"cp": 1, "fp8_recipe": "tensorwise", "compile": False}
STATUS_REASONS = {
    "async_tp": "async TP (torch's fused all-gather/reduce-scatter matmuls): meshplan prices tensor-parallel "
                "collectives as issued, not decomposed under the GEMMs",
    "megatron_fsdp": "Megatron-FSDP: the megatron-lm engine offers ZeRO 0 and 1 only",
}


def skip_reason(row: dict) -> str | None:
    """Why a row is kept out of the score, or None to score it."""
    status = row.get("status")
    return None if status is None else STATUS_REASONS.get(status, status)


def run_case(row: dict, models: dict) -> dict:
    """The row as one `meshplan simulate --batch` case."""
    plan = row["plan"]
    case = {"model": models[row["model"]]["config"], "cluster": row["cluster"],
            **{k: plan[k] for k in PLAN_KEYS if k in plan}, "engine": row["engine"]}
    if plan["precision"] == "fp8":
        case["fp8_recipe"] = plan.get("fp8_recipe", "tensorwise")   # always named: no silent default
    for key, default in FEATURE_DEFAULTS.items():
        if plan.get(key, default) != default:
            case[key] = plan[key]
    if row.get("engine_options"):
        case["engine_options"] = row["engine_options"]
    return case


def published_tokens_per_s_per_gpu(row: dict, models: dict) -> float:
    published = row["published"]
    if "tokens_per_s_per_gpu" in published:
        return published["tokens_per_s_per_gpu"]
    return tokens_per_s_per_gpu(published["model_tflops_per_gpu"], row["flops_formula"],
                                models[row["model"]]["config"], row["plan"]["seq"])


def features(row: dict) -> list[str]:
    """The groups a row counts in besides its source."""
    plan = row["plan"]
    found = []
    if plan.get("cp", 1) > 1:
        found.append("context parallel (cp > 1)")
    if plan["seq"] >= 32768:
        found.append("long sequence (>= 32K)")
    found.append("fp8" if plan["precision"] == "fp8" else "bf16")
    if plan.get("compile"):
        found.append("torch.compile")
    return found


def speedups(rows: list[dict], scored: dict) -> list[str]:
    """Measured vs predicted speedup of each row over its baseline, where both were priced."""
    lines = []
    for row in rows:
        base = row.get("baseline")
        if base and row["id"] in scored and base["id"] in scored:
            (pub, pred), (base_pub, base_pred) = scored[row["id"]], scored[base["id"]]
            lines.append(f"  {row['id']:46} {base['what']:18} measured x{pub / base_pub:5.2f}, "
                         f"predicted x{pred / base_pred:5.2f}")
    return lines


def main(argv=None) -> int:
    parser = arguments(__doc__.splitlines()[0], DATA)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the CLI refuses a row")
    args = parser.parse_args(argv)
    data, runnable, results = simulate_rows(args, run_case, skip_reason)
    rows, models = data["rows"], data["models"]
    scored, failed = score("Long-context and FP8 published runs", rows, runnable, results, skip_reason,
                           lambda row: published_tokens_per_s_per_gpu(row, models),
                           lambda row: [row["source"], *features(row)])
    ratios = speedups(rows, scored)
    print("\n".join(["speedups over the baseline run (the same configuration in bf16, or eager):", *ratios])
          if ratios else "speedups over the baseline run: no pair with both rows priced")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
