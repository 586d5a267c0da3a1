"""The one place that turns a plan into effects, in the one order the guarantees need.

    Forward   writes → publish (confirmed) → ack      the request id is on record before the hand-on
    Finish    writes → ack                            the outcome is stored before the ack
    Failure   index entry `publishing` → record (confirmed) → attempt's mark → user's status
              → index entry `queued` → ack
    Retry     the delivery stays unacked; the handler runs again after the delay
    Requeue   nack with requeue

Each delivery is settled once: acked or nacked here, or, when its channel is gone first,
handed back by the broker itself. Nothing is acked before what it led to is durable: a write
is waited out through an outage, a publish waits for the broker's confirm, and anything short
of that hands the delivery back.

A Failure publishes no record for an attempt whose mark says its record is out already: it
only finishes the user's status. The one window left is a crash between a record's confirm
and its attempt's mark (see docs/guarantees.md).

The failure queue's index (`regbridge.failure_index`) has an entry for the record before the
record can be on the queue, so that a reader of the index never misses one; the entry says
`queued` once the broker has confirmed the record (a move of that very entry: one a reader
changed meanwhile is left as it is). An entry that cannot be written (refused for good, any
error but an outage) does not hold the record back: it is logged and counted, and
`registrations failed reconcile` adds it.

A write that MongoDB refuses for good (a schema validator, a document too large) turns a
Forward or a Finish into a `store` Failure, so that nothing loops on it. Within a Failure it
is logged and counted: the record on the failure queue is out, and it is what counts.

A handler that raises an unexpected error sends the message round again after a pause, as a
copy that carries its count of errors (ERRORS_HEADER); on its POISON_DELIVERIES-th failed
handling it becomes a `validation` Failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pika.spec import BasicProperties

from regbridge.amqp import Delivery
from regbridge.durable import Durable, HandBack
from regbridge.failure_index import PUBLISHING, QUEUED, IndexEntry, new_token
from regbridge.lifecycle import Stage, clean_text
from regbridge.messages import TRUNCATED_ORIGINAL_CHARS, FailureError, FailureRecord
from regbridge.plans import (
    RECORD_ID_HEADER,
    Failure,
    Finish,
    Forward,
    Plan,
    RecordIndexed,
    Requeue,
    Retry,
    Subject,
    Write,
    failure_writes,
)
from regbridge.store import Store, WriteRefused

log = logging.getLogger(__name__)

# A message whose handling raised an unexpected error this many times becomes a failure record
# instead of going round for ever.
POISON_DELIVERIES = 10
# How long a message whose handling raised waits before it goes round again: never a tight loop.
ERROR_PAUSE_S = 2.0
# The executor's own count of a message's failed handlings, carried on the copy it hands back.
# `x-delivery-count` alone cannot be trusted for this: some RabbitMQ versions do not raise it on
# a requeue, and on others every requeue counts against a delivery limit.
ERRORS_HEADER = "x-regbridge-errors"
# Headers the broker sets on a delivery; a copy published anew must not carry them.
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-exchange", "x-first-death-queue",
                   "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


class Broker(Protocol):
    """The part of the AMQP runtime the executor uses; unit tests pass a fake."""

    stopping: threading.Event

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]: ...
    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None: ...
    def current(self, delivery: Delivery) -> bool: ...
    def ack(self, delivery: Delivery) -> None: ...
    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None: ...
    def hand_back(self, delivery: Delivery, queue: str, error: BaseException) -> None: ...
    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class Job:
    """One run of a handler: the delivery, the submit attempt a retry resumes at, and whether
    the delivery's channel still stands (a POST for a delivery that the broker hands out again
    is better left to that delivery)."""

    delivery: Delivery
    attempt: int = 1
    current: Callable[[], bool] = lambda: True
    resumed: bool = False  # a Retry's run: the handler's reads before its call are done

    @property
    def redelivered(self) -> bool:
        """Whether this message was taken before: redelivered by the broker, or a copy this
        service sent round again after an error."""
        return self.delivery.redelivered or ERRORS_HEADER in (self.delivery.properties.headers or {})


class Handler(Protocol):
    def handle(self, job: Job) -> Plan:
        """Reads, at most one legacy call, and the plan; raises `HandBack` when it must stop."""
        ...

    def subject(self, delivery: Delivery) -> Subject:
        """What a failure record of `delivery` says, read from its body alone."""
        ...


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Observer:
    """Metrics at the edge: told of each outcome once its ack is on its way."""

    finished: Callable[[Finish | Failure], None] = _nothing
    store_refused: Callable[[], None] = _nothing


def persistent(message_id: str | None, headers: dict[str, str] | None = None) -> BasicProperties:
    return BasicProperties(delivery_mode=2, content_type="application/json", message_id=message_id, headers=headers)


def errors_before(delivery: Delivery) -> int:
    """How many times handling this message raised before, by the broker's count or ours."""
    headers = delivery.properties.headers or {}
    counts = [headers.get("x-delivery-count"), headers.get(ERRORS_HEADER)]
    found = [c for c in counts if isinstance(c, int) and not isinstance(c, bool)]
    if found:
        return max(found)
    return 1 if delivery.redelivered else 0


