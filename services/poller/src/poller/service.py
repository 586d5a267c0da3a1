"""The poller's handler: one pending id in; at most one status poll; a plan out.

Too early, or still processing: a Forward to the wait queue of the delay, which dead-letters
it back to pending when due. Completed: a Finish that records `registered`. Failed, unknown
to the legacy API, or past the deadline: a Failure. `regbridge.executor` carries the plan
out, and publishes no second failure record for a duplicate pending message (dead-lettering
is at-least-once).

When to poll comes from the schedule (`POLL_SCHEDULE`): the configured one (`PollPolicy`), or
the adaptive one (`regbridge.poll_schedule`), which learns from the completions this poller
sees, and from its polls that find a registration still processing (past the plan, they show a
latency that moved later before any of its registrations completes). The handler decides on the
schedule it reads once per message; the learner's window and the swap of a refitted schedule
sit behind a lock, and the refit itself runs outside it, one at a time, on a thread of its own.
That thread is for memory: a fit allocates lists of the window's size that glibc's malloc takes
from the arena of the thread that runs it; run by whichever of the workers made it due, it wore
through the pages of every worker's arena in turn, and the RSS grew for as long as some were
left untouched (docs/design.md, "Memory").
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from poller import metrics
from regbridge.amqp import Delivery
from regbridge.executor import Job
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Completed, Fail, PollAfter, PollPolicy, Processing, Register, Stage, State, Transient
from regbridge.messages import DecodeError, FailureError, PendingMessage
from regbridge.plans import Failure, Finish, Forward, Plan, Subject, UserStatus
from regbridge.poll_schedule import (
    AdaptiveConfig,
    Learner,
    Observation,
    PollSchedule,
    Running,
    adaptive_tiers,
    fit,
    within_deadline,
)
from regbridge.settings import PollerSettings, Schedule
from regbridge.topology import wait_queue_name

log = logging.getLogger("poller")


class Poller:
    def __init__(self, settings: PollerSettings, *, legacy: Legacy, clock: Callable[[], float] = time.time) -> None:
        self._pending_queue = settings.pending_queue
        self._legacy = legacy
        self._clock = clock
        self.policy = PollPolicy(settings.poll_first_delay_s, settings.poll_interval_s, settings.poll_deadline_s)
        self.learning = Learning(settings, self.policy) if settings.poll_schedule is Schedule.ADAPTIVE else None
        metrics.schedule_changed(self.policy, learned=None)

    def tiers(self) -> tuple[float, ...]:
        """Every wait this poller may ask for: the wait queues to declare."""
        return self.learning.config.tiers if self.learning is not None else self.policy.tiers()

    @property
    def schedule(self) -> PollSchedule:
        return self.learning.schedule if self.learning is not None else self.policy

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
        schedule = self.schedule
        if msg.polls == 0:
            age = msg.age_s(self._clock())
            wait = schedule.first_wait(age_s=age, share=_share(msg.request_id))
            if wait is not None:
                return self._wait(msg, self._within_deadline(wait, age))
        with metrics.LEGACY_SECONDS.time():
            outcome = self._legacy.status(msg.request_id)
        # A poll the breaker or the cap held back reached nobody: it is neither counted nor a poll.
        held = isinstance(outcome, Transient) and not outcome.sent
        if not held:
            metrics.POLLS.labels(outcome.label).inc()
        age = msg.age_s(self._clock())
        polled = msg if held else msg.polled(processing_at_s=age if isinstance(outcome, Processing) else None)
        if isinstance(outcome, Completed | Processing) and self.learning is not None:
            now = self._clock()
            # Submitted `age` ago on this clock: the learner orders and truncates by submission. A
            # registration still processing is evidence too (kept past the plan: a latency that
            # moved later shows there first); its record replaces the one of its previous poll.
            self.learning.observe(Observation(msg.processing_age_s or 0.0, age, submitted_s=now - age)
                                  if isinstance(outcome, Completed) else
                                  Running(age, now - age, since_s=msg.processing_age_s), now=now)
        decision = self.policy.decide(outcome, age_s=age,
                                      wait_s=self._within_deadline(schedule.next_wait(age_s=age), age))
        if isinstance(decision, PollAfter):
            return self._wait(polled, decision.delay_s)
        if isinstance(decision, Register):
            return Finish(_subject(polled), (UserStatus(msg.user_id, State.REGISTERED, msg.request_id),),
                          registered=True)
        assert isinstance(decision, Fail)
        return Failure(_subject(polled), FailureError(decision.stage, decision.reason, decision.http_status))

    def _within_deadline(self, wait_s: float, age_s: float) -> float:
        # The fixed schedule's waits are its own two tiers, whatever the deadline, as they always were.
        if self.learning is None:
            return wait_s
        return within_deadline(wait_s, age_s=age_s, deadline_s=self.policy.deadline_s, tiers=self.learning.config.tiers)

    def _wait(self, msg: PendingMessage, delay_s: float) -> Forward:
        return Forward(_subject(msg), wait_queue_name(self._pending_queue, delay_s), msg.waited(delay_s).encode())


class Learning:
    """The adaptive schedule's state in one poller: the window of completions, and the schedule
    fitted to it (the cold start's `PollPolicy` until there is one). Replicas learn each on its
    own (docs/design.md, "The adaptive poll schedule")."""

    def __init__(self, settings: PollerSettings, cold: PollPolicy) -> None:
        self.config = AdaptiveConfig(
            tiers=adaptive_tiers(settings.poll_first_delay_s, settings.poll_interval_s),
            window=settings.poll_adaptive_window,
            min_observations=min(settings.poll_adaptive_min_observations, settings.poll_adaptive_window),
            delay_ratio=settings.poll_adaptive_delay_ratio, max_polls=settings.poll_adaptive_max_polls)
        self._cold = cold
        self._lock = threading.Lock()
        self._learner = Learner(self.config)
        self._fitting = False
        # Started at the first fit; its one thread ends with the process.
        self._fits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="schedule-fit")
        self._fit: Future[None] | None = None
        # Read without the lock: replacing a reference is atomic, and a handler that reads the
        # previous schedule decides as it would have a moment earlier.
        self.schedule: PollSchedule = cold

    def observe(self, observation: Observation | Running, *, now: float) -> None:
        with self._lock:
            self._learner.observe(observation)
            if self._fitting or not self._learner.due(now):
                return
            window = self._learner.take(now)
            try:
                self._fit = self._fits.submit(self._refit, window)
            except RuntimeError:  # the interpreter is shutting down: no more fits
                return
            self._fitting = True

    def wait_for_fit(self, timeout: float | None = None) -> None:
        """Until the fit under way, if any, has ended and its schedule is in use."""
        fit_ = self._fit
        if fit_ is not None:
            fit_.result(timeout)

    def _refit(self, window: tuple[Observation, ...]) -> None:
        learned = None
        try:
            learned = fit(window, self.config)
        except Exception:
            # A fit that fails keeps the schedule there is; the handler's decision stands.
            log.exception("refitting the poll schedule failed; keeping the current one",
                          extra={"event": "schedule_fit_failed"})
        finally:
            with self._lock:
                self._fitting = False
                if learned is not None:
                    self.schedule = learned
                    self._learner.follow(learned)
        if learned is not None:
            metrics.schedule_changed(self._cold, learned=learned)


def _share(request_id: str) -> float:
    """Where the id falls in [0, 1): the same at every redelivery, spread evenly over the ids."""
    return zlib.crc32(request_id.encode()) / 2**32


def _subject(msg: PendingMessage) -> Subject:
    return Subject(original=msg.payload, user_id=msg.user_id, attempt_key=msg.attempt_key,
                   request_id=msg.request_id, attempts=msg.submit_attempts + msg.polls, message_id=msg.message_id,
                   received_at=msg.received_at)
