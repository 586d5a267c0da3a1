"""The one place where text from outside reaches the operator's terminal.

A failure record's fields come from whoever published the registration, or from the legacy
API's answers: a `user_id` or a reason may hold ESC sequences (clear the screen, write the
clipboard with OSC 52), a C1 CSI (U+009B, which some terminals read as ESC [), or a bidi
override (U+202E) that makes text display in another order than it reads. Everything the
command prints goes through `visible` (the `Output` it prints results with, and `warn` for
messages on stderr), which renders each such character as its escape, `\\u001b`, so that it
can be seen and never acted on.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

# C0 controls and DEL; C1 controls; the Arabic letter mark; LRM, RLM; the line and paragraph
# separators; the bidi embeddings, overrides and isolates.
_OTHERS = "\x7f\x80-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_ANY = re.compile(f"[\x00-\x1f{_OTHERS}]")
_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHERS}]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def visible(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every control and bidi character rendered as `\\uXXXX`. `keep_newlines`
    keeps line feeds: for text whose lines the command itself joined (a table, a listing)."""
    return (_BUT_NEWLINE if keep_newlines else _ANY).sub(_escape, text)


def warn(message: str, stream: TextIO | None = None) -> None:
    """A message for the operator on stderr, prefixed with the command's name."""
    print(f"registrations: {visible(message)}", file=stream or sys.stderr)
