"""Launch `meshplan train --nproc-per-node 4` N times in a row and count the runs that exit 0.

Issue #31: a run could finish all its steps and then exit 1, one rank aborting at
interpreter exit ("terminate called without an active exception"). Each run here trains
gpt-tiny on the plan `meshplan plan --model gpt-tiny --cluster cpu:1x4 --global-batch 8
--seq 64` writes, with its own checkpoint directory and JSONL log. A run is complete when
it exited 0, `latest` names the last step and that checkpoint has its meshplan.json, and
the log holds every step once. Prints one line per run (the stderr of a failing run is kept
in --workdir) and then "N runs, K exited 0, C complete"; exits 0 only if every run did both.

    python benchmarks/train_exit_loop.py --runs 30
    python benchmarks/train_exit_loop.py --runs 1 --fault-rank 1 --fault-after-step 2   # must fail
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NPROC = 4


def run_job(cmd: list, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """Run cmd in a session of its own; past timeout_s, SIGTERM it - torchrun passes that on to the
    ranks, which it starts in sessions of their own - then SIGKILL what is left of the session.
    A hung job is reported (a negative exit code, "timed out" on stderr), not left running."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        err += f"\ntimed out after {timeout_s:.0f} s: {' '.join(map(str, cmd))}\n"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(*args, env_extra=None, timeout_s=600) -> subprocess.CompletedProcess:
    """`meshplan ARGS` from this checkout, in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)          # a launcher's variables would make the run join its job
    return run_job([sys.executable, "-m", "planner.cli", *args], env, timeout_s)


def make_plan(path: Path) -> Path:
    r = _cli("plan", "--model", "gpt-tiny", "--cluster", f"cpu:1x{NPROC}", "--global-batch", 8, "--seq", 64,
             "--out", path, "--force")
    if r.returncode != 0:
        raise SystemExit(f"meshplan plan failed:\n{r.stderr}")
    return path


def train(plan: Path, run_dir: Path, steps: int, env_extra=None, timeout_s=600) -> subprocess.CompletedProcess:
    return _cli("train", "--nproc-per-node", NPROC, "--model", "gpt-tiny", "--plan", plan, "--steps", steps,
                "--device", "cpu", "--quiet", "--checkpoint-dir", run_dir / "ck",
                "--checkpoint-every", max(1, steps // 2), "--log-json", run_dir / "log.jsonl", env_extra=env_extra,
                timeout_s=timeout_s)


def missing_output(run_dir: Path, steps: int) -> list[str]:
    """What a complete run leaves and this one did not: [] when the checkpoint and log are whole."""
    missing = []
    ck, log = run_dir / "ck", run_dir / "log.jsonl"
    last = f"step-{steps:08d}"
    latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
    if latest != last or not (ck / last / "meshplan.json").is_file():
        missing.append(f"checkpoint {last} (latest: {latest})")
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []
    if logged != list(range(1, steps + 1)):
        missing.append(f"log steps 1..{steps} (logged: {logged[:3]}..{logged[-1:]})")
    return missing


def loop(runs: int, steps: int, workdir: Path, env_extra=None, timeout_s=600) -> tuple[int, int]:
    """Run `runs` launches one after another; returns (how many exited 0, how many were complete)."""
    plan = make_plan(workdir / "plan.json")
    exited0 = complete = 0
    for i in range(1, runs + 1):
        run_dir = workdir / f"run-{i}"
        run_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        r = train(plan, run_dir, steps, env_extra, timeout_s)
        missing = missing_output(run_dir, steps)
        exited0 += r.returncode == 0
        complete += r.returncode == 0 and not missing
        note = "complete" if not missing else "missing " + "; ".join(missing)
        if r.returncode != 0:
            (run_dir / "stderr.txt").write_text(r.stderr)
            note += f"; stderr in {run_dir / 'stderr.txt'}"
        print(f"run {i}/{runs}: exit {r.returncode}, {time.perf_counter() - t0:.1f} s, {note}", flush=True)
    return exited0, complete


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout-s", type=float, default=600, help="a launch running longer is killed and fails")
    ap.add_argument("--workdir", help="where runs write (default: a new temporary directory)")
    ap.add_argument("--fault-rank", type=int, help="this rank raises after --fault-after-step (a failing run)")
    ap.add_argument("--fault-after-step", type=int, default=1)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train-exit-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"--workdir {workdir} is not empty: each run needs fresh checkpoint and log paths")
    fault = None
    if args.fault_rank is not None:
        fault = {"MESHPLAN_FAULT_RAISE_AFTER_STEP": str(args.fault_after_step),
                 "MESHPLAN_FAULT_RANK": str(args.fault_rank)}
    exited0, complete = loop(args.runs, args.steps, workdir, fault, args.timeout_s)
    print(f"{args.runs} runs, {exited0} exited 0, {complete} complete", flush=True)
    return 0 if complete == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
