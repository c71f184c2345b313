"""Table building blocks for the terminal renderers: :class:`FitTable` / :class:`Col`, number
formatting and :func:`clean` / :func:`cell` (names and messages escaped so they cannot drive the
terminal). rich is imported only inside the functions that draw."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["clean", "cell", "Col", "FitTable"]


def clean(text: Any) -> str:
    """``text`` safe to print on a terminal: control characters (ESC sequences, newlines, BEL,
    C1 codes, line/paragraph separators) become visible escapes such as ``\\x1b``, so a node name
    cannot move the cursor, recolour the terminal or break a one-line message."""
    import unicodedata

    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ord(ch) < 0x20:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)  # other non-printables (format characters, ...) render as nothing or a box
    return "".join(out)


def cell(value: Any) -> Any:
    """A table cell or title from a name or message: a rich ``Text`` (never parsed as markup, so
    ``[/bogus]`` or ``[link=...]`` in a node name prints as itself) with control characters escaped."""
    from rich.text import Text

    return Text(clean("" if value is None else value))


@dataclass(frozen=True)
class Col:
    """A column of a :class:`FitTable`.

    Attributes:
        header: the heading.
        fmt: ``(value, level) -> str``; level 0 is the widest form, higher levels shorter
            (numbers rounded to fewer digits). Default: ``str``.
        text: a name or note: it may fold; numbers never wrap nor get cropped.
        drop: from this level on the column is left out (narrow consoles); None: always shown.
        floor: the narrowest a text column may get before the next level is tried.
        justify: "left" or "right" (default: left for text, right for numbers).
    """

    header: str
    fmt: Callable[[Any, int], str] | None = None
    text: bool = False
    drop: int | None = None
    floor: int = 8
    justify: str | None = None


class FitTable:
    """A table that fits the console width by rounding numbers and leaving out the least important
    columns, never by cropping a number (rich crops no-wrap cells when a table is too wide: a
    cosine of 0.999895 would show as 0.9998). Rows are raw values; each level formats them anew.
    """

    def __init__(
        self, title: Any, columns: list[Col], rows: list[tuple[list[Any], str | None]], *, levels: int = 1,
        caption: str | None = None, show_lines: bool = False,
    ) -> None:  # fmt: skip
        self.title, self.columns, self.rows, self.levels = title, columns, rows, max(1, levels)
        self.caption, self.show_lines = caption, show_lines

    def _cells(self, level: int) -> tuple[list[Col], list[list[str]]]:
        keep = [i for i, c in enumerate(self.columns) if c.drop is None or level < c.drop]
        cols = [self.columns[i] for i in keep]
        body = [[self._fmt(self.columns[i], values[i], level) for i in keep] for values, _ in self.rows]
        return cols, body

    @staticmethod
    def _fmt(col: Col, value: Any, level: int) -> str:
        return clean(col.fmt(value, level) if col.fmt is not None else ("" if value is None else value))

    def min_width(self, level: int, *, fold: bool = True) -> int:
        """The narrowest this table gets at ``level`` with every number whole (and, with
        ``fold=False``, every name on one line)."""
        from rich.cells import cell_len

        cols, body = self._cells(level)
        total = 3 * len(cols) + 1  # one space of padding each side, one border between and around
        for j, col in enumerate(cols):
            widest = max([cell_len(col.header)] + [cell_len(r[j]) for r in body])
            total += min(widest, col.floor) if col.text and fold else widest
        return total

    def table(self, level: int = 0) -> Any:
        """The rich Table at ``level``."""
        from rich.table import Table

        cols, body = self._cells(level)
        table = Table(
            title=cell(self.title) if isinstance(self.title, str) else self.title, title_justify="left",
            header_style="bold", show_lines=self.show_lines, caption=self.caption,
        )  # fmt: skip
        for col in cols:
            table.add_column(
                col.header, justify=col.justify or ("left" if col.text else "right"),  # type: ignore[arg-type]
                no_wrap=not col.text, overflow="fold",
            )  # fmt: skip
        from rich.text import Text

        for cells, (_, style) in zip(body, self.rows):
            table.add_row(*[Text(c) for c in cells], style=style)
        return table

    def level_for(self, width: int) -> int:
        """The first level whose table fits ``width`` columns with names on one line, else the first
        that fits with names folded (the last level if none does)."""
        for fold in (False, True):  # names whole if some level allows it, else folded names
            for lv in range(self.levels):
                if self.min_width(lv, fold=fold) <= width:
                    return lv
        return self.levels - 1

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield self.table(self.level_for(options.max_width))


def _num(full: int, short: int | None = None, sci: bool = True) -> Callable[[Any, int], str]:
    """A number formatter for :class:`Col`: ``full`` decimals at level 0, ``short`` from level 1."""
    return lambda v, level: _fmt(v, full if level == 0 or short is None else short, sci)


def _fmt(v: Any, digits: int = 6, sci: bool = True) -> str:
    """A number for a table cell: '-' for missing/NaN, scientific for very large/small when ``sci``."""
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "-"
    if sci and (abs(f) >= 1e5 or (0 < abs(f) < 1e-3)):
        return f"{f:.2e}"
    return f"{f:.{digits}f}"


def _lines(lines: list[str]) -> Any:
    """Summary lines as one Text, each line's control characters escaped."""
    from rich.text import Text

    return Text("\n".join(clean(line) for line in lines))
