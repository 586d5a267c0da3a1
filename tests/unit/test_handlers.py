"""The handlers carried out by the executor, with in-memory fakes: no broker, no MongoDB, no HTTP, no sleep.

Each test reads the effects in the order the executor made them (`rig.log`)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from pika.spec import BasicProperties
from pymongo.errors import AutoReconnect, OperationFailure
from recursion_limit import low_recursion_limit

from poller.service import Poller
from regbridge.amqp import Delivery, PublishError
from regbridge.durable import Durable
from regbridge.executor import ERROR_PAUSE_S, ERRORS_HEADER, POISON_DELIVERIES, Executor, Handler, Job
from regbridge.failure_index import PUBLISHING, QUEUED, IndexEntry
from regbridge.lifecycle import (
    Accepted,
    Completed,
    LegacyFailed,
    NotFound,
    PollOutcome,
    Processing,
    Rejected,
    State,
    SubmitOutcome,
    Transient,
    may_record,
)
from regbridge.messages import TRUNCATED_ORIGINAL_CHARS, FailureError, FailureRecord, PendingMessage
from regbridge.plans import (
    RECORD_ID_HEADER,
    AttemptAccepted,
    AttemptFailed,
    Failure,
    Finish,
    Forward,
    Plan,
    RecordIndexed,
    Requeue,
    Retry,
    Subject,
    UserStatus,
    Write,
)
from regbridge.poll_schedule import LearnedSchedule, PollSchedule, adaptive_tiers
from regbridge.settings import poller_settings, submitter_settings
from regbridge.store import Attempt, UserState, WriteRefused
from regbridge.topology import wait_queue_name
from submitter.service import Submitter

INBOUND = "registrations"
PENDING = "registrations.pending"
# The submitter hands on straight into the wait queue of the first delay (10 s by default).
FIRST_HOP = "registrations.pending.wait.10000ms"
FAILED = "registrations.failed"
NOW = 1_800_000_000.0
REGISTRATION = {"user_id": "u-000123", "name": "Maria da Silva", "email": "maria@example.com", "cpf": "12345678909"}
BODY = json.dumps(REGISTRATION).encode()


# ---- fakes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    routing_key: str
    body: bytes
    properties: BasicProperties


class FakeBroker:
    """Records what a handler does; every publish is confirmed at once, unless told otherwise."""

    def __init__(self, log: list[str]) -> None:
        self.stopping = threading.Event()
        self.log = log
        self.published: list[Published] = []
        self.acks: list[int] = []
        self.nacks: list[tuple[int, bool]] = []
        self.handed_back: list[tuple[int, str]] = []  # after a publish it led to failed
        self.deferred: list[tuple[float, Callable[[], None]]] = []
        self.refuse: set[str] = set()  # routing keys whose publish fails
        self.stale: set[int] = set()  # delivery tags whose channel is gone

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        future: Future[None] = Future()
        if routing_key in self.refuse:
            self.log.append(f"publish-refused:{routing_key}")
            future.set_exception(PublishError("the broker refused the message (nack)"))
            return future
        self.published.append(Published(routing_key, body, properties))
        self.log.append(f"publish:{routing_key}")
        future.set_result(None)
        return future

    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None:
        future = self.publish(routing_key, body, properties)
        if future.exception() is None:
            self.ack(delivery)
        else:
            self.nack(delivery, requeue=True)

    def current(self, delivery: Delivery) -> bool:
        return delivery.delivery_tag not in self.stale

    def ack(self, delivery: Delivery) -> None:
        self.acks.append(delivery.delivery_tag)
        self.log.append(f"ack:{delivery.delivery_tag}")

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        self.nacks.append((delivery.delivery_tag, requeue))
        self.log.append(f"nack:{delivery.delivery_tag}")

    def hand_back(self, delivery: Delivery, queue: str, error: BaseException) -> None:
        """As the runtime does, past its pause for a refusal: the delivery goes back."""
        self.handed_back.append((delivery.delivery_tag, queue))
        self.nack(delivery, requeue=True)

    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None:
        self.deferred.append((delay_s, work))
        self.log.append(f"defer:{delivery.delivery_tag}")

    def on(self, routing_key: str) -> list[Published]:
        return [p for p in self.published if p.routing_key == routing_key]

    def run_deferred(self) -> float:
        """Run the oldest deferred work, as the runtime's timer would; returns its delay."""
        delay, work = self.deferred.pop(0)
        work()
        return delay


@dataclass
class UserDoc:
    status: str | None
    request_id: str | None
    error: dict[str, str] | None = None


