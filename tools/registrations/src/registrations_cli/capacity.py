"""The capacity model behind `registrations capacity`: pure functions, no I/O.

Given an arrival rate, a latency distribution and a poll schedule, it computes what a steady
state costs: the registrations in flight, the legacy API's requests, the broker's messages,
MongoDB's writes and the CPU of each part, from the per-unit figures measured by `make bench`
(docs/capacity.md says where each comes from and how to measure it again).

Everything is computed exactly from the distribution's CDF and its partial first moment
E[L; L <= t], both in closed form for the two kinds of latency; no sampling. A registration
that completes at age L is found by the first poll at an age >= L: its detection delay is that
age minus L. Polls stop at the first poll at or past the deadline, which fails it (`timeout`).

The latency is written as legacy-sim writes its profiles (`uniform:MIN,MAX`,
`lognormal:MEDIAN,SIGMA[,MAX]`). legacy-sim is a service of its own, not a library of the
command, so the two phases are parsed here again; tests/unit/test_capacity.py checks that both
parsers read the same texts alike. A drift is refused: a plan is for one steady state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

# legacy-sim cuts a log-normal draw without MAX at a day; the model cuts at the same age.
CEILING_S = 86400.0
_NORMAL = NormalDist()


class LatencyError(ValueError):
    """A latency profile the model cannot read; the message says why."""


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


@dataclass(frozen=True)
class Uniform:
    """Completion ages spread evenly over [min_s, max_s] (a point mass when they are equal)."""

    min_s: float
    max_s: float

    def cdf(self, t: float) -> float:
        if t >= self.max_s:
            return 1.0
        if t <= self.min_s:
            return 0.0
        return (t - self.min_s) / (self.max_s - self.min_s)

    def partial_mean(self, t: float) -> float:
        """E[L; L <= t]: the first moment of the mass up to t."""
        if t >= self.max_s:
            return self.mean
        if t <= self.min_s:
            return 0.0
        return (t * t - self.min_s * self.min_s) / (2 * (self.max_s - self.min_s))

    @property
    def mean(self) -> float:
        return (self.min_s + self.max_s) / 2

    @property
    def highest(self) -> float:
        return self.max_s

    def quantile(self, q: float) -> float:
        return self.min_s + q * (self.max_s - self.min_s)

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.min_s, self.max_s)

    def __str__(self) -> str:
        return f"uniform:{_number(self.min_s)},{_number(self.max_s)}"


@dataclass(frozen=True)
class LogNormal:
    """MEDIAN * exp(SIGMA * N(0,1)), a draw above the cap taken as the cap (MAX, else a day)."""

    median_s: float
    sigma: float
    max_s: float | None = None

    @property
    def cap(self) -> float:
        return CEILING_S if self.max_s is None else min(self.max_s, CEILING_S)

    def _z(self, t: float) -> float:
        return (math.log(t) - math.log(self.median_s)) / self.sigma

    def cdf(self, t: float) -> float:
        if t >= self.cap:
            return 1.0
        if t <= 0:
            return 0.0
        if self.sigma == 0:
            return 1.0 if t >= self.median_s else 0.0
        return _NORMAL.cdf(self._z(t))

    def _below_cap(self, t: float) -> float:
        """E[L; L <= t] of the uncut distribution, for t up to the cap."""
        if t <= 0:
            return 0.0
        if self.sigma == 0:
            return self.median_s if t >= self.median_s else 0.0
        return self.median_s * math.exp(self.sigma ** 2 / 2) * _NORMAL.cdf(self._z(t) - self.sigma)

    def partial_mean(self, t: float) -> float:
        if t < self.cap:
            return self._below_cap(t)
        # Everything above the cap was drawn as the cap.
        return self._below_cap(self.cap) + self.cap * (1.0 - self.cdf_uncut(self.cap))

    def cdf_uncut(self, t: float) -> float:
        if self.sigma == 0:
            return 1.0 if t >= self.median_s else 0.0
        return _NORMAL.cdf(self._z(t))

    @property
    def mean(self) -> float:
        return self.partial_mean(self.cap)

    @property
    def highest(self) -> float:
        return self.cap

    def quantile(self, q: float) -> float:
        if self.sigma == 0 or q <= 0:
            return min(self.median_s, self.cap) if self.sigma == 0 else 0.0
        if q >= 1:
            return self.cap
        return min(self.cap, self.median_s * math.exp(self.sigma * _NORMAL.inv_cdf(q)))

    def sample(self, rng: random.Random) -> float:
        return min(self.cap, self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0)))

    def __str__(self) -> str:
        text = f"lognormal:{_number(self.median_s)},{_number(self.sigma)}"
        return text if self.max_s is None else f"{text},{_number(self.max_s)}"


Latency = Uniform | LogNormal


def parse_latency(text: str) -> Latency:
    """`uniform:MIN,MAX` or `lognormal:MEDIAN,SIGMA[,MAX]`, with legacy-sim's rules."""
    text = text.strip()
    if " for " in f" {text} " or len(text.split()) > 1:
        raise LatencyError(f"{text!r}: a drift is not a steady state; plan each of its phases on its own")
    kind, colon, args = text.partition(":")
    if not colon or kind not in ("uniform", "lognormal"):
        raise LatencyError(f"{text!r}: expected uniform:MIN,MAX or lognormal:MEDIAN,SIGMA[,MAX]")
    raws = args.split(",")
    if not 2 <= len(raws) <= (2 if kind == "uniform" else 3):
        raise LatencyError(f"{text!r}: expected "
                           f"{'uniform:MIN,MAX' if kind == 'uniform' else 'lognormal:MEDIAN,SIGMA[,MAX]'}")
    try:
        values = [float(raw) for raw in raws]
    except ValueError:
        raise LatencyError(f"{text!r}: every value must be a number") from None
    if not all(math.isfinite(v) for v in values):
        raise LatencyError(f"{text!r}: every value must be a finite number")
    if kind == "uniform":
        low, high = values
        if low < 0 or low > high:
            raise LatencyError(f"{text!r}: expected 0 <= MIN <= MAX")
        return Uniform(low, high)
    median, sigma = values[0], values[1]
    cap = values[2] if len(values) == 3 else None
    if median <= 0 or sigma < 0 or (cap is not None and cap < median):
        raise LatencyError(f"{text!r}: expected MEDIAN > 0, SIGMA >= 0 and MAX >= MEDIAN")
    return LogNormal(median, sigma, cap)


