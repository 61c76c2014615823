import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
# Copies of the reference files the tests read (tests/fixtures/reference/README.md), so the
# suite runs them - never skips them - where shared/ is not beside the checkout.
VENDORED_REFERENCE = REPO / "tests" / "fixtures" / "reference"
VENDORED_FILES = ("gpu_specs.json", "h100/measured.jsonl")


def run_cli(*args, cwd=None, timeout=120):
    """Run the real `meshplan` entry point in a fresh interpreter, as a user would."""
    cmd = [sys.executable, "-m", "planner.cli", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def reference():
    """The reference folder the tests read: the repo's copies, checked against shared/reference
    wherever that is beside the checkout (a copy that went stale fails, it is not used)."""
    for name in VENDORED_FILES:
        original = REFERENCE / name
        if original.is_file():
            assert (VENDORED_REFERENCE / name).read_bytes() == original.read_bytes(), \
                f"tests/fixtures/reference/{name} differs from shared/reference/{name}: copy it again"
    return VENDORED_REFERENCE


def assert_user_error(proc, *fragments):
    """Exit code 2, exactly one line on stderr, no traceback, and the line names the fix."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("meshplan: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
