"""`python -m runtime.train` as a user runs it: one process, metrics, data, mistakes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO

from runtime.train import main
from runtime_helpers import read_jsonl, write_plan

pytestmark = pytest.mark.runtime   # needs torch >= the runtime's floor (planner/torch_compat.py)


def _train(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "runtime.train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def plan1(tmp_path):
    return write_plan(tmp_path / "plan.json", micro_batch=2, global_batch=4, seq=32, precision="fp32")


def test_single_process_run_writes_metrics(tmp_path, plan1):
    tb = tmp_path / "tb"
    args = ["--model", "gpt-tiny", "--plan", plan1, "--steps", 4, "--warmup", 2, "--lr", 1e-3,
            "--log-json", tmp_path / "m.jsonl", "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 2]
    import importlib.util
    tensorboard = importlib.util.find_spec("tensorboard") is not None    # optional extra: meshplan[tensorboard]
    if tensorboard:
        args += ["--tensorboard", tb]
    r = _train(*args)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 4
    recs = [json.loads(line) for line in lines]
    for i, rec in enumerate(recs, 1):
        assert rec["step"] == i
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert isinstance(rec[key], float) and rec[key] > 0, (key, rec)
        assert rec["mfu"] is not None and rec["peak_mem_bytes"] > 0
    assert [r["lr"] for r in recs[:2]] == pytest.approx([5e-4, 1e-3])   # linear warm-up
    assert recs[-1]["lr"] == pytest.approx(1e-4)                          # cosine down to lr / 10
    progress = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 4 and "loss" in progress[0] and "tok/s" in progress[0] and "MFU" in progress[0]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".meshplan.lock", "latest", "step-00000002",
                                                                    "step-00000004"]
    if tensorboard:
        assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())


def test_checkpoint_records_the_training_config_and_resume_checks_it(tmp_path, plan1, capsys, monkeypatch):
    from runtime.config import TrainingConfig
    ck = tmp_path / "ck"
    args = ["--model", "gpt-tiny", "--plan", plan1, "--lr", 1e-3, "--seed", 3, "--checkpoint-dir", ck]
    r = _train(*args, "--steps", 2, "--checkpoint-every", 2, "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((ck / "step-00000002" / "meshplan.json").read_text())
    assert meta["training"] == TrainingConfig(steps=2, lr=1e-3, seed=3).to_dict()
    assert meta["training"]["min_lr"] == pytest.approx(1e-4)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    refused = _error(capsys, *args, "--steps", 2, "--resume", "--lr", 2e-3)   # --lr is given twice: the last wins
    assert "cannot resume from" in refused and "--lr 0.001 -> 0.002" in refused
    longer = _train(*args, "--steps", 3, "--resume")
    assert longer.returncode == 0, longer.stderr
    assert "--steps 2 -> 3" in longer.stdout and "resumed from" in longer.stdout
    assert json.loads((ck / "step-00000003" / "meshplan.json").read_text())["training"]["steps"] == 3


def test_memmap_tokens_train(tmp_path, plan1):
    tokens = np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint16)
    np.save(tmp_path / "tokens.npy", tokens)
    r = _train("--model", "gpt-tiny", "--plan", plan1, "--steps", 2, "--data", tmp_path / "tokens.npy",
               "--log-json", tmp_path / "m.jsonl", "--quiet")
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_jsonl(tmp_path / "m.jsonl")] == [1, 2]


def _error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshplan: error: "), err
    return lines[0]


def test_user_mistakes_are_one_line_exit_2(tmp_path, plan1, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["--model", "gpt-tiny", "--steps", 2, "--quiet"]
    assert "does not exist" in _error(capsys, *base, "--plan", tmp_path / "nope.json")
    big = write_plan(tmp_path / "dp2.json", dp=2, global_batch=4, seq=32)
    assert "processes but 1 were started" in _error(capsys, *base, "--plan", big)
    assert "unknown model" in _error(capsys, "--model", "gpt-huge", "--plan", plan1, "--steps", 1)
    assert "--steps" in _error(capsys, "--model", "gpt-tiny", "--plan", plan1, "--steps", 0)
    assert "needs --checkpoint-dir" in _error(capsys, *base, "--plan", plan1, "--checkpoint-every", 2)
    (tmp_path / "m.jsonl").write_text("keep me\n")
    assert "already exists" in _error(capsys, *base, "--plan", plan1, "--log-json", tmp_path / "m.jsonl")
    assert (tmp_path / "m.jsonl").read_text() == "keep me\n"
    (tmp_path / "ck" / "step-00000003").mkdir(parents=True)
    assert "already holds checkpoints" in _error(capsys, *base, "--plan", plan1, "--checkpoint-dir", tmp_path / "ck")
    np.save(tmp_path / "floats.npy", np.zeros(100, dtype=np.float32))
    assert "integer token ids" in _error(capsys, *base, "--plan", plan1, "--data", tmp_path / "floats.npy")
    assert "unknown GPU" in _error(capsys, *base, "--plan", plan1, "--gpu", "tpu-v9")
    long = write_plan(tmp_path / "long.json", global_batch=2, seq=4096)
    assert "max_seq" in _error(capsys, *base, "--plan", long)
    assert "unrecognized arguments" in _error(capsys, *base, "--plan", plan1, "--bogus")


def test_out_of_vocabulary_tokens_are_refused(tmp_path, plan1):
    np.save(tmp_path / "tokens.npy", np.full(1000, 300, dtype=np.int32))   # gpt-tiny's vocabulary is 256
    r = _train("--model", "gpt-tiny", "--plan", plan1, "--steps", 1, "--data", tmp_path / "tokens.npy", "--quiet")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "outside the model's vocabulary" in r.stderr


def test_gpu_benchmark_script_runs_on_cpu():
    script = REPO / "benchmarks" / "runtime_vs_plain.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--model", "gpt-tiny", "--seq", "32",
                        "--micro-batch", "2", "--precision", "fp32", "--steps", "2", "--warmup", "1",
                        "--checkpoint", "full"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["step_time_ratio"] > 0 and rec["plain_peak_bytes"] > 0 and rec["runtime_peak_bytes"] > 0


def test_check_only_mode_for_launchers(tmp_path, plan1):
    env = {**os.environ, "MESHPLAN_CHECK_ONLY": "1", "WORLD_SIZE": "4", "RANK": "0"}
    four = write_plan(tmp_path / "four.json", dp=2, tp=2, global_batch=4, seq=32)
    cmd = [sys.executable, "-m", "runtime.train", "--model", "gpt-tiny", "--steps", "1"]
    ok = subprocess.run([*cmd, "--plan", str(four)], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == "", ok.stderr
    bad = subprocess.run([*cmd, "--plan", str(plan1)], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "processes but 4 were started" in bad.stderr
