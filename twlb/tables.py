"""The tables `twlb` commands print: rich tables that wrap instead of cutting.

rich shortens a cell that cannot wrap (one long word, a URL, a header) to its column's
width with an ellipsis ("sta…"); every column made here folds it onto the next line
instead, so a table in a narrow terminal (or `COLUMNS=100`) loses no character. Headers
are short words for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.table import Table

#: The terminal width every command's tables are checked against (tests set COLUMNS).
CHECKED_WIDTH = 100


def table(
    columns: Iterable[str | tuple[str, str]], title: str | None = None, **options: Any
) -> Table:
    """A table with these columns (a name, or (name, "right"|"left"|"center")), every
    cell folding rather than being cut."""
    # No vertical rules and one space between columns: the room goes to the cells.
    options.setdefault("box", box.SIMPLE_HEAD)
    options.setdefault("padding", (0, 0))
    options.setdefault("show_edge", False)
    t = Table(title=title, header_style="bold", **options)
    for column in columns:
        name, justify = (column, "left") if isinstance(column, str) else column
        t.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    return t


def rows_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Table:
    """A table of dict rows, one column per key in `columns` (numbers to the right). A
    column's header is `headers[key]`, else the key, one word a line (underscores split
    words), so headers take no more width than their longest word."""
    numeric = {c for c in columns if rows and all(_is_number(r.get(c)) for r in rows)}
    names = headers or {}
    headers_ = [
        ("\n".join(names.get(c, c.replace("_", " ")).split()), "right" if c in numeric else "left")
        for c in columns
    ]
    t = table(headers_, title)
    for r in rows:
        t.add_row(*(cell(r.get(c)) for c in columns))
    return t


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def cell(value: Any) -> str:
    """A figure as a table shows it: "-" for none, three decimals below 100."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
