"""Self-contained HTML reports of a plan search, one simulated plan, or a cluster comparison
(`meshplan plan|simulate|compare --html FILE`): one file with its CSS, script and SVG inline,
nothing fetched, to open in any browser or mail to a team.

pages.py builds each report; page.py is the HTML shell and the timeline's script; charts.py
draws the SVG; timeline.py turns a simulated pipeline into the script's data.
"""
from __future__ import annotations

from cost_models.inputs import check_output_path
from planner.report.pages import compare_report, plan_report, simulate_report

__all__ = ["compare_report", "plan_report", "simulate_report", "write_report", "check_report_path"]


def check_report_path(path: str, overwrite: bool = False) -> None:
    """Before any work: a new .html file (or `overwrite`) in a writable folder."""
    check_output_path(path, overwrite=overwrite, suffixes=("html", "htm"), force_hint=True)


def write_report(path: str, html: str, overwrite: bool = False) -> None:
    check_report_path(path, overwrite)
    with open(path, "w" if overwrite else "x", encoding="utf-8") as f:   # "x": never replaces a file
        f.write(html)
