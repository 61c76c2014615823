"""What several test folders share: the repository's paths, `meshplan` run in this interpreter
(the `cli` fixture) or in a fresh one (`run_cli`, for the few end-to-end smoke tests), and the
check that a user mistake ends in one line and exit code 2."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Copies of the reference files the tests read (tests/fixtures/reference/README.md): the data
# the shipped catalogue and H100 calibration were built from, so the suite runs those tests -
# never skips them - wherever it runs, whatever is (or is not) beside the checkout.
REFERENCE = REPO / "tests" / "fixtures" / "reference"
FIXTURES = REPO / "tests" / "fixtures"


def run_cli(*args, cwd=None, timeout=120):
    """Run the real `meshplan` entry point in a fresh interpreter, as a user would."""
    cmd = [sys.executable, "-m", "planner.cli", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout)


@contextlib.contextmanager
def _working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli_in_process(*args, cwd=None, timeout=None):
    """`meshplan *args` through planner.cli.main in this interpreter (no torch import per call),
    returning what run_cli returns. `train` still runs in a fresh interpreter: it launches
    training processes. `timeout` is accepted for run_cli's signature; an in-process call has
    none."""
    argv = [str(a) for a in args]
    if argv[:1] == ["train"]:
        return run_cli(*argv, cwd=cwd, timeout=timeout or 120)
    from planner.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _working_directory(cwd or REPO):
        try:
            code = main(argv)
        except SystemExit as exc:   # argparse's --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["meshplan", *argv], code, out.getvalue(), err.getvalue())


def assert_user_error(proc, *fragments):
    """Exit code 2, exactly one line on stderr, no traceback, and the line names the fix."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("meshplan: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_published_plan(row: dict, data: dict, same: dict) -> int:
    """A published-run row's plan is its source's configuration (benchmarks/data/*_runs.json):
    known source and model, as many GPUs as printed, the `same` columns ({published column:
    plan field}) equal, virtual stages as the interleave. Returns the GPU count."""
    plan, published = row["plan"], row["published"]
    assert row["source"] in data["sources"] and row["model"] in data["models"]
    gpus = plan["dp"] * plan["tp"] * plan["pp"] * plan.get("cp", 1)
    assert gpus == published["gpus"]
    for column, field in same.items():
        if isinstance(published.get(column), int):
            assert plan[field] == published[column], column
    if isinstance(published.get("vp"), int) and published["vp"] > 1:
        assert (plan["interleave"], plan["schedule"]) == (published["vp"], "interleaved")
    return gpus
