"""The console the commands print tables and messages on: 100 columns unless asked for more.

A table wider than that wraps its text columns (schedules, lists, notes) onto more lines;
numbers never wrap and are never cut short with an ellipsis. A terminal wider than 100
columns lends its width; `--wide` prints every table at its full natural width (one line
per row and per message, as the output was before), piped or not.
"""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

COLUMNS = 100                 # what a table and a message line fit, unless the terminal is wider
_UNBOUNDED_COLUMNS = 10_000   # measure a table's natural width, not the width it is squeezed into
WIDE_HELP = "print tables at their full width (one line per row), not wrapped to 100 columns"


def add_wide_flag(parser) -> None:
    parser.add_argument("--wide", action="store_true", help=WIDE_HELP)


def natural_width(console: Console, *tables) -> int:
    options = console.options.update_width(_UNBOUNDED_COLUMNS)
    return max((Measurement.get(console, options, table).maximum for table in tables), default=0)


def console_for(*tables, wide: bool = False) -> Console:
    """A Console for `tables` and the lines printed beside them: `wide`, at least as wide as
    the widest table is without wrapping any cell (lines are left whole too); else the
    terminal's width when it is a terminal wider than COLUMNS, else COLUMNS."""
    console = Console()
    if wide:
        needed = natural_width(console, *tables)
        return Console(width=max(needed, console.width), soft_wrap=True)
    width = console.width if console.is_terminal and console.width > COLUMNS else COLUMNS
    for table in tables:
        _fit(console, table, width)
    # a table that cannot fit even with every text column at its longest word stays whole
    return Console(width=max(width, natural_width(console, *tables)))


def cell_width(cell) -> int:
    """Columns a cell's text takes (markup such as [red] takes none)."""
    return len(Text.from_markup(cell).plain) if isinstance(cell, str) else len(str(cell))


def _fit(console: Console, table: Table, width: int) -> None:
    """Narrow the table's wrapping columns, always the widest by one column, each no narrower
    than its longest word, until the table fits `width` (rich left to itself shares the cut
    among every column and so cuts numbers short). A table that cannot fit stays whole."""
    excess = natural_width(console, table) - width
    if excess <= 0:
        return
    widths, floors = {}, {}
    for column in table.columns:
        if column.no_wrap:
            continue
        texts = [Text.from_markup(x).plain if isinstance(x, str) else str(x) for x in (column.header, *column.cells)]
        widths[id(column)] = max(map(len, texts), default=1)
        floors[id(column)] = max((len(word) for text in texts for word in text.split()), default=1)
    by_id = {id(c): c for c in table.columns}
    while excess > 0:
        narrowable = [k for k in widths if widths[k] > floors[k]]
        if not narrowable:
            break
        widest = max(narrowable, key=widths.get)
        widths[widest] -= 1
        excess -= 1
    for key, value in widths.items():
        by_id[key].min_width, by_id[key].max_width = floors[key], value


def new_table(title: str) -> Table:
    """A table of the compact style every command prints: a rule under the header, columns
    two spaces apart, no frame (a frame costs 3 columns a column; 13 columns of it were 40)."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
                 pad_edge=False,
                 show_edge=False)


def numbers_column(table, header: str, **kw) -> None:
    """A right-aligned column whose cells never wrap (a number split over lines misreads)."""
    table.add_column(header, justify="right", no_wrap=True, **kw)


def text_column(table, header: str, **kw) -> None:
    """A column that may wrap at spaces (never narrower than its longest word: _fit)."""
    table.add_column(header, **kw)
