"""The submitter's handler: one inbound registration in; one POST; a plan out.

A 201 becomes a Forward: the attempt's request id and the user's `submitted` are written,
then the pending message goes to the first wait queue. A redelivered message whose attempt
has a request id on record is handed on again without a second POST. A busy legacy API is
retried in process (Retry), a refusal or a spent budget is a Failure. `regbridge.executor`
carries the plan out.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable

from regbridge.amqp import Delivery
from regbridge.durable import Durable
from regbridge.executor import Job
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Fail, HandOn, RetrySubmit, Stage, State, SubmitPolicy, Transient
from regbridge.messages import DecodeError, FailureError, PendingMessage, Registration, publish_mark
from regbridge.plans import AttemptAccepted, Failure, Finish, Forward, Plan, Requeue, Retry, Subject, UserStatus, Write
from regbridge.settings import Schedule, SubmitterSettings
from regbridge.store import Store
from regbridge.topology import first_hop
from submitter import metrics

log = logging.getLogger("submitter")


class Submitter:
    def __init__(self, settings: SubmitterSettings, *, store: Store, legacy: Legacy, durable: Durable,
                 clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 publish_mark: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self._max_bytes = settings.max_message_bytes
        self._store = store
        self._legacy = legacy
        self._durable = durable
        self._clock = clock
        self._rng = rng
        self._publish_mark = publish_mark
        self._policy = SubmitPolicy(settings.submit_max_attempts, settings.submit_backoff_base_s,
                                    settings.submit_backoff_max_s)
        self._first_hop = first_hop(settings.pending_queue, settings.poll_first_delay_s,
                                    adaptive=settings.poll_schedule is Schedule.ADAPTIVE)
        # What the first hop's wait queue holds it for (none when it goes straight to pending).
        self._first_wait_s = settings.poll_first_delay_s if self._first_hop != settings.pending_queue else 0.0

    def _decode(self, delivery: Delivery) -> Registration:
        props = delivery.properties
        return Registration.decode(delivery.body, message_id=props.message_id, max_bytes=self._max_bytes,
                                   publish_mark=publish_mark(props.headers, props.timestamp))

    def subject(self, delivery: Delivery) -> Subject:
        try:
            return _subject(delivery, self._decode(delivery))
        except DecodeError as exc:
            return _invalid(delivery, exc)

    def handle(self, job: Job) -> Plan:
        delivery = job.delivery
        try:
            registration = self._decode(delivery)
        except DecodeError as exc:
            log.warning("invalid message: %s", exc.reason,
                        extra={"event": "invalid", "stage": Stage.VALIDATION, "reason": exc.reason})
            return Failure(_invalid(delivery, exc), FailureError(Stage.VALIDATION, exc.reason))
        if job.resumed:  # a retry: the reads are done; the publish's mark is on record
            attempt = self._durable(lambda: self._store.attempt(registration.attempt_key))
            return self._submit(job, registration, attempt.publish if attempt is not None else None)
        return self._start(job, registration)

    def _start(self, job: Job, reg: Registration) -> Plan:
        user = self._durable(lambda: self._store.user(reg.user_id))
        if user.status == State.REGISTERED:
            log.info("already registered; not submitted again",
                     extra={"event": "already_registered", "user_id": reg.user_id})
            metrics.SUBMISSIONS.labels(metrics.ALREADY_REGISTERED).inc()
            return Finish(_subject(job.delivery, reg))
        if not job.redelivered:
            if user.status == State.SUBMITTED:
                attempt = self._durable(lambda: self._store.attempt(reg.attempt_key))
                if attempt is not None and not attempt.failed and attempt.request_id == user.request_id:
                    # A copy of a message whose attempt is in flight: a publisher sent it again
                    # when a confirm was lost (a node of a cluster went down). That attempt
                    # finishes it; a POST here would be a second registration of the user.
                    log.info("a copy of a message in flight; not submitted again",
                             extra={"event": "copy_in_flight", "user_id": reg.user_id,
                                    "request_id": attempt.request_id})
                    metrics.SUBMISSIONS.labels(metrics.COPY_IN_FLIGHT).inc()
                    return Finish(_subject(job.delivery, reg, attempt.request_id))
            if user.status is not None:
                # A new attempt (a replay, or the same message published again): what an earlier
                # attempt of this message recorded must not make a later redelivery of this one
                # look finished, so it is cleared before the POST, and it gets a mark of its own
                # for the Idempotency-Key: a legacy API that still holds the earlier attempt's
                # key must not answer this one with that attempt's request id. A user never seen
                # before has no attempts: no write needed.
                publish = self._publish_mark()
                self._durable(lambda: self._store.reset_attempt(reg.attempt_key, publish))
                return self._submit(job, reg, publish)
            return self._submit(job, reg, None)
        attempt = self._durable(lambda: self._store.attempt(reg.attempt_key))
        if attempt is not None and attempt.failed:
            # Its record is out; the executor finishes what the crash may have left unwritten.
            error = attempt.error or FailureError(Stage.VALIDATION, "failed in an earlier delivery")
            return Failure(_subject(job.delivery, reg, attempt.request_id), error)
        if attempt is not None and attempt.request_id:
            log.info("redelivered with a request id on record; not submitted again",
                     extra={"event": "resumed", "user_id": reg.user_id, "request_id": attempt.request_id})
            metrics.SUBMISSIONS.labels(metrics.RESUMED).inc()
            return self._hand_on(job, reg, attempt.request_id,
                                 (UserStatus(reg.user_id, State.SUBMITTED, attempt.request_id),))
        return self._submit(job, reg, attempt.publish if attempt is not None else None)

    def _submit(self, job: Job, reg: Registration, publish: str | None) -> Plan:
        if not job.current():
            return Requeue()  # the connection dropped: its redelivery submits it, not a second POST now
        key = reg.attempt_key if publish is None else f"{reg.attempt_key}|publish:{publish}"
        with metrics.LEGACY_SECONDS.time():
            outcome = self._legacy.submit(reg.body, key)
        if isinstance(outcome, Transient) and not outcome.sent:
            # Nothing reached the legacy API: the budget counts its answers, not our restraint.
            return Retry(outcome.retry_after_s or 0.0, job.attempt)
        metrics.SUBMISSIONS.labels(outcome.label).inc()
        decision = self._policy.decide(outcome, attempt=job.attempt, jitter=self._rng())
        if isinstance(decision, HandOn):
            return self._hand_on(job, reg, decision.request_id,
                                 (AttemptAccepted(reg.attempt_key, reg.user_id, decision.request_id),))
        if isinstance(decision, RetrySubmit):
            metrics.RETRIES.inc()
            log.info("legacy API busy; retrying in %.2f s", decision.delay_s,
                     extra={"event": "submit_retry", "user_id": reg.user_id, "attempt": job.attempt,
                            "delay_s": round(decision.delay_s, 3)})
            return Retry(decision.delay_s, job.attempt + 1)
        assert isinstance(decision, Fail)
        return Failure(_subject(job.delivery, reg, attempts=job.attempt),
                       FailureError(decision.stage, decision.reason, decision.http_status))

    def _hand_on(self, job: Job, reg: Registration, request_id: str, writes: tuple[Write, ...]) -> Forward:
        subject = _subject(job.delivery, reg, request_id, job.attempt)
        pending = PendingMessage(
            request_id=request_id, user_id=reg.user_id, payload=reg.payload, attempt_key=reg.attempt_key,
            submitted_at=self._clock(), message_id=reg.message_id, received_at=subject.received_at,
            submit_attempts=job.attempt, waited_s=self._first_wait_s,
        )
        log.info("submitted", extra={"event": "submitted", "user_id": reg.user_id, "request_id": request_id})
        return Forward(subject, self._first_hop, pending.encode(), writes)


def _invalid(delivery: Delivery, exc: DecodeError) -> Subject:
    """A message that could not be read: its record is named by what it has (`Subject.record_id`)."""
    props = delivery.properties
    return Subject(exc.original, exc.user_id, message_id=props.message_id,
                   publish_mark=publish_mark(props.headers, props.timestamp))


def _subject(delivery: Delivery, reg: Registration, request_id: str | None = None, attempts: int = 0) -> Subject:
    return Subject(original=reg.payload, user_id=reg.user_id, attempt_key=reg.attempt_key,
                   request_id=request_id, attempts=attempts, message_id=delivery.properties.message_id,
                   received_at=_published_at(delivery))


def _published_at(delivery: Delivery) -> float:
    """When the registration entered the system: the publisher's AMQP timestamp (whole seconds)
    when it set one, else when this service took it. End-to-end latency is measured from here."""
    stamp = delivery.properties.timestamp
    if isinstance(stamp, int) and 0 < stamp <= delivery.received_at + 60:
        return float(stamp)
    return delivery.received_at