class FakeStore:
    """The `regbridge.store.Store` protocol in dicts, with `may_record` guarding every status write."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.users: dict[str, UserDoc] = {}
        self.attempts: dict[str, Attempt] = {}
        self.attempt_users: dict[str, str | None] = {}
        self.attempt_errors: dict[str, FailureError] = {}
        self.refuse: set[type] = set()  # kinds of write the server refuses for good
        self.unreachable = False
        # The failure index: record id -> (state, entry), and each index write in order.
        self.index: dict[str, tuple[str, IndexEntry | None]] = {}
        self.index_tokens: dict[str, str] = {}
        self.index_log: list[str] = []
        self.index_error: Exception | None = None  # what every index write raises

    def _check(self) -> None:
        if self.unreachable:
            raise AutoReconnect("connection refused")

    def user(self, user_id: str) -> UserState:
        self._check()
        doc = self.users.get(user_id)
        return UserState(None, None) if doc is None else UserState(doc.status, doc.request_id)

    def attempt(self, key: str) -> Attempt | None:
        self._check()
        found = self.attempts.get(key)
        if found is None or found.error is not None:
            return found
        return Attempt(found.request_id, found.failed, self.attempt_errors.get(key))

    def reset_attempt(self, key: str, publish: str) -> None:
        self._check()
        self.attempts[key] = Attempt(None, False, publish=publish)
        self.log.append("attempt:reset")

    def apply(self, write: Write) -> bool:
        self._check()
        if type(write) in self.refuse:
            self.log.append(f"refused:{type(write).__name__}")
            raise WriteRefused("Document failed validation")
        if isinstance(write, AttemptAccepted):
            self.attempts[write.attempt_key] = Attempt(write.request_id, False)
            self.attempt_users[write.attempt_key] = write.user_id
            self.log.append(f"attempt:{write.request_id}")
            return self.apply(UserStatus(write.user_id, State.SUBMITTED, write.request_id))
        if isinstance(write, AttemptFailed):
            self.attempts[write.attempt_key] = Attempt(write.request_id, True)
            self.attempt_errors[write.attempt_key] = write.error
            self.attempt_users[write.attempt_key] = write.user_id
            self.log.append(f"attempt-failed:{write.request_id}")
            return True
        if isinstance(write, RecordIndexed):
            if self.index_error is not None:
                raise self.index_error
            self.index_log.append(f"{write.state}:{write.record_id}")
            if write.entry is not None:
                self.index[write.record_id] = (write.state, write.entry)
                self.index_tokens[write.record_id] = write.token
            elif (self.index.get(write.record_id, ("", None))[0] == PUBLISHING
                  and self.index_tokens.get(write.record_id) == write.token):
                self.index[write.record_id] = (write.state, self.index[write.record_id][1])
            return True
        return self._write(write)

    def _write(self, write: UserStatus) -> bool:
        doc = self.users.get(write.user_id)
        if doc is not None and not may_record(doc.status, doc.request_id, write.request_id):
            self.log.append(f"blocked:{write.status}")
            return False
        error = None if write.error is None else {"stage": write.error.stage, "reason": write.error.reason}
        self.users[write.user_id] = UserDoc(write.status.value, write.request_id, error)
        self.log.append(f"{write.status}:{write.request_id}")
        return True

    def ping(self) -> bool:
        return not self.unreachable


class FakeLegacy:
    """Answers with scripted lifecycle outcomes; an unscripted call fails the test."""

    def __init__(self, submits: Iterable[SubmitOutcome] = (), statuses: Iterable[PollOutcome] = ()) -> None:
        self.submit_outcomes = list(submits)
        self.status_outcomes = list(statuses)
        self.submitted: list[bytes] = []
        self.keys: list[str] = []  # the Idempotency-Key of each POST
        self.polled: list[str] = []

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        self.submitted.append(body)
        self.keys.append(idempotency_key)
        assert self.submit_outcomes, "unexpected POST to the legacy API"
        return self.submit_outcomes.pop(0)

    def status(self, request_id: str) -> PollOutcome:
        self.polled.append(request_id)
        assert self.status_outcomes, "unexpected status poll"
        return self.status_outcomes.pop(0)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def delivery(body: bytes, *, message_id: str | None = "m-1", redelivered: bool = False, tag: int = 1,
             queue: str = INBOUND, received_at: float = NOW - 0.5) -> Delivery:
    return Delivery(body, BasicProperties(message_id=message_id), redelivered, tag, queue, 1, received_at)


def failure_records(broker: FakeBroker) -> list[FailureRecord]:
    return [FailureRecord.decode(p.body) for p in broker.on(FAILED)]


def pending_messages(broker: FakeBroker) -> list[PendingMessage]:
    return [PendingMessage.decode(p.body) for p in broker.on(FIRST_HOP)]


def assert_persistent(published: Published, message_id: str | None) -> None:
    assert published.properties.delivery_mode == 2
    assert published.properties.message_id == message_id


# ---- the submitter ----------------------------------------------------------------------------


def executor(handler: Handler, broker: FakeBroker, store: FakeStore, clock: FakeClock) -> Executor:
    return Executor(handler, broker=broker, store=store, durable=Durable(broker.stopping, max_delay_s=0.0),
                    failed_queue=FAILED, clock=clock)


@dataclass
class SubmitterRig:
    submitter: Submitter
    executor: Executor
    broker: FakeBroker
    store: FakeStore
    legacy: FakeLegacy
    clock: FakeClock
    log: list[str]


def submitter_rig(*outcomes: SubmitOutcome, env: dict[str, str] | None = None) -> SubmitterRig:
    log: list[str] = []
    broker, store, legacy, clock = FakeBroker(log), FakeStore(log), FakeLegacy(submits=outcomes), FakeClock()
    # The fixed schedule's first hop (FIRST_HOP); the adaptive one's has its own test.
    settings = submitter_settings({"SUBMIT_MAX_ATTEMPTS": "3", "SUBMIT_BACKOFF_BASE_S": "1",
                                   "SUBMIT_BACKOFF_MAX_S": "8", "MAX_MESSAGE_BYTES": "4096",
                                   "POLL_SCHEDULE": "fixed", **(env or {})})
    submitter = Submitter(settings, store=store, legacy=legacy, durable=Durable(broker.stopping, max_delay_s=0.0),
                          clock=clock, rng=lambda: 0.5)
    return SubmitterRig(submitter, executor(submitter, broker, store, clock), broker, store, legacy, clock, log)


@pytest.mark.parametrize(
    ("body", "original"),
    [
        (b"not json at all", "not json at all"),
        (b'["u-1"]', ["u-1"]),
        (b'{"name": "Maria"}', {"name": "Maria"}),
        (b'{"user_id": {"$gt": ""}}', {"user_id": {"$gt": ""}}),
        (b'{"user_id": ""}', {"user_id": ""}),
    ],
)
def test_submitter_invalid_message_is_one_validation_failure(body: bytes, original: object) -> None:
    rig = submitter_rig()
    rig.executor.run(delivery(body, message_id="m-bad", tag=7))
    records = failure_records(rig.broker)
    assert len(records) == 1
    record = records[0]
    assert record.original == original
    assert record.user_id is None
    assert record.legacy_request_id is None
    assert record.error.stage == "validation"
    assert record.error.http_status is None
    assert record.attempts == 0
    assert record.failed_at == datetime.fromtimestamp(NOW, UTC)
    assert_persistent(rig.broker.on(FAILED)[0], "m-bad")
    assert rig.broker.acks == [7]
    assert rig.broker.nacks == []
    assert rig.legacy.submitted == []
    assert rig.store.users == {}
    assert rig.store.attempts == {}
    assert rig.log == ["publish:registrations.failed", "ack:7"]


def test_submitter_oversized_message_is_a_validation_failure() -> None:
    rig = submitter_rig()
    body = json.dumps({"user_id": "u-1", "pad": "x" * 10_000}).encode()
    rig.executor.run(delivery(body))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation"
    assert isinstance(record.original, str)
    assert rig.legacy.submitted == []
    assert rig.broker.acks == [1]


def test_submitter_already_registered_user_is_acked_without_a_post() -> None:
    rig = submitter_rig()
    rig.store.users["u-000123"] = UserDoc("registered", "OLD-1")
    rig.executor.run(delivery(BODY))
    assert rig.legacy.submitted == []
    assert rig.broker.published == []
    assert rig.broker.acks == [1]
    assert rig.store.users["u-000123"] == UserDoc("registered", "OLD-1")


def test_submitter_copy_of_a_message_in_flight_is_acked_without_a_post() -> None:
    """A publisher that lost a confirm sends the message again; the first copy's attempt is on
    record and the user `submitted` under its request id: the copy is acked, nothing else."""
    rig = submitter_rig(Accepted("SECOND-1"))
    rig.store.users["u-000123"] = UserDoc("submitted", "AB583C-X")
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("AB583C-X", False)
    rig.executor.run(delivery(BODY, message_id="m-1", tag=2))
    assert rig.legacy.submitted == []
    assert rig.broker.published == []
    assert rig.broker.acks == [2]
    assert rig.store.users["u-000123"] == UserDoc("submitted", "AB583C-X")
    assert rig.store.attempts == {"u-000123|mid:m-1": Attempt("AB583C-X", False)}


@pytest.mark.parametrize(
    ("attempt", "user_request_id"),
    [
        (None, "OTHER-1"),  # the user is in flight under another message
        (Attempt("AB583C-X", True), "AB583C-X"),  # this message's attempt failed: a new attempt
        (Attempt("AB583C-X", False), "LATER-1"),  # the user moved on to another attempt since
    ],
    ids=["another-message", "failed-attempt", "user-moved-on"],
)
def test_submitter_same_key_not_in_flight_is_a_new_attempt(attempt: Attempt | None, user_request_id: str) -> None:
    rig = submitter_rig(Accepted("NEW-1"))
    rig.store.users["u-000123"] = UserDoc("submitted", user_request_id)
    if attempt is not None:
        rig.store.attempts["u-000123|mid:m-1"] = attempt
    rig.executor.run(delivery(BODY, message_id="m-1", tag=2))
    assert rig.legacy.submitted == [BODY]
    assert [m.request_id for m in pending_messages(rig.broker)] == ["NEW-1"]
    assert rig.broker.acks == [2]


def test_submitter_accepted_records_then_hands_on_then_acks() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    rig.executor.run(delivery(BODY, message_id="m-1", tag=3, received_at=NOW - 2))
    assert rig.legacy.submitted == [BODY]  # the body as received, unchanged
    assert rig.store.attempts == {"u-000123|mid:m-1": Attempt("AB583C-X", False)}
    assert rig.store.users["u-000123"] == UserDoc("submitted", "AB583C-X")
    [published] = rig.broker.on(FIRST_HOP)
    assert_persistent(published, "m-1")
    assert PendingMessage.decode(published.body) == PendingMessage(
        request_id="AB583C-X", user_id="u-000123", payload=REGISTRATION, attempt_key="u-000123|mid:m-1",
        submitted_at=NOW, message_id="m-1", received_at=NOW - 2, submit_attempts=1, polls=0, waited_s=10.0,
    )
    assert rig.broker.acks == [3]
    assert rig.broker.on(FAILED) == []
    # Stored before published, published (confirmed) before acked.
    assert rig.log == ["attempt:AB583C-X", "submitted:AB583C-X", "publish:registrations.pending.wait.10000ms", "ack:3"]


def test_submitter_on_the_adaptive_schedule_hands_on_to_pending_unwaited() -> None:
    # Only the poller knows when the first poll is due: it sends the id on from pending.
    rig = submitter_rig(Accepted("AB583C-X"), env={"POLL_SCHEDULE": "adaptive"})
    rig.executor.run(delivery(BODY, message_id="m-1", tag=3, received_at=NOW - 2))
    assert rig.broker.on(FIRST_HOP) == []
    [published] = rig.broker.on(PENDING)
    msg = PendingMessage.decode(published.body)
    assert (msg.request_id, msg.polls, msg.waited_s) == ("AB583C-X", 0, 0.0)
    assert rig.log == ["attempt:AB583C-X", "submitted:AB583C-X", f"publish:{PENDING}", "ack:3"]


def test_submitter_without_message_id_keys_the_attempt_by_body_digest() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    rig.executor.run(delivery(BODY, message_id=None))
    key = "u-000123|sha256:" + hashlib.sha256(BODY).hexdigest()
    assert rig.legacy.keys == [key]
    assert rig.store.attempts == {key: Attempt("AB583C-X", False)}
    [published] = rig.broker.on(FIRST_HOP)
    assert published.properties.message_id is None
    [pending] = pending_messages(rig.broker)
    assert pending.attempt_key == key
    assert pending.message_id is None


def test_submitter_publish_failure_hands_the_message_back() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    rig.broker.refuse.add(FIRST_HOP)
    rig.executor.run(delivery(BODY, tag=4))
    assert rig.broker.nacks == [(4, True)]
    assert rig.broker.acks == []
    # The request id is on record, so the redelivery will not POST again.
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("AB583C-X", False)


def test_submitter_failure_record_publish_failure_hands_the_message_back() -> None:
    rig = submitter_rig(Rejected("rejected by the legacy API: bad cpf", 400))
    rig.broker.refuse.add(FAILED)
    rig.executor.run(delivery(BODY, tag=5))
    # Handed back the way a refused hop is (after the runtime's pause, never in a loop).
    assert rig.broker.handed_back == [(5, FAILED)]
    assert rig.broker.nacks == [(5, True)]
    assert rig.broker.acks == []
    # Nothing says "failed" while the failure record is not out.
    assert rig.store.users == {}
    assert rig.store.attempts == {}


def test_submitter_rejection_is_a_submit_failure() -> None:
    rig = submitter_rig(Rejected("rejected by the legacy API: cpf: must have 11 digits", 400))
    rig.executor.run(delivery(BODY, message_id="m-1", tag=6))
    [record] = failure_records(rig.broker)
    assert record.original == REGISTRATION
    assert record.user_id == "u-000123"
    assert record.legacy_request_id is None
    assert record.error == FailureError("submit", "rejected by the legacy API: cpf: must have 11 digits", 400)
    assert record.attempts == 1
    assert_persistent(rig.broker.on(FAILED)[0], "m-1")
    assert rig.store.users["u-000123"] == UserDoc(
        "failed", None, {"stage": "submit", "reason": "rejected by the legacy API: cpf: must have 11 digits"})
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt(None, True)
    assert rig.broker.on(FIRST_HOP) == []
    assert rig.broker.acks == [6]
    # The failure record is out before anything says "failed"; the ack comes last.
    assert rig.log == ["publish:registrations.failed", "attempt-failed:None", "failed:None", "ack:6"]


def test_submitter_busy_defers_then_the_retry_succeeds() -> None:
    rig = submitter_rig(Transient("legacy API busy: HTTP 503", 503), Accepted("AB583C-X"))
    rig.executor.run(delivery(BODY, tag=8))
    assert rig.broker.acks == [] and rig.broker.nacks == [] and rig.broker.published == []
    assert [delay for delay, _ in rig.broker.deferred] == [0.75]  # base 1 s, jitter 0.5 → [0.5, 1]
    rig.broker.run_deferred()
    assert len(rig.legacy.submitted) == 2
    # Both POSTs name the one attempt: an adapter that honours the key registers it once.
    assert rig.legacy.keys == ["u-000123|mid:m-1", "u-000123|mid:m-1"]
    [pending] = pending_messages(rig.broker)
    assert pending.request_id == "AB583C-X"
    assert pending.submit_attempts == 2
    assert rig.broker.acks == [8]
    assert rig.broker.deferred == []


def test_submitter_honours_retry_after() -> None:
    rig = submitter_rig(Transient("legacy API busy: HTTP 429", 429, 5.0))
    rig.executor.run(delivery(BODY))
    assert [delay for delay, _ in rig.broker.deferred] == [5.0]


def test_submitter_gives_up_when_the_budget_is_spent() -> None:
    busy = Transient("legacy API busy: HTTP 503", 503)
    rig = submitter_rig(busy, busy, busy)
    rig.executor.run(delivery(BODY, tag=9))
    delays = [rig.broker.run_deferred(), rig.broker.run_deferred()]
    assert delays == [0.75, 1.5]  # growing
    assert rig.broker.deferred == []
    assert len(rig.legacy.submitted) == 3
    [record] = failure_records(rig.broker)
    assert record.error == FailureError("submit", "gave up after 3 attempts: legacy API busy: HTTP 503", 503)
    assert record.attempts == 3
    assert record.user_id == "u-000123"
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt(None, True)
    assert rig.broker.acks == [9]


def test_submitter_call_held_back_by_the_breaker_spends_no_attempt() -> None:
    busy = Transient("legacy API busy: HTTP 503", 503)
    held = Transient("not sent: the circuit breaker is open", retry_after_s=2.5, sent=False)
    rig = submitter_rig(busy, held, held, busy, held, busy)
    rig.executor.run(delivery(BODY, tag=9))
    delays = [rig.broker.run_deferred() for _ in range(5)]
    # A held call waits as long as the breaker says, and the backoff goes on where it was.
    assert delays == [0.75, 2.5, 2.5, 1.5, 2.5]
    [record] = failure_records(rig.broker)
    assert record.error == FailureError("submit", "gave up after 3 attempts: legacy API busy: HTTP 503", 503)
    assert record.attempts == 3
    assert rig.broker.acks == [9]


def test_submitter_redelivered_with_a_request_id_on_record_is_not_submitted_again() -> None:
    rig = submitter_rig()
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("REQ-9", False)
    rig.store.users["u-000123"] = UserDoc("submitted", "REQ-9")
    rig.executor.run(delivery(BODY, message_id="m-1", redelivered=True, tag=10))
    assert rig.legacy.submitted == []
    [pending] = pending_messages(rig.broker)
    assert pending.request_id == "REQ-9"
    assert pending.attempt_key == "u-000123|mid:m-1"
    assert pending.message_id == "m-1"
    assert_persistent(rig.broker.on(FIRST_HOP)[0], "m-1")
    assert rig.store.users["u-000123"] == UserDoc("submitted", "REQ-9")
    assert rig.broker.acks == [10]


def test_submitter_redelivered_after_its_failure_was_recorded_is_only_acked() -> None:
    rig = submitter_rig()
    rig.store.attempts["u-000123|mid:m-1"] = Attempt(None, True)
    rig.store.users["u-000123"] = UserDoc("failed", None)
    rig.executor.run(delivery(BODY, redelivered=True, tag=11))
    assert rig.legacy.submitted == []
    assert rig.broker.published == []
    assert rig.broker.acks == [11]


def test_submitter_redelivered_without_an_attempt_on_record_is_submitted() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    rig.executor.run(delivery(BODY, redelivered=True))
    assert rig.legacy.submitted == [BODY]
    assert len(rig.broker.on(FIRST_HOP)) == 1


def test_submitter_new_message_after_a_failed_attempt_is_submitted_again() -> None:
    # A replay from the failure queue keeps its message_id, so it has the same attempt key.
    rig = submitter_rig(Accepted("NEW-1"))
    rig.store.attempts["u-000123|mid:m-1"] = Attempt(None, True)
    rig.store.users["u-000123"] = UserDoc("failed", None, {"stage": "submit", "reason": "x"})
    rig.executor.run(delivery(BODY, message_id="m-1", redelivered=False, tag=12))
    assert rig.legacy.submitted == [BODY]
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("NEW-1", False)
    assert rig.store.users["u-000123"] == UserDoc("submitted", "NEW-1")
    assert [p.request_id for p in pending_messages(rig.broker)] == ["NEW-1"]
    assert rig.broker.acks == [12]


def test_submitter_replay_redelivered_before_it_finished_is_not_dropped() -> None:
    # Contract §7.1: every inbound message ends in exactly one terminal outcome. A replay (same
    # message_id as an earlier, failed message) that is handed back mid-way (a 503 retry pending
    # at a restart, a lost connection) comes back redelivered. It must not be taken for the
    # earlier message whose failure record is already out.
    rig = submitter_rig(Transient("legacy API busy: HTTP 503", 503), Accepted("NEW-1"))
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("OLD-1", True)
    rig.store.users["u-000123"] = UserDoc("failed", "OLD-1")
    rig.executor.run(delivery(BODY, message_id="m-1", redelivered=False, tag=13))
    assert len(rig.broker.deferred) == 1
    rig.broker.deferred.clear()  # shutdown: the deferred retry is handed back to the broker
    rig.executor.run(delivery(BODY, message_id="m-1", redelivered=True, tag=14))
    assert len(rig.legacy.submitted) == 2
    assert [p.request_id for p in pending_messages(rig.broker)] == ["NEW-1"]
    assert rig.broker.acks == [14]


def test_submitter_user_failed_by_another_attempt_moves_to_submitted() -> None:
    rig = submitter_rig(Accepted("NEW-1"))
    rig.store.users["u-000123"] = UserDoc("failed", "OLD-1", {"stage": "legacy", "reason": "x"})
    rig.executor.run(delivery(BODY, message_id="m-2"))
    assert rig.store.users["u-000123"] == UserDoc("submitted", "NEW-1")


def test_submitter_hands_back_when_the_store_is_down_during_shutdown() -> None:
    rig = submitter_rig()
    rig.store.unreachable = True
    rig.broker.stopping.set()
    rig.executor.run(delivery(BODY, tag=15))
    assert rig.broker.nacks == [(15, True)]
    assert rig.broker.acks == []
    assert rig.legacy.submitted == []


# ---- the poller -------------------------------------------------------------------------------

SUBMITTED_AT = NOW - 100.0


@dataclass
class PollerRig:
    poller: Poller
    executor: Executor
    broker: FakeBroker
    store: FakeStore
    legacy: FakeLegacy
    clock: FakeClock
    log: list[str]


def poller_rig(*outcomes: PollOutcome, age: float = 15.0, env: dict[str, str] | None = None) -> PollerRig:
    log: list[str] = []
    clock = FakeClock(SUBMITTED_AT + age)
    broker, store, legacy = FakeBroker(log), FakeStore(log), FakeLegacy(statuses=outcomes)
    # The default schedule (adaptive) starts as the configured one: these tests hold for both.
    settings = poller_settings({"POLL_FIRST_DELAY_S": "10", "POLL_INTERVAL_S": "2", "POLL_DEADLINE_S": "300",
                                **(env or {})})
    poller = Poller(settings, legacy=legacy, clock=clock)
    # The submitter's state of affairs when a pending message exists.
    store.attempts["u-000123|mid:m-1"] = Attempt("AB583C-X", False)
    store.users["u-000123"] = UserDoc("submitted", "AB583C-X")
    return PollerRig(poller, executor(poller, broker, store, clock), broker, store, legacy, clock, log)


def fitted(rig: PollerRig) -> PollSchedule:
    """The poller's schedule once the fit under way, on the fit's own thread, has ended."""
    assert rig.poller.learning is not None
    rig.poller.learning.wait_for_fit(timeout=10)
    return rig.poller.schedule


def pending(*, polls: int = 0, request_id: str = "AB583C-X", submit_attempts: int = 1) -> PendingMessage:
    return PendingMessage(request_id=request_id, user_id="u-000123", payload=REGISTRATION,
                          attempt_key="u-000123|mid:m-1", submitted_at=SUBMITTED_AT, message_id="m-1",
                          received_at=SUBMITTED_AT - 1,
                          submit_attempts=submit_attempts, polls=polls)


def pending_delivery(msg: PendingMessage, *, tag: int = 1, redelivered: bool = False) -> Delivery:
    return delivery(msg.encode(), message_id=msg.message_id, tag=tag, queue=PENDING, redelivered=redelivered)


@pytest.mark.parametrize(("age", "tier"), [(0.0, 10.0), (3.0, 10.0), (7.5, 10.0), (8.5, 2.0), (9.99, 2.0)])
def test_poller_too_early_waits_without_polling(age: float, tier: float) -> None:
    rig = poller_rig(age=age)
    msg = pending(polls=0)
    rig.executor.run(pending_delivery(msg, tag=2))
    assert rig.legacy.polled == []
    queue = wait_queue_name(PENDING, tier)
    assert queue == f"{PENDING}.wait.{int(tier * 1000)}ms"
    [published] = rig.broker.published
    assert published.routing_key == queue
    # Not a poll: the count stays 0; the broker holds it for the tier.
    assert PendingMessage.decode(published.body) == msg.waited(tier)
    assert_persistent(published, "m-1")
    assert rig.broker.acks == [2]
    assert rig.log == [f"publish:{queue}", "ack:2"]


def test_poller_polls_once_the_first_delay_has_passed() -> None:
    rig = poller_rig(Processing(), age=10.0)
    rig.executor.run(pending_delivery(pending(polls=0)))
    assert rig.legacy.polled == ["AB583C-X"]


def test_poller_processing_waits_the_interval_with_one_more_poll_counted() -> None:
    rig = poller_rig(Processing(), age=12.0)
    rig.executor.run(pending_delivery(pending(polls=2), tag=3))
    [published] = rig.broker.published
    assert published.routing_key == wait_queue_name(PENDING, 2.0) == "registrations.pending.wait.2000ms"
    assert PendingMessage.decode(published.body) == replace(pending(polls=3), processing_age_s=12.0).waited(2.0)
    assert_persistent(published, "m-1")
    assert rig.broker.acks == [3]
    assert rig.log == ["publish:registrations.pending.wait.2000ms", "ack:3"]
    assert rig.store.users["u-000123"] == UserDoc("submitted", "AB583C-X")


def test_poller_declares_the_fixed_schedules_two_queues_or_the_adaptive_ladder() -> None:
    fixed = poller_rig(env={"POLL_SCHEDULE": "fixed"}).poller
    assert fixed.tiers() == (2.0, 10.0) and fixed.learning is None
    adaptive = poller_rig().poller
    assert adaptive.tiers() == adaptive_tiers(10.0, 2.0)
    assert adaptive.schedule is adaptive.policy  # the cold start: the configured schedule


def test_poller_learns_from_completions_then_polls_when_they_complete() -> None:
    rig = poller_rig(*[Completed()] * 20, age=3.0)
    # Each seen processing at 2 s and done at 3 s, the poller's first polls still at 10 s.
    for tag in range(20):
        msg = replace(pending(polls=1, request_id=f"R-{tag}"), processing_age_s=2.0)
        rig.executor.run(pending_delivery(msg, tag=tag))
    learned = fitted(rig)
    assert isinstance(learned, LearnedSchedule) and learned.observations == 20
    assert 3.0 * 0.99 <= learned.first_poll_s < 3.5  # never before the earliest completion seen
    rig.broker.published.clear()
    rig.clock.now = SUBMITTED_AT + 0.05  # a new id, straight from the submitter
    rig.executor.run(pending_delivery(pending(polls=0, request_id="R-NEW"), tag=99))
    [published] = rig.broker.published
    waited = PendingMessage.decode(published.body).waited_s
    assert 0 < waited <= learned.first_poll_s and waited in rig.poller.tiers()
    assert published.routing_key == wait_queue_name(PENDING, waited)


def test_poller_on_a_learned_schedule_polls_at_the_deadline_not_a_long_wait_after() -> None:
    rig = poller_rig(*[Completed()] * 20, Processing(), age=100.0)
    for tag in range(20):  # done between 60 and 100 s
        msg = replace(pending(polls=1, request_id=f"R-{tag}"), processing_age_s=60.0)
        rig.executor.run(pending_delivery(msg, tag=tag))
    assert isinstance(fitted(rig), LearnedSchedule)
    rig.broker.published.clear()
    rig.clock.now = SUBMITTED_AT + 299.0  # past the plan: its waits grow with the age, 0.4 of it
    rig.executor.run(pending_delivery(pending(polls=3, request_id="R-LATE"), tag=99))
    [published] = rig.broker.published
    waited = PendingMessage.decode(published.body).waited_s
    assert 1.0 <= waited <= 1.2  # the shortest tier that reaches 300 s


def test_poller_on_a_learned_schedule_survives_a_fit_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import poller.service

    def broken(*_args: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(poller.service, "fit", broken)
    rig = poller_rig(*[Completed()] * 21, age=3.0)
    for tag in range(21):
        rig.executor.run(pending_delivery(pending(polls=1, request_id=f"R-{tag}"), tag=tag))
    assert fitted(rig) is rig.poller.policy
    assert rig.broker.acks == list(range(21))


def test_poller_on_the_fixed_schedule_learns_nothing() -> None:
    rig = poller_rig(*[Completed()] * 25, age=3.0, env={"POLL_SCHEDULE": "fixed"})
    for tag in range(25):
        rig.executor.run(pending_delivery(pending(polls=1, request_id=f"R-{tag}"), tag=tag))
    assert rig.poller.schedule is rig.poller.policy


def test_poller_transient_before_the_deadline_waits_the_interval() -> None:
    rig = poller_rig(Transient("status endpoint busy: HTTP 503", 503), age=50.0)
    rig.executor.run(pending_delivery(pending(polls=1)))
    [published] = rig.broker.published
    assert published.routing_key == "registrations.pending.wait.2000ms"
    assert PendingMessage.decode(published.body).polls == 2
    assert rig.broker.on(FAILED) == []


def test_poller_poll_held_back_waits_the_interval_and_is_not_a_poll() -> None:
    rig = poller_rig(Transient("not sent: the circuit breaker is open", retry_after_s=3.0, sent=False), age=50.0)
    rig.executor.run(pending_delivery(pending(polls=1)))
    [published] = rig.broker.published
    assert published.routing_key == "registrations.pending.wait.2000ms"
    assert PendingMessage.decode(published.body).polls == 1


def test_poller_wait_publish_failure_hands_the_message_back() -> None:
    rig = poller_rig(Processing(), age=12.0)
    rig.broker.refuse.add("registrations.pending.wait.2000ms")
    rig.executor.run(pending_delivery(pending(polls=1), tag=4))
    assert rig.broker.nacks == [(4, True)]
    assert rig.broker.acks == []


def test_poller_completed_registers_then_acks() -> None:
    rig = poller_rig(Completed(), age=15.0)
    rig.executor.run(pending_delivery(pending(polls=1), tag=5))
    assert rig.store.users["u-000123"] == UserDoc("registered", "AB583C-X")
    assert rig.broker.published == []
    assert rig.broker.acks == [5]
    assert rig.log == ["registered:AB583C-X", "ack:5"]


def test_poller_completed_twice_registers_once_and_acks_both() -> None:
    rig = poller_rig(Completed(), Completed(), age=15.0)
    rig.executor.run(pending_delivery(pending(polls=1), tag=6))
    rig.executor.run(pending_delivery(pending(polls=1), tag=7, redelivered=True))
    assert rig.store.users["u-000123"] == UserDoc("registered", "AB583C-X")
    assert rig.broker.acks == [6, 7]
    assert rig.log.count("registered:AB583C-X") == 1


def test_poller_legacy_failure_is_one_failure_record_and_status_failed() -> None:
    rig = poller_rig(LegacyFailed("rejected by the legacy system"), age=17.0)
    rig.executor.run(pending_delivery(pending(polls=2, submit_attempts=2), tag=8))
    [record] = failure_records(rig.broker)
    assert record.original == REGISTRATION
    assert record.user_id == "u-000123"
    assert record.legacy_request_id == "AB583C-X"
    assert record.error == FailureError("legacy", "rejected by the legacy system", 200)
    assert record.attempts == 2 + 3  # submissions + polls, this one included
    assert record.failed_at == datetime.fromtimestamp(SUBMITTED_AT + 17.0, UTC)
    assert_persistent(rig.broker.on(FAILED)[0], "m-1")
    assert rig.store.users["u-000123"] == UserDoc(
        "failed", "AB583C-X", {"stage": "legacy", "reason": "rejected by the legacy system"})
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("AB583C-X", True)
    assert rig.broker.acks == [8]
    assert rig.log == ["publish:registrations.failed", "attempt-failed:AB583C-X", "failed:AB583C-X", "ack:8"]


def test_poller_same_pending_message_twice_after_a_failure_gives_one_record() -> None:
    rig = poller_rig(LegacyFailed("no"), LegacyFailed("no"), age=17.0)
    msg = pending(polls=1)
    rig.executor.run(pending_delivery(msg, tag=9))
    rig.executor.run(pending_delivery(msg, tag=10))  # a duplicate from at-least-once dead-lettering
    assert len(failure_records(rig.broker)) == 1
    assert rig.broker.acks == [9, 10]
    assert rig.store.users["u-000123"].status == "failed"


def test_poller_failure_of_a_new_attempt_is_recorded_again() -> None:
    rig = poller_rig(LegacyFailed("no"), age=17.0)
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("OLD-1", True)  # an earlier attempt of the same message failed
    rig.store.users["u-000123"] = UserDoc("submitted", "NEW-1")
    rig.executor.run(pending_delivery(pending(polls=1, request_id="NEW-1")))
    [record] = failure_records(rig.broker)
    assert record.legacy_request_id == "NEW-1"
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("NEW-1", True)
    assert rig.store.users["u-000123"].status == "failed"


def test_poller_failure_record_publish_failure_hands_back_and_records_nothing() -> None:
    rig = poller_rig(LegacyFailed("no"), age=17.0)
    rig.broker.refuse.add(FAILED)
    rig.executor.run(pending_delivery(pending(polls=1), tag=11))
    # Handed back the way a refused hop is (after the runtime's pause, never in a loop).
    assert rig.broker.handed_back == [(11, FAILED)]
    assert rig.broker.nacks == [(11, True)]
    assert rig.broker.acks == []
    assert rig.store.users["u-000123"] == UserDoc("submitted", "AB583C-X")
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("AB583C-X", False)


def test_poller_not_found_is_a_poll_failure() -> None:
    rig = poller_rig(NotFound("the status endpoint does not know this request id: unknown", 404), age=12.0)
    rig.executor.run(pending_delivery(pending(polls=0)))
    [record] = failure_records(rig.broker)
    assert record.error == FailureError("poll", "the status endpoint does not know this request id: unknown", 404)
    assert record.legacy_request_id == "AB583C-X"
    assert record.attempts == 2
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.broker.acks == [1]


@pytest.mark.parametrize("age", [300.0, 301.0, 5000.0])
def test_poller_past_the_deadline_times_out(age: float) -> None:
    rig = poller_rig(Processing(), age=age)
    rig.executor.run(pending_delivery(pending(polls=20)))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "timeout"
    assert record.error.http_status == 200
    assert "still processing" in record.error.reason
    assert record.legacy_request_id == "AB583C-X"
    assert rig.broker.on(PENDING) == []
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.store.users["u-000123"].error == {"stage": "timeout", "reason": record.error.reason}


def test_poller_completed_past_the_deadline_still_registers() -> None:
    rig = poller_rig(Completed(), age=400.0)
    rig.executor.run(pending_delivery(pending(polls=20)))
    assert rig.store.users["u-000123"].status == "registered"
    assert rig.broker.published == []


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"request_id": "AB583C-X"}'])
def test_poller_malformed_pending_message_is_a_validation_failure(body: bytes) -> None:
    rig = poller_rig(age=50.0)
    rig.executor.run(delivery(body, message_id="m-x", queue=PENDING, tag=12))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation"
    assert record.error.http_status is None
    assert record.user_id is None
    assert record.legacy_request_id is None
    assert record.attempts == 0
    assert record.original == (body.decode() if body.startswith(b"{n") else json.loads(body))
    assert_persistent(rig.broker.on(FAILED)[0], "m-x")
    assert rig.legacy.polled == []
    assert rig.broker.acks == [12]
    assert rig.store.users["u-000123"] == UserDoc("submitted", "AB583C-X")


def test_poller_malformed_pending_message_with_a_user_id_marks_the_user_failed() -> None:
    rig = poller_rig(age=50.0)
    data: dict[str, Any] = json.loads(pending().encode())
    data["polls"] = "many"
    rig.executor.run(delivery(json.dumps(data).encode(), queue=PENDING, tag=13))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation"
    assert record.user_id == "u-000123"
    assert record.original == REGISTRATION
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.broker.acks == [13]


def test_poller_hands_back_when_the_store_is_down_during_shutdown() -> None:
    rig = poller_rig(Completed(), age=15.0)
    rig.store.unreachable = True
    rig.broker.stopping.set()
    rig.executor.run(pending_delivery(pending(polls=1), tag=14))
    assert rig.broker.nacks == [(14, True)]
    assert rig.broker.acks == []


# ---- poison messages: an unexpected error, again and again ------------------------------------


def _with_deliveries(d: Delivery, count: int) -> Delivery:
    return Delivery(d.body, BasicProperties(message_id=d.properties.message_id, headers={"x-delivery-count": count}),
                    True, d.delivery_tag, d.queue, d.generation, d.received_at)


def test_submitter_unexpected_error_goes_back_until_the_limit_then_fails() -> None:
    rig = submitter_rig()

    def broken(user_id: str) -> UserState:
        raise OperationFailure("not authorized")

    rig.store.user = broken  # type: ignore[method-assign]
    rig.executor.run(_with_deliveries(delivery(BODY, tag=3), POISON_DELIVERIES - 2))
    # Not yet poison: after a pause, a copy with its error counted goes round, and the
    # delivery is acked on the copy's confirm.
    assert rig.broker.published == [] and rig.broker.acks == []
    assert rig.broker.run_deferred() == ERROR_PAUSE_S
    [copy] = rig.broker.on(INBOUND)
    assert copy.body == BODY and copy.properties.message_id == "m-1"
    assert copy.properties.headers == {ERRORS_HEADER: POISON_DELIVERIES - 1}
    assert rig.broker.acks == [3]

    rig.executor.run(_with_deliveries(delivery(BODY, tag=4), POISON_DELIVERIES - 1))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation" and record.user_id == "u-000123"
    assert f"in {POISON_DELIVERIES} deliveries" in record.error.reason and "OperationFailure" in record.error.reason
    assert rig.broker.acks == [3, 4]


def test_poller_unexpected_error_goes_back_until_the_limit_then_fails() -> None:
    rig = poller_rig(Completed())

    apply = rig.store.apply

    def broken(write: Write) -> bool:
        if isinstance(write, UserStatus) and write.status is State.REGISTERED:
            raise OperationFailure("not authorized", 13)
        return apply(write)

    rig.store.apply = broken  # type: ignore[method-assign]
    msg = pending(polls=1)
    rig.executor.run(_with_deliveries(pending_delivery(msg, tag=5), 0))
    rig.broker.run_deferred()
    assert [p.properties.headers for p in rig.broker.on(PENDING)] == [{ERRORS_HEADER: 1}]
    rig.legacy.status_outcomes.append(Completed())
    rig.executor.run(_with_deliveries(pending_delivery(msg, tag=6), POISON_DELIVERIES))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation" and record.legacy_request_id == "AB583C-X"
    assert rig.broker.acks == [5, 6]


# ---- hostile input: nothing the codecs cannot write gets past decode, nothing loops -------------

# The figure: an extra field nested 990 levels inside a valid registration.
DEEP_990 = BODY[:-1] + b', "x": ' + b"[" * 990 + b"]" * 990 + b"}"



@pytest.mark.parametrize("body", [DEEP_990, BODY[:-1] + b', "x": ' + b"[" * 100_000 + b"}",
                                  b'{"user_id": "victim", "name": "M", "user_id": "attacker"}'],
                         ids=["deep-990", "deep-100000", "duplicate-user_id"])
def test_submitter_hostile_body_is_one_validation_failure_without_a_post(body: bytes) -> None:
    rig = submitter_rig(Accepted("AB583C-X"), env={"MAX_MESSAGE_BYTES": "300000"})
    with low_recursion_limit(200):
        rig.executor.run(delivery(body, tag=41))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation" and record.user_id is None
    assert ("nested more than" in record.error.reason) != ("appears twice" in record.error.reason)
    assert isinstance(record.original, str) and body.decode().startswith(record.original[:100])
    assert rig.legacy.submitted == [] and rig.store.users == {} and rig.store.attempts == {}
    assert rig.broker.acks == [41] and rig.broker.nacks == [] and rig.broker.deferred == []


def test_poller_pending_message_nested_990_deep_is_one_validation_failure_without_a_poll() -> None:
    rig = poller_rig(Completed(), age=50.0)
    data = json.loads(pending(polls=1).encode())
    data["payload"] = "@"
    body = json.dumps(data).encode().replace(b'"@"', DEEP_990)
    with low_recursion_limit(200):
        rig.executor.run(delivery(body, queue=PENDING, tag=42))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation" and "nested more than" in record.error.reason
    assert rig.legacy.polled == [] and rig.broker.acks == [42]


class _Unwritable:
    """A value neither json nor repr can write: the worst a handler's subject could hold."""

    def __repr__(self) -> str:
        raise RecursionError("maximum recursion depth exceeded")


