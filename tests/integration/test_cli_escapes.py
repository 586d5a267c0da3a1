"""Terminal escapes in failure records never reach the operator's terminal: every command and
format of `registrations`, run as its console script against the real broker and the Mongo-wire
server, prints each escape class as a visible `\\uXXXX`."""

from __future__ import annotations

from datetime import UTC, datetime
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
}
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]} - {"\n"} | set(
    "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")



def test_every_escape_class_is_shown_visibly_by_every_command(stack: Stack, failure_records: FailureRecords) -> None:
    for name, escape in HOSTILE.items():
        user = f"u-{name}{escape}"
        body = FailureRecord(original={"user_id": user, "name": f"Maria{escape}"}, user_id=user,
                             legacy_request_id=f"R{escape}", error=FailureError("legacy", f"rejected {escape} here"),
                             attempts=1, failed_at=datetime.now(UTC)).encode()
        failure_records.publish(body, message_id=f"m-{name}{escape}")
    commands: list[tuple[str, ...]] = []
    for fmt in ("table", "json", "jsonl"):
        commands += [("failed", "list", "-o", fmt), ("failed", "list", "--from-queue", "-o", fmt),
                     ("failed", "replay", "--dry-run", "-o", fmt), ("failed", "discard", "--dry-run", "-o", fmt)]
    for name, escape in HOSTILE.items():
        commands += [("failed", "show", f"m-{name}{escape}"), ("status", f"u-{name}{escape}")]
    commands += [("failed", "show", "m-esc\x1b[2J", "-o", "json"), ("status", "u-rlo\u202eevil", "-o", "jsonl"),
                 ("failed", "list", "--no-headers"), ("failed", "show", "m-missing\x1b[2J\u202e")]
    shown: dict[str, int] = {}
    for args in commands:
        result = run(stack.env, *args)
        printed = result.stdout + result.stderr
        raw = sorted({f"U+{ord(c):04X}" for c in printed if c in UNSAFE})
        assert not raw, f"registrations {' '.join(map(ascii, args))} printed {raw}:\n{printed!a}"
        assert "Traceback" not in printed
        for name, escape in HOSTILE.items():
            visible = "".join(f"\\u{ord(c):04x}" if c in UNSAFE else c for c in escape)
            shown[name] = shown.get(name, 0) + (visible in printed)
    # The error for an id that is not there names it, visibly.
    missing = run(stack.env, "failed", "show", "m-missing\x1b[2J")
    assert missing.returncode == 1
    assert "m-missing\\u001b[2J" in missing.stderr or "m-missing\\x1b[2J" in missing.stderr, missing.stderr
    print(f"{len(commands)} command runs, no raw control or bidi character printed; each escape class seen "
          f"rendered visibly in: {shown}")
    assert all(count > 0 for count in shown.values()), shown


def test_json_is_plain_ascii(stack: Stack, failure_records: FailureRecords) -> None:
    body = FailureRecord(original={"user_id": "u-jose"}, user_id="u-jos\u00e9", legacy_request_id=None,
                         error=FailureError("legacy", "recus\u00e9 \u2014 no"), attempts=1,
                         failed_at=datetime.now(UTC)).encode()
    failure_records.publish(body, message_id="m-accents")
    for args in (("failed", "list", "-o", "json"), ("failed", "show", "m-accents", "-o", "json")):
        out: Any = run(stack.env, *args).stdout
        assert out.isascii() and "u-jos\\u00e9" in out
