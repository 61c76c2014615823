import pytest

from helpers import REFERENCE, run_cli_in_process


@pytest.fixture
def cli():
    """`meshplan` in-process: cli("plan", "--model", ...) -> CompletedProcess-like (returncode, stdout, stderr)."""
    return run_cli_in_process


@pytest.fixture(scope="session")
def reference():
    return REFERENCE


def pytest_collection_modifyitems(items):
    """Everything under tests/cli/ runs the command line: `-m cli` selects it."""
    for item in items:
        if item.path.parent.name == "cli":
            item.add_marker(pytest.mark.cli)
