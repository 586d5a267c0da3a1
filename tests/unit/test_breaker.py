"""The circuit breaker and the rate cap with a fake clock, and the Legacy wrapper that applies them."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from regbridge.breaker import HORIZON_S, Breaker, Hold, Limits, Refusal, State, TokenBucket
from regbridge.legacy_guard import GuardedLegacy, GuardHooks
from regbridge.lifecycle import Accepted, PollOutcome, Processing, SubmitOutcome, Transient

LIMITS = Limits(max_rps=200.0, failures=10, probe_rps=5.0, open_s=5.0, ramp_s=10.0)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def opened(clock: FakeClock, limits: Limits = LIMITS) -> Breaker:
    breaker = Breaker(limits, clock=clock)
    for _ in range(limits.failures):
        assert breaker.admit() is None
        breaker.record(failed=True)
    assert breaker.state is State.OPEN
    return breaker


# ---- the token bucket -------------------------------------------------------------------------


def test_bucket_allows_a_burst_of_one_second_then_its_rate() -> None:
    bucket = TokenBucket(10.0, 0.0)
    assert [bucket.take(0.0) for _ in range(10)] == [0.0] * 10
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0  # one token a tenth of a second later


def test_bucket_gives_successive_refusals_successive_slots_within_the_horizon() -> None:
    bucket = TokenBucket(10.0, 0.0, tokens=0.0)
    waits = [bucket.take(0.0) for _ in range(15)]
    assert waits[:10] == pytest.approx([0.1 * i for i in range(1, 11)])
    assert waits[10:] == pytest.approx([HORIZON_S] * 5)  # no further ahead than the horizon
    # Callers that come back at their slot find a token each.
    assert all(bucket.take(0.1 * i) == 0.0 for i in range(1, 11))


def test_bucket_slot_is_never_before_the_next_token_at_a_slow_rate() -> None:
    bucket = TokenBucket(0.2, 0.0, tokens=0.0)
    assert bucket.take(0.0) == pytest.approx(5.0)


def test_bucket_rate_change_keeps_what_accrued() -> None:
    bucket = TokenBucket(10.0, 0.0, tokens=0.0)
    bucket.set_rate(100.0, 0.5)  # 5 tokens accrued at the old rate
    assert [bucket.take(0.5) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.5) == pytest.approx(0.01)


# ---- the breaker ------------------------------------------------------------------------------


def test_closed_breaker_is_capped_at_max_rps() -> None:
    clock = FakeClock()
    breaker = Breaker(LIMITS, clock=clock)
    sent = sum(breaker.admit() is None for _ in range(500))
    assert sent == 200
    refusal = breaker.admit()
    assert refusal is not None and refusal.hold is Hold.RATE_CAP and refusal.retry_after_s > 0
    assert breaker.state is State.CLOSED


def test_opens_after_failures_in_a_row_only() -> None:
    breaker = Breaker(LIMITS, clock=FakeClock())
    for _ in range(3):
        for _ in range(LIMITS.failures - 1):
            breaker.admit()
            breaker.record(failed=True)
        breaker.admit()
        breaker.record(failed=False)  # an answer starts the count again
    assert breaker.state is State.CLOSED
    for _ in range(LIMITS.failures):
        breaker.admit()
        breaker.record(failed=True)
    assert breaker.state is State.OPEN


def test_open_breaker_sends_nothing_and_says_when_it_probes() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(2.0)
    assert breaker.admit() == Refusal(Hold.BREAKER, pytest.approx(3.0))
    breaker.record(failed=False)  # a late answer to a call sent before it opened
    assert breaker.state is State.OPEN


def test_half_open_probes_at_the_probe_rate_and_a_failed_probe_opens_again() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(LIMITS.open_s)
    assert breaker.admit() is None  # the first probe
    assert breaker.state is State.HALF_OPEN
    refused = breaker.admit()
    assert refused is not None and refused.hold is Hold.BREAKER
    assert refused.retry_after_s == pytest.approx(1 / LIMITS.probe_rps)
    clock.advance(1 / LIMITS.probe_rps)
    assert breaker.admit() is None  # a second probe while the first is in flight
    breaker.record(failed=True)
    assert breaker.state is State.OPEN
    assert breaker.admit() == Refusal(Hold.BREAKER, pytest.approx(LIMITS.open_s))


def test_an_answered_probe_closes_and_the_rate_ramps_up_to_the_cap() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(LIMITS.open_s)
    assert breaker.admit() is None
    breaker.record(failed=False)
    assert breaker.state is State.CLOSED
    assert breaker.rate == pytest.approx(LIMITS.probe_rps)
    rates = []
    for _ in range(12):
        clock.advance(1.0)
        breaker.admit()
        rates.append(breaker.rate)
    assert rates == sorted(rates)
    # Geometric: the same factor every second, from the probe rate to the cap in ramp_s.
    factor = (LIMITS.max_rps / LIMITS.probe_rps) ** (1 / LIMITS.ramp_s)
    assert rates[0] == pytest.approx(LIMITS.probe_rps * factor)
    assert rates[9:] == [LIMITS.max_rps] * 3


def test_a_cap_below_the_probe_rate_is_still_the_ceiling() -> None:
    clock = FakeClock()
    limits = Limits(max_rps=2.0, failures=1, probe_rps=5.0, open_s=1.0, ramp_s=1.0)
    breaker = opened(clock, limits)
    clock.advance(1.0)
    breaker.admit()
    breaker.record(failed=False)
    assert breaker.rate == 2.0


def simulate(limits: Limits, *, seconds: float, down: tuple[float, float], demand_rps: float) -> list[int]:
    """One replica whose waiting registrations ask for a call `demand_rps` times a second (each
    answered at once, with a 503 while `down`); returns the calls sent in each second."""
    clock = FakeClock(0.0)
    breaker = Breaker(limits, clock=clock)
    sent: Counter[int] = Counter()
    steps = int(seconds * demand_rps)
    for step in range(steps):
        clock.now = step / demand_rps
        if breaker.admit() is None:
            sent[math.floor(clock.now)] += 1
            breaker.record(failed=down[0] <= clock.now < down[1])
    return [sent[second] for second in range(int(seconds))]


def test_an_outage_and_its_recovery() -> None:
    per_second = simulate(LIMITS, seconds=60, down=(10, 30), demand_rps=2000)
    print("calls sent per second:", per_second)
    # Normal operation: the cap (plus the first second's burst).
    assert 399 <= per_second[0] <= 400 and per_second[1:10] == [200] * 9
    # The outage: the failures that open the breaker, then a probe per open period, far below
    # the bound of probe_rps a second.
    during = sum(per_second[10:30])
    assert during <= LIMITS.failures + 20 / LIMITS.open_s + 1
    assert during <= LIMITS.probe_rps * 20
    # Recovery: no surge. The first probe after the API is back closes the breaker; from there
    # the rate grows from the probe rate to the cap within ramp_s.
    recovered = next(second for second in range(30, 60) if per_second[second] > 1)
    assert recovered <= 30 + LIMITS.open_s
    ramp = per_second[recovered:recovered + int(LIMITS.ramp_s)]
    assert ramp[0] <= 2 * LIMITS.probe_rps
    assert all(later >= earlier for earlier, later in itertools.pairwise(ramp))
    assert max(per_second[30:]) <= LIMITS.max_rps
    after = per_second[recovered + int(LIMITS.ramp_s) + 1:]
    assert after == [200] * len(after)


def test_a_slow_failing_api_still_gets_at_most_the_probe_rate() -> None:
    # Probes that hang: nothing is answered while half-open, so only the probe rate bounds them.
    clock = FakeClock(0.0)
    breaker = opened(clock)
    clock.advance(LIMITS.open_s)
    sent = 0
    for step in range(20_000):
        clock.now = LIMITS.open_s + step / 1000
        sent += breaker.admit() is None
    assert sent <= LIMITS.probe_rps * 20 + 1


# ---- the Legacy wrapper -----------------------------------------------------------------------


class ScriptedLegacy:
    def __init__(self, *answers: Transient | Accepted | Processing) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        self.calls.append("POST")
        answer = self.answers.pop(0)
        assert not isinstance(answer, Processing)
        return answer

    def status(self, request_id: str) -> PollOutcome:
        self.calls.append(f"GET {request_id}")
        answer = self.answers.pop(0)
        assert not isinstance(answer, Accepted)
        return answer


def test_guard_sends_nothing_when_the_breaker_is_open_and_says_when_to_come_back() -> None:
    clock = FakeClock()
    limits = Limits(max_rps=100.0, failures=2, probe_rps=5.0, open_s=3.0, ramp_s=5.0)
    busy = Transient("legacy API busy: HTTP 503", 503)
    inner = ScriptedLegacy(busy, busy, Processing())
    held: list[str] = []
    states: list[str] = []
    guard = GuardedLegacy(inner, Breaker(limits, clock=clock), GuardHooks(held=held.append, state=states.append))
    assert guard.submit(b"{}", "key-1") == busy
    assert guard.status("R-1") == busy
    assert guard.state is State.OPEN
    outcome = guard.status("R-2")
    assert isinstance(outcome, Transient) and not outcome.sent
    assert outcome.retry_after_s == pytest.approx(3.0)
    assert inner.calls == ["POST", "GET R-1"]  # nothing went out for R-2
    assert held == ["breaker"] and states == ["open"]
    clock.advance(3.0)
    assert guard.status("R-3") == Processing()
    assert states == ["open", "half_open", "closed"]


def test_guard_holds_calls_over_the_cap() -> None:
    clock = FakeClock()
    inner = ScriptedLegacy(Accepted("R-1"))
    held: list[str] = []
    limits = Limits(max_rps=1.0, failures=5, probe_rps=1.0, open_s=1.0, ramp_s=1.0)
    guard = GuardedLegacy(inner, Breaker(limits, clock=clock), GuardHooks(held=held.append))
    assert guard.submit(b"{}", "key-1") == Accepted("R-1")
    outcome = guard.submit(b"{}", "key-2")
    assert isinstance(outcome, Transient) and not outcome.sent and outcome.retry_after_s == pytest.approx(1.0)
    assert inner.calls == ["POST"] and held == ["rate_cap"]


def test_an_odd_200_does_not_count_as_a_failing_api() -> None:
    clock = FakeClock()
    breaker = Breaker(Limits(max_rps=1000.0, failures=2, probe_rps=5.0, open_s=5.0, ramp_s=10.0), clock=clock)
    odd = Transient("unknown status value 'weird' in the status answer", 200)
    guard = GuardedLegacy(ScriptedLegacy(*([odd] * 10)), breaker)
    for _ in range(10):
        assert guard.status("R-1") == odd
    assert guard.state is State.CLOSED
