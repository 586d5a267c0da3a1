"""The pipeline end to end: real broker, real Mongo wire protocol, real legacy-sim, real processes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from conftest import Stack
from harness import Broker, LegacySim, wait_until
from outcomes import INBOUND, PENDING, Outcomes, check_exact, good, mixed_load
from test_faults import metric

from regbridge.messages import PendingMessage
from regbridge.poll_schedule import adaptive_tiers
from regbridge.topology import wait_queue_name

pytestmark = pytest.mark.integration

def test_happy_path_registers_each_user_once(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    for i in range(3):
        broker.publish(INBOUND, good(f"u-{i}"), message_id=f"m-{i}")
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=3, failed=0)

    stats = legacy.stats()
    issued = {r["user_id"]: rid for rid, r in stats["requests"].items()}
    for i in range(3):
        doc = users.find_one({"_id": f"u-{i}"})
        assert doc["registration_status"] == "registered"
        assert doc["legacy_request_id"] == issued[f"u-{i}"]
        assert doc["registration_updated_at"].tzinfo is not None
        assert "registration_error" not in doc
        # Only the contract's fields are written.
        assert set(doc) == {"_id", "registration_status", "legacy_request_id", "registration_updated_at"}
    assert stats["submissions_by_user"] == {"u-0": 1, "u-1": 1, "u-2": 1}
    assert outcomes.failures == []
    assert submitter.terminate() == 0
    assert poller.terminate() == 0


def test_no_poll_before_the_first_delay(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # Completion takes 0.3-0.6 s; with the first poll held back 1 s, a poll that came too early
    # would see "processing" and cost a second poll. (On the default, adaptive, schedule: ten
    # registrations are too few to learn from, so this is its cold start.)
    stack.env["POLL_FIRST_DELAY_S"] = "1.0"
    stack.start("submitter")
    stack.start("poller")
    for i in range(10):
        broker.publish(INBOUND, good(f"early-{i}"))
    Outcomes(broker, users).wait(registered=10, failed=0)
    polls = legacy.stats()["polls_by_request"]
    assert len(polls) == 10 and set(polls.values()) == {1}, polls


def test_each_failure_stage(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, b"this is not json", message_id="bad-json")
    broker.publish(INBOUND, b'["an", "array"]')
    broker.publish(INBOUND, {"name": "no id", "email": "a@b.c", "cpf": "12345678909"})
    broker.publish(INBOUND, {**good("x"), "user_id": {"$gt": ""}})
    broker.publish(INBOUND, b"\xff\xfe not utf-8")
    broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="m-bad-cpf")
    broker.publish(INBOUND, good("legacy-no", name="FAIL Maria"))
    # An id the legacy system never issued: the status endpoint answers 404.
    lost = PendingMessage(request_id="ZZZZZZ-Z", user_id="lost", payload=good("lost"), attempt_key="k-lost",
                          submitted_at=time.time() - 5)
    broker.publish(PENDING, lost.encode())

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=8)
    stages = outcomes.by_stage()
    assert sorted((s, len(r)) for s, r in stages.items()) == [
        ("legacy", 1), ("poll", 1), ("submit", 1), ("validation", 5)]

    for record in outcomes.failures:
        assert set(record) == {"original", "user_id", "legacy_request_id", "error", "attempts", "failed_at"}
        assert set(record["error"]) == {"stage", "reason", "http_status"}
        assert record["error"]["reason"]
    validation = {json.dumps(r["original"]): r for r in stages["validation"]}
    assert validation['"this is not json"']["user_id"] is None
    assert json.dumps(["an", "array"]) in validation
    injected = [r for r in stages["validation"] if isinstance(r["original"], dict)
                and isinstance(r["original"].get("user_id"), dict)]
    assert len(injected) == 1 and injected[0]["user_id"] is None

    submit = stages["submit"][0]
    assert submit["user_id"] == "bad-cpf" and submit["error"]["http_status"] == 400
    assert submit["legacy_request_id"] is None and submit["original"]["cpf"] == "123"
    legacy_failure = stages["legacy"][0]
    assert legacy_failure["legacy_request_id"] and legacy_failure["error"]["reason"] == "rejected by the legacy system"
    assert stages["poll"][0]["error"]["http_status"] == 404
    assert stages["poll"][0]["legacy_request_id"] == "ZZZZZZ-Z"

    for uid, stage in (("bad-cpf", "submit"), ("legacy-no", "legacy"), ("lost", "poll")):
        doc = users.find_one({"_id": uid})
        assert doc["registration_status"] == "failed", doc
        assert doc["registration_error"]["stage"] == stage
    # The operator object never became a filter: nothing matched or was written for it.
    assert users.count_documents({}) == 3
    # Nothing invalid ever reached the legacy API.
    assert set(legacy.stats()["submissions_by_user"]) == {"legacy-no"}


def test_deadline_gives_a_timeout_failure(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    legacy.configure(latency_min_s=60, latency_max_s=60)
    stack.env["POLL_DEADLINE_S"] = "1.0"
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("slow"))
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=1)
    record = outcomes.failures[0]
    assert record["error"]["stage"] == "timeout"
    assert record["legacy_request_id"] and "still processing" in record["error"]["reason"]
    assert record["attempts"] >= 3  # one submission and at least two polls
    assert users.find_one({"_id": "slow"})["registration_status"] == "failed"


def test_transient_503s_are_retried_to_success(stack: Stack, broker: Broker, users: Any,
                                               legacy: LegacySim) -> None:
    legacy.configure(post_503_rate=0.4, get_503_rate=0.4)
    stack.env["SUBMIT_MAX_ATTEMPTS"] = "30"  # six 503s in a row are likely enough among 40 here
    stack.start("submitter")
    stack.start("poller")
    for i in range(40):
        broker.publish(INBOUND, good(f"busy-{i}"))
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=40, failed=0, timeout=90)
    stats = legacy.stats()
    assert stats["post_503_total"] > 0 and stats["get_503_total"] > 0
    assert set(stats["submissions_by_user"].values()) == {1}
    assert outcomes.failures == []


def test_legacy_down_past_the_budget_fails_at_submit(stack: Stack, broker: Broker, users: Any,
                                                     legacy: LegacySim) -> None:
    legacy.configure(down=True)
    stack.env["SUBMIT_MAX_ATTEMPTS"] = "3"
    stack.start("submitter")
    broker.publish(INBOUND, good("down"))
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=1)
    record = outcomes.failures[0]
    assert record["error"]["stage"] == "submit" and record["error"]["http_status"] == 503
    assert record["attempts"] == 3 and "gave up after 3 attempts" in record["error"]["reason"]


def test_a_registered_user_is_not_submitted_again(stack: Stack, broker: Broker, users: Any,
                                                  legacy: LegacySim) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("once"))
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=1, failed=0)
    first = users.find_one({"_id": "once"})
    broker.publish(INBOUND, good("once"), message_id="again")
    outcomes.quiet()
    assert legacy.stats()["submissions_by_user"] == {"once": 1}
    assert users.find_one({"_id": "once"}) == first
    assert outcomes.failures == []


def test_a_new_attempt_after_a_failure_can_register(stack: Stack, broker: Broker, users: Any,
                                                    legacy: LegacySim) -> None:
    stack.start("submitter")
    stack.start("poller")
    body = good("retry-me", name="FAIL then fixed")
    broker.publish(INBOUND, body, message_id="first")
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=1)
    failed_rid = users.find_one({"_id": "retry-me"})["legacy_request_id"]
    legacy.configure(fail_prefix="")
    # The failure record's original, republished under the same message_id with a timestamp:
    # a new attempt from the start, under an attempt key of its own.
    broker.publish(INBOUND, outcomes.failures[0]["original"], message_id="first", timestamp=int(time.time()))
    outcomes.wait(registered=1, failed=1)
    doc = users.find_one({"_id": "retry-me"})
    assert doc["registration_status"] == "registered"
    assert doc["legacy_request_id"] != failed_rid
    assert "registration_error" not in doc
    assert legacy.stats()["submissions_by_user"] == {"retry-me": 2}


def test_published_again_under_the_same_attempt_key_is_a_new_attempt(stack: Stack, broker: Broker, users: Any,
                                                                      legacy: LegacySim) -> None:
    # No timestamp and the same message_id: the same attempt key. legacy-sim still holds the first
    # POST's Idempotency-Key, but the new publish carries a mark of its own in it: a new
    # registration, retried from the start as the contract says.
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("same-key", name="FAIL then fixed"), message_id="first")
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=0, failed=1)
    legacy.configure(fail_prefix="")
    broker.publish(INBOUND, outcomes.failures[0]["original"], message_id="first")
    outcomes.wait(registered=1, failed=1)
    doc = users.find_one({"_id": "same-key"})
    assert doc["registration_status"] == "registered"
    assert doc["legacy_request_id"] != outcomes.failures[0]["legacy_request_id"]
    stats = legacy.stats()
    assert stats["submissions_by_user"] == {"same-key": 2}
    assert stats["idempotent_replays_total"] == 0


def test_a_copy_published_while_its_message_is_in_flight_is_not_submitted_again(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # What a publisher does when a confirm is lost (a cluster's node went down): the same message
    # again, same message_id. The first is submitted and still processing when the copy comes.
    legacy.configure(latency_min_s=3, latency_max_s=3)
    submitter = stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("copied"), message_id="sent-twice")
    wait_until(lambda: (users.find_one({"_id": "copied"}) or {}).get("registration_status") == "submitted",
               timeout=30, what="the first copy submitted")
    broker.publish(INBOUND, good("copied"), message_id="sent-twice")
    wait_until(lambda: metric(submitter, 'submitter_submissions_total{result="copy_in_flight"}') == 1,
               timeout=30, what="the copy taken for a copy")
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=1, failed=0)
    assert legacy.stats()["submissions_by_user"] == {"copied": 1}
    assert broker.depth(INBOUND) == 0


def test_hundreds_in_flight_each_get_their_exact_outcome(stack: Stack, broker: Broker, users: Any,
                                                         legacy: LegacySim) -> None:
    legacy.configure(post_503_rate=0.05, get_503_rate=0.05)
    stack.start("submitter")
    stack.start("poller")
    stack.start("poller")  # two copies share the pending queue
    expected = mixed_load(broker, 400, seed=7)
    assert check_exact(Outcomes(broker, users), expected) == 0
    submissions = legacy.stats()["submissions_by_user"]
    assert max(submissions.values()) == 1, "a registration was submitted twice"
    assert set(submissions) == {u for u, v in expected.items() if v not in ("submit", "validation")}
    # Nothing is left waiting anywhere (the adaptive schedule's ladder included).
    for delay in adaptive_tiers(0.3, 0.2):
        assert broker.depth(wait_queue_name(PENDING, delay)) == 0
