"""The adaptive poll schedule: learn when registrations complete, and choose when to poll. No I/O.

What is observed. Each registration the poller finds completed tells it an interval: it completed
after the age of its last poll that said `processing` (0 when there was none) and no later than the
age of the poll that said `completed`; and when it was submitted. A `Learner` keeps the last
`window` such observations (bounded memory). Below `min_observations` the schedule is the
configured one (`PollPolicy`: `POLL_FIRST_DELAY_S`, then every `POLL_INTERVAL_S`). A poll that
finds `processing` is told too (`Running`): one at or past the plan's last age is kept, an id still
running where the plan expected none, with no upper bound (right censored); the same id's next poll
replaces its record, its completion drops it, a record whose next poll is overdue (it failed,
another replica took it) stands for nothing, and at most `window` are kept. In steady arrivals they
are the rare straggler; when the latency moves later, every new id is one, long before any of them
completes.

What is estimated. `estimate` turns the window into a distribution of completion ages with a few
rounds of Turnbull's self-consistency algorithm (the maximum-likelihood method for
interval-censored data), started from each interval spread evenly. That is enough to move the mass
of intervals like (0, 10] ("done at the first poll, at 10 s") to where probes' (0, 5] ("done
already at 5 s") put it, which no per-interval spreading would do, and stops short of the
maximum-likelihood estimate's habit of piling the mass on a few points, which a plan would then fit
too closely. Ages are rounded to 1 % first, so the intervals fall into a few dozen distinct ones
and the fit stays cheap. The window is not a sample of the distribution whenever arrivals are not
steady: while a burst completes it holds only the fast end of it, after arrivals stop only the slow
end of the last submissions. So the estimate is Turnbull's for right-truncated data: an id
submitted t seconds before the latest detection stands also for those submitted with it that
complete later than t (not seen yet); and once the window is full, submissions so old that their
fast ids have left it are left out. A submission older than the plan is complete in the window (its
ids done, or running past the plan), so it stands for no one unseen; the running ids put mass past
the ages they were seen at, and past every completion into `beyond`, which the plan does not reach.
A drift: in order of submission, the ids' ranks in that distribution (each among the ages it could
have been seen at; a running id, past its age) change level, past chance and by more than `shift`,
split where a change of level is likeliest; the ids before the change are set aside, so the plan is
fitted to the registrations now arriving rather than to a mixture of old and new. When most of
those are still running past every completion (a shift seen in the ids outliving the plan, none or
few done yet), the plan is its first poll alone, where they were last seen running: the ids in
flight go there instead of through the old plan's remaining polls and its tail, and on from it in
the waits past a plan.

What is chosen. A plan of poll ages: the first poll, then a wait from the ladder between each poll
and the next. It minimises E[polls] + lambda * E[detection delay] by dynamic programming over a
grid of ages, where each step is "wait one tier of the ladder, then poll"; lambda is found by
bisection so that the expected delay the plan can change is `delay_ratio` of the median completion
age (of the mass it reaches: `beyond` pays its polls, not its delay), unless that would cost more
than `max_polls` polls on average, in which case the polls are capped. The first poll may be any
sum of one or two tiers (two hops through the broker before it); every later wait is exactly one
tier, so each poll costs one hop, as on the fixed schedule. Two bounds keep a plan from hurting the
day the latency moves later: a poll counts as at least `_LEAST_POLL_COST` of a poll however few ids
are expected to need it (no long train of polls for the last percent), and no wait is longer than
`tail_ratio` of the age it starts from (a last poll long after the others would yield wide
intervals whose spread mass would justify it again). Past the plan's last age the waits grow by
that same ratio, so a latency that moved later is caught in a few polls and then learned; by the
smaller `unseen_ratio` while the window cannot have seen the tail (its oldest submission not yet
1.2 times older than 90 % of its completion ages: a burst, a start), since the ids there are then
most of them, not stragglers. A plan is costed at its exact ages, not the grid's. After a poll, the
next is at the next planned age at least half a planned gap ahead (a shift's one age: past it when
seen running there), so an id whose plan was refitted while it waited is not polled twice in a row.

The rule of promise 4. The first poll is never planned before the earliest age at which a
registration in the window was seen completed (the smallest upper bound, the `floor`; for a shift
none of whose ids completed, where they were last seen running): mass the estimate puts below it is
found at the first poll, its delay counted but left out of the aim (no plan can change it). The
only polls before the floor are probes: when registrations were done at their first poll, the
latency may have moved earlier, so a share of the ids growing with theirs (`probe_share` of them
once `probe_trigger` of the window was; chosen by a hash of the request id, the same at every
redelivery) make their first poll earlier: spread log-uniformly by that hash from just below the
planned age down to half of it when every one was done, so some land among the completions wherever
they start (all at one age, they could all fall below them, and the floor would never come down). A
probe that finds `completed` lowers the floor; one that finds `processing` bounds the mass from
below. Both are observations.

Why a ladder. The broker serves a delay only as a wait queue of fixed TTL, declared at connect
time. `LADDER_S` is 25 tiers from 0.1 s to 409.6 s in steps of sqrt(2); the configured
`POLL_FIRST_DELAY_S` and `POLL_INTERVAL_S` are added for the cold start, so at most 27 queues
whatever is learned. sqrt(2) is the coarsest step whose choice of gaps still lets the plan meet a
delay of a few percent of the latency (the plan picks among them, it does not round to them); a
finer step would double the queues for little gain.

The fit is some 5 to 15 milliseconds of pure Python: it runs at most every `refit_every`
observations (running records kept count) and `refit_min_s` seconds, on a copy of the window,
outside any lock.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# 0.1 s * sqrt(2)**k, whole milliseconds (queue names and TTLs are in ms): 0.1 s .. 409.6 s.
LADDER_S: tuple[float, ...] = tuple(round(100 * 2 ** (k / 2)) / 1000 for k in range(25))

# Ages are compared after rounding to 1 %: a poll planned at 12.8 s and taken at 12.83 s is one age.
_ROUNDING = 0.01
# DP grid cells between the floor and the last completion seen.
_GRID = 120
# What the plan counts a poll as at least, however few ids are expected to be still waiting: a
# plan that ends in many polls nearly nobody needs would cost every id all of them the day the
# latency moves later.
_LEAST_POLL_COST = 0.06
# Steps of the search for lambda, over 7 decades: about 5 % of lambda at the end.
_BISECTIONS = 14
# How far past chance a change in the ranks' level must be (the sup of a Brownian bridge: 1.36
# at 5 %, 1.63 at 1 %, 1.95 at 0.1 %): a fit runs every few seconds, a false one costs a plan.
_CHANGE_Z = 2.0
# The same for the likeliest split, standardised, which sees a change at the newest end (the ids
# outliving a plan) as soon as it holds `min_observations` ids: over splits with at least 4 % of
# the window on either side, chance passes it in some 3 fits in 1,000 (and `shift` must pass too).
_SPLIT_Z = 4.0
# The window has seen the tail once its oldest submission is older than this times nearly all
# (90 %) of its completion ages: that submission has had time to complete, bar stragglers.
_SEEN_MARGIN = 1.2
# The shallowest probe, as a share of the planned first poll: short of it by more than a
# message's lateness.
_PROBE_TOP = 0.95
# How far past a planned age a message may arrive (its hops and the poller's work) and still be
# on plan: seconds, plus a share of the wait.
_SLACK_S = 0.05
_SLACK_SHARE = 0.05
# A running id is kept from the plan's last age on, to the rounding of ages (a wait may be a tier a
# little short of the gap, the message late by its hops).
_PAST_PLAN = 1.0 - 2 * _ROUNDING
# Past this share of ids still running past every completion seen (a shift few of whose ids have
# completed), the plan is its first poll alone, where they were last seen running.
_MOSTLY_BEYOND = 0.5
# How long a running id's record stands for it: until its next poll is overdue, this many times
# the longest wait past the plan (`tail_ratio` of its age). Its next poll, on this poller, replaces
# it; one taken by another replica, or an id that failed, leaves a record nothing replaces.
_RUNNING_FOR = 2.0


class PollSchedule(Protocol):
    """When to poll one id, from its age (and, for the first poll, its place among the ids)."""

    def first_wait(self, *, age_s: float, share: float = 0.0) -> float | None:
        """How long an id never polled must still wait, or None: poll now. `share` is uniform in
        [0, 1) per id and stable across redeliveries (it picks the ids that probe)."""
        ...

    def next_wait(self, *, age_s: float) -> float:
        """How long to wait after a poll at `age_s` that found the registration not done."""
        ...


def adaptive_tiers(first_delay_s: float, interval_s: float) -> tuple[float, ...]:
    """The waits the adaptive schedule uses: the ladder, and the configured delays for the cold start."""
    return tuple(sorted({*LADDER_S, *(d for d in (first_delay_s, interval_s) if d > 0)}))


def _slack(wait_s: float) -> float:
    return _SLACK_S + _SLACK_SHARE * wait_s


def tier_not_below(wait_s: float, tiers: Sequence[float]) -> float:
    """The shortest tier at least `wait_s` (a little less allowed: the message is late by its hops),
    or the longest tier."""
    i = bisect.bisect_left(tiers, wait_s - _slack(wait_s))
    return tiers[min(i, len(tiers) - 1)]


def within_deadline(wait_s: float, *, age_s: float, deadline_s: float, tiers: Sequence[float]) -> float:
    """`wait_s`, or, when it would end past the deadline, the shortest tier that reaches the
    deadline: the deadline stays absolute, the last poll comes at it, not a long wait after."""
    if age_s + wait_s <= deadline_s or age_s >= deadline_s:
        return wait_s
    return min(wait_s, tier_not_below(deadline_s - age_s, tiers))


def first_hop(remaining_s: float, tiers: Sequence[float]) -> float:
    """The next wait towards an age `remaining_s` away: of one tier, or two, whichever lands
    there soonest at or after it (within a late message's slack; a second hop counts as
    `_SLACK_S` later, for what a hop adds), the first; else the longest tier short of it, and
    another hop follows. Never lands early."""
    slack = _slack(remaining_s)
    best, best_score = None, math.inf
    i = bisect.bisect_left(tiers, remaining_s)
    if i < len(tiers) and tiers[i] - remaining_s <= slack:
        best, best_score = tiers[i], tiers[i] - remaining_s
    for t in reversed(tiers[:i]):
        rest = remaining_s - t
        j = bisect.bisect_left(tiers, rest)
        if j < len(tiers) and tiers[j] - rest <= slack and tiers[j] - rest + _SLACK_S < best_score:
            best, best_score = t, tiers[j] - rest + _SLACK_S
    if best is not None:
        return best
    return tiers[i - 1] if i > 0 else tiers[0]


def two_tier_ages(tiers: Sequence[float]) -> list[float]:
    """Every age one or two hops reach: the possible first polls of a plan."""
    return sorted({*tiers, *(round(a + b, 6) for k, a in enumerate(tiers) for b in tiers[k:])})


def _round_age(age_s: float) -> float:
    if age_s <= 0:
        return 0.0
    return math.exp(round(math.log(age_s) / _ROUNDING) * _ROUNDING)


@dataclass(frozen=True)
class Observation:
    """A registration seen completed: it completed in (lo_s, hi_s] of age; submitted at
    `submitted_s` on the poller's clock (None: unknown, the window's order stands for it)."""

    lo_s: float
    hi_s: float
    submitted_s: float | None = None


@dataclass(frozen=True)
class Running:
    """A registration polled `processing` at `age_s` of age, submitted at `submitted_s` on the
    poller's clock; `since_s`: the age of its previous poll that said `processing` (None: none
    did), whose record this one replaces. To an estimate, an observation with no upper bound."""

    age_s: float
    submitted_s: float
    since_s: float | None = None


@dataclass(frozen=True)
class AdaptiveConfig:
    """What the adaptive schedule is tuned by: the waits it may use, and the knobs above (the
    poller sets the window, the cold start's length, the delay aimed at and the polls cap from
    its settings; the rest are the defaults the simulations were run with)."""

    tiers: tuple[float, ...]
    window: int = 500
    min_observations: int = 20
    delay_ratio: float = 0.05
    max_polls: float = 4.0
    refit_every: int = 20
    refit_min_s: float = 2.0
    # Probes: `probe_share` of ids once `probe_trigger` of the window was done at its first poll
    # (proportionally fewer below), their first poll spread below the planned one, the deepest
    # earlier by `probe_depth` times that share of the window.
    probe_trigger: float = 0.8
    probe_share: float = 0.3
    probe_depth: float = 0.5
    # No wait longer than this times the age it starts from; past the plan, waits of that.
    tail_ratio: float = 0.4
    # Past the plan while the window's first ids may still be completing (a burst, a start):
    # waits of this times the age instead (those ids are the bulk of the distribution, not its
    # stragglers: a mean delay near 6 % of their age).
    unseen_ratio: float = 0.12
    # How far apart the mean ranks (a half when nothing moved) of the ids submitted before and
    # after a change must be for the older to be set aside as a distribution that has gone.
    shift: float = 0.15


@dataclass(frozen=True)
class LearnedSchedule:
    """A plan fitted to a window of observations. Implements PollSchedule."""

    tiers: tuple[float, ...]
    ages: tuple[float, ...]  # planned poll ages: the first, then one tier apart each
    floor_s: float
    probe_age_s: float | None
    probe_share: float
    tail_ratio: float  # past the plan, waits of this times the age
    observations: int  # completions fitted to
    running: int  # ids fitted to as still running past the plan
    beyond: float  # the share of ids expected past every completion seen: past the plan
    quantiles: tuple[float, float, float]  # completion age p10, p50, p90
    expected_polls: float
    expected_delay_s: float

    @property
    def first_poll_s(self) -> float:
        return self.ages[0]

    @property
    def mean_interval_s(self) -> float:
        return (self.ages[-1] - self.ages[0]) / (len(self.ages) - 1) if len(self.ages) > 1 else 0.0

    def probe_target(self, share: float) -> float | None:
        """The first poll of a probing id: spread log-uniformly by its share from the deepest
        probe up to just below the planned first poll, so that whatever lies between, some
        probe lands there (all at one age, they could all fall below every completion)."""
        if self.probe_age_s is None or share >= self.probe_share:
            return None
        top = _PROBE_TOP * self.ages[0]
        if top <= self.probe_age_s:
            return self.probe_age_s
        return self.probe_age_s * math.exp(math.log(top / self.probe_age_s) * share / self.probe_share)

    def first_wait(self, *, age_s: float, share: float = 0.0) -> float | None:
        probe = self.probe_target(share)
        target = probe if probe is not None else self.ages[0]
        remaining = target - age_s
        # Waits are whole milliseconds of TTL summed in `waited_s`: a hop that lands on the age
        # leaves float dust, not a wait.
        if remaining <= 1e-6:
            return None
        return first_hop(remaining, self.tiers)

    def next_wait(self, *, age_s: float) -> float:
        # The next planned age at least half the plan's own gap ahead: a message polled on an
        # older plan (the plan is refitted as it waits) is not polled again almost at once, so
        # an id never meets more polls than the plans it lives through would give it. The plan
        # of a shift starts where its ids were last seen running: one seen there is past it.
        ages = self.ages
        i = bisect.bisect_right(ages, age_s)
        if i == 0 and self.beyond >= _MOSTLY_BEYOND and age_s >= _PAST_PLAN * self.floor_s:
            i = len(ages)
        while i < len(ages) and i > 0 and ages[i] - age_s < (ages[i] - ages[i - 1]) / 2:
            i += 1
        if i < len(ages):
            return tier_not_below(ages[i] - age_s, self.tiers)
        last_gap = ages[-1] - ages[-2] if len(ages) > 1 else self.tiers[0]
        return tier_not_below(max(last_gap, self.tail_ratio * age_s), self.tiers)


# ---- the learner's window -----------------------------------------------------------------------


@dataclass
class Learner:
    """The sliding window and when to refit. Not thread-safe: its owner holds a lock around it.

    Besides the last `window` completions, it keeps the ids still running past the plan its
    owner `follow`s: a `Running` record from the plan's last age on, and then each of the same
    id's records after it (its next poll says where it was last seen, whatever the plan by then),
    until it completes. At most `window` of them, the oldest dropped first."""

    config: AdaptiveConfig
    _window: deque[Observation] = field(init=False)
    _since_fit: int = field(init=False, default=0)
    _last_fit_at: float = field(init=False, default=-math.inf)
    # Running records by the age they were polled at: the key a later record of the same id, or
    # its completion, names as its last `processing` age (an exact float, carried in the message).
    _running: dict[float, list[Observation]] = field(init=False, default_factory=dict)
    _running_count: int = field(init=False, default=0)
    _plan_end_s: float = field(init=False, default=math.inf)  # none before a plan: the cold start

    def __post_init__(self) -> None:
        self._window = deque(maxlen=self.config.window)

    def __len__(self) -> int:
        return len(self._window)

    @property
    def running(self) -> int:
        return self._running_count

    def observe(self, observation: Observation | Running) -> None:
        if isinstance(observation, Running):
            followed = self._replace(observation.since_s)
            if not followed and observation.age_s < _PAST_PLAN * self._plan_end_s:
                return
            self._keep(Observation(observation.age_s, math.inf, submitted_s=observation.submitted_s))
        else:
            self._replace(observation.lo_s)
            self._window.append(observation)
        self._since_fit += 1

    def due(self, now: float) -> bool:
        c = self.config
        return (len(self._window) >= c.min_observations and self._since_fit >= min(c.refit_every, c.min_observations)
                and now - self._last_fit_at >= c.refit_min_s)

    def take(self, now: float) -> tuple[Observation, ...]:
        """A copy of the window to fit, the running records after it (no upper bound), outside the
        owner's lock; the next fit waits its turn."""
        self._since_fit = 0
        self._last_fit_at = now
        return (*self._window, *(o for records in self._running.values() for o in records))

    def follow(self, schedule: LearnedSchedule) -> None:
        """The schedule now in use: ids found running past its last age are kept."""
        self._plan_end_s = schedule.ages[-1]

    def _replace(self, age_s: float | None) -> bool:
        """Drop the record of an id last seen running at `age_s`, if kept; whether one was."""
        if age_s is None or age_s not in self._running:
            return False
        records = self._running[age_s]
        records.pop()
        self._running_count -= 1
        if not records:
            del self._running[age_s]
        return True

    def _keep(self, record: Observation) -> None:
        if self._running_count >= self.config.window:
            self._replace(next(iter(self._running)))
        self._running.setdefault(record.lo_s, []).append(record)
        self._running_count += 1


