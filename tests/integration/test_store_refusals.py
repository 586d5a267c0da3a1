"""Writes MongoDB refuses for good, on the real wire: a schema validator on the users collection
refuses some documents. Each such registration becomes exactly one failure record of stage
`store` with the server's reason, its message is acked, and nothing loops."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Stack
from harness import Broker, LegacySim, wait_until
from outcomes import INBOUND, PENDING, Outcomes, good

pytestmark = pytest.mark.integration

# Two users the collection refuses at one step each: `refuse-submit` may only ever be `failed`,
# `refuse-register` never `registered`. Everyone else is free.
VALIDATOR = {"$or": [
    {"_id": {"$nin": ["refuse-submit", "refuse-register"]}},
    {"_id": "refuse-submit", "registration_status": "failed"},
    {"_id": "refuse-register", "registration_status": {"$in": ["submitted", "failed"]}},
]}


def test_a_refused_write_is_one_store_failure_and_never_loops(stack: Stack, broker: Broker, users: Any,
                                                              legacy: LegacySim) -> None:
    users.database.create_collection(users.name, validator=VALIDATOR)
    stack.start("submitter")
    stack.start("poller")
    for user in ("free", "refuse-submit", "refuse-register"):
        broker.publish(INBOUND, good(user), message_id=f"m-{user}")

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=1, failed=2)
    wait_until(lambda: broker.in_pipeline(exclude="registrations.failed") == 0, timeout=30,
               what="nothing left in the pipeline")
    outcomes.collect()

    by_user = {record["user_id"]: record for record in outcomes.failures}
    assert sorted(by_user) == ["refuse-register", "refuse-submit"] and len(outcomes.failures) == 2
    issued = {r["user_id"]: rid for rid, r in legacy.stats()["requests"].items()}
    for user, record in by_user.items():
        assert record["error"]["stage"] == "store"
        assert "Document failed validation" in record["error"]["reason"]
        assert record["legacy_request_id"] == issued[user]  # the legacy API took it; MongoDB did not
    assert users.find_one({"_id": "free"})["registration_status"] == "registered"
    # Each user's status says what happened, as far as the validator lets it.
    refused_submit = users.find_one({"_id": "refuse-submit"})
    assert refused_submit["registration_status"] == "failed"
    assert refused_submit["registration_error"]["stage"] == "store"
    assert users.find_one({"_id": "refuse-register"})["registration_status"] == "failed"
    # Exactly one POST each: nothing went round again.
    assert legacy.stats()["submissions_by_user"] == {"free": 1, "refuse-submit": 1, "refuse-register": 1}
    assert broker.depth(INBOUND) == 0 and broker.depth(PENDING) == 0
