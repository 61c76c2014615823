import os
import subprocess
import sys

from helpers import REPO


def test_describe_job_example_runs():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "describe_job.py")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "174.62 B parameters" in proc.stdout and "1024 devices" in proc.stdout
    assert "plan dp=16 tp=8 pp=8: 96 micro-batches per step" in proc.stdout


def test_get_a_plan_example_plans_and_saves(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "get_a_plan.py"), "gpt3-350m",
                           "a100-sxm-80gb:1x8", "32", str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#1 dp=") and "searched" in proc.stdout
    from planner.plan import Plan
    assert Plan.load(out).world_size == 8


def test_the_readme_python_api_runs(capsys):
    """The README's Python API snippet, as written, in this interpreter."""
    text = (REPO / "README.md").read_text()
    snippet = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "README.md", "exec"), {})
    dp, tp, pp, step_s = capsys.readouterr().out.split()
    assert int(dp) * int(tp) * int(pp) == 8 and float(step_s) > 0


def test_the_readme_stays_short():
    """README under 1,200 words (as `wc -w` counts them); details go to docs/."""
    words = len((REPO / "README.md").read_text().split())
    assert words <= 1200, f"README.md has {words} words: move detail to docs/"


def test_the_readme_screenshot_is_there():
    text = (REPO / "README.md").read_text()
    assert "](docs/report.png)" in text and "--html report.html" in text
    assert (REPO / "docs" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
