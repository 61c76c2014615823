"""One-process runs (in this interpreter) of issue 28's runtime flags: --checkpoint-every
auto, the save and summary lines, --resume with nothing to resume, checkpoints of another
model or plan, --log-json after a resume, --wandb, and their mistakes (one line, exit 2)."""
from __future__ import annotations

import json
import re
import statistics
import sys
import types

import pytest

from runtime.train import main
from runtime_helpers import write_plan

pytestmark = pytest.mark.runtime


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MESHPLAN_CHECK_ONLY", "MESHPLAN_PREEMPTED_FILE", "MESHPLAN_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def plan1(tmp_path):
    return write_plan(tmp_path / "plan.json", micro_batch=2, global_batch=4, seq=32, precision="fp32")


def _run(capsys, plan, *args) -> tuple[int, list[str], list[str]]:
    code = main([str(a) for a in ["--model", "gpt-tiny", "--plan", plan, "--device", "cpu", *args]])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip().splitlines()


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_auto_interval_is_young_daly_of_the_first_save(tmp_path, plan1, capsys):
    from cost_models.failures import GPU_FAILURE_RATE_PER_HOUR, young_daly_interval_s
    from runtime.checkpointing import complete_steps
    # 3.6e9 failures per GPU-hour: an MTBF of 1 us, an interval far below a step: every step saves
    ck = tmp_path / "often"
    code, out, err = _run(capsys, plan1, "--steps", 3, "--checkpoint-dir", ck, "--checkpoint-every", "auto",
                          "--failure-rate-per-gpu-hour", 3.6e9)
    assert code == 0, err
    [line] = [x for x in out if x.startswith("--checkpoint-every auto:")]
    interval, save, mtbf = map(float, re.search(r"every (\S+) s of training = sqrt\(2 x (\S+) s save x (\S+) s MTBF",
                                                line).groups())
    assert mtbf == pytest.approx(3600 / 3.6e9, rel=1e-5) and "x 1 GPUs" in line
    assert interval == pytest.approx(young_daly_interval_s(save, mtbf), rel=1e-5)
    assert complete_steps(str(ck)) == [1, 2, 3]
    saves = [x for x in out if x.startswith("saved checkpoint step ")]
    assert [int(x.split()[3]) for x in saves] == [1, 2, 3] and all(str(ck) in x for x in saves)

    # the default rate (Llama 3's): an MTBF of 5.8 years, so only the first step and the end save
    ck, log = tmp_path / "rarely", tmp_path / "m.jsonl"
    code, out, err = _run(capsys, plan1, "--steps", 4, "--checkpoint-dir", ck, "--checkpoint-every", "auto",
                          "--log-json", log)
    assert code == 0, err
    assert complete_steps(str(ck)) == [1, 4]
    assert f"({GPU_FAILURE_RATE_PER_HOUR:.6g} failures per GPU-hour x 1 GPUs)" in next(
        x for x in out if x.startswith("--checkpoint-every"))
    # the run ends with the summary: measured median step time (after step 1) and peak memory
    # beside planner.simulate's prediction for this plan on cpu:1x1
    from cost_models import parse_cluster
    from planner.plan import Plan
    from planner.simulate import simulate
    from planner.zoo import load_model
    summary, wrote = out[-2:]                               # the summary, then what the run wrote
    assert wrote == f"wrote {log} (4 step records)"
    records = _records(log)
    predicted = simulate(Plan.load(plan1), load_model("gpt-tiny"), parse_cluster("cpu:1x1"))
    assert summary.startswith("summary: 4 step(s) | step time "), summary
    assert f"{statistics.median(r['step_time_s'] for r in records[1:]):.4g} s measured (median)" in summary
    assert f"vs {predicted.step_time_s:.4g} s predicted" in summary and "on cpu:1x1" in summary
    assert f"peak memory {max(r['peak_mem_bytes'] for r in records) / 2**30:.3g} GiB measured" in summary


def test_resume_with_nothing_to_resume_starts_at_step_0_saying_so(tmp_path, plan1, capsys):
    code, out, err = _run(capsys, plan1, "--steps", 1, "--resume")
    assert code == 0, err
    assert [x for x in out if "resume" in x] == [
        "--resume without --checkpoint-dir: nothing to resume from, starting from step 0 (and saving no checkpoint)"]
    ck = tmp_path / "not-yet"                      # a spot job's restart command, run the first time
    code, out, err = _run(capsys, plan1, "--steps", 1, "--resume", "--checkpoint-dir", ck, "--quiet")
    assert code == 0, err
    assert (ck / "step-00000001" / "meshplan.json").is_file()


