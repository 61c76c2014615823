"""What the long-running, file-writing commands share: `--html FILE` (planner.report),
`--force`, one "wrote FILE" line per file written (on stderr under `--json`, so stdout stays
one JSON document), and a progress spinner on stderr while they work (terminals only)."""
from __future__ import annotations

import contextlib
import shlex
import sys

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

HTML_HELP = ("write a self-contained HTML report (tables, charts, zoomable pipeline timeline; "
             "no network needed to view it)")


FORCE_HELP = "replace output files that already exist (default: refuse, before any work)"


def add_html_flag(parser, force: bool = True) -> None:
    """`--html FILE`, and `--force` (which every output of the command then obeys) unless
    the command has its own."""
    parser.add_argument("--html", metavar="FILE", help=HTML_HELP)
    if force:
        parser.add_argument("--force", action="store_true", help=FORCE_HELP)


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


@contextlib.contextmanager
def progress(text: str):
    """A spinner with the elapsed time on stderr while the block runs, for work that can take
    seconds; yields `update(text)`. Only on a terminal: piped or captured stderr (and so
    `--json | jq`, CI logs, tests) gets nothing, and stdout never does."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _text: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(text, total=None)
        yield lambda new_text: bar.update(task, description=new_text)
