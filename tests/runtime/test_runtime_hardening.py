"""Broken checkpoints, unwritable outputs, orphaned ranks and two jobs on one directory
(issue 24): each ends in one line and exit 2 before any work, or never happens.

One 2-rank `meshplan train` job (module fixture) saves steps 3 and 6; every corruption is
tried on a copy of its directory through the launcher's pre-check (`MESHPLAN_CHECK_ONLY`,
in process: what `meshplan train` runs before torchrun starts a rank), and step 3 is then
resumed for real with `--resume-from 3`. Launches: 4 torchrun jobs in all.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.train import main
from runtime_helpers import (end_job, left_running, processes_with, rank_of, read_jsonl, wait_for_lines,
                             write_plan)

pytestmark = [pytest.mark.runtime, pytest.mark.distributed,
              pytest.mark.skipif(sys.platform != "linux", reason="torchrun, /proc, prctl and flock: Linux")]

STEP6 = "step-00000006"


def _launch(*args, timeout=240, **kw):
    """`meshplan train --nproc-per-node 2 ARGS` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "MESHPLAN_CHECK_ONLY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "planner.cli", "train", "--nproc-per-node", "2", *map(str, args)]
    if kw.get("background"):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank ZeRO-3 job of 6 steps, checkpoints at 3 and 6, and its losses."""
    root = tmp_path_factory.mktemp("saved")
    plan = write_plan(root / "plan.json", dp=2, zero=3, micro_batch=1, global_batch=4, seq=32, precision="fp32")
    common = ["--model", "gpt-tiny", "--plan", plan, "--steps", 6, "--device", "cpu", "--seed", 1, "--quiet"]
    r = _launch(*common, "--checkpoint-every", 3, "--checkpoint-dir", root / "ck", "--log-json", root / "a.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(root=root, plan=plan, common=common, records=read_jsonl(root / "a.jsonl"))


def _copy(saved, tmp_path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(saved["root"] / "ck", ck)
    return ck


def _precheck(capsys, monkeypatch, saved, *args) -> tuple[int, list[str]]:
    """What `meshplan train --nproc-per-node 2` checks before torchrun starts: (exit, stderr lines)."""
    monkeypatch.setenv("MESHPLAN_CHECK_ONLY", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main([str(a) for a in [*saved["common"], *args]])
    return code, capsys.readouterr().err.strip().splitlines()


def _shard(ck: Path) -> Path:
    return ck / STEP6 / "__1_0.distcp"


def _garbage_metadata(ck):
    (ck / STEP6 / ".metadata").write_bytes(random.Random(0).randbytes(4096))


def _empty_metadata(ck):
    (ck / STEP6 / ".metadata").write_bytes(b"")


def _truncated_shard(ck):
    data = _shard(ck).read_bytes()
    _shard(ck).write_bytes(data[: len(data) // 2])


def _zeroed_shard(ck):
    _shard(ck).write_bytes(bytes(_shard(ck).stat().st_size))


def _deleted_shard(ck):
    _shard(ck).unlink()


def _garbage_marker(ck):
    (ck / STEP6 / "meshplan.json").write_bytes(b"\xff\xfe{not json")


def _marker_of_wrong_shape(ck):
    (ck / STEP6 / "meshplan.json").write_text('{"training": [1, 2]}')


CORRUPTIONS = {
    "garbage .metadata": (_garbage_metadata, ".metadata cannot be read"),
    "empty .metadata": (_empty_metadata, ".metadata cannot be read"),
    "truncated shard": (_truncated_shard, "__1_0.distcp is truncated"),
    "zeroed shard": (_zeroed_shard, "__1_0.distcp does not match the CRC-32"),
    "deleted shard": (_deleted_shard, "__1_0.distcp is missing"),
    "garbage meshplan.json": (_garbage_marker, "meshplan.json"),
    "meshplan.json of the wrong shape": (_marker_of_wrong_shape, "meshplan.json"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_damaged_checkpoint_is_refused_in_one_line(saved, tmp_path, capsys, monkeypatch, name):
    damage, fragment = CORRUPTIONS[name]
    ck = _copy(saved, tmp_path)
    damage(ck)
    code, lines = _precheck(capsys, monkeypatch, saved, "--checkpoint-dir", ck, "--resume")
    assert code == 2 and len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("meshplan: error: checkpoint step 6 is unusable: ") and str(ck / STEP6) in line, line
    assert fragment in line and line.endswith("with --resume-from 3"), line
    # the previous checkpoint passes the same checks
    assert _precheck(capsys, monkeypatch, saved, "--checkpoint-dir", ck, "--resume-from", 3) == (0, [])


def test_checkpoint_of_another_model_is_refused(saved, tmp_path, capsys, monkeypatch):
    from planner.zoo import load_model
    config = {k: v for k, v in vars(load_model("gpt-tiny").config).items() if not k.startswith("_")}
    other = tmp_path / "wider.json"
    other.write_text(json.dumps({**config, "hidden": 2 * config["hidden"], "name": "wider"}))
    ck = _copy(saved, tmp_path)
    code, lines = _precheck(capsys, monkeypatch, saved, "--checkpoint-dir", ck, "--resume", "--model", other)
    assert code == 2 and len(lines) == 1, lines
    assert "checkpoint step 6 is unusable: " in lines[0] and f"{ck / STEP6 / '.metadata'} holds another model" \
        in lines[0] and "start a new --checkpoint-dir" in lines[0], lines[0]


def test_resume_from_an_older_step_after_damage(saved, tmp_path):
    """Through the launcher: the damaged latest is refused before torchrun starts (one line,
    exit 2); --resume-from 3 then trains steps 4-6 exactly as the uninterrupted run did."""
    ck = _copy(saved, tmp_path)
    _zeroed_shard(ck)
    log = tmp_path / "b.jsonl"
    refused = _launch(*saved["common"], "--checkpoint-dir", ck, "--resume", "--log-json", log)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--resume-from 3" in refused.stderr and not log.exists()
    r = _launch(*saved["common"], "--checkpoint-dir", ck, "--resume-from", 3, "--log-json", log)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = read_jsonl(log)
    assert [x["step"] for x in resumed] == [4, 5, 6]
    assert [x["loss"] for x in resumed] == [x["loss"] for x in saved["records"][3:]]
    assert (ck / "latest").read_text().strip() == STEP6
    assert _problem_free(ck / STEP6)


def _problem_free(where: Path) -> bool:
    from runtime.checkpointing import _problem
    return _problem(where, None) is None


def test_a_load_that_fails_on_the_ranks_ends_every_rank_with_one_line(saved, tmp_path):
    """Damage the checks cannot see (a checkpoint saved without CRCs, one shard zeroed)
    fails inside DCP's load on every rank: rank 0 says so once, no rank prints a traceback,
    and the launcher exits 2. (torchrun still prints its own report of the failed ranks.)"""
    ck = _copy(saved, tmp_path)
    marker = ck / STEP6 / "meshplan.json"
    meta = json.loads(marker.read_text())
    del meta["files"]                                   # as saved before the CRCs were recorded
    marker.write_text(json.dumps(meta))
    _zeroed_shard(ck)
    r = _launch(*saved["common"], "--checkpoint-dir", ck, "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "meshplan: error:" in line]
    assert len(errors) == 1 and "cannot resume from checkpoint step 6" in errors[0], r.stderr[-3000:]
    assert "--resume-from 3" in errors[0] and "UnpicklingError" in errors[0], errors[0]
    assert "runtime/train.py" not in r.stderr and "runtime/checkpointing.py" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--log-json", "--tensorboard"])
def test_unwritable_outputs_are_refused_before_any_work(saved, tmp_path, capsys, monkeypatch, flag):
    if flag == "--tensorboard":
        pytest.importorskip("tensorboard")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    for where in (blocker / "sub" / "out", Path("/proc/meshplan-test-out")):
        code, lines = _precheck(capsys, monkeypatch, saved, flag, where)
        assert code == 2 and len(lines) == 1, lines
        assert flag in lines[0] and str(where) in lines[0], lines
    assert blocker.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_killed_launcher_takes_its_ranks_and_the_directory_lock_with_it(saved, tmp_path):
    """A job holds its checkpoint directory (a second job is refused, naming rank 0's pid);
    SIGKILL to the launcher alone (the process-group leader) ends torchrun and both ranks."""
    ck, log = tmp_path / "ck-locked", tmp_path / "m.jsonl"
    job = _launch("--model", "gpt-tiny", "--plan", saved["plan"], "--steps", 100000, "--device", "cpu",
                  "--checkpoint-dir", ck, "--checkpoint-every", 1000, "--log-json", log, "--quiet", background=True)
    try:
        wait_for_lines(job, log, 1)
        ranks = {pid: rank_of(pid) for pid, cmd in processes_with(str(ck)).items()
                 if "runtime.train" in cmd and "torch.distributed.run" not in cmd}
        assert sorted(ranks.values()) == ["0", "1"], ranks
        holder = next(pid for pid, rank in ranks.items() if rank == "0")
        second = _launch("--model", "gpt-tiny", "--plan", saved["plan"], "--steps", 100000, "--device", "cpu",
                         "--checkpoint-dir", ck, "--resume")
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"is in use by another job (pid {holder} on " in second.stderr, second.stderr

        os.kill(job.pid, signal.SIGKILL)                 # the launcher only, not its group
        job.wait(timeout=10)
        assert left_running(str(ck)) == {}              # torchrun and both ranks are gone
    finally:
        end_job(job, str(ck))
    from runtime.checkpointing import DirectoryLock
    lock = DirectoryLock(str(ck))
    lock.acquire()                                      # the dead job's lock went with it
    lock.release()