# ---- the estimate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """Completion-age mass on elementary cells (edges[k], edges[k+1]], spread evenly inside each,
    and `beyond` the last edge, where no completion was seen (ids still running there)."""

    edges: tuple[float, ...]
    mass: tuple[float, ...]
    beyond: float = 0.0

    def cdf(self, age_s: float) -> float:
        total = 0.0
        for k, m in enumerate(self.mass):
            lo, hi = self.edges[k], self.edges[k + 1]
            if age_s >= hi:
                total += m
            elif age_s > lo:
                total += m * (age_s - lo) / (hi - lo)
        return min(1.0, total)

    def moment(self, age_s: float) -> float:
        """The mass up to `age_s` times its age (the first partial moment)."""
        total = 0.0
        for k, m in enumerate(self.mass):
            lo, hi = self.edges[k], self.edges[k + 1]
            if age_s >= hi:
                total += m * (lo + hi) / 2
            elif age_s > lo:
                part = (age_s - lo) / (hi - lo)
                total += m * part * (lo + age_s) / 2
        return total

    def quantile(self, q: float) -> float:
        """The age by which a share `q` completed; the last edge, a lower bound, when that share
        lies beyond it."""
        total = 0.0
        for k, m in enumerate(self.mass):
            if m > 0 and total + m >= q:
                lo, hi = self.edges[k], self.edges[k + 1]
                return lo + (hi - lo) * (q - total) / m
            total += m
        return self.edges[-1]


def face_value(observations: Sequence[Observation], *,
               window_full: bool) -> tuple[list[Observation], list[float] | None]:
    """What an estimate can take from the window: the observations, and, when their submission
    times are known, the age up to which a completion of each one's submission would have been
    seen by now (the latest detection in the window stands for now). Once the window is full
    and drops its oldest, a submission older than the oldest detection kept by more than the
    earliest completion age seen has lost its fast ids to the window's end: those are left out
    rather than corrected for (how much a submission lost there, only the mass below the floor,
    which nothing observes, would say)."""
    if not observations or any(o.submitted_s is None for o in observations):
        return list(observations), None
    seen = [(o.submitted_s or 0.0) + o.hi_s for o in observations]
    now, since, floor_s = max(seen), min(seen), min(o.hi_s for o in observations)
    kept = [o for o in observations if not window_full or since - (o.submitted_s or 0.0) <= floor_s]
    return kept, [now - (o.submitted_s or 0.0) for o in kept]


def estimate(observations: Sequence[Observation], *, seen_until: Sequence[float] | None = None,
             recorded_from_s: float = math.inf, iterations: int = 10, tolerance: float = 1e-5) -> Distribution:
    """Turnbull's self-consistency estimate of the completion-age distribution; with
    `seen_until`, his estimate for right-truncated data: each id seen stands also for the ids of
    its submission that complete later than it could have been seen by now, so that neither a
    burst's first completions nor a pause's last (the slow end of the cohorts before it) pass
    for the whole distribution. Observations with no upper bound (ids still running) are right
    censored; a submission at least `recorded_from_s` old has all its running ids among them, so
    its completions stand for no one else."""
    intervals = [(lo, max(lo, _round_age(o.hi_s)) if math.isfinite(o.hi_s) else math.inf)
                 for o in observations for lo in (_round_age(o.lo_s),)]
    counts: dict[tuple[float, float], int] = {}
    for key in intervals:
        counts[key] = counts.get(key, 0) + 1
    edges = sorted({0.0, *(lo for lo, _ in counts), *(hi for _, hi in counts if math.isfinite(hi))})
    index = {e: k for k, e in enumerate(edges)}
    # Past the last edge, a cell of its own when an id is still running there.
    open_ended = any(not math.isfinite(hi) for _, hi in counts)
    cells = len(edges) - (0 if open_ended else 1)
    index[math.inf] = cells
    if cells == 0:
        return Distribution((0.0, edges[0] or 1e-3), (1.0,))
    # A zero-width interval (rounding met) counts in the cell that ends at it.
    def span(lo: float, hi: float) -> tuple[int, int]:
        return (max(0, index[hi] - 1) if lo == hi else index[lo]), index[hi]

    groups = [(*span(lo, hi), n) for (lo, hi), n in counts.items()]
    total = sum(n for _, _, n in groups)
    # Per id, the cells that end by the age it could have been seen at (its own at least).
    windows: dict[int, int] = {}
    if seen_until is not None:
        for (_, hi), t_s in zip(intervals, seen_until, strict=True):
            if not math.isfinite(hi) or t_s >= recorded_from_s:
                continue
            last = max(index[hi], bisect.bisect_right(edges, _round_age(t_s)) - 1)
            if last < cells:
                windows[last] = windows.get(last, 0) + 1
    covered = [0.0] * cells
    for a, b, n in groups:
        for k in range(a, b):
            covered[k] += n / (b - a)
    p = [c / total for c in covered]
    for _ in range(iterations):
        new = [0.0] * cells
        prefix = [0.0]
        for x in p:
            prefix.append(prefix[-1] + x)
        for a, b, n in groups:
            s = prefix[b] - prefix[a]
            if s <= 0:
                continue
            w = n / s
            for k in range(a, b):
                new[k] += w * p[k]
        if windows:
            # The ids not seen yet: n (1 - F(T)) / F(T) per id seen by T, spread over the cells
            # past T in proportion to their mass. (F(T) is held above 2 %: one id seen at the
            # very start of the distribution stands for at most fifty.)
            ghosts = [0.0] * (cells + 1)
            for b, n in windows.items():
                ghosts[b] += n / max(prefix[b], 0.02)
            weight = 0.0
            for k in range(cells):
                weight += ghosts[k]
                new[k] += p[k] * weight
        norm = sum(new)
        new = [x / norm for x in new]
        change = max(abs(x - y) for x, y in zip(new, p, strict=True))
        p = new
        if change < tolerance:
            break
    if open_ended:
        return Distribution(tuple(edges), tuple(p[:-1]), beyond=p[-1])
    return Distribution(tuple(edges), tuple(p))


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """The mass on a uniform grid from the floor: point k is age floor + k * step; cumulative
    mass F and first moment G at each point, for the delay of any span in O(1)."""

    floor_s: float
    step_s: float
    cdf: tuple[float, ...]
    moment: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.cdf) - 1

    def age(self, k: int) -> float:
        return self.floor_s + k * self.step_s

    def index(self, age_s: float) -> int:
        return max(0, round((age_s - self.floor_s) / self.step_s))

    def delay_from_start(self, j: int) -> float:
        """Expected detection delay of the mass up to point j, caught by a first poll at j."""
        jj = min(j, self.size)
        return self.age(j) * self.cdf[jj] - self.moment[jj]

    def at(self, age_s: float) -> tuple[float, float]:
        """F and G at any age, between the points: what a plan's exact ages are costed at."""
        x = (age_s - self.floor_s) / self.step_s
        if x >= self.size:
            return self.cdf[-1], self.moment[-1]
        k = max(0, int(x))
        part = max(0.0, x - k)
        return (self.cdf[k] + part * (self.cdf[k + 1] - self.cdf[k]),
                self.moment[k] + part * (self.moment[k + 1] - self.moment[k]))

    def delay(self, i: int, j: int) -> float:
        """Expected detection delay of the mass in (point i, point j], caught by a poll at j."""
        jj = min(j, self.size)
        mass = self.cdf[jj] - self.cdf[i]
        return self.age(j) * mass - (self.moment[jj] - self.moment[i])


