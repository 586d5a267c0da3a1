"""A recursion limit that proves code does not recurse over a value's depth."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def low_recursion_limit(headroom: int = 150) -> Iterator[None]:
    """Python's recursion limit set just above the frames in use: json's parser may recurse
    through the MAX_NESTING levels it is given (and it counts against this limit), but a
    recursion through hundreds of levels raises RecursionError. A decoder that passes its deep
    cases under it did not recurse over their depth."""
    frames, frame = 0, sys._getframe()
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(frames + headroom)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)

