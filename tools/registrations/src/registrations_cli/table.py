"""Plain-text tables for a terminal: one line per row, columns padded, long text cut short."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .sanitize import visible

_SPACE = re.compile(r"\s+")


def one_line(text: str) -> str:
    """A value on one line: line feeds, carriage returns, tabs and every other control or bidi
    character rendered visibly (`\\u000a`), runs of other blanks as one space. So a cell never
    breaks its table nor a field its line, and values that differ only there still look apart:
    `bob\\u000aalice` is not the user `bob alice`."""
    return _SPACE.sub(" ", visible(text)).strip()


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 record`, `2 records`."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def truncate(text: str, width: int) -> str:
    text = one_line(text)
    if width < 1:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = (),
           indent: str = "") -> str:
    """Columns as wide as their widest cell; the columns named in `right` aligned right (numbers).
    The last column is not padded, so a long last cell never leaves trailing blanks."""
    cells = [[one_line("" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    last = len(headers) - 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, (value, width) in enumerate(zip(values, widths, strict=True)):
            if headers[i] in right:
                parts.append(value.rjust(width))
            elif i == last:
                parts.append(value)
            else:
                parts.append(value.ljust(width))
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])
