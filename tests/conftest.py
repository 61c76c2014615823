import pytest

from helpers import REFERENCE, run_cli


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def reference():
    return REFERENCE


def pytest_collection_modifyitems(items):
    """Everything under tests/cli/ runs the command line: `-m cli` selects it."""
    for item in items:
        if item.path.parent.name == "cli":
            item.add_marker(pytest.mark.cli)