class _BrokenHandler:
    """Raises on every handling; its subject is given, or raises what it is given."""

    def __init__(self, subject: Subject | BaseException) -> None:
        self._subject = subject

    def handle(self, job: Job) -> Plan:
        raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")

    def subject(self, delivery: Delivery) -> Subject:
        if isinstance(self._subject, BaseException):
            raise self._subject
        return self._subject


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "subject",
    [Subject(_deep_list(100_000), "u-000123", "u-000123|mid:m-1", message_id="m-1"),
     Subject(_Unwritable(), "u-000123", "u-000123|mid:m-1", message_id="m-1"),
     RecursionError("maximum recursion depth exceeded"), ValueError("no subject")],
    ids=["deep-original", "unwritable-original", "subject-recursion", "subject-error"],
)
def test_the_poison_path_cannot_fail_the_way_the_handler_did(subject: Subject | BaseException) -> None:
    """A message whose handling keeps failing on its payload becomes one failure record at its
    last delivery, even when its subject cannot be read or its original cannot be written."""
    log: list[str] = []
    broker, store, clock = FakeBroker(log), FakeStore(log), FakeClock()
    run = executor(_BrokenHandler(subject), broker, store, clock)
    with low_recursion_limit(200):
        run.run(_with_deliveries(delivery(DEEP_990, tag=43), POISON_DELIVERIES - 1))
    [record] = failure_records(broker)
    assert record.error.stage == "validation" and f"in {POISON_DELIVERIES} deliveries" in record.error.reason
    assert isinstance(record.original, str) and len(record.original) <= TRUNCATED_ORIGINAL_CHARS + 50
    if isinstance(subject, BaseException):  # the raw text stands in, cut short
        assert DEEP_990.decode().startswith(record.original)
    else:
        assert record.user_id == "u-000123"
        assert store.attempts["u-000123|mid:m-1"].failed
    assert broker.acks == [43] and broker.nacks == [] and broker.deferred == []


