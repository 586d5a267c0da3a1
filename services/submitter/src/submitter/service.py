"""The submitter's handler: one inbound registration in, one POST, one hand-on or failure out.

Order of effects, so that a crash at any point loses nothing:
  201 → record the attempt's request id and `submitted` (MongoDB) → publish the pending
  message (confirmed) → ack. A redelivered message whose attempt already has a request id is
  handed on again without a second POST.
  failure → publish the failure record (confirmed) → record `failed` → ack.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from regbridge.amqp import Delivery
from regbridge.durable import HandBack, until_stored
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Fail, HandOn, RetrySubmit, Stage, SubmitPolicy
from regbridge.messages import (
    DecodeError,
    FailureError,
    FailureRecord,
    PendingMessage,
    Registration,
    publish_mark,
)
from regbridge.process import CONFIRM_TIMEOUT_S, Broker, persistent, poison_reason
from regbridge.settings import SubmitterSettings
from regbridge.store import Store
from regbridge.topology import first_hop
from submitter import metrics

log = logging.getLogger("submitter")


class Submitter:
    def __init__(self, settings: SubmitterSettings, *, store: Store, legacy: Legacy,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random) -> None:
        self._s = settings
        self._store = store
        self._legacy = legacy
        self._clock = clock
        self._rng = rng
        self._policy = SubmitPolicy(settings.submit_max_attempts, settings.submit_backoff_base_s,
                                    settings.submit_backoff_max_s)
        self._first_hop = first_hop(settings.pending_queue, settings.poll_first_delay_s)
        self.broker: Broker  # set once the runtime exists (it needs this handler first)

    def handle(self, delivery: Delivery) -> None:
        try:
            props = delivery.properties
            registration = Registration.decode(delivery.body, message_id=props.message_id,
                                               max_bytes=self._s.max_message_bytes,
                                               publish_mark=publish_mark(props.headers, props.timestamp))
        except DecodeError as exc:
            log.warning("invalid message: %s", exc.reason,
                        extra={"event": "invalid", "stage": Stage.VALIDATION, "reason": exc.reason})
            self._fail(delivery, original=exc.original, user_id=exc.user_id, attempt_key=None,
                       error=FailureError(Stage.VALIDATION, exc.reason), attempts=0)
            return
        try:
            self._start(delivery, registration)
        except HandBack:
            self.broker.nack(delivery, requeue=True)
        except Exception as exc:
            reason = poison_reason(delivery, exc)
            if reason is None:
                raise  # the runtime logs it and requeues after a pause
            log.exception("giving up on a message: %s", reason,
                          extra={"event": "poison", "user_id": registration.user_id})
            self._fail(delivery, original=dict(registration.payload), user_id=registration.user_id,
                       attempt_key=registration.attempt_key, error=FailureError(Stage.VALIDATION, reason), attempts=0)

    def _stored(self, operation: Callable[[], Any]) -> Any:
        return until_stored(operation, stopping=self.broker.stopping, on_retry=metrics.STORE_RETRIES.inc)

    def _start(self, delivery: Delivery, reg: Registration) -> None:
        user = self._stored(lambda: self._store.user(reg.user_id))
        if user.status == "registered":
            log.info("already registered; not submitted again",
                     extra={"event": "already_registered", "user_id": reg.user_id})
            metrics.SUBMISSIONS.labels("already_registered").inc()
            self.broker.ack(delivery)
            return
        if not delivery.redelivered:
            if user.status is not None:
                # A new attempt (a replay, or the same message published again): what an earlier
                # attempt of this message recorded must not make a later redelivery of this one
                # look finished. A user never seen before has no attempts: no write needed.
                self._stored(lambda: self._store.reset_attempt(reg.attempt_key))
        else:
            attempt = self._stored(lambda: self._store.attempt(reg.attempt_key))
            if attempt is not None and attempt.failed:
                # Its failure record is already out. The user's status may not be, if the crash
                # came between the two writes: write it again (an idempotent write), then ack.
                if attempt.error is not None:
                    error = attempt.error
                    self._stored(lambda: self._store.record_failed(reg.user_id, attempt.request_id, error))
                self.broker.ack(delivery)
                return
            if attempt is not None and attempt.request_id:
                log.info("redelivered with a request id on record; not submitted again",
                         extra={"event": "resumed", "user_id": reg.user_id, "request_id": attempt.request_id})
                metrics.SUBMISSIONS.labels("resumed").inc()
                self._hand_on(delivery, reg, attempt.request_id, attempts=1)
                return
        self._submit(delivery, reg, 1)

    def _submit(self, delivery: Delivery, reg: Registration, attempt: int) -> None:
        if not self.broker.current(delivery):
            return  # the connection dropped: its redelivery will submit it, not a second POST now
        with metrics.LEGACY_SECONDS.time():
            outcome = self._legacy.submit(reg.body)
        decision = self._policy.decide(outcome, attempt=attempt, jitter=self._rng())
        metrics.SUBMISSIONS.labels(type(outcome).__name__.lower()).inc()
        if isinstance(decision, HandOn):
            # The request id is on record before anything else: from here a redelivery of this
            # message resumes with it instead of submitting again.
            self._stored(lambda: self._store.record_accepted(reg.attempt_key, user_id=reg.user_id,
                                                             request_id=decision.request_id))
            self._hand_on(delivery, reg, decision.request_id, attempts=attempt, recorded=True)
        elif isinstance(decision, RetrySubmit):
            metrics.RETRIES.inc()
            log.info("legacy API busy; retrying in %.2f s", decision.delay_s,
                     extra={"event": "submit_retry", "user_id": reg.user_id, "attempt": attempt,
                            "delay_s": round(decision.delay_s, 3)})
            self.broker.defer(delivery, decision.delay_s, lambda: self._retry(delivery, reg, attempt + 1))
        elif isinstance(decision, Fail):
            self._fail(delivery, original=dict(reg.payload), user_id=reg.user_id, attempt_key=reg.attempt_key,
                       error=FailureError(decision.stage, decision.reason, decision.http_status),
                       attempts=attempt)

    def _retry(self, delivery: Delivery, reg: Registration, attempt: int) -> None:
        try:
            self._submit(delivery, reg, attempt)
        except HandBack:
            self.broker.nack(delivery, requeue=True)

    def _hand_on(self, delivery: Delivery, reg: Registration, request_id: str, *, attempts: int,
                 recorded: bool = False) -> None:
        if not recorded:
            self._stored(lambda: self._store.record_submitted(reg.user_id, request_id))
        pending = PendingMessage(
            request_id=request_id, user_id=reg.user_id, payload=reg.payload, attempt_key=reg.attempt_key,
            submitted_at=self._clock(), message_id=reg.message_id, received_at=_published_at(delivery),
            submit_attempts=attempts,
        )
        log.info("submitted", extra={"event": "submitted", "user_id": reg.user_id, "request_id": request_id})
        # Acked when the broker confirms it; handed back if it does not.
        self.broker.forward(delivery, self._first_hop, pending.encode(), persistent(reg.message_id))

    def _fail(self, delivery: Delivery, *, original: Any, user_id: str | None, attempt_key: str | None,
              error: FailureError, attempts: int) -> None:
        record = FailureRecord(original=original, user_id=user_id, legacy_request_id=None, error=error,
                               attempts=attempts, failed_at=datetime.fromtimestamp(self._clock(), UTC))
        if not self._publish(self._s.failed_queue, record.encode(), delivery.properties.message_id, delivery):
            return
        # The attempt's mark first: from then on a redelivery is acked without a second record.
        # Between the confirm and this write lies the one window where a crash duplicates a record.
        if attempt_key is not None:
            self._stored(lambda: self._store.record_attempt_failed(attempt_key, user_id=user_id, request_id=None,
                                                                   error=error))
        if user_id is not None:
            self._stored(lambda: self._store.record_failed(user_id, None, error))
        metrics.FAILURES.labels(error.stage).inc()
        log.warning("failed: %s", error.reason, extra={"event": "failed", "user_id": user_id,
                                                        "stage": error.stage, "reason": error.reason})
        self.broker.ack(delivery)

    def _publish(self, queue: str, body: bytes, message_id: str | None, delivery: Delivery) -> bool:
        """Publish and wait for the confirm; on failure hand the inbound message back."""
        try:
            self.broker.publish(queue, body, persistent(message_id)).result(timeout=CONFIRM_TIMEOUT_S)
        except Exception as exc:
            log.warning("publish to %s not confirmed (%s); message handed back", queue, exc,
                        extra={"event": "publish_failed", "queue": queue})
            self.broker.nack(delivery, requeue=True)
            return False
        return True


def _published_at(delivery: Delivery) -> float:
    """When the registration entered the system: the publisher's AMQP timestamp (whole seconds)
    when it set one, else when this service took it. End-to-end latency is measured from here."""
    stamp = delivery.properties.timestamp
    if isinstance(stamp, int) and 0 < stamp <= delivery.received_at + 60:
        return float(stamp)
    return delivery.received_at
