"""The poller's handler: one pending id in; at most one status poll; a plan out.

Too early, or still processing: a Forward to the wait queue of the delay, which dead-letters
it back to pending when due. Completed: a Finish that records `registered`. Failed, unknown
to the legacy API, or past the deadline: a Failure. `regbridge.executor` carries the plan
out, and publishes no second failure record for a duplicate pending message (dead-lettering
is at-least-once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from poller import metrics
from regbridge.amqp import Delivery
from regbridge.executor import Job
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Fail, PollAfter, PollPolicy, Register, Stage, State, Transient
from regbridge.messages import DecodeError, FailureError, PendingMessage
from regbridge.plans import Failure, Finish, Forward, Plan, Subject, UserStatus
from regbridge.settings import PollerSettings
from regbridge.topology import wait_queue_name

log = logging.getLogger("poller")


class Poller:
    def __init__(self, settings: PollerSettings, *, legacy: Legacy, clock: Callable[[], float] = time.time) -> None:
        self._pending_queue = settings.pending_queue
        self._legacy = legacy
        self._clock = clock
        self.policy = PollPolicy(settings.poll_first_delay_s, settings.poll_interval_s, settings.poll_deadline_s)

    def subject(self, delivery: Delivery) -> Subject:
        try:
            return _subject(PendingMessage.decode(delivery.body))
        except DecodeError as exc:
            return Subject(exc.original, exc.user_id, message_id=delivery.properties.message_id)

    def handle(self, job: Job) -> Plan:
        try:
            msg = PendingMessage.decode(job.delivery.body)
        except DecodeError as exc:
            log.error("unreadable pending message: %s", exc.reason, extra={"event": "invalid", "reason": exc.reason})
            return Failure(Subject(exc.original, exc.user_id, message_id=job.delivery.properties.message_id),
                           FailureError(Stage.VALIDATION, exc.reason))
        if msg.polls == 0:
            wait = self.policy.first_wait(age_s=msg.age_s(self._clock()))
            if wait is not None:
                return self._wait(msg, wait)
        with metrics.LEGACY_SECONDS.time():
            outcome = self._legacy.status(msg.request_id)
        # A poll the breaker or the cap held back reached nobody: it is neither counted nor a poll.
        held = isinstance(outcome, Transient) and not outcome.sent
        if not held:
            metrics.POLLS.labels(outcome.label).inc()
        polled = msg if held else msg.polled()
        decision = self.policy.decide(outcome, age_s=msg.age_s(self._clock()))
        if isinstance(decision, PollAfter):
            return self._wait(polled, decision.delay_s)
        if isinstance(decision, Register):
            return Finish(_subject(polled), (UserStatus(msg.user_id, State.REGISTERED, msg.request_id),),
                          registered=True)
        assert isinstance(decision, Fail)
        return Failure(_subject(polled), FailureError(decision.stage, decision.reason, decision.http_status))

    def _wait(self, msg: PendingMessage, delay_s: float) -> Forward:
        return Forward(_subject(msg), wait_queue_name(self._pending_queue, delay_s), msg.waited(delay_s).encode())


def _subject(msg: PendingMessage) -> Subject:
    return Subject(original=msg.payload, user_id=msg.user_id, attempt_key=msg.attempt_key,
                   request_id=msg.request_id, attempts=msg.submit_attempts + msg.polls, message_id=msg.message_id,
                   received_at=msg.received_at)
