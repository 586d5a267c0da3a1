"""The legacy API behind a circuit breaker and a rate cap (`regbridge.breaker`), as a `Legacy`.

Every call asks the breaker first. A call it holds back sends no request: it comes back as a
`Transient` with `sent=False` and `retry_after_s` saying when to ask again, so that a handler can
wait without spending a retry budget that is meant for the legacy API's own answers. The
breaker is shared by the calls of every worker thread of the process: one lock guards it, and
is never held during a request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from regbridge.breaker import Breaker, Hold, Refusal, State
from regbridge.legacy_http import Legacy
from regbridge.lifecycle import Outcome, PollOutcome, SubmitOutcome, Transient

log = logging.getLogger(__name__)
OutcomeT = TypeVar("OutcomeT", bound=Outcome)

_HELD_REASONS = {
    Hold.BREAKER: "not sent: the legacy API keeps failing and its circuit breaker is open",
    Hold.RATE_CAP: "not sent: the request rate to the legacy API is at its cap",
}


def _nothing(_: str) -> None:
    return None


@dataclass(frozen=True)
class GuardHooks:
    """Metrics at the edge: a call held back, by reason; the breaker's new state."""

    held: Callable[[str], None] = _nothing
    state: Callable[[str], None] = _nothing


class GuardedLegacy:
    def __init__(self, inner: Legacy, breaker: Breaker, hooks: GuardHooks | None = None) -> None:
        self._inner = inner
        self._breaker = breaker
        self._hooks = hooks or GuardHooks()
        self._lock = threading.Lock()

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        return self._call(lambda: self._inner.submit(body, idempotency_key))

    def status(self, request_id: str) -> PollOutcome:
        return self._call(lambda: self._inner.status(request_id))

    @property
    def state(self) -> State:
        return self._breaker.state

    def _call(self, call: Callable[[], OutcomeT]) -> OutcomeT | Transient:
        with self._lock:
            before = self._breaker.state
            refusal = self._breaker.admit()
            after = self._breaker.state
        self._changed(before, after)
        if refusal is not None:
            self._hooks.held(refusal.hold)
            return _held(refusal)
        outcome = call()
        with self._lock:
            before = self._breaker.state
            self._breaker.record(failed=_failing(outcome))
            after = self._breaker.state
            rate = self._breaker.rate
        self._changed(before, after, outcome, rate)
        return outcome

    def _changed(self, before: State, after: State, outcome: Outcome | None = None, rate: float = 0.0) -> None:
        if after is before:
            return
        self._hooks.state(after)
        if after is State.OPEN:
            reason = outcome.reason if isinstance(outcome, Transient) else ""
            log.warning("legacy API circuit breaker open: sending nothing, then a few probes (last error: %s)",
                        reason, extra={"event": "breaker_open", "reason": reason})
        elif after is State.CLOSED:
            log.info("legacy API answering again: circuit breaker closed, ramping up from %.1f calls/s", rate,
                     extra={"event": "breaker_closed"})
        else:
            log.info("legacy API circuit breaker half-open: probing", extra={"event": "breaker_half_open"})


def _failing(outcome: Outcome) -> bool:
    """Whether an answer says the API itself is failing: no answer (a timeout, a refused
    connection), 429 or a 5xx. An odd 200 is an API that answers: no reason to back off."""
    if not isinstance(outcome, Transient):
        return False
    status = outcome.http_status
    return status is None or status == 429 or status >= 500


def _held(refusal: Refusal) -> Transient:
    return Transient(_HELD_REASONS[refusal.hold], retry_after_s=refusal.retry_after_s, sent=False)
