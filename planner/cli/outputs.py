"""What every command that writes files shares: `--html FILE` (planner.report), and one
"wrote FILE" line per file written - on stderr under `--json`, so stdout stays one JSON
document."""
from __future__ import annotations

import shlex
import sys

HTML_HELP = ("write a self-contained HTML report (tables, charts, zoomable pipeline timeline; "
             "no network needed to view it)")


def add_html_flag(parser) -> None:
    parser.add_argument("--html", metavar="FILE", help=HTML_HELP)


def check_html(args) -> None:
    """Before any work: the report's path is new (or --force), writable, .html."""
    if getattr(args, "html", None):
        from planner.report import check_report_path
        check_report_path(args.html, overwrite=getattr(args, "force", False))


def write_html(args, html: str) -> None:
    from planner.report import write_report
    write_report(args.html, html, overwrite=getattr(args, "force", False))
    wrote(args, args.html)


def command_line(args) -> str:
    """The command as typed (main() keeps argv on args), for the report's footer."""
    argv = getattr(args, "argv", None)
    return shlex.join(["meshplan", *argv]) if argv is not None else ""


def wrote(args, path: str) -> None:
    print(f"wrote {path}", file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)
