"""Score `meshplan simulate --batch` results against published tokens/s per GPU: one line a
row, the rows kept out and the rows the CLI refused, then the MAPE overall and per group
(the scripts that check published runs through the CLI share it: moe_runs.py,
long_context_fp8_runs.py)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from cli_batch import REPO, simulate_batch


def arguments(description: str, data: Path) -> argparse.ArgumentParser:
    """The options every such script takes: --data, --cases, --repo."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=data,
                        help=f"the rows (default: benchmarks/data/{data.name})")
    parser.add_argument("--cases", type=Path, help="keep the `meshplan simulate --batch` cases in this file")
    parser.add_argument("--repo", type=Path, default=REPO, help="the meshplan checkout whose CLI runs the cases")
    return parser


def simulate_rows(args, case_of: Callable[[dict, dict], dict], skip_reason: Callable[[dict], str | None]):
    """The data file's rows, those not kept out, and the CLI's result for each of those."""
    data = json.loads(args.data.read_text())
    runnable = [row for row in data["rows"] if skip_reason(row) is None]
    with tempfile.TemporaryDirectory() as tmp:
        results = simulate_batch([case_of(row, data["models"]) for row in runnable],
                                 args.cases or Path(tmp) / "cases.jsonl", args.repo.resolve())
    return data, runnable, results


def gpus(row: dict) -> int:
    plan = row["plan"]
    return plan["dp"] * plan.get("tp", 1) * plan.get("pp", 1) * plan.get("cp", 1)


def mape_text(errors: list[float]) -> str:
    return f"MAPE {100 * statistics.mean(map(abs, errors)):.1f}%"


def score(title: str, rows: list[dict], runnable: list[dict], results: list[dict],
          skip_reason: Callable[[dict], str | None], published_of: Callable[[dict], float],
          groups_of: Callable[[dict], list[str]]) -> tuple[dict, int]:
    """Print each scored row (predicted = global batch x seq / step time / GPUs), the skipped
    and refused rows, and the MAPE; returns ({row id: (published, predicted)}, refused count)."""
    errors, by_group, failed, scored = [], {}, [], {}
    print(f"{'run':46} {'published':>10} {'predicted':>10} {'err %':>7}   (tokens/s per GPU)")
    for row, result in zip(runnable, results):
        if "error" in result:
            failed.append((row["id"], result["error"]))
            continue
        plan = row["plan"]
        predicted = plan["global_batch"] * plan["seq"] / result["step_time_s"] / gpus(row)
        published = published_of(row)
        scored[row["id"]] = (published, predicted)
        error = predicted / published - 1
        errors.append(error)
        for group in groups_of(row):
            by_group.setdefault(group, []).append(error)
        print(f"{row['id']:46} {published:10.0f} {predicted:10.0f} {100 * error:+7.1f}"
              + ("" if result.get("fits", True) else "   (predicted not to fit)"))
    for row in rows:
        reason = skip_reason(row)
        if reason:
            print(f"skipped {row['id']}: {reason}")
    for name, message in failed:
        print(f"failed  {name}: {message}")
    counts = f"{len(rows) - len(runnable)} skipped, {len(failed)} refused by the CLI"
    if errors:
        print(f"{title}: {len(errors)} scored, {mape_text(errors)} "
              f"(median {100 * statistics.median(map(abs, errors)):.1f}%, "
              f"mean signed {100 * statistics.mean(errors):+.1f}%); {counts}")
        for group, errs in sorted(by_group.items()):
            print(f"  {group:30s} {len(errs):2d} runs: {mape_text(errs)}, "
                  f"mean signed {100 * statistics.mean(errs):+.1f}%")
    else:
        print(f"{title}: none scored ({counts})")
    return scored, len(failed)
