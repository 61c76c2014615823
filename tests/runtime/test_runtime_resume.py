"""Kill a rank for real under torchrun, resume, and get the uninterrupted losses back.

Run A trains 6 steps (checkpoints at 3 and 6). Run B is the same command with the
fault hook MESHPLAN_FAULT_SIGKILL_AFTER_STEP=4: rank 1 sends itself SIGKILL right after
step 4, torchrun tears the job down and exits non-zero. Run C is B's command plus
--resume: it loads the step-3 checkpoint and its steps 4-6 must equal A's exactly.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtime_helpers import planned, read_jsonl

pytestmark = [pytest.mark.runtime, pytest.mark.distributed,
              pytest.mark.skipif(sys.platform != "linux", reason="torchrun + SIGKILL test written for Linux")]


def _torchrun(args, env_extra=None, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "runtime.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_sigkill_then_resume_reproduces_losses(tmp_path):
    plan = planned(tmp_path / "plan.json", "gpt-tiny", dp=2, zero=3, micro_batch=1, global_batch=4, seq=32,
                      precision="fp32")
    common = ["--model", "gpt-tiny", "--plan", str(plan), "--steps", "6", "--checkpoint-every", "3",
              "--device", "cpu", "--seed", "1"]

    a = _torchrun([*common, "--checkpoint-dir", str(tmp_path / "ck-a"), "--log-json", str(tmp_path / "a.jsonl")])
    assert a.returncode == 0, a.stderr[-3000:]
    straight = read_jsonl(tmp_path / "a.jsonl")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]

    b_args = [*common, "--checkpoint-dir", str(tmp_path / "ck-b"), "--log-json", str(tmp_path / "b.jsonl")]
    b = _torchrun(b_args, {"MESHPLAN_FAULT_SIGKILL_AFTER_STEP": "4", "MESHPLAN_FAULT_RANK": "1"})
    assert b.returncode != 0
    assert "SIGKILL" in b.stdout + b.stderr or "Signal 9" in b.stdout + b.stderr
    assert (tmp_path / "ck-b" / "latest").read_text().strip() == "step-00000003"
    assert not (tmp_path / "ck-b" / "step-00000006").exists()

    c = _torchrun([*b_args, "--resume"])
    assert c.returncode == 0, c.stderr[-3000:]
    assert "resumed from" in c.stdout
    resumed = read_jsonl(tmp_path / "b.jsonl")     # B's lines, then C's (later records win)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed[3:]] == [r["loss"] for r in straight[3:]]
    assert [r["grad_norm"] for r in resumed[3:]] == [r["grad_norm"] for r in straight[3:]]
    assert [r["lr"] for r in resumed[3:]] == [r["lr"] for r in straight[3:]]