# ---- schedules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """The first poll at `first_delay_s` (POLL_FIRST_DELAY_S), then one every `interval_s`.

    The submitter hands a registration straight into the first delay's wait queue, so each poll
    costs one hop through a wait queue (straight into pending when the first delay is 0)."""

    first_delay_s: float = 10.0
    interval_s: float = 2.0


@dataclass(frozen=True)
class Adaptive:
    """A model of the adaptive schedule: the poll ages that need the fewest polls on average
    for a mean detection delay of at most `target_delay_s`, knowing the distribution exactly,
    with the polls capped at `max_polls` on average (the delay then exceeds the target). The
    first poll is never before the 0.1 % quantile: no earlier than a registration has been
    seen to complete in a window of hundreds.

    A learning poller knows the distribution only from a window of completions and chooses its
    waits from a ladder of wait queues, so it needs somewhat more polls for the same delay:
    read the polls as a floor. Routing: the submitter hands a registration to the pending
    queue (only the poller knows the first poll's age), and the first poll is up to
    `first_hops` hops through wait queues away; each later poll one hop."""

    target_delay_s: float
    max_polls: float = 4.0
    first_hops: int = 2


Schedule = Fixed | Adaptive


@dataclass(frozen=True)
class Polling:
    """What a schedule costs one registration, on average."""

    polls: float  # GETs of the status endpoint
    delay_s: float  # mean detection delay of the registrations that completed in time
    time_in_system_s: float  # age at the outcome: found completed, or failed at the deadline
    timed_out: float  # share still processing at the deadline
    poll_ages_s: tuple[float, ...]  # the schedule's poll ages, up to the deadline or the last completion
    wait_hops: float  # hops through a wait queue (a publish, a dead-lettering, a delivery)
    pending_handoffs: float  # publishes straight into pending (a publish and a delivery)

    @property
    def poller_messages(self) -> float:
        """Deliveries the poller handles: each hop's, and each hand-off's."""
        return self.wait_hops + self.pending_handoffs


def _evaluate(dist: Latency, ages: list[float]) -> tuple[float, float, float, float]:
    """Polls, total delay (not yet divided by the completed share), time in system and the share
    left after the last age, for polls at `ages` (each taken only if nothing was found before)."""
    polls = delay = sojourn = 0.0
    before_f = before_g = 0.0
    for age in ages:
        f, g = dist.cdf(age), dist.partial_mean(age)
        polls += 1.0 - before_f
        caught = f - before_f
        delay += age * caught - (g - before_g)
        sojourn += age * caught
        before_f, before_g = f, g
    left = max(0.0, 1.0 - before_f)
    return polls, delay, sojourn + ages[-1] * left, left


def _outcome(dist: Latency, ages: list[float], wait_hops_extra: float, handoffs: float) -> Polling:
    polls, delay, sojourn, left = _evaluate(dist, ages)
    completed = 1.0 - left
    return Polling(polls=polls, delay_s=max(0.0, delay / completed) if completed > 0 else 0.0,
                   time_in_system_s=sojourn, timed_out=left, poll_ages_s=tuple(ages),
                   wait_hops=polls + wait_hops_extra, pending_handoffs=handoffs)


def fixed_polling(dist: Latency, schedule: Fixed, deadline_s: float) -> Polling:
    ages = [schedule.first_delay_s]
    while ages[-1] < deadline_s and dist.cdf(ages[-1]) < 1.0:
        ages.append(schedule.first_delay_s + len(ages) * schedule.interval_s)
    if schedule.first_delay_s > 0:
        return _outcome(dist, ages, 0.0, 0.0)
    # No first delay: the submitter publishes to pending and the first poll comes from there.
    return _outcome(dist, ages, -1.0, 1.0)


# Grid of candidate poll ages for the adaptive model: this many evenly spaced in age, as many
# evenly spaced in probability (fine where the mass is, still covering a long tail).
_GRID = 100
# The lowest age a first poll may have, as a quantile; and where a long tail is cut.
_FLOOR_Q = 0.001
_TOP_Q = 1e-6
_BISECTIONS = 32


def _grid(dist: Latency, deadline_s: float) -> list[float]:
    low = dist.quantile(_FLOOR_Q)
    top = min(deadline_s, dist.highest if dist.highest < CEILING_S else dist.quantile(1.0 - _TOP_Q))
    # A deadline before the earliest completions: the polls still end at the deadline.
    low = min(low, top)
    if top - low < 1e-9:
        return [top]
    f_low, f_top = dist.cdf(low), dist.cdf(top)
    ages = {low + (top - low) * k / _GRID for k in range(_GRID + 1)}
    if f_top > f_low:
        ages |= {min(top, max(low, dist.quantile(f_low + (f_top - f_low) * k / _GRID))) for k in range(1, _GRID)}
    points = sorted(ages)
    # Ages closer than a millisecond are one age.
    grid = [points[0]]
    for age in points[1:]:
        if age - grid[-1] > 1e-3:
            grid.append(age)
    grid[-1] = top
    return grid


def _solve(ages: list[float], cdf: list[float], moment: list[float], lam: float) -> list[int]:
    """The grid points of the schedule minimising E[polls] + lam * E[delay]; the last point
    (the top of the distribution, or the deadline) is always polled."""
    n = len(ages)
    value = [0.0] * n
    choice = [n - 1] * n
    for i in range(n - 2, -1, -1):
        c_i, m_i, p_i = cdf[i], moment[i], 1.0 - cdf[i]
        best, best_j = math.inf, n - 1
        for j in range(i + 1, n):
            cost = p_i + lam * (ages[j] * (cdf[j] - c_i) - (moment[j] - m_i)) + value[j]
            if cost < best:
                best, best_j = cost, j
        value[i], choice[i] = best, best_j
    first, best = 0, math.inf
    for j in range(n):
        cost = 1.0 + lam * (ages[j] * cdf[j] - moment[j]) + value[j]
        if cost < best:
            best, first = cost, j
    chain = [first]
    while chain[-1] < n - 1:
        chain.append(choice[chain[-1]])
    return chain


def adaptive_polling(dist: Latency, schedule: Adaptive, deadline_s: float) -> Polling:
    ages = _grid(dist, deadline_s)
    cdf = [dist.cdf(a) for a in ages]
    moment = [dist.partial_mean(a) for a in ages]
    extra, handoffs = float(schedule.first_hops - 1), 1.0

    def plan(lam: float) -> Polling:
        return _outcome(dist, [ages[k] for k in _solve(ages, cdf, moment, lam)], extra, handoffs)

    # E[delay] falls and E[polls] rises as lam grows: the smallest lam that meets the target
    # gives the fewest polls that do.
    scale = max(dist.quantile(0.5), 1e-3)
    lo, hi = math.log(1e-4 / scale), math.log(1e6 / scale)
    best = plan(math.exp(hi))
    if best.delay_s <= schedule.target_delay_s:
        a, b = lo, hi
        low_plan = plan(math.exp(lo))
        if low_plan.delay_s <= schedule.target_delay_s:
            best = low_plan
        else:
            for _ in range(_BISECTIONS):
                mid = (a + b) / 2
                p = plan(math.exp(mid))
                if p.delay_s <= schedule.target_delay_s:
                    b, best = mid, p
                else:
                    a = mid
    if best.polls > schedule.max_polls + 1e-9:
        # The target costs too many polls: the smallest delay within the cap.
        a, b = lo, hi
        best = plan(math.exp(lo))
        for _ in range(_BISECTIONS):
            mid = (a + b) / 2
            p = plan(math.exp(mid))
            if p.polls <= schedule.max_polls:
                a, best = mid, p
            else:
                b = mid
    return best


def polling(dist: Latency, schedule: Schedule, deadline_s: float) -> Polling:
    if isinstance(schedule, Fixed):
        return fixed_polling(dist, schedule, deadline_s)
    return adaptive_polling(dist, schedule, deadline_s)


# ---- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """Per-unit costs, measured by `make bench` on a 2-core machine (docs/capacity.md has the
    runs each comes from). CPU figures are milliseconds of one core."""

    submitter_ms_per_registration: float = 1.1
    # The poller's CPU per message it handles: each a poll on the fixed schedule, where it was
    # measured; a message relayed without a poll is counted the same, an upper bound.
    poller_ms_per_message: float = 0.9
    # The broker's CPU per message operation: a publish, a dead-lettering or a delivery.
    broker_ms_per_message: float = 0.2
    # The share of a replica's capacity the plan uses: of one core (the charts' CPU limit; one
    # Python process uses about one core at most) and of its worker threads.
    utilization: float = 0.6
    submitter_workers: int = 64
    poller_workers: int = 16
    # How long a legacy call holds a worker (legacy-sim answers in 30 ms in the bench).
    legacy_call_s: float = 0.03


# MongoDB operations per registration (docs/capacity.md#mongodb): the submitter reads the user
# and the attempt, writes the attempt's request id and the user's `submitted`; the poller writes
# `registered`. A failure instead reads the attempt and writes the index entry (twice: publishing,
# then queued), the attempt's mark and the user's `failed`, plus a counter block per 32 failures.
WRITES_REGISTERED = 3.0
READS_REGISTERED = 2.0
WRITES_FAILED = 2.0 + 4.0 + 1.0 / 32
READS_FAILED = 3.0


@dataclass(frozen=True)
class Replicas:
    cores: float
    by_cpu: int
    by_workers: int

    @property
    def needed(self) -> int:
        return max(1, self.by_cpu, self.by_workers)


@dataclass(frozen=True)
class Plan:
    rate: float
    latency: Latency
    schedule: Schedule
    deadline_s: float
    failed_share: float
    figures: Figures
    polling: Polling

    # ---- flows ----
    @property
    def in_flight(self) -> float:
        """Little's law: arrivals a second times the seconds each stays."""
        return self.rate * self.polling.time_in_system_s

    @property
    def failures_per_registration(self) -> float:
        """The legacy system's failures among those completed, and every timeout."""
        p = self.polling
        return self.failed_share * (1.0 - p.timed_out) + p.timed_out

    @property
    def legacy_posts_per_s(self) -> float:
        return self.rate

    @property
    def legacy_polls_per_s(self) -> float:
        return self.rate * self.polling.polls

    @property
    def legacy_requests_per_s(self) -> float:
        return self.legacy_posts_per_s + self.legacy_polls_per_s

    # ---- broker ----
    @property
    def broker_published_per_s(self) -> float:
        """Publishes by clients: the inbound message, hand-offs, hops and failure records."""
        p = self.polling
        return self.rate * (1.0 + p.pending_handoffs + p.wait_hops + self.failures_per_registration)

    @property
    def broker_dead_lettered_per_s(self) -> float:
        return self.rate * self.polling.wait_hops

    @property
    def broker_delivered_per_s(self) -> float:
        """To the submitter, and to the poller (the failure queue's readers are not counted)."""
        return self.rate * (1.0 + self.polling.poller_messages)

    @property
    def broker_messages_per_s(self) -> float:
        return self.broker_published_per_s + self.broker_dead_lettered_per_s + self.broker_delivered_per_s

    @property
    def pending_enqueued_per_s(self) -> float:
        """Into the pending queue, by hand-off or dead-lettering; as many leave it."""
        return self.rate * self.polling.poller_messages

    @property
    def wait_enqueued_per_s(self) -> float:
        return self.rate * self.polling.wait_hops

    # ---- MongoDB ----
    @property
    def mongodb_writes_per_s(self) -> float:
        f = self.failures_per_registration
        return self.rate * ((1.0 - f) * WRITES_REGISTERED + f * WRITES_FAILED)

    @property
    def mongodb_reads_per_s(self) -> float:
        f = self.failures_per_registration
        return self.rate * ((1.0 - f) * READS_REGISTERED + f * READS_FAILED)

    # ---- CPU and replicas ----
    def _replicas(self, cores: float, calls_per_s: float, workers: int) -> Replicas:
        u = self.figures.utilization
        busy_workers = calls_per_s * self.figures.legacy_call_s
        return Replicas(cores, math.ceil(cores / u - 1e-9), math.ceil(busy_workers / (workers * u) - 1e-9))

    @property
    def submitter(self) -> Replicas:
        cores = self.rate * self.figures.submitter_ms_per_registration / 1000.0
        return self._replicas(cores, self.legacy_posts_per_s, self.figures.submitter_workers)

    @property
    def poller(self) -> Replicas:
        cores = self.rate * self.polling.poller_messages * self.figures.poller_ms_per_message / 1000.0
        return self._replicas(cores, self.legacy_polls_per_s, self.figures.poller_workers)

    @property
    def broker_cores(self) -> float:
        return self.broker_messages_per_s * self.figures.broker_ms_per_message / 1000.0

    @property
    def target_met(self) -> bool | None:
        if isinstance(self.schedule, Adaptive):
            return self.polling.delay_s <= self.schedule.target_delay_s + 1e-9
        return None


def plan(*, rate: float, latency: Latency, schedule: Schedule, deadline_s: float = 300.0,
         failed_share: float = 0.0, figures: Figures | None = None) -> Plan:
    if not rate > 0:
        raise ValueError("the rate must be > 0")
    if not 0.0 <= failed_share <= 1.0:
        raise ValueError("the failed share must be within 0..1")
    return Plan(rate, latency, schedule, deadline_s, failed_share, figures or Figures(),
                polling(latency, schedule, deadline_s))