def test_a_store_refusal_reason_loses_its_control_characters() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))

    def refuse(write: Write) -> bool:
        if isinstance(write, AttemptAccepted):
            raise WriteRefused("Document failed validation: \x1b[2J\x1b]52;c;cHduZWQ=\x07 \x9b31m \u202eevil\n")
        return FakeStore.apply(rig.store, write)

    rig.store.apply = refuse  # type: ignore[method-assign]
    rig.executor.run(delivery(BODY, tag=44))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "store"
    assert record.error.reason == "Document failed validation: [2J]52;c;cHduZWQ= 31m evil"


def test_submitter_redelivered_after_the_attempt_mark_but_before_the_status_finishes_it() -> None:
    """A crash between marking the attempt failed and writing the user's status: the redelivery
    writes the status from what the attempt kept, and acks; no second record, no POST."""
    rig = submitter_rig()
    rig.store.attempts["u-000123|mid:m-1"] = Attempt(None, True, FailureError("submit", "rejected", 400))
    rig.executor.run(delivery(BODY, tag=21, redelivered=True))
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.broker.acks == [21] and rig.broker.published == [] and rig.legacy.submitted == []


def test_poller_duplicate_after_the_attempt_mark_finishes_the_status() -> None:
    rig = poller_rig(LegacyFailed("rejected by the legacy system"))
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("AB583C-X", True, FailureError("legacy", "rejected", 200))
    rig.executor.run(pending_delivery(pending(polls=1), tag=22))
    assert rig.store.users["u-000123"].status == "failed"
    assert rig.broker.acks == [22] and failure_records(rig.broker) == []


