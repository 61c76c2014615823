"""Preemption (issue 28): SIGTERM to `meshplan train` on 4 gloo ranks writes a checkpoint,
exits PREEMPTED_EXIT and leaves no process; the resumed run continues with the losses of an
uninterrupted one. SIGKILL while an asynchronous save is in flight leaves the previous
checkpoint as the latest, and the resumed run's --log-json has each step once.

The uninterrupted reference and the resumed runs run in-process on 4 forkserver ranks
(runtime_helpers.run_ranks: the same code, 1 thread per rank, as torchrun's workers);
the interrupted runs go through the real launcher and torchrun.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime_helpers import (end_job, left_running, processes_with, rank_of, run_ranks, train_many,
                             wait_for_lines, write_plan)

pytestmark = [pytest.mark.runtime, pytest.mark.distributed,
              pytest.mark.skipif(sys.platform != "linux", reason="torchrun, signals and /proc: Linux")]

STEPS = 12
PREEMPTED_EXIT = 75


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 4-rank ZeRO-3 job of STEPS steps, uninterrupted: its plan, flags and records."""
    root = tmp_path_factory.mktemp("reference")
    plan = write_plan(root / "plan.json", dp=4, zero=3, micro_batch=1, global_batch=4, seq=32, precision="fp32")
    common = ["--model", "gpt-tiny", "--plan", str(plan), "--steps", str(STEPS), "--device", "cpu", "--seed", "2",
              "--quiet"]
    run_ranks(4, train_many, [[*common, "--log-json", str(root / "a.jsonl")]], timeout=300)
    return dict(plan=plan, common=common, records=_lines(root / "a.jsonl"))


def _lines(path: Path) -> list[dict]:
    """Every record of a --log-json file, duplicates included."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _launch(*args, env_extra=None, background=False, timeout=300, nproc=4):
    """`meshplan train --nproc-per-node NPROC ARGS`, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for name in ("RANK", "WORLD_SIZE", "MESHPLAN_CHECK_ONLY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "planner.cli", "train", "--nproc-per-node", str(nproc), *map(str, args)]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _sigterm_after_two_steps(args, ck: Path, log: Path, pick, nproc: int) -> int:
    """Launch `meshplan train` in the background; once it logged 2 steps, SIGTERM the process
    `pick(processes)` chooses ({pid: command line} of the job's, the launcher's pid under key
    "launcher"). The job must exit PREEMPTED_EXIT and leave no process; returns the step it
    stopped after (checked against its checkpoint and --log-json)."""
    job = _launch(*args, "--checkpoint-dir", ck, "--log-json", log, background=True, nproc=nproc)
    try:
        wait_for_lines(job, log, 2)
        os.kill(pick({**processes_with(str(ck)), "launcher": job.pid}), signal.SIGTERM)
        _, stderr = job.communicate(timeout=240)
        assert job.returncode == PREEMPTED_EXIT, stderr[-3000:]
        assert left_running(str(ck)) == {}
    finally:
        end_job(job, str(ck))
    lines = [line for line in stderr.splitlines() if line.startswith("meshplan: stopped by SIGTERM after step ")]
    assert len(lines) == 1, stderr[-3000:]
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert (ck / "latest").read_text().strip() == f"step-{step:08d}"
    assert [r["step"] for r in _lines(log)] == list(range(1, step + 1))
    return step


def _launcher(processes: dict) -> int:
    assert len(processes) == 1 + 6, processes        # launcher, torchrun, 4 ranks (and the key)
    return processes["launcher"]                    # the launcher only, as `kill PID` does


def _rank_1(processes: dict) -> int:
    [pid] = [pid for pid, cmd in processes.items() if pid != "launcher" and "torch.distributed.run" not in cmd
             and "planner.cli" not in cmd and rank_of(pid) == "1"]
    return pid


def test_sigterm_to_the_launcher_checkpoints_stops_everything_and_resumes_exactly(reference, tmp_path):
    ck, log = tmp_path / "ck", tmp_path / "b.jsonl"
    step = _sigterm_after_two_steps(reference["common"], ck, log, _launcher, nproc=4)
    assert 2 <= step < STEPS
    run_ranks(4, train_many, [[*reference["common"], "--checkpoint-dir", str(ck), "--log-json", str(log),
                               "--resume"]], timeout=300)
    resumed = _lines(log)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in reference["records"]], key


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """The signal reaches rank 1 alone: the per-step all-reduce tells rank 0, both save
    together, and the launcher still reports the preemption (2 ranks: nothing here needs 4)."""
    plan = write_plan(tmp_path / "plan.json", dp=2, zero=3, micro_batch=1, global_batch=4, seq=32, precision="fp32")
    ck, log = tmp_path / "ck", tmp_path / "b.jsonl"
    step = _sigterm_after_two_steps(["--model", "gpt-tiny", "--plan", plan, "--steps", 1000, "--device", "cpu",
                                     "--quiet"], ck, log, _rank_1, nproc=2)
    saved = json.loads((ck / f"step-{step:08d}" / "meshplan.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(saved["files"])      # both ranks' shards


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_one(reference, tmp_path):
    """Rank 0 is killed right after it started the asynchronous save of step 4 (the save of
    step 2 was finished first: one save in flight): step 2 stays the latest, and the resumed
    run drops the killed run's records of steps 3-4 from --log-json before it redoes them."""
    ck, log = tmp_path / "ck", tmp_path / "b.jsonl"
    flags = [*reference["common"], "--checkpoint-dir", str(ck), "--log-json", str(log), "--checkpoint-every", "2",
             "--async-checkpoint"]
    killed = _launch(*flags, env_extra={"MESHPLAN_FAULT_SIGKILL_AFTER_STEP": "4", "MESHPLAN_FAULT_RANK": "0"})
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert left_running(str(ck)) == {}
    assert (ck / "latest").read_text().strip() == "step-00000002"
    assert not (ck / "step-00000004").exists()
    assert [r["step"] for r in _lines(log)] == [1, 2, 3, 4]

    run_ranks(4, train_many, [[*flags, "--resume"]], timeout=300)
    resumed = _lines(log)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))     # 3 and 4 once each
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in reference["records"]], key
    assert (ck / "latest").read_text().strip() == f"step-{STEPS:08d}"
    from runtime.checkpointing import complete_steps
    assert complete_steps(str(ck)) == [2, 4, 6, 8, 10, 12]


def test_sigkill_to_the_launcher_while_the_ranks_start_leaves_none(tmp_path):
    """SIGKILL to the launcher as soon as torchrun has started the ranks - while they still
    import torch, before they could ask the kernel to end them with torchrun: they end
    themselves on finding their agent gone (runtime.lifeline). Before, they trained on as
    orphans of init."""
    plan = write_plan(tmp_path / "plan.json", dp=2, zero=0, micro_batch=1, global_batch=2, seq=32, precision="fp32")
    ck = tmp_path / "ck"
    job = _launch("--model", "gpt-tiny", "--plan", plan, "--steps", 1000, "--device", "cpu", "--quiet",
                  "--checkpoint-dir", ck, background=True, nproc=2)
    try:
        deadline = time.monotonic() + 120
        while sum(" -u -m runtime.train " in cmd for cmd in processes_with(str(ck)).values()) < 2:   # torchrun's
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        assert left_running(str(ck), timeout_s=60) == {}
    finally:
        end_job(job, str(ck))
