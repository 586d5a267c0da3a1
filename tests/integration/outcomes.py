"""Accounting for every message: what the pipeline produced, and what each message should end as."""

from __future__ import annotations

import json
import random
from typing import Any

from harness import Broker, wait_until

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

    def collect(self) -> None:
        self.failures += [json.loads(body) for _, body in self.broker.drain(FAILED)]

    def registered(self) -> set[str]:
        return {d["_id"] for d in self.users.find({"registration_status": "registered"}, {"_id": 1})}

    def wait(self, *, registered: int, failed: int, timeout: float = 60) -> None:
        def done() -> bool:
            self.collect()
            return len(self.registered()) >= registered and len(self.failures) >= failed

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
        wait_until(lambda: self.broker.in_pipeline(exclude=FAILED) == 0, timeout=60, what="the pipeline to drain",
                   every=0.3)
        self.collect()

    def by_stage(self) -> dict[str, list[dict[str, Any]]]:
        stages: dict[str, list[dict[str, Any]]] = {}
        for record in self.failures:
            stages.setdefault(record["error"]["stage"], []).append(record)
        return stages


def mixed_load(broker: Broker, n: int, *, seed: int, prefix: str = "load") -> tuple[dict[str, str], int]:
    """Publish `n` messages: mostly good, some the legacy refuses, some invalid for the legacy API,
    some invalid messages. Returns the expected outcome per user id and the number of invalid ones."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}
    invalid = 0
    for i in range(n):
        kind = rng.choices(["ok", "legacy", "submit", "invalid"], weights=[80, 8, 6, 6])[0]
        uid = f"{prefix}-{i}"
        if kind == "ok":
            broker.publish(INBOUND, good(uid), message_id=uid)
            expected[uid] = "registered"
        elif kind == "legacy":
            broker.publish(INBOUND, good(uid, name="FAIL x"), message_id=uid)
            expected[uid] = "legacy"
        elif kind == "submit":
            broker.publish(INBOUND, good(uid, email="no-at-sign"), message_id=uid)
            expected[uid] = "submit"
        else:
            broker.publish(INBOUND, b"{not json", message_id=uid)
            invalid += 1
    return expected, invalid


def check_exact(outcomes: Outcomes, expected: dict[str, str], invalid: int, *, timeout: float = 120) -> None:
    """Wait for every message's outcome; then each user has exactly its expected one, and no
    failure record is extra."""
    want_registered = sum(1 for v in expected.values() if v == "registered")
    outcomes.wait(registered=want_registered, failed=len(expected) - want_registered + invalid, timeout=timeout)
    got: dict[str, str] = {uid: "registered" for uid in outcomes.registered()}
    for record in outcomes.failures:
        if record["user_id"] is not None:
            assert record["user_id"] not in got, f"two outcomes for {record['user_id']}: {record}"
            got[record["user_id"]] = record["error"]["stage"]
    assert got == expected
    assert len(outcomes.by_stage().get("validation", [])) == invalid
    assert len(outcomes.failures) == len(expected) - want_registered + invalid
    for uid, outcome in expected.items():
        doc = outcomes.users.find_one({"_id": uid})
        if outcome == "registered":
            assert doc["registration_status"] == "registered"
        else:
            assert doc["registration_status"] == "failed" and doc["registration_error"]["stage"] == outcome