# ---- writes MongoDB refuses for good -----------------------------------------------------------


def test_submitter_accepted_but_the_user_write_refused_is_one_store_failure() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    rig.store.refuse.add(AttemptAccepted)
    rig.executor.run(delivery(BODY, tag=31))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "store" and "Document failed validation" in record.error.reason
    assert record.legacy_request_id == "AB583C-X"
    assert rig.broker.on(FIRST_HOP) == []
    assert rig.broker.acks == [31] and rig.broker.nacks == []
    assert rig.log == ["refused:AttemptAccepted", "publish:registrations.failed", "attempt-failed:AB583C-X",
                       "failed:AB583C-X", "ack:31"]


def test_poller_completed_but_registered_refused_is_one_store_failure_and_no_loop() -> None:
    rig = poller_rig(Completed(), Completed(), age=15.0)
    rig.store.refuse.add(UserStatus)
    msg = pending(polls=1)
    rig.executor.run(pending_delivery(msg, tag=32))
    rig.executor.run(pending_delivery(msg, tag=33, redelivered=True))  # a duplicate pending message
    [record] = failure_records(rig.broker)
    assert record.error.stage == "store" and record.legacy_request_id == "AB583C-X"
    assert rig.store.attempts["u-000123|mid:m-1"] == Attempt("AB583C-X", True)
    assert rig.broker.acks == [32, 33] and rig.broker.nacks == []


