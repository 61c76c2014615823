"""`meshplan train` exits 0 after every run that succeeded, and non-zero when a rank fails (issue #31).

The bug: gloo's worker threads outlived the run into interpreter finalization, where a worker
dropping the last reference to a finished collective's tensor needed the GIL, CPython ended the
thread and std::terminate aborted the rank - exit 1 in about 1 run of 9 to 15. mesh.teardown
now frees the process groups, which joins those threads, before the interpreter exits. The
first test checks that directly and fails on every run without it; the others launch the real
CLI through benchmarks/train_exit_loop.py and check exit codes, checkpoints and logs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import write_plan

pytestmark = [pytest.mark.runtime, pytest.mark.distributed,   # runtime: needs torch >= the runtime's floor (planner/torch_compat.py)
              pytest.mark.skipif(sys.platform != "linux", reason="counts threads in /proc/self/task; torchrun")]

from helpers import REPO  # noqa: E402
LOOP = REPO / "benchmarks" / "train_exit_loop.py"


def _load_loop():
    spec = importlib.util.spec_from_file_location("train_exit_loop", LOOP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_exit_loop = _load_loop()

# Counts this rank's threads before and after one run: a completed run must leave none of
# its process groups' threads behind. Not counted: autograd's device worker threads
# ("pt_autograd_0".."pt_autograd_7"), which a CUDA build of torch starts at the first backward
# even without a GPU and keeps for the life of the process (measured on 2.10.0+cu128,
# 2.12.0+cu130 and 2.13.0+cu130; a +cpu build starts none); they hold no process group.
# (One run per job: a second init_process_group in the same torchrun job can meet the first
# one's keys in the agent's store and hang.)
RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
from runtime.train import run
def threads():
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += not Path("/proc/self/task", task, "comm").read_text().startswith("pt_autograd_")
        except FileNotFoundError:   # ended since the listing
            pass
    return count
before = threads()
run(["--model", "gpt-tiny", "--plan", sys.argv[1], "--steps", "2", "--device", "cpu", "--quiet"])
Path(sys.argv[2], f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"before": before, "after": threads()}))
"""


def _plan(kind: str, path: Path) -> Path:
    if kind == "zero1":        # FSDP2 driven per micro-batch (Engine._sync)
        return write_plan(path, dp=4, zero=1, micro_batch=2, global_batch=8, seq=32, precision="fp32")
    train_exit_loop.make_plan(path)    # the issue's: meshplan plan's choice for gpt-tiny on cpu:1x4 (FSDP2)
    return path


@pytest.mark.parametrize("kind", ["planner", "zero1"])
def test_completed_run_leaves_no_process_group_threads(tmp_path, kind):
    plan = _plan(kind, tmp_path / "plan.json")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = train_exit_loop.run_job([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "4", script, plan, tmp_path], env, timeout_s=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "still referenced after teardown" not in r.stderr, r.stderr[-3000:]
    for rank in range(4):
        c = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert c["after"] == c["before"], (rank, c)     # before the fix: 9 more (the planner's ZeRO-2 plan)


def _loop(workdir: Path, runs: int, *args, launch_timeout_s=300) -> subprocess.CompletedProcess:
    """benchmarks/train_exit_loop.py; each launch it makes is killed and reported past launch_timeout_s."""
    return subprocess.run([sys.executable, str(LOOP), "--workdir", str(workdir), "--runs", str(runs),
                           "--timeout-s", str(launch_timeout_s), *map(str, args)],
                          capture_output=True, text=True, timeout=(runs + 1) * launch_timeout_s + 120)


def _summary(r: subprocess.CompletedProcess) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+) runs, (\d+) exited 0, (\d+) complete", r.stdout.strip().splitlines()[-1])
    assert m, r.stdout + r.stderr[-3000:]
    return tuple(int(g) for g in m.groups())


def test_runs_exit_zero_and_a_failing_rank_fails_the_job(tmp_path):
    ok = _loop(tmp_path / "ok", 3, "--steps", 6)
    assert _summary(ok) == (3, 3, 3), ok.stdout
    assert ok.returncode == 0

    # rank 1 raises after step 2: the job must fail, with the rank's error on stderr
    bad = _loop(tmp_path / "bad", 1, "--steps", 6, "--fault-rank", 1, "--fault-after-step", 2)
    assert _summary(bad) == (1, 0, 0), bad.stdout
    assert bad.returncode == 1
    assert int(re.search(r"run 1/1: exit (-?\d+),", bad.stdout).group(1)) != 0, bad.stdout
    stderr = (tmp_path / "bad" / "run-1" / "stderr.txt").read_text()
    assert "injected fault on rank 1 after step 2" in stderr
    assert "missing checkpoint step-00000006" in bad.stdout     # never got to the last step


@pytest.mark.slow
def test_twenty_runs_in_a_row_all_exit_zero(tmp_path):
    r = _loop(tmp_path, 20, "--steps", 20)
    assert _summary(r) == (20, 20, 20), r.stdout
    assert r.returncode == 0