def _grid(dist: Distribution, floor_s: float) -> _Grid:
    top = max(dist.edges[-1], floor_s)
    step = max((top - floor_s) / _GRID, 1e-3)
    n = max(1, math.ceil((top - floor_s) / step))
    # Point 0 holds everything up to the floor, at the ages the estimate gives it: no poll comes
    # earlier, so it is found at the first poll, and its delay counts.
    cells = [0.0] * (n + 1)
    moments = [0.0] * (n + 1)
    cells[0] = dist.cdf(floor_s)
    moments[0] = dist.moment(floor_s)
    for k in range(1, n + 1):
        lo, hi = floor_s + (k - 1) * step, floor_s + k * step
        m = dist.cdf(hi) - dist.cdf(lo)
        cells[k] = m
        moments[k] = m * (lo + hi) / 2
    cdf, moment, c, g = [], [], 0.0, 0.0
    for m, mm in zip(cells, moments, strict=True):
        c += m
        g += mm
        cdf.append(c)
        moment.append(g)
    # The mass beyond the last edge stays out of the grid: every poll of the plan finds it
    # running, and the waits past the plan, not the plan, find it done.
    scale = c + dist.beyond if c + dist.beyond > 0 else 1.0
    return _Grid(floor_s, step, tuple(x / scale for x in cdf), tuple(x / scale for x in moment))


