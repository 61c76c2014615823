"""What several test folders share: the repository's paths, the real `meshplan` run in a fresh
interpreter, and the check that a user mistake ends in one line and exit code 2."""
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


def assert_user_error(proc, *fragments):
    """Exit code 2, exactly one line on stderr, no traceback, and the line names the fix."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("meshplan: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
