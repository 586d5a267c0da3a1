"""Hostile inbound bodies on the real broker: nested past the limit, or holding a key twice.
Each becomes exactly one `validation` failure record and is acked; none reaches the legacy API,
none goes round again, and no service logs a traceback for it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Stack
from harness import Broker, LegacySim, Service
from outcomes import INBOUND, PENDING, Outcomes, good

from regbridge.messages import MAX_NESTING, TRUNCATED_ORIGINAL_CHARS

pytestmark = pytest.mark.integration

# Room for a 100,000-deep body (200 kB), so that it fails on its depth, not its size.
MAX_BYTES = 250_000
FIELDS = b'"name": "Deep", "email": "d@example.com", "cpf": "12345678909"'


def nested_in(user_id: str, levels: int) -> bytes:
    """A valid registration whose extra field `x` holds arrays nested `levels` deep: the body
    nests `levels` + 1 deep (the registration itself is one level)."""
    return (b'{"user_id": "' + user_id.encode() + b'", ' + FIELDS + b', "x": '
            + b"[" * levels + b"]" * levels + b"}")


# message_id -> (body, words its reason must hold)
HOSTILE: dict[str, tuple[bytes, tuple[str, ...]]] = {
    # The figure: an extra field nested 990 levels inside a valid registration.
    "deep-990": (nested_in("deep-990-user", 990), ("nested", str(MAX_NESTING))),
    "deep-100k": (nested_in("deep-100k-user", 100_000), ("nested", str(MAX_NESTING))),
    "deep-one-over": (nested_in("deep-65-user", MAX_NESTING), ("nested", str(MAX_NESTING))),
    "dup-user-id": (b'{"user_id": "victim", ' + FIELDS + b', "user_id": "attacker"}', ("'user_id'", "twice")),
    "dup-nested": (b'{"user_id": "dup-nested-user", ' + FIELDS
                   + b', "address": {"city": "Recife", "zip": "50000", "city": "Olinda"}}', ("'city'", "twice")),
    "dup-in-list": (b'{"user_id": "dup-list-user", ' + FIELDS
                    + b', "phones": [{"kind": "home"}, {"kind": "work", "kind": "home"}]}', ("'kind'", "twice")),
}
HIDDEN_USERS = {"deep-990-user", "deep-100k-user", "deep-65-user", "victim", "attacker", "dup-nested-user",
                "dup-list-user"}
AT_THE_LIMIT = "deep-64-user"  # nested exactly MAX_NESTING deep: a registration like any other


def pending_for(payload: bytes, *, request_id: str) -> bytes:
    """A pending message as the submitter writes it, around a payload given as JSON text."""
    envelope = {"request_id": request_id, "user_id": "pending-user", "payload": "@PAYLOAD@", "attempt_key": "k",
                "submitted_at": 1.0, "message_id": None, "received_at": None, "submit_attempts": 1, "polls": 1,
                "waited_s": 0.0}
    return json.dumps(envelope).encode().replace(b'"@PAYLOAD@"', payload)


# Published straight to the pending queue: the poller's decode must hold the same line.
HOSTILE_PENDING: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "pending-deep-990": (pending_for(nested_in("pending-user", 990), request_id="P-DEEP"), ("nested",)),
    "pending-dup": (pending_for(b'{"user_id": "pending-user", "user_id": "other"}', request_id="P-DUP"),
                    ("'user_id'", "twice")),
}


def clean_log(service: Service) -> None:
    text = service.log()
    for word in ("Traceback", "RecursionError", "handler_error", "poison"):
        assert word not in text, f"{service.name} logged {word!r}:\n{text[-3000:]}"


def test_hostile_bodies_each_become_one_validation_failure_and_are_acked(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    stack.env["MAX_MESSAGE_BYTES"] = str(MAX_BYTES)
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    assert len(HOSTILE["deep-100k"][0]) < MAX_BYTES
    # Each body is what it claims: valid JSON but for the one flaw.
    assert json.loads(HOSTILE["dup-user-id"][0])["user_id"] == "attacker"  # what a last-wins parser reads

    for message_id, (body, _) in HOSTILE.items():
        broker.publish(INBOUND, body, message_id=message_id)
    for message_id, (body, _) in HOSTILE_PENDING.items():
        broker.publish(PENDING, body, message_id=message_id)
    broker.publish(INBOUND, nested_in(AT_THE_LIMIT, MAX_NESTING - 1), message_id="at-the-limit")

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=1, failed=len(HOSTILE) + len(HOSTILE_PENDING), timeout=60)
    # `wait` ends once nothing is left in any queue but the failure queue, ready or unacked:
    # every hostile message was acked, and any redelivery would have shown up as a second record.
    print(f"\nfailure records: {len(outcomes.failures)} for {len(HOSTILE) + len(HOSTILE_PENDING)} hostile messages")

    assert outcomes.registered() == {AT_THE_LIMIT}
    for message_id, (body, words) in {**HOSTILE, **HOSTILE_PENDING}.items():
        records = [r for mid, r in zip(outcomes.failure_ids, outcomes.failures, strict=True) if mid == message_id]
        assert len(records) == 1, f"{message_id}: {len(records)} failure records"
        record = records[0]
        error = record["error"]
        assert error["stage"] == "validation", (message_id, error)
        for word in words:
            assert word in error["reason"], (message_id, error["reason"])
        assert len(error["reason"]) < 300, (message_id, error["reason"])
        assert record["user_id"] is None and record["legacy_request_id"] is None, (message_id, record)
        # The raw text, cut short: never a parsed value that could not be written back.
        assert isinstance(record["original"], str), (message_id, type(record["original"]))
        assert len(record["original"]) <= TRUNCATED_ORIGINAL_CHARS + 100, (message_id, len(record["original"]))
        assert body.decode().startswith(record["original"][:200]), message_id
    assert "truncated" in next(r for m, r in zip(outcomes.failure_ids, outcomes.failures, strict=True)
                               if m == "deep-100k")["original"]
    assert set(outcomes.failure_ids) == {*HOSTILE, *HOSTILE_PENDING}

    # Nothing hostile reached the legacy API or MongoDB: one POST in all, the one at the limit.
    stats = legacy.stats()
    assert stats["submissions_by_user"] == {AT_THE_LIMIT: 1}, stats["submissions_by_user"]
    assert len(stats["post_arrivals"]) == 1, len(stats["post_arrivals"])
    assert {"P-DEEP", "P-DUP"}.isdisjoint(stats["polls_by_request"])
    for user_id in HIDDEN_USERS | {"pending-user", "other"}:
        assert users.count_documents({"_id": user_id}) == 0, user_id
    clean_log(submitter)
    clean_log(poller)

    # Still working.
    broker.publish(INBOUND, good("after-the-storm"), message_id="after")
    outcomes.wait(registered=2, failed=len(outcomes.failures))
    assert outcomes.registered() == {AT_THE_LIMIT, "after-the-storm"}
    assert submitter.terminate() == 0
    assert poller.terminate() == 0
    clean_log(submitter)
    clean_log(poller)