def test_checkpoint_of_another_plan_or_model_config_is_refused(tmp_path, plan1, capsys, monkeypatch):
    ck = tmp_path / "ck"
    assert _run(capsys, plan1, "--steps", 1, "--checkpoint-dir", ck, "--quiet")[0] == 0
    monkeypatch.setenv("MESHPLAN_CHECK_ONLY", "1")             # the launcher's pre-check: no training
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    wider = write_plan(tmp_path / "gb8.json", micro_batch=2, global_batch=8, seq=32, precision="fp32")
    code, _, err = _run(capsys, wider, "--steps", 2, "--checkpoint-dir", ck, "--resume")
    assert code == 2 and len(err) == 1, err
    assert "saved by a plan with another global_batch 4 there, 8 in this plan" in err[0], err
    from planner.zoo import load_model
    config = {k: v for k, v in vars(load_model("gpt-tiny").config).items() if not k.startswith("_")}
    other = tmp_path / "eps.json"
    other.write_text(json.dumps({**config, "norm_eps": 1e-6, "name": "tiny-eps"}))   # same shapes as gpt-tiny
    code, _, err = _run(capsys, plan1, "--steps", 2, "--checkpoint-dir", ck, "--resume", "--model", other)
    assert code == 2 and len(err) == 1, err
    assert "holds another model (norm_eps 1e-05 there, 1e-06 in this one)" in err[0], err
    relaid = write_plan(tmp_path / "mb1.json", micro_batch=1, global_batch=4, seq=32, precision="fp32")
    assert _run(capsys, relaid, "--steps", 2, "--checkpoint-dir", ck, "--resume") == (0, [], [])   # layout may change


def test_log_json_keeps_each_step_once_after_a_resume(tmp_path):
    from runtime.metrics import MetricsSink
    log = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo')          # the stopped run's last write, cut short
    sink = MetricsSink(0, 8, str(log), None, resume=True, quiet=True)
    sink.drop_after(3)
    sink.log({"step": 4, "loss": 0.3, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "peak_mem_bytes": 1})
    sink.close()
    assert [r["step"] for r in _records(log)] == [1, 2, 3, 4]
    assert log.read_text().splitlines()[:3] == lines[:3]


class _FakeRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_logs_every_step_offline(tmp_path, plan1, capsys, monkeypatch):
    run, inits = _FakeRun(), []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = tmp_path / "m.jsonl"
    code, _, err = _run(capsys, plan1, "--steps", 2, "--wandb", "--log-json", log, "--quiet")
    assert code == 0, err
    assert len(inits) == 1 and inits[0]["mode"] == "offline" and inits[0]["project"] == "meshplan"
    assert inits[0]["config"]["model"] == "gpt-tiny" and inits[0]["config"]["plan"]["global_batch"] == 4
    records = _records(log)
    assert [step for step, _ in run.logged] == [1, 2]
    assert [v["train/loss"] for _, v in run.logged] == [r["loss"] for r in records]
    assert run.finished
    code, _, err = _run(capsys, plan1, "--steps", 1, "--wandb", "mine", "--wandb-mode", "online", "--quiet")
    assert code == 0 and inits[1]["project"] == "mine" and inits[1]["mode"] == "online", err


def test_wandb_without_the_package_is_one_line(plan1, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # `import wandb` raises ImportError
    code, out, err = _run(capsys, plan1, "--steps", 1, "--wandb")
    assert code == 2 and err == ["meshplan: error: --wandb needs the wandb package: pip install wandb "
                                 "(or drop --wandb)"], err
    assert out == []                                      # refused before any work


@pytest.mark.parametrize("args, fragment", [
    (["--checkpoint-every", "-1"], "--checkpoint-every must be a whole number of steps >= 0 or 'auto'"),
    (["--checkpoint-every", "soon"], "--checkpoint-every must be a whole number of steps >= 0 or 'auto'"),
    (["--checkpoint-every", "auto", "--failure-rate-per-gpu-hour", "-0.5"], "must be a finite number >= 0"),
    (["--checkpoint-every", "auto", "--failure-rate-per-gpu-hour", "nan"], "must be a finite number >= 0"),
    (["--checkpoint-every", "auto", "--failure-rate-per-gpu-hour", "inf"], "must be a finite number >= 0"),
    (["--checkpoint-every", "5", "--failure-rate-per-gpu-hour", "1e-5"], "add --checkpoint-every auto"),
    (["--async-checkpoint"], "--async-checkpoint needs --checkpoint-dir"),
    (["--checkpoint-every", "auto"], "--checkpoint-every needs --checkpoint-dir"),
    (["--resume-from", "3"], "--resume-from needs --checkpoint-dir"),
    (["--wandb-mode", "online"], "--wandb-mode needs --wandb"),
    (["--wandb", "mine", "--wandb-mode", "cloud"], "invalid choice"),
])
def test_mistakes_are_one_line_exit_2(plan1, capsys, args, fragment, tmp_path):
    code, out, err = _run(capsys, plan1, "--steps", 2, "--log-json", tmp_path / "m.jsonl", *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("meshplan: error: "), err
    assert fragment in err[0], err
    assert out == [] and not (tmp_path / "m.jsonl").exists()


def test_an_existing_log_is_kept_unless_forced_and_each_output_says_wrote(tmp_path, plan1, capsys):
    log, board = tmp_path / "run.jsonl", tmp_path / "board"
    log.write_text("the user's own notes\n")
    code, out, err = _run(capsys, plan1, "--steps", 2, "--log-json", log)
    assert code == 2 and len(err) == 1 and "add --force to replace it" in err[0], err
    assert log.read_text() == "the user's own notes\n" and out == []
    code, out, err = _run(capsys, plan1, "--steps", 2, "--log-json", log, "--tensorboard", board, "--force")
    assert code == 0, err
    assert [r["step"] for r in _records(log)] == [1, 2]          # replaced, not appended to
    assert f"wrote {log} (2 step records)" in out
    assert f"wrote {board} (TensorBoard scalars)" in out and any(board.iterdir())
