"""Reading a file of registrations (JSONL, or CSV with a header row) and judging every row.

Pure code. A row is valid when its body decodes as the contract's inbound message: the very
check the submitter makes (`regbridge.messages.Registration.decode`), so that a row accepted
here is never a `validation` failure there. Line numbers are the file's, 1-based.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regbridge.messages import DecodeError, Registration

FORMATS = ("jsonl", "csv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
MESSAGE_ID_MAX_BYTES = 255  # an AMQP short string


@dataclass(frozen=True)
class Row:
    line: int
    body: bytes
    user_id: str
    message_id: str | None = None  # from --message-id-field; else the publisher makes one up


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass(frozen=True)
class Parsed:
    rows: list[Row]
    bad: list[BadRow]

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.bad)


def guess_format(path: str) -> str | None:
    return _EXTENSIONS.get(Path(path).suffix.lower())


def parse(data: bytes, fmt: str, *, max_bytes: int, message_id_field: str | None = None) -> Parsed:
    if fmt == "jsonl":
        return parse_jsonl(data, max_bytes=max_bytes, message_id_field=message_id_field)
    if fmt == "csv":
        return parse_csv(data, max_bytes=max_bytes, message_id_field=message_id_field)
    raise ValueError(f"unknown format {fmt!r}")


def judge(line: int, body: bytes, *, max_bytes: int, message_id_field: str | None) -> Row | BadRow:
    """A row as the submitter would take it, or why it would fail validation there."""
    try:
        registration = Registration.decode(body, message_id=None, max_bytes=max_bytes)
    except DecodeError as exc:
        return BadRow(line, exc.reason)
    message_id = None
    if message_id_field is not None:
        value: Any = registration.payload.get(message_id_field)
        if not isinstance(value, str) or not value:
            return BadRow(line, f"{message_id_field} (the message id field) must be a non-empty string")
        if len(value.encode("utf-8", errors="replace")) > MESSAGE_ID_MAX_BYTES:
            return BadRow(line, f"{message_id_field} (the message id field) is over {MESSAGE_ID_MAX_BYTES} bytes")
        message_id = value
    return Row(line, body, registration.user_id, message_id)


def _add(parsed: Parsed, item: Row | BadRow) -> None:
    if isinstance(item, Row):
        parsed.rows.append(item)
    else:
        parsed.bad.append(item)


def parse_jsonl(data: bytes, *, max_bytes: int, message_id_field: str | None = None) -> Parsed:
    """One JSON object per line; blank lines are skipped. The body published is the line itself."""
    parsed = Parsed([], [])
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        _add(parsed, judge(number, line.strip(), max_bytes=max_bytes, message_id_field=message_id_field))
    return parsed


def parse_csv(data: bytes, *, max_bytes: int, message_id_field: str | None = None) -> Parsed:
    """A header row, then one registration per row: each cell a string field (a CPF keeps its
    leading zeros). A quoted cell may span lines; a row is numbered by its first line."""
    parsed = Parsed([], [])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        parsed.bad.append(BadRow(line, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
        return parsed
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    previous_end = 0
    try:
        for cells in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if all(not c.strip() for c in cells):
                continue  # a blank line
            if header is None:
                header, header_line = [c.strip() for c in cells], start
                problem = _header_problem(header, message_id_field)
                if problem:
                    parsed.bad.append(BadRow(header_line, problem))
                    return parsed
                continue
            if len(cells) != len(header):
                parsed.bad.append(BadRow(start, f"has {len(cells)} fields; the header (line {header_line}) "
                                                f"has {len(header)}"))
                continue
            body = json.dumps(dict(zip(header, cells, strict=True)), ensure_ascii=False,
                              separators=(",", ":")).encode("utf-8")
            _add(parsed, judge(start, body, max_bytes=max_bytes, message_id_field=message_id_field))
    except csv.Error as exc:
        parsed.bad.append(BadRow(reader.line_num or previous_end + 1, f"not valid CSV ({exc})"))
    if header is None:
        parsed.bad.append(BadRow(1, "no header row (the first row names the fields: user_id,name,...)"))
    return parsed


def _header_problem(header: list[str], message_id_field: str | None) -> str | None:
    if any(not name for name in header):
        return "the header row has an empty column name"
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        return f"the header row names {', '.join(duplicates)} more than once"
    if "user_id" not in header:
        return "the header row has no user_id column"
    if message_id_field is not None and message_id_field not in header:
        return f"the header row has no {message_id_field} column (--message-id-field)"
    return None