@dataclass(frozen=True)
class _Plan:
    ages: tuple[float, ...]
    polls: float
    delay_s: float


def _moves(grid: _Grid, tiers: Sequence[float], longest: float) -> list[list[tuple[int, float, float]]]:
    """From each grid point, the polls one tier can reach: (point, its age, the tier), shortest
    first, none longer than `longest` times the age (but the shortest), and none past the first
    that reaches the end of the mass (a longer wait there only adds delay)."""
    n, floor_s, step_s = grid.size, grid.floor_s, grid.step_s
    by_step: dict[int, float] = {}
    for t in sorted(tiers, reverse=True):  # the shortest tier of a step, for the plan's exact ages
        by_step[max(1, round(t / step_s))] = t
    steps = sorted(by_step)
    moves = []
    for i in range(n):
        reach = max(1, int(longest * (floor_s + i * step_s) / step_s))
        out = []
        for k, step in enumerate(steps):
            if step > reach and k > 0:
                break
            j = i + step
            out.append((j, floor_s + j * step_s, by_step[step]))
            if j >= n:
                break
        moves.append(out)
    return moves


def _solve(grid: _Grid, moves: Sequence[Sequence[tuple[int, float, float]]],
           firsts: Sequence[tuple[float, int, float]], lam: float) -> _Plan:
    """The plan minimising E[polls] + lam * E[detection delay]: backwards over the grid, each
    step one of `moves`. (The inner loop is written out: it runs a few thousand times a fit.)"""
    n = grid.size
    cdf, moment = grid.cdf, grid.moment
    total_mass, total_moment = cdf[n], moment[n]
    value = [0.0] * (n + 1)
    choice: list[tuple[int, float, float]] = [(n, 0.0, 0.0)] * (n + 1)
    for i in range(n - 1, -1, -1):
        best, best_move = math.inf, moves[i][-1]
        c_i, m_i = cdf[i], moment[i]
        s_i = max(1.0 - c_i, _LEAST_POLL_COST)
        for move in moves[i]:
            j, age_j, _ = move
            if j >= n:  # past the last completion: everything left is caught (but what lies beyond)
                cost = s_i + lam * (age_j * (total_mass - c_i) - (total_moment - m_i))
            else:
                cost = s_i + lam * (age_j * (cdf[j] - c_i) - (moment[j] - m_i)) + value[j]
            if cost < best:
                best, best_move = cost, move
        value[i], choice[i] = best, best_move
    # The first poll: any age one or two hops reach, from the floor on (each with its grid
    # point and the delay of the mass it catches).
    best, first, first_age = math.inf, -1, 0.0
    for a, j, caught_delay in firsts:
        if j > n and first >= 0:
            break
        cost = 1.0 + lam * caught_delay + (value[j] if j <= n else 0.0)
        if cost < best:
            best, first, first_age = cost, j, a
    # Walk the plan: its ages (exact sums of tiers, which the grid's points only approach: a
    # rounding each hop would add up) and what it is expected to cost at them; the last poll
    # catches all that is left.
    ages = [first_age]
    j = first
    while j < n:
        nxt, _, tier = choice[j]
        j = nxt
        ages.append(round(ages[-1] + tier, 6))
    polls, delay, f0, g0 = 0.0, 0.0, 0.0, 0.0
    for k, age in enumerate(ages):
        f, g = grid.at(age) if k < len(ages) - 1 else (total_mass, total_moment)
        polls += 1.0 - f0
        delay += age * (f - f0) - (g - g0)
        f0, g0 = f, g
    return _Plan(tuple(ages), polls, max(0.0, delay))


