"""Predicted vs published throughput of Mixture-of-Experts training runs (a check: nothing is fitted to these).

    python benchmarks/moe_runs.py                      # every row; prints each, then MAPE and median
    python benchmarks/moe_runs.py --cases moe.jsonl    # keep the cases: meshplan simulate --batch moe.jsonl
    python benchmarks/moe_runs.py --repo ../other      # run another meshplan checkout's CLI

The rows (benchmarks/data/moe_runs.json) are published MoE pre-training runs whose whole
configuration is printed beside the measurement, each with its source (repository, path,
commit): NVIDIA's Megatron-Bridge performance tables (GPT-OSS 120B, BF16, H100 and B200;
run by Megatron-Core) and NeMo AutoModel's DGX-H100 BF16 table (DeepSeek-V3, Kimi K2,
Qwen3-30B-A3B, GPT-OSS; PyTorch FSDP2 with expert parallelism). Both force balanced
routing (their footnotes), so each row states `moe_imbalance` 1.0.

Predictions come from the CLI alone: each row becomes one `meshplan simulate --batch` case
(`moe_case`: the model config of the row, the cluster, the plan with `"ep"`, the engine,
`"moe_imbalance"`), and predicted tokens/s per GPU = global batch x seq / step time / GPUs.

Not scored (kept in the data, listed with the reason): FP8 rows (meshplan prices 16-bit
training only), rows with tp > 1 and ep > 1 (the Plan refuses them for now: experts would
need expert tensor parallelism). A row the CLI refuses (e.g. a meshplan without `"ep"` in
--batch cases) is listed with the CLI's error and not scored; the exit status is then 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_report import arguments, score, simulate_rows  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "moe_runs.json"
# Plan fields a row's "plan" may carry, passed to the case as they are.
PLAN_KEYS = ("dp", "tp", "pp", "ep", "zero", "micro_batch", "global_batch", "seq", "precision", "schedule",
             "interleave", "checkpoint", "sequence_parallel")
SIXTEEN_BIT = ("bf16", "fp16")


def skip_reason(row: dict) -> str | None:
    """Why a row is kept out of the score, or None to score it."""
    plan = row["plan"]
    reasons = []
    if row.get("status") == "fp8" or plan["precision"] not in SIXTEEN_BIT:
        reasons.append(f"{plan['precision']}: meshplan prices 16-bit training only")
    if plan.get("tp", 1) > 1 and plan.get("ep", 1) > 1:
        reasons.append(f"tp {plan['tp']} with ep {plan['ep']}: the Plan refuses ep > 1 with tp > 1 for now")
    return "; ".join(reasons) or None


def moe_case(row: dict, models: dict) -> dict:
    """The row as one `meshplan simulate --batch` case."""
    case = {"model": models[row["model"]]["config"], "cluster": row["cluster"],
            **{k: row["plan"][k] for k in PLAN_KEYS if k in row["plan"]},
            "engine": row["engine"]}
    if row.get("engine_options"):
        case["engine_options"] = row["engine_options"]
    if row.get("moe_imbalance") is not None:
        case["moe_imbalance"] = row["moe_imbalance"]
    return case


def main(argv=None) -> int:
    args = arguments(__doc__.splitlines()[0], DATA).parse_args(argv)
    data, runnable, results = simulate_rows(args, moe_case, skip_reason)
    sources = data["sources"]
    _, failed = score("MoE published runs", data["rows"], runnable, results, skip_reason,
                      lambda row: row["published"]["tokens_per_s_per_gpu"],
                      # per source and per system (B200: a transferred calibration)
                      lambda row: [sources[row["source"]]["repo"], row["cluster"].split(":")[0]])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
