"""Run `meshplan simulate --batch` on a list of cases, as a user would: one process of a
checkout's CLI, one JSON case a line in, one JSON result a line out (the benchmarks that
score predictions through the CLI share it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]   # this checkout's meshplan, installed or not


def simulate_batch(cases: list[dict], cases_path: Path, repo: Path = REPO) -> list[dict]:
    """One result per case from `meshplan simulate --batch` of the checkout `repo`: the
    result's JSON, or {"error": ...} for a case the CLI refused (the others still run).
    The cases are written to `cases_path` (kept, to rerun by hand)."""
    cases_path.write_text("".join(json.dumps(case) + "\n" for case in cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "simulate", "--batch", str(cases_path.resolve())],
                          capture_output=True, text=True, check=False, cwd=repo, env=env)
    if proc.returncode:
        raise SystemExit(f"meshplan simulate --batch failed:\n{proc.stderr}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(results) != len(cases):
        raise SystemExit(f"meshplan simulate --batch: {len(results)} results for {len(cases)} cases")
    return results