def test_a_failure_whose_status_write_is_refused_is_still_acked_once() -> None:
    rig = poller_rig(LegacyFailed("rejected by the legacy system"), age=17.0)
    rig.store.refuse.add(UserStatus)
    rig.executor.run(pending_delivery(pending(polls=1), tag=34))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "legacy"
    assert rig.broker.acks == [34]


# ---- the failure queue's index -------------------------------------------------------------------

RID = "u-000123|mid:m-1"  # the record's id: its attempt key


class WatchedBroker(FakeBroker):
    """Notes the failure index's state of the record at its publish and at the ack."""

    def __init__(self, log: list[str], store: FakeStore) -> None:
        super().__init__(log)
        self.store = store
        self.seen: list[str] = []

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        if routing_key == FAILED:
            record_id = str((properties.headers or {}).get(RECORD_ID_HEADER))
            self.seen.append(f"publish:{self.store.index.get(record_id, ('none', None))[0]}")
        return super().publish(routing_key, body, properties)

    def ack(self, delivery: Delivery) -> None:
        self.seen.append("ack:" + ",".join(state for state, _ in self.store.index.values()))
        super().ack(delivery)


def watched_poller_rig(*outcomes: PollOutcome) -> tuple[PollerRig, WatchedBroker]:
    rig = poller_rig(*outcomes, age=17.0)
    broker = WatchedBroker(rig.log, rig.store)
    rig.executor = executor(rig.poller, broker, rig.store, rig.clock)
    rig.broker = broker
    return rig, broker


