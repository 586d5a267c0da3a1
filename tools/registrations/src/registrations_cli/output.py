"""How every command prints its results: `-o table|json|jsonl` and `--no-headers`, as kubectl does.

- `table` (for people): a table with its header row, then a summary line. `--no-headers` prints
  the rows only, so that `cut`, `awk` and `wc -l` see nothing else.
- `json` (for a script): one JSON document on stdout, the whole result.
- `jsonl` (for a stream into `jq -c`): one JSON object per line, one per record or row, written
  as soon as it is known; no summary.

JSON is written with `ensure_ascii=True`: every character outside ASCII as `\\uXXXX`, and the
C0 controls escaped by json itself, so that a field carries nothing a terminal or an editor
acts on. Everything printed goes through `sanitize.visible` as well, the one sanitiser of the
command: a table, a `show`, a replay's lines. A record's fields come from whoever published the
registration, so this matters even for output nobody pipes anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .sanitize import visible
from .table import render

FORMATS = ("table", "json", "jsonl")

def safe_json(value: Any, *, indent: int | None = None) -> str:
    """`value` as JSON text in plain ASCII (see the module's docstring)."""
    return json.dumps(value, indent=indent, ensure_ascii=True, default=str,
                      separators=None if indent is not None else (",", ":"))


def add_arguments(parser: argparse.ArgumentParser, *, default: str = "table", json_alias: bool = False) -> None:
    """`-o/--output` and `--no-headers` on a (sub)command; with `json_alias`, `--json` as well."""
    parser.add_argument("-o", "--output", choices=FORMATS, default=default,
                        help=f"table, json (one document) or jsonl (one object per line) (default: {default})")
    parser.add_argument("--no-headers", action="store_true",
                        help="table output without its header row and summary lines: the rows only")
    if json_alias:
        parser.add_argument("--json", dest="output", action="store_const", const="json",
                            help="the same as -o json")


@dataclass
class Output:
    """The chosen format, and the stream results go to. A command builds one from its arguments
    (`Output.of(args)`) and prints through it only."""

    format: str = "table"
    headers: bool = True
    stream: TextIO = field(default_factory=lambda: sys.stdout)

    @classmethod
    def of(cls, args: argparse.Namespace) -> Output:
        return cls(format=args.output, headers=not args.no_headers)

    @property
    def is_table(self) -> bool:
        return self.format == "table"

    def line(self, text: str = "") -> None:
        self.stream.write(visible(text, keep_newlines=True) + "\n")
        self.stream.flush()

    def document(self, value: Any, *, jsonl_rows: Iterable[Any] | None = None) -> None:
        """A whole result for `json`; for `jsonl`, `jsonl_rows` one per line (else `value` on one line)."""
        if self.format == "json":
            self.line(safe_json(value, indent=2))
        elif jsonl_rows is not None:
            for row in jsonl_rows:
                self.row(row)
        else:
            self.line(safe_json(value))

    def rows(self, values: Iterable[Any]) -> None:
        """A list of results, each written as it comes: for `json`, one array (the text
        `json.dumps(list, indent=2)` would give); for `jsonl`, one per line. Memory holds one."""
        if self.format != "json":
            for value in values:
                self.row(value)
            return
        first = True
        for value in values:
            text = "\n".join("  " + line for line in safe_json(value, indent=2).split("\n"))
            self.stream.write(visible(("[\n" if first else ",\n") + text, keep_newlines=True))
            first = False
        self.line("[]" if first else "\n]")

    def row(self, value: Any) -> None:
        """One record of a `jsonl` stream."""
        self.line(safe_json(value))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = (),
              indent: str = "") -> str:
        """The text of a table, without its header row under `--no-headers`."""
        text = render(headers, rows, right=right, indent=indent)
        return text if self.headers else text.split("\n", 1)[1] if rows else ""

    def summary(self, text: str | Callable[[], str]) -> None:
        """A line that tells a person about the rows (a count, a title): table output with headers only."""
        if self.is_table and self.headers:
            self.line(text() if callable(text) else text)
