"""A text progress bar on stderr, drawn in place; silent when stderr is not a terminal."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO, *, enabled: bool, label: str = "publishing",
                 width: int = 30, every_s: float = 0.1) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._enabled = enabled and total > 0
        self._label = label
        self._width = width
        self._every_s = every_s
        self._last = 0.0
        self._drawn = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self._enabled and (now - self._last >= self._every_s or self.done >= self.total):
            self._last = now
            self._stream.write("\r" + bar(self.done, self.total, self._width, self._label))
            self._stream.flush()
            self._drawn = True

    def close(self) -> None:
        """Leave the line, so what is printed next starts on its own."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def bar(done: int, total: int, width: int = 30, label: str = "publishing") -> str:
    """`publishing [###########-------------------]  37% 370/1000`"""
    fraction = 0.0 if total <= 0 else min(1.0, done / total)
    filled = round(fraction * width)
    return f"{label} [{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}% {done}/{total}"