def plan(dist: Distribution, *, floor_s: float, tiers: Sequence[float], delay_ratio: float,
         max_polls: float, longest: float) -> _Plan:
    """The cheapest plan whose expected delay is `delay_ratio` of the median, polls capped, no
    wait between polls longer than `longest` times the age. (That bound keeps a plan from
    feeding itself: a last poll long after the others would yield wide intervals, whose spread
    mass would justify the same long wait again.)"""
    grid = _grid(dist, floor_s)
    moves = _moves(grid, tiers, longest)
    firsts = [(a, grid.index(a), grid.delay_from_start(grid.index(a)))
              for a in two_tier_ages(tiers) if a >= floor_s - 1e-9]
    if not firsts:  # a floor beyond two hops of the longest tier: the hops to it are composed
        firsts = [(floor_s, 0, grid.delay_from_start(0))]
    # The aim is for the delay the plan can change: mass the estimate puts before the floor is
    # found at the first poll at best, and that much delay no plan avoids; mass beyond the last
    # completion seen, the plan does not find (the aim is for the rest, at its own median).
    seen = 1.0 - dist.beyond
    median = max(dist.quantile(0.5 * seen), 1e-3)
    target = delay_ratio * median * seen + grid.delay_from_start(0)
    lo, hi = math.log(1e-3 / median), math.log(1e4 / median)
    solved: list[tuple[float, _Plan]] = []

    def solve(x: float) -> _Plan:
        p = _solve(grid, moves, firsts, math.exp(x))
        solved.append((x, p))
        return p

    def bisect(good: float, bad: float, best: _Plan, ok: Callable[[_Plan], bool]) -> _Plan:
        """The plan at the log-lambda closest to `bad` that is still `ok`, from `best` at `good`."""
        # Down to 2**-_BISECTIONS of the whole range (the margin: float halvings are inexact).
        while abs(bad - good) > (hi - lo) / 2 ** _BISECTIONS * (1 + 1e-9):
            mid = (good + bad) / 2
            p = solve(mid)
            if ok(p):
                good, best = mid, p
            else:
                bad = mid
        return best

    # The smallest lambda that meets the delay (E[delay] falls as lambda grows).
    best = solve(hi)
    if best.delay_s <= target:
        best = bisect(hi, lo, best, lambda p: p.delay_s <= target)
    if best.polls > max_polls:
        # Too many polls for that delay: the largest lambda within the cap (E[polls] grows with
        # lambda), searched between the lambdas already solved on either side of it.
        within = [(x, p) for x, p in solved if p.polls <= max_polls]
        a, best = max(within, key=lambda s: s[0]) if within else (lo, solve(lo))
        b = min(x for x, p in solved if p.polls > max_polls)
        best = bisect(a, b, best, lambda p: p.polls <= max_polls)
    return best


