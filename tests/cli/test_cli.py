import json
import shutil
import subprocess

import pytest

from helpers import assert_user_error, run_cli
from planner.plan import Plan


def test_describe_prints_params_and_cluster(cli):
    proc = cli("describe", "--model", "gpt3-175b", "--cluster", "a100-sxm-80gb:128x8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["params"] == pytest.approx(174.6e9, rel=0.005)
    assert out["cluster"]["world_size"] == 1024 and out["config"]["layers"] == 96


def test_console_script_is_installed():
    exe = shutil.which("meshplan")
    if exe is None:
        pytest.skip("meshplan is not installed as a console script in this environment")
    proc = subprocess.run([exe, "describe", "--model", "llama3-8b", "--cluster", "dgx-h100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "8.03 B" in proc.stdout and "dgx-h100" in proc.stdout


def test_listings(cli):
    models = json.loads(cli("models", "--json").stdout)
    assert {"gpt3-175b", "llama3-405b", "gpt2-124m"} <= {m["name"] for m in models}
    gpus = json.loads(cli("gpus", "--json").stdout)
    assert {"h100-sxm-80gb", "mi300x", "cpu"} <= {g["name"] for g in gpus}


def test_tables_piped_to_a_file_keep_every_cell_whole(cli):
    """Without a terminal rich would squeeze tables into 80 columns and cut cells with an ellipsis."""
    models = cli("models")
    assert models.returncode == 0, models.stderr
    assert "…" not in models.stdout
    assert "174.62 B" in models.stdout and "0.22 M" in models.stdout   # gpt3-175b, gpt-tiny
    gpus = cli("gpus")
    assert gpus.returncode == 0 and "…" not in gpus.stdout and "NVLink GB/s" in gpus.stdout


@pytest.mark.parametrize("args,fragment", [
    (["describe", "--model", "gpt5", "--cluster", "dgx-a100"], "unknown model 'gpt5'"),
    (["describe", "--model", "gpt-tiny", "--cluster", "z100:1x8"], "unknown GPU 'z100'"),
    (["describe", "--model", "gpt-tiny", "--cluster", "dgx-a100:x"], "cannot read cluster"),
    (["describe", "--model", "gpt-tiny"], "--cluster"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(cli, args, fragment):
    assert_user_error(cli(*args), fragment)


def test_malformed_files_exit_2(cli, tmp_path):
    """The first case in a real process: exit status 2 and one stderr line from the interpreter's view."""
    bad_cluster = tmp_path / "c.yaml"
    bad_cluster.write_text("gpu: [h100\n")
    assert_user_error(run_cli("describe", "--model", "gpt-tiny", "--cluster", bad_cluster), "not valid YAML")
    bad_model = tmp_path / "m.json"
    bad_model.write_text('{"arch": "gpt", "layers": 2')
    assert_user_error(cli("describe", "--model", bad_model, "--cluster", "cpu:1x1"), "not valid JSON")


def test_validate_plan(cli, tmp_path):
    path = tmp_path / "plan.json"
    Plan(dp=2, tp=2, pp=1, global_batch=8, micro_batch=2, seq=64, model="gpt-tiny", cluster="cpu:1x4").save(path)
    proc = cli("validate", "--plan", path)
    assert proc.returncode == 0 and "is valid" in proc.stdout
    assert_user_error(cli("validate", "--plan", path, "--cluster", "cpu:1x8"), "make the product 8")
    path.write_text(path.read_text().replace('"dp": 2', '"dp": 0'))
    assert_user_error(cli("validate", "--plan", path), "dp must be")
    assert_user_error(cli("validate", "--plan", tmp_path / "missing.json"), "does not exist")


@pytest.mark.runtime
def test_train_launcher_single_process_and_checks(cli, tmp_path):
    plan = tmp_path / "plan.json"
    Plan(dp=1, global_batch=2, micro_batch=2, seq=32, precision="fp32").save(plan)
    ok = cli("train", "--model", "gpt-tiny", "--plan", plan, "--steps", "1", "--quiet",
             "--log-json", tmp_path / "m.jsonl")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "m.jsonl").read_text())["step"] == 1
    # a plan for one process launched on two: refused before torchrun starts, in one line
    assert_user_error(cli("train", "--nproc-per-node", "2", "--model", "gpt-tiny", "--plan", plan,
                          "--steps", "1"))
    assert_user_error(cli("train", "--nproc-per-node", "zero", "--model", "gpt-tiny"), "--nproc-per-node")
