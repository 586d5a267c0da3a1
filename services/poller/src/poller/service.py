"""The poller's handler: one pending id in; a wait, a registration or a failure out.

Order of effects:
  too early / still processing → publish to the wait queue (confirmed) → ack;
  completed → record `registered` → ack;
  failed, 404, deadline → unless this attempt's failure is already on record: publish the
  failure record (confirmed) → record `failed` and the attempt's failure → ack.
A duplicate pending message (dead-lettering is at-least-once) therefore finalises nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from poller import metrics
from regbridge.amqp import Delivery
from regbridge.durable import HandBack, until_stored
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Fail, PollAfter, PollPolicy, Register, Stage
from regbridge.messages import DecodeError, FailureError, FailureRecord, PendingMessage
from regbridge.process import CONFIRM_TIMEOUT_S, Broker, persistent, poison_reason
from regbridge.settings import PollerSettings
from regbridge.store import Store
from regbridge.topology import wait_queue_name

log = logging.getLogger("poller")


class Poller:
    def __init__(self, settings: PollerSettings, *, store: Store, legacy: Legacy,
                 clock: Callable[[], float] = time.time) -> None:
        self._s = settings
        self._store = store
        self._legacy = legacy
        self._clock = clock
        self.policy = PollPolicy(settings.poll_first_delay_s, settings.poll_interval_s, settings.poll_deadline_s)
        self.broker: Broker

    def handle(self, delivery: Delivery) -> None:
        try:
            msg = PendingMessage.decode(delivery.body)
        except DecodeError as exc:
            log.error("unreadable pending message: %s", exc.reason, extra={"event": "invalid", "reason": exc.reason})
            self._fail(delivery, None, original=exc.original, user_id=exc.user_id,
                       error=FailureError(Stage.VALIDATION, exc.reason), attempts=0)
            return
        try:
            self._handle(delivery, msg)
        except HandBack:
            self.broker.nack(delivery, requeue=True)
        except Exception as exc:
            reason = poison_reason(delivery, exc)
            if reason is None:
                raise  # the runtime logs it and requeues after a pause
            log.exception("giving up on a message: %s", reason, extra={"event": "poison", "user_id": msg.user_id})
            self._fail(delivery, msg, original=dict(msg.payload), user_id=msg.user_id,
                       error=FailureError(Stage.VALIDATION, reason), attempts=msg.submit_attempts + msg.polls)

    def _stored(self, operation: Callable[[], Any]) -> Any:
        return until_stored(operation, stopping=self.broker.stopping, on_retry=metrics.STORE_RETRIES.inc)

    def _handle(self, delivery: Delivery, msg: PendingMessage) -> None:
        if msg.polls == 0:
            wait = self.policy.first_wait(age_s=self._clock() - msg.submitted_at)
            if wait is not None:
                self._wait(delivery, msg, wait)
                return
        with metrics.LEGACY_SECONDS.time():
            outcome = self._legacy.status(msg.request_id)
        metrics.POLLS.labels(type(outcome).__name__.lower()).inc()
        polled = msg.polled()
        decision = self.policy.decide(outcome, age_s=self._clock() - msg.submitted_at)
        if isinstance(decision, PollAfter):
            self._wait(delivery, polled, decision.delay_s)
        elif isinstance(decision, Register):
            self._register(delivery, polled)
        elif isinstance(decision, Fail):
            self._fail(delivery, polled, original=dict(msg.payload), user_id=msg.user_id,
                       error=FailureError(decision.stage, decision.reason, decision.http_status),
                       attempts=polled.submit_attempts + polled.polls)

    def _wait(self, delivery: Delivery, msg: PendingMessage, delay_s: float) -> None:
        # Acked when the wait queue confirms it; handed back if it does not.
        self.broker.forward(delivery, wait_queue_name(self._s.pending_queue, delay_s), msg.encode(),
                            persistent(msg.message_id))

    def _register(self, delivery: Delivery, msg: PendingMessage) -> None:
        recorded = self._stored(lambda: self._store.record_registered(msg.user_id, msg.request_id))
        self._observe_end(msg, "registered", None)
        log.info("registered" if recorded else "registered already, or this attempt failed already",
                 extra={"event": "registered", "user_id": msg.user_id, "request_id": msg.request_id,
                        "outcome": "registered" if recorded else "duplicate"})
        self.broker.ack(delivery)

    def _fail(self, delivery: Delivery, msg: PendingMessage | None, *, original: Any, user_id: str | None,
              error: FailureError, attempts: int) -> None:
        request_id = msg.request_id if msg else None
        if msg is not None:
            attempt = self._stored(lambda: self._store.attempt(msg.attempt_key))
            if attempt is not None and attempt.failed and attempt.request_id == request_id:
                log.info("failure already recorded for this attempt",
                         extra={"event": "duplicate", "user_id": user_id, "request_id": request_id})
                # The record is out; the user's status may not be, if a crash came between the
                # two writes: write it again (an idempotent write), then ack.
                if user_id is not None:
                    self._stored(lambda: self._store.record_failed(user_id, request_id, attempt.error or error))
                self.broker.ack(delivery)
                return
        record = FailureRecord(original=original, user_id=user_id, legacy_request_id=request_id, error=error,
                               attempts=attempts, failed_at=datetime.fromtimestamp(self._clock(), UTC))
        message_id = msg.message_id if msg else delivery.properties.message_id
        if not self._publish(self._s.failed_queue, record.encode(), message_id, delivery):
            return
        # The attempt's mark first (see the submitter): the crash window ends with this write.
        if msg is not None:
            self._stored(lambda: self._store.record_attempt_failed(msg.attempt_key, user_id=user_id,
                                                                   request_id=request_id, error=error))
        if user_id is not None:
            self._stored(lambda: self._store.record_failed(user_id, request_id, error))
        self._observe_end(msg, "failed", error.stage)
        log.warning("failed: %s", error.reason, extra={"event": "failed", "user_id": user_id,
                                                        "request_id": request_id, "stage": error.stage,
                                                        "reason": error.reason})
        self.broker.ack(delivery)

    def _observe_end(self, msg: PendingMessage | None, outcome: str, stage: str | None) -> None:
        metrics.FINALISED.labels(outcome, stage or "").inc()
        if msg is not None and msg.received_at is not None:
            metrics.END_TO_END_SECONDS.observe(max(0.0, self._clock() - msg.received_at))

    def _publish(self, queue: str, body: bytes, message_id: str | None, delivery: Delivery) -> bool:
        try:
            self.broker.publish(queue, body, persistent(message_id)).result(timeout=CONFIRM_TIMEOUT_S)
        except Exception as exc:
            log.warning("publish to %s not confirmed (%s); message handed back", queue, exc,
                        extra={"event": "publish_failed", "queue": queue})
            self.broker.nack(delivery, requeue=True)
            return False
        return True