def test_a_failure_record_has_its_entry_publishing_before_it_is_out_and_queued_before_the_ack() -> None:
    rig, broker = watched_poller_rig(LegacyFailed("rejected by the legacy system"))
    rig.executor.run(pending_delivery(pending(polls=2), tag=41))
    assert broker.seen == [f"publish:{PUBLISHING}", f"ack:{QUEUED}"]
    assert rig.store.index_log == [f"publishing:{RID}", f"queued:{RID}"]
    _, entry = rig.store.index[RID]
    [published] = broker.on(FAILED)
    assert entry is not None and entry.body.encode() == published.body  # the record exactly as published
    assert (entry.record_id, entry.stage, entry.reason, entry.user_id, entry.legacy_request_id) == (
        RID, "legacy", "rejected by the legacy system", "u-000123", "AB583C-X")
    # The inbound message_id stays the record's (the contract); its id travels in a header.
    assert published.properties.message_id == "m-1" and published.properties.headers == {RECORD_ID_HEADER: RID}
    assert entry.failed_at == FailureRecord.decode(published.body).failed_at


def test_a_record_without_a_confirm_leaves_its_entry_publishing_and_goes_back() -> None:
    rig, broker = watched_poller_rig(LegacyFailed("no"))
    broker.refuse.add(FAILED)
    rig.executor.run(pending_delivery(pending(polls=1), tag=42))
    assert broker.handed_back == [(42, FAILED)]
    assert rig.store.index[RID][0] == PUBLISHING  # a reader shows it unconfirmed; the redelivery settles it


def test_an_index_entry_refused_for_good_does_not_hold_the_record_back() -> None:
    rig, broker = watched_poller_rig(LegacyFailed("no"))
    rig.store.refuse.add(RecordIndexed)
    rig.executor.run(pending_delivery(pending(polls=1), tag=43))
    assert len(failure_records(broker)) == 1 and broker.acks == [43]
    assert rig.store.index == {}


