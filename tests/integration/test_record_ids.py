"""Every failure record carries an id (its `x-record-id` header, and its AMQP message_id when the
inbound message had none to keep): the attempt key, or for a message no user could be read from
a digest of its body. Copies of one record (a crash window) share it; two records of different
messages never do (`test_shared_message_ids.py`: nor two users' messages under one message_id)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import Any

import pytest
from conftest import Stack
from harness import Broker, LegacySim, wait_until
from outcomes import INBOUND, Outcomes, good

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_records_of_messages_without_a_message_id_are_named_by_what_they_carry(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    stack.start("submitter")
    stack.start("poller")
    refused = {f"noid-{i}": json.dumps(good(f"noid-{i}", name="FAIL Maria")).encode() for i in range(20)}
    invalid = [b"{not json %d" % i for i in range(10)]
    expected: dict[str, str] = {}
    for user_id, body in refused.items():
        broker.publish(INBOUND, body)
        expected[f"{user_id}|sha256:{sha(body)}"] = "legacy"
    for body in invalid:
        broker.publish(INBOUND, body)
        expected[f"sha256:{sha(body)}"] = "validation"
    # Cut every connection while they are in flight: copies a cut leaves must share the id.
    wait_until(lambda: legacy.stats(summary=True)["submissions_total"] >= 5, timeout=30, what="work in flight")
    vhost = broker.url.rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: cut"],
                   check=True, capture_output=True, timeout=60)
    broker.reconnect()

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=len(expected), distinct=True)
    assert set(outcomes.record_id_from) == {"header"}
    stages: dict[str, set[str]] = {}
    for record_id, message_id, record in zip(outcomes.record_ids, outcomes.failure_ids, outcomes.failures,
                                             strict=True):
        assert message_id == record_id  # no inbound message_id to keep: the id is the message_id too
        stages.setdefault(record_id, set()).add(record["error"]["stage"])
    print(f"{len(outcomes.failures)} records, {len(stages)} ids, for {len(expected)} messages")
    assert set(stages) == set(expected)
    assert all(stages[record_id] == {stage} for record_id, stage in expected.items())