def _ranks(dist: Distribution, observations: Sequence[Observation], seen_until: Sequence[float]) -> list[float]:
    """Where each observation falls in `dist`, among the ages it could have been seen at (a
    running id: past its age): uniform in [0, 1] when they were drawn from it."""
    edges, mass = dist.edges, dist.mass
    cumulative = [0.0]
    for m in mass:
        cumulative.append(cumulative[-1] + m)

    def cdf(age_s: float) -> float:
        k = bisect.bisect_right(edges, age_s) - 1
        if k < 0:
            return 0.0
        if k >= len(mass):
            return cumulative[-1]
        return cumulative[k] + mass[k] * (age_s - edges[k]) / (edges[k + 1] - edges[k])

    ranks = []
    for o, t_s in zip(observations, seen_until, strict=True):
        if not math.isfinite(o.hi_s):  # still running: anywhere past its age, whenever submitted
            ranks.append((cdf(o.lo_s) + 1.0) / 2)
            continue
        high = cdf(t_s) if math.isfinite(t_s) else 1.0
        at = (cdf(o.lo_s) + cdf(o.hi_s)) / 2
        ranks.append(min(1.0, at / high) if high > 1e-6 else 0.0)
    return ranks


def change_point(ranks: Sequence[float], *, least: int, shift: float,
                 submitted: Sequence[float] | None = None) -> int | None:
    """Where ranks in order of submission change level, if they do: at the split most likely for
    a change of level (the cumulative sum of deviations from the mean, CUSUM, standardised by the
    spread of the two sides' means: CUSUM's own peak drifts towards the middle when one side is
    short, as the newest is when it is found early), when the largest CUSUM is past chance (a
    Brownian bridge's sup beyond `_CHANGE_Z`, for ranks of variance 1/12) or that split's is
    (beyond `_SPLIT_Z`), and the two sides' mean ranks differ by more than `shift`; each side at
    least `least` long, and, with the submission times, never between ids submitted at once
    (their order says nothing of when they came)."""
    n = len(ranks)
    if n < 2 * least:
        return None
    mean = sum(ranks) / n
    total, best, likeliest, at = 0.0, 0.0, 0.0, 0
    for k in range(n - least):
        total += ranks[k] - mean
        if k + 1 >= least and (submitted is None or submitted[k] < submitted[k + 1]):
            best = max(best, abs(total))
            likelihood = abs(total) / math.sqrt((k + 1) * (n - k - 1))
            if likelihood > likeliest:
                likeliest, at = likelihood, k + 1
    if best < _CHANGE_Z * math.sqrt(n / 12) and likeliest * math.sqrt(n) < _SPLIT_Z * math.sqrt(1 / 12):
        return None
    before, after = sum(ranks[:at]) / at, sum(ranks[at:]) / (n - at)
    return at if abs(after - before) > shift else None