def test_a_duplicate_after_the_mark_leaves_the_entry_as_it_is() -> None:
    """A crash after the record's confirm, before its entry said so: the duplicate delivery that
    finds the attempt marked publishes nothing and writes no entry (it cannot tell the entry it
    finds from one a newer attempt is publishing): the entry stays unsure until a reconcile."""
    rig, broker = watched_poller_rig(LegacyFailed("no"))
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("AB583C-X", True, FailureError("legacy", "no", 200))
    entry = IndexEntry(RID, "legacy", "no", "u-000123", "AB583C-X", datetime.fromtimestamp(NOW, UTC), "{}")
    rig.store.index[RID] = (PUBLISHING, entry)
    rig.executor.run(pending_delivery(pending(polls=1), tag=44))
    assert broker.on(FAILED) == [] and broker.acks == [44]
    assert rig.store.index[RID] == (PUBLISHING, entry) and rig.store.index_log == []


def test_the_entry_is_confirmed_only_if_it_is_still_the_one_written_before_the_publish() -> None:
    """A reader (the CLI's `leaving`) or another attempt that rewrote the entry after the
    publish keeps it: the move to `queued` names the publishing write's token."""
    rig, broker = watched_poller_rig(LegacyFailed("no"))
    original_publish = broker.publish

    def publish_then_a_reader_marks_it(routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        future = original_publish(routing_key, body, properties)
        if routing_key == FAILED:
            _, entry = rig.store.index[RID]
            rig.store.index[RID] = ("leaving", entry)
            rig.store.index_tokens[RID] = "the CLI's"
        return future

    broker.publish = publish_then_a_reader_marks_it  # type: ignore[method-assign]
    rig.executor.run(pending_delivery(pending(polls=1), tag=46))
    assert broker.acks == [46] and rig.store.index[RID][0] == "leaving"


@pytest.mark.parametrize("error", [OperationFailure("Index already exists with a different name", 85),
                                   RuntimeError("anything else")])
def test_an_index_entry_that_cannot_be_written_does_not_hold_the_record_back(error: Exception) -> None:
    rig, broker = watched_poller_rig(LegacyFailed("rejected by the legacy system"))
    rig.store.index_error = error
    rig.executor.run(pending_delivery(pending(polls=1), tag=47))
    [record] = failure_records(broker)
    assert record.error.stage == "legacy" and broker.acks == [47] and broker.nacks == []
    assert rig.store.users["u-000123"].status == "failed"


def test_a_failure_without_a_message_id_is_indexed_under_its_record_id() -> None:
    rig = submitter_rig()
    rig.executor.run(delivery(b"not json at all", message_id=None, tag=45))
    [published] = rig.broker.on(FAILED)
    record_id = "sha256:" + hashlib.sha256(b"not json at all").hexdigest()
    # Without an inbound message_id to keep, the record's message_id is its id as well.
    assert published.properties.message_id == record_id
    assert published.properties.headers == {RECORD_ID_HEADER: record_id}
    assert list(rig.store.index) == [record_id] and rig.store.index[record_id][0] == QUEUED


# ---- the handlers' plans, without an executor ---------------------------------------------------


def test_the_submitter_plans_a_forward_with_the_request_id_written_first() -> None:
    rig = submitter_rig(Accepted("AB583C-X"))
    plan = rig.submitter.handle(Job(delivery(BODY, tag=35)))
    assert isinstance(plan, Forward)
    assert plan.queue == FIRST_HOP
    assert plan.writes == (AttemptAccepted("u-000123|mid:m-1", "u-000123", "AB583C-X"),)
    assert PendingMessage.decode(plan.body).request_id == "AB583C-X"
    assert rig.broker.log == []  # a handler touches no broker


def test_the_submitter_plans_a_retry_for_a_busy_api() -> None:
    rig = submitter_rig(Transient("legacy API busy: HTTP 503", 503))
    assert rig.submitter.handle(Job(delivery(BODY))) == Retry(0.75, 2)


def test_the_submitter_plans_a_retry_at_the_same_attempt_for_a_call_held_back() -> None:
    rig = submitter_rig(Transient("not sent: the rate cap", retry_after_s=0.2, sent=False))
    assert rig.submitter.handle(Job(delivery(BODY), attempt=2)) == Retry(0.2, 2)


def test_the_submitter_plans_a_requeue_when_the_channel_is_gone_before_the_post() -> None:
    rig = submitter_rig()
    assert rig.submitter.handle(Job(delivery(BODY), current=lambda: False)) == Requeue()
    assert rig.legacy.submitted == []


def test_the_poller_plans_finish_wait_and_failure() -> None:
    rig = poller_rig(Completed(), Processing(), NotFound("unknown", 404), age=15.0)
    finish = rig.poller.handle(Job(pending_delivery(pending(polls=1))))
    assert isinstance(finish, Finish) and finish.registered
    assert finish.writes == (UserStatus("u-000123", State.REGISTERED, "AB583C-X"),)
    wait = rig.poller.handle(Job(pending_delivery(pending(polls=1))))
    assert isinstance(wait, Forward) and wait.queue == "registrations.pending.wait.2000ms" and wait.writes == ()
    failure = rig.poller.handle(Job(pending_delivery(pending(polls=1))))
    assert isinstance(failure, Failure) and failure.error == FailureError("poll", "unknown", 404)
    assert failure.subject.attempt_key == "u-000123|mid:m-1" and failure.subject.request_id == "AB583C-X"


def test_a_copy_sent_round_after_an_error_is_not_taken_for_a_new_attempt() -> None:
    """On a broker that does not count requeues, the executor's own count still ends the loop,
    and the copy resumes with the request id on record instead of POSTing again."""
    rig = submitter_rig()
    rig.store.attempts["u-000123|mid:m-1"] = Attempt("REQ-9", False)
    rig.store.users["u-000123"] = UserDoc("submitted", "REQ-9")
    copy = Delivery(BODY, BasicProperties(message_id="m-1", headers={ERRORS_HEADER: 3}), False, 40, INBOUND, 1, NOW)
    rig.executor.run(copy)
    assert rig.legacy.submitted == []
    assert [p.request_id for p in pending_messages(rig.broker)] == ["REQ-9"]


def test_the_own_error_count_makes_a_message_poison_without_x_delivery_count() -> None:
    rig = submitter_rig()

    def broken(user_id: str) -> UserState:
        raise OperationFailure("not authorized")

    rig.store.user = broken  # type: ignore[method-assign]
    headers = {ERRORS_HEADER: POISON_DELIVERIES - 1}
    rig.executor.run(Delivery(BODY, BasicProperties(message_id="m-1", headers=headers), False, 41, INBOUND, 1, NOW))
    [record] = failure_records(rig.broker)
    assert record.error.stage == "validation"
    assert rig.broker.acks == [41] and rig.broker.deferred == []


# ---- clocks that disagree between hosts ---------------------------------------------------------


@pytest.mark.parametrize("skew", [-2.0, -0.5, 0.0, 0.5, 2.0])
def test_a_skewed_clock_adds_no_wait_hop(skew: float) -> None:
    """The poller's clock `skew` seconds off the submitter's: a registration back from the first
    wait queue (10 s, served by the broker) is polled at once, whichever way the clocks differ."""
    rig = poller_rig(Processing(), age=10.0 + skew)
    rig.executor.run(pending_delivery(pending(polls=0).waited(10.0)))
    assert rig.legacy.polled == ["AB583C-X"]
    [published] = rig.broker.published
    assert published.routing_key == "registrations.pending.wait.2000ms"


@pytest.mark.parametrize("skew", [-2.0, 2.0])
def test_a_skewed_clock_moves_the_deadline_by_no_more_than_the_skew(skew: float) -> None:
    real_age = 300.0 - 2.5  # 2.5 s before the deadline: no skew of up to 2 s may end it
    rig = poller_rig(Processing(), age=real_age + skew)
    rig.executor.run(pending_delivery(pending(polls=20).waited(real_age - 5)))
    assert failure_records(rig.broker) == []
    late = poller_rig(Processing(), age=300.0 + 2.5 + skew)
    late.executor.run(pending_delivery(pending(polls=20).waited(290.0)))
    assert [r.error.stage for r in failure_records(late.broker)] == ["timeout"]
