"""A terminal console wide enough for the tables it prints.

rich fits a table to the console's width, shortening cells with an ellipsis when it is too
narrow - and without a terminal (output piped to a file or another program) that width is
80 columns, so `meshplan models | less` would show "174… B" for GPT-3's parameter count.
A number cut short is worse than a long line, so the console is never narrower than the
widest table needs; a terminal wider than that keeps its own width.
"""
from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement

_UNBOUNDED_COLUMNS = 10_000   # measure a table's natural width, not the width it is squeezed into


def console_for(*tables) -> Console:
    """A Console at least as wide as the widest of `tables` is without wrapping any cell."""
    console = Console()
    options = console.options.update_width(_UNBOUNDED_COLUMNS)
    needed = max((Measurement.get(console, options, table).maximum for table in tables), default=0)
    # widened: lines of text beside the table are left whole too (one line per message)
    return Console(width=needed, soft_wrap=True) if needed > console.width else console
