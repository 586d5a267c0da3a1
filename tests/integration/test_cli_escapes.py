"""Terminal escapes in failure records and registration documents never reach the operator's
terminal: every command and format of `registrations`, run as its console script against the
real broker and the Mongo-wire server, shows each escape class visibly (`\\u001b`, or JSON's own
escape) wherever it prints the record that holds it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import run_cli as run

from regbridge.messages import FailureError, FailureRecord

pytestmark = pytest.mark.integration

HOSTILE = {
    "esc": "\x1b[2J",
    "osc52": "\x1b]52;c;ZWNobyBwd25lZA==\x07",
    "c1": "\u009b31m",
    "rlo": "\u202eevil",
    "isolate": "\u2066x\u2069",
    # A line feed would start a line of the attacker's choosing; a carriage return would print
    # over the start of the line it is in.
    "newline": "\nforged-line",
    "cr": "\rforged",
}
FORGED = "forged-line"
# Never printed as they are (a line feed is printed only between the lines the command writes).
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]} - {"\n"} | set(
    "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown_forms(escape: str) -> set[str]:
    """How `escape` may be shown visibly: as the sanitiser renders it, as JSON escapes it, or as
    Python's repr does in an error that quotes what was asked for."""
    return {"".join(f"\\u{ord(c):04x}" if c in UNSAFE or c == "\n" else c for c in escape),
            json.dumps(escape)[1:-1], repr(escape)[1:-1]}


def record(name: str, prefix: str = "m") -> tuple[str, bytes]:
    escape = HOSTILE[name]
    user = f"u-{name}{escape}"
    body = FailureRecord(original={"user_id": user, "name": f"Maria{escape}"}, user_id=user,
                         legacy_request_id=f"R{escape}", error=FailureError("legacy", f"rejected {escape} here"),
                         attempts=1, failed_at=datetime.now(UTC)).encode()
    return f"{prefix}-{name}{escape}", body


def check(env: dict[str, str], args: tuple[str, ...], classes: list[str], *, code: int = 0) -> str:
    """Run the command; fail if it printed a control or bidi character as it is, let a line feed
    start a line, or did not show each of `classes` visibly."""
    result = run(env, *args)
    printed: str = result.stdout + result.stderr
    where = f"registrations {' '.join(map(ascii, args))}"
    assert result.returncode == code, f"{where} exited {result.returncode}:\n{printed!a}"
    assert "Traceback" not in printed
    raw = sorted({f"U+{ord(c):04X}" for c in printed if c in UNSAFE})
    assert not raw, f"{where} printed {raw}:\n{printed!a}"
    assert not any(line.lstrip().startswith(FORGED) for line in printed.splitlines()), f"{where}:\n{printed!a}"
    hidden = [n for n in classes if not any(form in printed for form in shown_forms(HOSTILE[n]))]
    assert not hidden, f"{where} did not show {hidden} visibly:\n{printed!a}"
    return printed


def test_every_escape_class_is_shown_visibly_by_every_command(stack: Stack, failure_records: FailureRecords,
                                                              users: Any, tmp_path: Path) -> None:
    every = list(HOSTILE)
    for name, escape in HOSTILE.items():
        message_id, body = record(name)
        failure_records.publish(body, message_id=message_id)
        # The user's document as something other than the bridge might have written it.
        users.insert_one({"_id": f"u-{name}{escape}", "registration_status": f"failed{escape}",
                          "legacy_request_id": f"R{escape}",
                          "registration_error": {"stage": "legacy", "reason": f"rejected {escape} here"}})
    # The error for an id that is not there names it, visibly.
    unknown = "m-missing" + "".join(HOSTILE[n] for n in ("esc", "rlo", "newline"))
    missing = check(stack.env, ("failed", "show", unknown), ["esc", "rlo", "newline"], code=1)
    assert "m-missing\\x1b[2J\\u202eevil\\n" + FORGED in missing, missing
    runs = 1
    for fmt in ("table", "json", "jsonl"):
        listing: tuple[str, ...]
        for listing in (("failed", "list"), ("failed", "list", "--from-queue"), ("failed", "replay", "--dry-run"),
                        ("failed", "discard", "--dry-run")):
            check(stack.env, (*listing, "-o", fmt), every)
            runs += 1
    check(stack.env, ("failed", "list", "--no-headers"), every)
    runs += 1
    # Each record, alone, by every command that shows one: its own class visibly.
    for name, escape in HOSTILE.items():
        for args in (("failed", "show", f"m-{name}{escape}"), ("failed", "show", f"m-{name}{escape}", "-o", "json"),
                     ("failed", "show", "--from-queue", f"m-{name}{escape}"),
                     ("status", f"u-{name}{escape}"), ("status", f"u-{name}{escape}", "-o", "jsonl")):
            check(stack.env, args, [name])
            runs += 1
    # A replay for real prints each record it moved, visibly too; then a discard, whose export
    # file is plain ASCII and gives back each record's exact body.
    check(stack.env, ("failed", "replay", "--yes"), every)
    published = dict(record(name, prefix="d") for name in HOSTILE)
    for message_id, body in published.items():
        failure_records.publish(body, message_id=message_id)
    export = tmp_path / "discarded.jsonl"
    check(stack.env, ("failed", "discard", "--yes", "--export", str(export)), every)
    runs += 2
    text = export.read_text(encoding="utf-8")
    assert text.isascii(), sorted({f"U+{ord(c):04X}" for c in text if not c.isascii()})
    lines = [json.loads(line) for line in text.splitlines()]
    assert {line["id"]: line["body"].encode("utf-8") for line in lines} == published
    print(f"{runs} command runs, no raw control or bidi character printed and no forged line; each shows "
          f"every escape class of the records it names; the export ({len(lines)} records) is ASCII and exact")


def test_json_is_plain_ascii(stack: Stack, failure_records: FailureRecords) -> None:
    body = FailureRecord(original={"user_id": "u-jose"}, user_id="u-jos\u00e9", legacy_request_id=None,
                         error=FailureError("legacy", "recus\u00e9 \u2014 no"), attempts=1,
                         failed_at=datetime.now(UTC)).encode()
    failure_records.publish(body, message_id="m-accents")
    for args in (("failed", "list", "-o", "json"), ("failed", "show", "m-accents", "-o", "json")):
        out: Any = run(stack.env, *args).stdout
        assert out.isascii() and "u-jos\\u00e9" in out
