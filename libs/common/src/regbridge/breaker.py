"""How many calls a replica may send to the legacy API, and when: a circuit breaker and a rate cap.

This module contains no I/O and no clock of its own: time comes from the clock it is given, so
an outage and its recovery can be played out with a fake one. It is not thread-safe; the
adapter that uses it (`regbridge.legacy_guard`) holds a lock around it.

    CLOSED --`failures` transient failures in a row--> OPEN
    OPEN --`open_s` later--> HALF_OPEN
    HALF_OPEN --a probe answered--> CLOSED, ramping up
    HALF_OPEN --a probe failed--> OPEN

While closed, calls go at most at `max_rps` (a token bucket). While half-open, probes go at most
at `probe_rps`; while open, nothing goes. A failing API therefore sees a few probes a second from
each replica, however many registrations wait. Once a probe is answered the rate starts again
from the probe rate and grows geometrically to `max_rps` over `ramp_s`: the backlog of every
waiting registration comes back gradually, not all at once.

A refused call is told when to come back: the end of the open period, or a slot of its own
after the next token. Successive refusals get successive slots, one token apart, so that the
callers return spread out instead of together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Hold(StrEnum):
    """Why a call was not sent, as the metrics name it."""

    BREAKER = "breaker"
    RATE_CAP = "rate_cap"


@dataclass(frozen=True)
class Limits:
    max_rps: float
    failures: int
    probe_rps: float
    open_s: float
    ramp_s: float


@dataclass(frozen=True)
class Refusal:
    """A call the breaker or the cap holds back: send nothing, come back after `retry_after_s`."""

    hold: Hold
    retry_after_s: float


# A bucket holds at most this many seconds of its rate: a burst after a quiet spell stays small.
BURST_S = 1.0
# Slots are handed out at most this far ahead. A ramping rate grows, so a slot computed from the
# rate of the moment would be too late; beyond it, callers come back together and ask again.
HORIZON_S = 1.0


class TokenBucket:
    """`rate` calls a second, in bursts of at most `rate * BURST_S` (and at least one)."""

    def __init__(self, rate: float, now: float, *, tokens: float | None = None) -> None:
        self._rate = rate
        self._tokens = self._capacity() if tokens is None else min(tokens, self._capacity())
        self._stamp = now
        self._next_slot = now

    @property
    def rate(self) -> float:
        return self._rate

    def _capacity(self) -> float:
        return max(1.0, self._rate * BURST_S)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._capacity(), self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)  # what accrued so far accrued at the old rate
        self._rate = rate
        self._tokens = min(self._tokens, self._capacity())

    def take(self, now: float) -> float:
        """0 when a token was taken; else how long this caller should wait before asking again."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        first = now + (1.0 - self._tokens) / self._rate
        slot = max(first, min(self._next_slot, now + HORIZON_S))
        self._next_slot = slot + 1.0 / self._rate
        return slot - now


class Breaker:
    """The breaker's state and the two buckets: the cap (or its ramp) and the probes."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float]) -> None:
        now = clock()
        self._limits = limits
        self._clock = clock
        self.state = State.CLOSED
        self._since = now
        self._failures = 0
        self._ramping = False
        self._cap = TokenBucket(limits.max_rps, now)
        self._probes = TokenBucket(limits.probe_rps, now)

    def admit(self) -> Refusal | None:
        """None: send the call now (and `record` its answer). Otherwise send nothing."""
        now = self._clock()
        if self.state is State.OPEN:
            wait = self._since + self._limits.open_s - now
            if wait > 0:
                return Refusal(Hold.BREAKER, wait)
            self._enter(State.HALF_OPEN, now)
        if self.state is State.HALF_OPEN:
            wait = self._probes.take(now)
            return Refusal(Hold.BREAKER, wait) if wait > 0 else None
        if self._ramping:
            self._cap.set_rate(self._ramp_rate(now), now)
        wait = self._cap.take(now)
        return Refusal(Hold.RATE_CAP, wait) if wait > 0 else None

    def record(self, *, failed: bool) -> None:
        """The answer to an admitted call: `failed` for a transient failure (a timeout, a refused
        connection, 429, 5xx), not for any answer that the API gave on purpose."""
        now = self._clock()
        if self.state is State.HALF_OPEN:
            self._enter(State.OPEN if failed else State.CLOSED, now)
        elif self.state is State.CLOSED:
            self._failures = self._failures + 1 if failed else 0
            if self._failures >= self._limits.failures:
                self._enter(State.OPEN, now)
        # While open, late answers to calls sent before it opened change nothing.

    @property
    def rate(self) -> float:
        """The cap in force: `max_rps`, or less while ramping up."""
        return self._cap.rate

    def _enter(self, state: State, now: float) -> None:
        self.state = state
        self._since = now
        self._failures = 0
        if state is State.HALF_OPEN:
            self._probes = TokenBucket(self._limits.probe_rps, now, tokens=1.0)
        elif state is State.CLOSED:
            self._ramping = True
            self._cap = TokenBucket(self._ramp_rate(now), now, tokens=1.0)

    def _ramp_rate(self, now: float) -> float:
        limits = self._limits
        start = min(limits.probe_rps, limits.max_rps)
        progress = (now - self._since) / limits.ramp_s
        if progress >= 1.0:
            self._ramping = False
            return limits.max_rps
        return float(start * (limits.max_rps / start) ** progress)
