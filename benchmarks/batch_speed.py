"""How long `meshplan simulate --batch` takes for 1000 cases (traces and costs are cached).

    python benchmarks/batch_speed.py [--cases 1000]

Writes a sweep over tp, pp, micro-batch, ZeRO stage and checkpointing of GPT-3 1.3B on
64 A100s to a temporary file, runs the real CLI on it and prints the wall time.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(count: int) -> list[dict]:
    grid = [dict(model="gpt3-1.3b", cluster="a100-sxm-80gb:8x8", seq=2048, global_batch=512, micro_batch=mb,
                 dp=64 // (tp * pp), tp=tp, pp=pp, zero=zero, checkpoint=ckpt)
            for tp, pp, mb, zero, ckpt in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4), (0, 1, 3),
                                                            ("none", "full"))]
    return list(itertools.islice(itertools.cycle(grid), count))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.jsonl"
        path.write_text("".join(json.dumps(c) + "\n" for c in sweep(args.cases)))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "planner.cli", "simulate", "--batch", str(path)],
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    errors = sum("error" in r for r in results)
    print(f"{len(results)} cases in {elapsed:.1f} s ({1e3 * elapsed / max(1, len(results)):.1f} ms a case, "
          f"process start and tracing included), {errors} errors, exit code {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
