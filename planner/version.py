"""meshplan's version: the installed distribution's (pyproject.toml), for `meshplan --version`
and the reports' "made by" line."""
from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("meshplan")
    except PackageNotFoundError:   # run from a checkout that was never pip-installed
        return "unknown (not installed)"
