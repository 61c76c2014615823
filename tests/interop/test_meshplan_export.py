"""`meshplan plan --export meshplan`: plan.json, model.json, a torchrun launch script for every
node and a Slurm batch script. The launch script is run as written: two "nodes" (two
torchrun agents on this machine, one gloo rank each) train the plan for two steps."""
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

from helpers import REPO, assert_user_error
from planner.plan import Plan

pytestmark = pytest.mark.cli
PLAN = ("plan", "--model", "gpt-tiny", "--global-batch", "4", "--seq", "32", "--precision", "fp32", "--top", "1")


@pytest.mark.runtime   # the exported files are checked by the runtime's pre-launch checks (torch >= 2.10)
def test_files_for_the_plans_nodes(cli, tmp_path):
    out = tmp_path / "job"
    proc = cli(*PLAN, "--cluster", "cpu:2x2", "--dp", "4", "--export", "meshplan", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["launch.sh", "plan.json", "slurm.sbatch"]   # a preset: no model.json
    plan = Plan.load(out / "plan.json")
    assert plan.world_size == 4 and plan.engine == "meshplan"
    launch, sbatch = (out / "launch.sh").read_text(), (out / "slurm.sbatch").read_text()
    assert "torchrun --nnodes 2 --nproc-per-node 2" in launch and "-m runtime.train --model gpt-tiny" in launch
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=2" in sbatch and "srun torchrun" in sbatch
    for script in (out / "launch.sh", out / "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.access(out / "launch.sh", os.X_OK)
    # the runtime takes the exported arguments: its pre-launch checks (runtime.train's check-only mode)
    check = subprocess.run([sys.executable, "-m", "runtime.train", "--model", "gpt-tiny", "--plan", str(out / "plan.json"),
                            "--steps", "1"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MESHPLAN_CHECK_ONLY": "1", "WORLD_SIZE": "4", "RANK": "0",
                                "PYTHONPATH": str(REPO)})
    assert check.returncode == 0, check.stderr
    # one node: meshplan train's own standalone torchrun
    one = tmp_path / "one"
    assert cli(*PLAN, "--cluster", "cpu:1x2", "--dp", "2", "--export", "meshplan", "--out", str(one)).returncode == 0
    assert "meshplan train --nproc-per-node 2 --model gpt-tiny" in (one / "launch.sh").read_text()


def test_a_json_model_travels_with_the_plan(cli, tmp_path):
    model = tmp_path / "m.json"
    model.write_text(json.dumps(dict(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=256, max_seq=64)))
    out = tmp_path / "job"
    proc = cli(*PLAN[:2], str(model), *PLAN[3:], "--cluster", "cpu:1x2", "--export", "meshplan", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "model.json").read_text())["kv_heads"] == 2
    assert '--model "$DIR/model.json"' in (out / "launch.sh").read_text()


def test_export_needs_a_folder_and_never_overwrites(cli, tmp_path):
    assert_user_error(cli(*PLAN, "--cluster", "cpu:1x2", "--export", "meshplan"), "needs --out DIR")
    assert_user_error(cli(*PLAN, "--cluster", "cpu:1x2", "--export", "nemo", "--out", str(tmp_path)),
                      "'nemo' is not an engine", "megatron-lm, deepspeed, torchtitan, meshplan")
    assert_user_error(cli(*PLAN, "--cluster", "cpu:1x2", "--export", "meshplan", "--engine", "torchtitan",
                          "--out", str(tmp_path)), "--export meshplan writes plans of meshplan")
    (tmp_path / "plan.json").write_text("mine")
    assert_user_error(cli(*PLAN, "--cluster", "cpu:1x2", "--export", "meshplan", "--out", str(tmp_path)),
                      "already exists", "--force")
    assert (tmp_path / "plan.json").read_text() == "mine"
    proc = cli(*PLAN, "--cluster", "cpu:1x2", "--export", "meshplan", "--out", str(tmp_path), "--force")
    assert proc.returncode == 0 and Plan.load(tmp_path / "plan.json").world_size == 2


@pytest.mark.runtime
@pytest.mark.distributed
@pytest.mark.slow      # ~1 min on 2 busy cores: two torchrun agents and two ranks start torch
def test_the_launch_script_trains_on_two_nodes(cli, tmp_path):
    out = tmp_path / "job"
    assert cli(*PLAN, "--cluster", "cpu:2x1", "--dp", "2", "--export", "meshplan", "--out", str(out)).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": f"t{port}", "STEPS": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "steps.jsonl"
    nodes = [subprocess.Popen(["bash", str(out / "launch.sh"), "--log-json", str(log), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2], shlex.join(map(str, steps))
