"""Accounting for every message: what the pipeline produced, and what each message should end as."""

from __future__ import annotations

import json
import random
from typing import Any

from harness import Broker, wait_until
from registrations_cli.records import record_id_of

from regbridge.failure_index import QUEUED

FAILED = "registrations.failed"
INBOUND = "registrations"
PENDING = "registrations.pending"


def good(user_id: str, **overrides: Any) -> dict[str, Any]:
    return {"user_id": user_id, "name": "Maria da Silva", "email": f"{user_id}@example.com",
            "cpf": "12345678909", **overrides}


class Outcomes:
    """Collects the failure queue as it fills, and reads MongoDB, until every message is accounted for."""

    def __init__(self, broker: Broker, users: Any) -> None:
        self.broker = broker
        self.users = users
        self.failures: list[dict[str, Any]] = []
        self.failure_ids: list[str | None] = []  # the AMQP message_id each record carries
        self.record_ids: list[str] = []  # each record's id, as the CLI reads it (`record_id_of`)
        self.record_id_from: list[str] = []  # where it was read: "header" for what the services write

    def collect(self) -> None:
        for props, body in self.broker.drain(FAILED):
            self.failures.append(json.loads(body))
            self.failure_ids.append(props.message_id)
            record_id, found_in = record_id_of(props.message_id, props.headers, body)
            self.record_ids.append(record_id)
            self.record_id_from.append(found_in)

    def registered(self) -> set[str]:
        return {d["_id"] for d in self.users.find({"registration_status": "registered"}, {"_id": 1})}

    def wait(self, *, registered: int, failed: int, timeout: float = 60, distinct: bool = False) -> None:
        """Until `registered` users are registered and `failed` failure records arrived (with
        `distinct`, records of `failed` different message ids)."""
        def done() -> bool:
            self.collect()
            records = len(set(self.failure_ids)) if distinct else len(self.failures)
            return len(self.registered()) >= registered and records >= failed

        try:
            wait_until(done, timeout=timeout, what=f"{registered} registered and {failed} failure records",
                       every=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; have {len(self.registered())} registered and failures "
                                 f"{[(f['user_id'], f['error']) for f in self.failures]}") from None
        # Anything extra (a duplicate, a stray record) would arrive right behind: look once more
        # after the services have gone quiet.
        self.quiet()

    def quiet(self) -> None:
        """Wait until no queue but the failure queue holds a message, ready or unacked, then
        collect the last records: after that, nothing more can arrive."""
        self.broker.wait_drained(FAILED)
        self.collect()

    def by_stage(self) -> dict[str, list[dict[str, Any]]]:
        stages: dict[str, list[dict[str, Any]]] = {}
        for record in self.failures:
            stages.setdefault(record["error"]["stage"], []).append(record)
        return stages


def mixed_load(broker: Broker, n: int, *, seed: int, prefix: str = "load") -> dict[str, str]:
    """Publish `n` messages, each with message_id = user_id: mostly good, some the legacy refuses,
    some the legacy API rejects, some invalid. Returns each message's expected outcome:
    "registered" or the failure stage."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    for i in range(n):
        kind = rng.choices(["registered", "legacy", "submit", "validation"], weights=[80, 8, 6, 6])[0]
        uid = f"{prefix}-{i}"
        body: Any = {
            "registered": good(uid),
            "legacy": good(uid, name="FAIL x"),
            "submit": good(uid, email="no-at-sign"),
            "validation": b"{not json",
        }[kind]
        broker.publish(INBOUND, body, message_id=uid)
        expected[uid] = kind
    return expected


def check_exact(outcomes: Outcomes, expected: dict[str, str], *, timeout: float = 120) -> int:
    """Wait for every message's outcome, then hold each to its expected one: registered, or
    failure records of the right stage. Returns how many records were extra identical copies
    (the at-least-once window a crash or a cut connection leaves); a conflicting or stray
    outcome fails here."""
    want_registered = {m for m, v in expected.items() if v == "registered"}
    want_failed = {m: v for m, v in expected.items() if v != "registered"}
    outcomes.wait(registered=len(want_registered), failed=len(want_failed), timeout=timeout, distinct=True)

    copies: dict[str, set[tuple[Any, ...]]] = {}
    extra = 0
    for message_id, record in zip(outcomes.failure_ids, outcomes.failures, strict=True):
        assert message_id in want_failed, f"a failure record for {message_id}, which should not fail: {record}"
        key = (record["error"]["stage"], record["user_id"], record["legacy_request_id"])
        if message_id in copies:
            extra += 1
        copies.setdefault(message_id, set()).add(key)
    for message_id, stage in want_failed.items():
        assert message_id in copies, f"no outcome for {message_id}"
        assert len(copies[message_id]) == 1, f"conflicting failure records for {message_id}: {copies[message_id]}"
        got_stage, user_id, _ = next(iter(copies[message_id]))
        assert got_stage == stage, f"{message_id}: stage {got_stage}, expected {stage}"
        if stage != "validation":
            assert user_id == message_id
            doc = outcomes.users.find_one({"_id": user_id})
            assert doc["registration_status"] == "failed" and doc["registration_error"]["stage"] == stage
    assert outcomes.registered() == want_registered
    index_agrees(outcomes)
    return extra


def index_agrees(outcomes: Outcomes) -> int:
    """The failure index against the records the failure queue received: every record's id
    (`records.record_id_of`, the entry's `_id`) has an entry, holding one of that id's records
    exactly; no entry says `queued` of an id that never reached the queue. Returns the entries
    left unsure (`publishing` with no record: a kill before the publish whose redelivery ended
    otherwise), which a reconcile deletes."""
    entries = {doc["_id"]: doc for doc in outcomes.users.database[f"{outcomes.users.name}.failures"].find(
        {}, {"state": 1, "stage": 1, "user_id": 1, "body": 1})}
    received: dict[str, list[dict[str, Any]]] = {}
    for record_id, record in zip(outcomes.record_ids, outcomes.failures, strict=True):
        received.setdefault(record_id, []).append(record)
    missing = [m for m in received if m not in entries]
    assert not missing, f"failure records without an index entry: {missing[:5]}"
    for record_id, records in received.items():
        entry = entries[record_id]
        assert json.loads(entry["body"]) in records, f"{record_id}: the entry holds no record that was published"
        assert entry["stage"] == records[0]["error"]["stage"] and entry["user_id"] == records[0]["user_id"]
    phantom = [i for i, e in entries.items() if i not in received and e["state"] == QUEUED]
    assert not phantom, f"entries queued without a record: {phantom[:5]}"
    return sum(1 for i, e in entries.items() if i not in received)