def _still_running(running: Sequence[Observation], window: Sequence[Observation], *,
                   tail_ratio: float) -> list[Observation]:
    """The running records that still stand for an id here: its next poll not overdue yet (else
    it completed, failed, or was polled by another replica), and submitted no earlier than the
    completions kept (the rest of its submission has left the window)."""
    if not running or not window:
        return []
    submitted = [o.submitted_s or 0.0 for o in window]
    now = max(max(t + o.hi_s for t, o in zip(submitted, window, strict=True)),
              max((o.submitted_s or 0.0) + o.lo_s for o in running))
    since = min(submitted)
    return [o for o in running if o.submitted_s is not None and o.submitted_s >= since
            and now - o.submitted_s <= o.lo_s * (1 + _RUNNING_FOR * tail_ratio)]


def fit(observations: Sequence[Observation], config: AdaptiveConfig) -> LearnedSchedule | None:
    """A schedule for this window (completions, and ids still running: no upper bound), or None
    while it holds too few completions to learn from (the cold start)."""
    done = [o for o in observations if math.isfinite(o.hi_s)]
    if len(done) < config.min_observations:
        return None
    window, seen_until = face_value(done, window_full=len(done) >= config.window)
    if len(window) < config.min_observations:  # too few left to learn from: the whole window, as it is
        window, seen_until = face_value(done, window_full=False)
    # The window cannot have seen the tail while its oldest submission is not older than nearly
    # all its completions by a margin (a burst, a start): the ids past the plan are then the bulk
    # of the distribution, not its stragglers, and the waits past the plan grow more slowly.
    unseen = False
    if seen_until is not None:
        submitted = [o.submitted_s or 0.0 for o in done]
        oldest = max(t + o.hi_s for t, o in zip(submitted, done, strict=True)) - min(submitted)
        his = sorted(o.hi_s for o in done)
        unseen = oldest < _SEEN_MARGIN * his[int(0.9 * (len(his) - 1))]
    # Ids still running past the plan, in order of submission with the rest (without submission
    # times, they could be placed nowhere). Running ids are kept from past every completion the
    # window holds: a submission older than that has all its running ids here, and its
    # completions stand for no one unseen.
    running = [o for o in observations if not math.isfinite(o.hi_s)]
    running = _still_running(running, window, tail_ratio=config.tail_ratio) if seen_until is not None else []
    recorded_from = max(o.hi_s for o in window) if running else math.inf
    if running:
        now = max(max((o.submitted_s or 0.0) + o.hi_s for o in window),
                  max((o.submitted_s or 0.0) + o.lo_s for o in running))
        window = [*window, *running]
        seen_until = [now - (o.submitted_s or 0.0) for o in window]
    dist = estimate(window, seen_until=seen_until, recorded_from_s=recorded_from)
    # A latency that moved: in order of submission (in order of completion, the slow end of a
    # cohort would pass for one), the ids' ranks in the window's distribution, each among the
    # ages it could have been seen at, change level. The ids before the change describe a
    # latency no longer arriving; fit those after it alone, so a drift costs the ids in flight
    # one plan's polls, not those of a plan for a mixture. Ids still running past the plan rank
    # near 1: when more outlive it than it expects, they are the change.
    order = list(range(len(window)))
    if seen_until is not None:
        order.sort(key=lambda i: window[i].submitted_s or 0.0)
    until = seen_until or [math.inf] * len(window)
    ranks = _ranks(dist, [window[i] for i in order], [until[i] for i in order])
    at = change_point(ranks, least=config.min_observations, shift=config.shift,
                      submitted=[window[i].submitted_s or 0.0 for i in order] if seen_until is not None else None)
    if at is not None:
        window = [window[i] for i in order[at:]]
        seen_until = [until[i] for i in order[at:]] if seen_until is not None else None
        if any(math.isfinite(o.hi_s) for o in window):
            dist = estimate(window, seen_until=seen_until, recorded_from_s=recorded_from)
    completions = [o for o in window if math.isfinite(o.hi_s)]
    if not completions:
        dist = Distribution((0.0, max(o.lo_s for o in window)), (0.0,), beyond=1.0)
    if dist.beyond < _MOSTLY_BEYOND:
        floor_s = _round_age(min(o.hi_s for o in completions))
        best = plan(dist, floor_s=floor_s, tiers=config.tiers, delay_ratio=config.delay_ratio,
                    max_polls=config.max_polls, longest=config.tail_ratio)
    else:
        # Most ids are still running past every age one completed at (a shift none or few of
        # whose ids have completed yet): a plan for the few done would cost the many all its
        # polls. The first poll goes where they were last seen running (no earlier than one
        # completed); past it, the waits past a plan find them.
        floor_s = _round_age(max(max(o.lo_s for o in window if not math.isfinite(o.hi_s)),
                                 min((o.hi_s for o in completions), default=0.0)))
        first = min((a for a in two_tier_ages(config.tiers) if a >= floor_s), default=floor_s)
        best = _Plan((first,), 1.0, 0.0)
    # Ids done at their first poll may have been done long before it: probe below the first
    # poll, the more of them the more often (none when the first poll always finds `processing`).
    first_done = sum(1 for o in completions if o.lo_s <= 0) / max(1, len(completions))
    share = min(config.probe_share, config.probe_share * first_done / config.probe_trigger)
    # The more were done at their first poll, the deeper the probe: half the first poll's age
    # when all were.
    depth = 1.0 - config.probe_depth * first_done
    probe = max((a for a in two_tier_ages(config.tiers) if a <= depth * best.ages[0]), default=None)
    if share <= 0:
        probe = None
    return LearnedSchedule(
        tiers=config.tiers, ages=best.ages, floor_s=floor_s, probe_age_s=probe,
        probe_share=share if probe is not None else 0.0,
        tail_ratio=config.unseen_ratio if unseen else config.tail_ratio,
        observations=len(completions), running=len(window) - len(completions), beyond=dist.beyond,
        quantiles=(dist.quantile(0.1), dist.quantile(0.5), dist.quantile(0.9)),
        expected_polls=best.polls, expected_delay_s=best.delay_s,
    )