def poison_reason(delivery: Delivery, exc: Exception) -> str | None:
    """A failure reason once `delivery` has failed too often, else None: hand it back again."""
    count = errors_before(delivery)
    if count + 1 < POISON_DELIVERIES:
        return None
    return f"could not be processed in {count + 1} deliveries (last error: {type(exc).__name__})"


def counted_copy(delivery: Delivery) -> BasicProperties:
    """The delivery's properties for a copy that goes round again, with one more error counted."""
    props = delivery.properties
    headers = {k: v for k, v in (props.headers or {}).items() if k not in _BROKER_HEADERS}
    headers[ERRORS_HEADER] = errors_before(delivery) + 1
    return BasicProperties(content_type=props.content_type, content_encoding=props.content_encoding,
                           headers=headers, delivery_mode=props.delivery_mode or 2, priority=props.priority,
                           correlation_id=props.correlation_id, reply_to=props.reply_to,
                           message_id=props.message_id, timestamp=props.timestamp, type=props.type,
                           app_id=props.app_id)


class Executor:
    def __init__(self, handler: Handler, *, broker: Broker, store: Store, durable: Durable, failed_queue: str,
                 clock: Callable[[], float], observer: Observer | None = None) -> None:
        self._handler = handler
        self._broker = broker
        self._store = store
        self._durable = durable
        self._failed_queue = failed_queue
        self._clock = clock
        self._observer = observer or Observer()

    def run(self, delivery: Delivery) -> None:
        """The runtime's entry point, on a worker thread."""
        self._run(delivery, 1)

    def _run(self, delivery: Delivery, attempt: int, resumed: bool = False) -> None:
        try:
            plan = self._handler.handle(Job(delivery, attempt, lambda: self._broker.current(delivery), resumed))
            self.carry_out(delivery, plan)
        except HandBack:
            self._broker.nack(delivery, requeue=True)
        except Exception as exc:
            reason = poison_reason(delivery, exc)
            if reason is None:
                log.exception("handling failed; the message goes round again in %.0f s", ERROR_PAUSE_S,
                              extra={"event": "handler_error"})
                self._go_round(delivery)
                return
            log.exception("giving up on a message: %s", reason, extra={"event": "poison"})
            try:
                self._fail(delivery, Failure(self._subject(delivery), FailureError(Stage.VALIDATION, reason)),
                           poisoned=True)
            except HandBack:
                self._broker.nack(delivery, requeue=True)

    def _go_round(self, delivery: Delivery) -> None:
        """After a pause, a copy with its error counted goes to the back of its queue, and the
        delivery is acked on the copy's confirm (handed back if none comes). A requeue would
        leave the count to the broker, which may not keep it, and would wear out a delivery
        limit."""
        self._broker.defer(delivery, ERROR_PAUSE_S, lambda: self._broker.forward(
            delivery, delivery.queue, delivery.body, counted_copy(delivery)))

    def _subject(self, delivery: Delivery) -> Subject:
        try:
            return self._handler.subject(delivery)
        except Exception:  # the poison path must not fail the way the handler did
            text = delivery.body[:TRUNCATED_ORIGINAL_CHARS].decode("utf-8", errors="replace")
            return Subject(original=text, message_id=delivery.properties.message_id)

    def carry_out(self, delivery: Delivery, plan: Plan) -> None:
        try:
            if isinstance(plan, Forward):
                self._forward(delivery, plan)
            elif isinstance(plan, Finish):
                self._finish(delivery, plan)
            elif isinstance(plan, Failure):
                self._fail(delivery, plan)
            elif isinstance(plan, Retry):
                self._broker.defer(delivery, plan.delay_s, lambda: self._run(delivery, plan.attempt, resumed=True))
            elif isinstance(plan, Requeue):
                self._broker.nack(delivery, requeue=True)
        except HandBack:
            self._broker.nack(delivery, requeue=True)

    def _write(self, write: Write) -> bool:
        return self._durable(lambda: self._store.apply(write))

    def _refused(self, subject: Subject, exc: WriteRefused) -> Failure:
        self._observer.store_refused()
        log.error("MongoDB refused a write for good: %s", exc.reason,
                  extra={"event": "store_refused", "user_id": subject.user_id, "reason": exc.reason})
        return Failure(subject, FailureError(Stage.STORE, clean_text(exc.reason)))

    def _forward(self, delivery: Delivery, plan: Forward) -> None:
        try:
            for write in plan.writes:
                self._write(write)
        except WriteRefused as exc:
            self._fail(delivery, self._refused(plan.subject, exc))
            return
        # Acked when the broker confirms it; handed back if it does not.
        self._broker.forward(delivery, plan.queue, plan.body, persistent(plan.subject.message_id))

    def _finish(self, delivery: Delivery, plan: Finish) -> None:
        try:
            recorded = all([self._write(write) for write in plan.writes])
        except WriteRefused as exc:
            self._fail(delivery, self._refused(plan.subject, exc))
            return
        self._broker.ack(delivery)
        if plan.registered:
            outcome = "registered" if recorded else "duplicate"
            log.info("registered" if recorded else "registered already, or this attempt failed already",
                     extra={"event": "registered", "user_id": plan.subject.user_id,
                            "request_id": plan.subject.request_id, "outcome": outcome})
        self._observer.finished(plan)

    def _fail(self, delivery: Delivery, plan: Failure, *, poisoned: bool = False) -> None:
        subject, error = plan.subject, plan.error
        marked = self._marked_failed(subject, error, poisoned)
        queued: tuple[RecordIndexed, ...] = ()
        if marked is not None:
            # The record is out. Its entry is left as that delivery left it: `queued`, or, after a
            # crash before that write, `publishing` (unsure) until `reconcile` sees the record.
            log.info("failure already recorded for this attempt",
                     extra={"event": "duplicate", "user_id": subject.user_id, "request_id": subject.request_id})
            error = marked
        else:
            published = self._publish_record(delivery, subject, error)
            if published is None:
                return
            queued = (published,)
        for write in (*failure_writes(subject, error), *queued):
            # The record is out and is what counts: handing the delivery back now would only
            # publish another.
            self._not_holding_back(write, "a failure's write did not go through; its record is out", subject)
        self._broker.ack(delivery)
        if marked is None:
            log.warning("failed: %s", error.reason, extra={"event": "failed", "user_id": subject.user_id,
                                                            "request_id": subject.request_id, "stage": error.stage,
                                                            "reason": error.reason})
            self._observer.finished(Failure(subject, error))

    def _marked_failed(self, subject: Subject, error: FailureError, poisoned: bool) -> FailureError | None:
        """The error of this attempt's record if one is out already, else None. A message that
        is poison because the store keeps erroring cannot wait for the store: its record goes
        out unchecked (a second record is better than none)."""
        key = subject.attempt_key
        if key is None:
            return None
        try:
            attempt = self._durable(lambda: self._store.attempt(key))
        except HandBack:
            raise
        except Exception:
            if not poisoned:
                raise  # the runtime hands it back; it counts towards POISON_DELIVERIES
            log.exception("cannot read the attempt before a failure record", extra={"event": "attempt_unreadable"})
            return None
        if attempt is None or not attempt.failed or attempt.request_id != subject.request_id:
            return None
        return attempt.error or error

    def _publish_record(self, delivery: Delivery, subject: Subject, error: FailureError) -> RecordIndexed | None:
        """Write the record's index entry, publish the record and wait for its confirm: then the
        write that marks the entry `queued`; None when no confirm came and the delivery was
        handed back."""
        failed_at = datetime.fromtimestamp(self._clock(), UTC)
        record = FailureRecord(original=subject.original, user_id=subject.user_id,
                               legacy_request_id=subject.request_id, error=error, attempts=subject.attempts,
                               failed_at=failed_at)
        body = record.encode()
        record_id, token = subject.record_id(delivery.body), new_token()
        entry = IndexEntry(record_id, error.stage, error.reason, subject.user_id, subject.request_id, failed_at,
                           body.decode())
        # The entry before its record. One that cannot be written does not hold the record back:
        # `registrations failed reconcile` adds it.
        self._not_holding_back(RecordIndexed(record_id, PUBLISHING, token, entry),
                               "the failure record's index entry was not written; the record goes out without it",
                               subject)
        if not self._broker.current(delivery) and not self._broker.stopping.is_set():
            # The channel went while the entry was written: the broker hands the delivery out
            # again, and that delivery publishes the record. Publishing it here as well would
            # make a second record wherever no attempt's mark can tell (a message without a user).
            # (During a stop the channel may still stand: the publish finds out.)
            raise HandBack("the delivery's channel is gone")
        # The contract keeps the inbound message_id; a record without one is named by its id.
        future = self._broker.publish(self._failed_queue, body, persistent(subject.message_id or record_id,
                                                                           {RECORD_ID_HEADER: record_id}))
        try:
            # No timeout of its own: the runtime settles every publish (a confirm, a nack, a
            # return, a lost channel, a stop). Giving up while the broker merely holds the
            # connection blocked (an alarm) would hand back a record that may still go out.
            future.result()
        except Exception as exc:
            log.warning("publish to %s not confirmed (%s); message handed back", self._failed_queue, exc,
                        extra={"event": "publish_failed", "queue": self._failed_queue})
            # As a refused hop is: a failure queue that refuses (a length limit) is not asked
            # again at once, in a loop.
            self._broker.hand_back(delivery, self._failed_queue, exc)
            return None
        return RecordIndexed(record_id, QUEUED, token)

    def _not_holding_back(self, write: Write, what: str, subject: Subject) -> None:
        """A write that must not keep a failure from its record: waited out through an outage
        (or handed back during a stop), like every write; anything else is logged and counted."""
        try:
            self._write(write)
        except HandBack:
            raise
        except Exception as exc:
            self._observer.store_refused()
            reason = exc.reason if isinstance(exc, WriteRefused) else f"{type(exc).__name__}: {exc}"[:300]
            log.error("%s: %s", what, reason, extra={"event": "store_refused", "user_id": subject.user_id,
                                                    "reason": reason})
