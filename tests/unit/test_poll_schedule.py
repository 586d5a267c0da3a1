"""The adaptive poll schedule (regbridge.poll_schedule), without a broker or a clock.

A small discrete-event simulation drives the pure code as the poller does: registrations arrive
at a steady rate (or all at once, or a warm-up first and the rest once it is drained, as the
benchmarks send them), each completes at its drawn latency, each message is taken by the "poller" at
the age its waits add up to (plus a little per hop, as a broker adds), polled or sent on to a
wait. It counts polls and detection delays (simulated seconds, not wall time), for the adaptive
schedule and, for comparison, the fixed one (10 s, then every 2 s).
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import pytest

from regbridge.lifecycle import PollPolicy
from regbridge.poll_schedule import (
    LADDER_S,
    AdaptiveConfig,
    LearnedSchedule,
    Learner,
    Observation,
    PollSchedule,
    Running,
    adaptive_tiers,
    change_point,
    estimate,
    face_value,
    first_hop,
    fit,
    tier_not_below,
    two_tier_ages,
)
from regbridge.topology import wait_queue, wait_queue_name

Latency = Callable[[random.Random, float], float]  # (rng, arrival time) -> seconds to complete

COLD = PollPolicy(10.0, 2.0, 300.0)
TIERS = adaptive_tiers(10.0, 2.0)
CONFIG = AdaptiveConfig(tiers=TIERS)
HOP_S = 0.02  # what a broker hop and the poller's work add to every wait


def uniform(lo: float, hi: float) -> Latency:
    return lambda rng, _t: rng.uniform(lo, hi)


def lognormal(median: float, sigma: float) -> Latency:
    return lambda rng, _t: rng.lognormvariate(math.log(median), sigma)


def drift(before: Latency, after: Latency, at_s: float) -> Latency:
    return lambda rng, t: (before if t < at_s else after)(rng, t)


@dataclass
class Reg:
    arrived: float
    latency: float
    share: float
    polls: int = 0
    processing_at: float = 0.0
    delay: float | None = None
    first_poll_age: float | None = None


@dataclass(frozen=True)
class Run:
    regs: list[Reg]  # the measured ones: after the warm-up, if any
    schedules: list[LearnedSchedule]

    def polls(self, start: float = 0.0, end: float = 1.0) -> float:
        part = self._part(start, end)
        return sum(r.polls for r in part) / len(part)

    def delay(self, start: float = 0.0, end: float = 1.0) -> float:
        part = self._part(start, end)
        return sum(r.delay or 0.0 for r in part) / len(part)

    def _part(self, start: float, end: float) -> list[Reg]:
        return self.regs[int(start * len(self.regs)):int(end * len(self.regs))]


def simulate(latency: Latency, *, adaptive: bool, n: int = 2000, rate: float = 10.0, seed: int = 7,
             config: AdaptiveConfig = CONFIG, warmup: int = 0) -> Run:
    """Registrations arriving `rate` a second (all at once when `rate` is infinite), polled by one
    poller on the chosen schedule. With a `warmup`, as bench/profiles.py runs: that many arrive
    first, then none until all of them are detected, then the `n` measured ones."""
    rng = random.Random(seed)
    learner = Learner(config)
    schedule: PollSchedule = COLD
    schedules: list[LearnedSchedule] = []
    regs: list[Reg] = []
    events: list[tuple[float, int]] = []

    def arrive(count: int, start: float) -> None:
        for k in range(count):
            arrived = start + (k / rate if math.isfinite(rate) else 0.0)
            i = len(regs)
            regs.append(Reg(arrived, latency(rng, arrived), zlib.crc32(f"R-{i}".encode()) / 2**32))
            heapq.heappush(events, (arrived + HOP_S, i))  # the submitter hands on to pending

    arrive(warmup or n, 0.0)
    undetected = len(regs)
    while events:
        now, i = heapq.heappop(events)
        reg = regs[i]
        age = now - reg.arrived
        if reg.polls == 0:
            wait = schedule.first_wait(age_s=age, share=reg.share)
            if wait is not None:
                heapq.heappush(events, (now + wait + HOP_S, i))
                continue
            reg.first_poll_age = age
        reg.polls += 1
        if reg.latency > age:
            # As the poller does: every poll that finds `processing` is told to the learner, which
            # keeps those past the plan.
            observation: Observation | Running = Running(age, reg.arrived, since_s=reg.processing_at or None)
            reg.processing_at = age
            heapq.heappush(events, (now + schedule.next_wait(age_s=age) + HOP_S, i))
        else:
            reg.delay = age - reg.latency
            undetected -= 1
            if undetected == 0 and warmup and len(regs) == warmup:
                arrive(n, now)
                undetected = n
            observation = Observation(reg.processing_at, age, submitted_s=reg.arrived)
        if adaptive:
            learner.observe(observation)
            if learner.due(now):
                learned = fit(learner.take(now), config)
                if learned is not None:
                    schedule = learned
                    schedules.append(learned)
                    learner.follow(learned)
    return Run(regs[warmup:], schedules)


# ---- the figures the issue asks for -------------------------------------------------------------
# Measured after the first quarter of the run, which holds the cold start and the learning.


@pytest.fixture(scope="module")
def fixed_10_20() -> Run:
    return simulate(uniform(10, 20), adaptive=False)


def test_on_the_briefs_latency_it_is_no_worse_than_the_fixed_schedule(fixed_10_20: Run) -> None:
    run = simulate(uniform(10, 20), adaptive=True)
    assert 3.7 < fixed_10_20.polls(0.25) < 4.2 and 0.9 < fixed_10_20.delay(0.25) < 1.2  # 10 s, then every 2 s
    assert run.polls(0.25) <= fixed_10_20.polls(0.25)
    assert run.delay(0.25) <= 1.1 * fixed_10_20.delay(0.25)
    assert run.delay(0.25) <= 0.1 * 15


@pytest.mark.parametrize(("latency", "median"), [
    pytest.param(uniform(2, 4), 3.0, id="uniform 2-4 s"),
    pytest.param(uniform(40, 80), 60.0, id="uniform 40-80 s"),
])
def test_on_other_latencies_polls_stay_near_four_and_the_delay_near_a_tenth(latency: Latency, median: float) -> None:
    fixed, run = simulate(latency, adaptive=False), simulate(latency, adaptive=True)
    assert run.polls(0.25) <= 4.3
    assert run.delay(0.25) <= 0.1 * median
    # What the fixed schedule does there: a 7 s delay at 2-4 s, some 26 polls at 40-80 s.
    assert run.delay(0.25) < fixed.delay(0.25) / 10 or run.polls(0.25) < fixed.polls(0.25) / 5


def test_on_a_skewed_latency_polls_and_delay_stay_bounded() -> None:
    # Log-normal, median 15 s, sigma 0.5: a long tail both ways. Even knowing the distribution
    # exactly, four polls on average cannot bring the mean delay much under 1.5 s (a tenth of the
    # median); the bound allows the estimate's error on top.
    run = simulate(lognormal(15, 0.5), adaptive=True)
    assert run.polls(0.25) <= 4.6
    assert run.delay(0.25) <= 0.15 * 15


@pytest.fixture(scope="module")
def drifted_later() -> Run:
    # 10-20 s, then 40-80 s from the 150th second (registration 1,500 of 4,000).
    return simulate(drift(uniform(10, 20), uniform(40, 80), 150.0), adaptive=True, n=4000)


def test_a_latency_that_drifts_later_is_followed(drifted_later: Run) -> None:
    fixed = simulate(drift(uniform(10, 20), uniform(40, 80), 150.0), adaptive=False, n=4000)
    run = drifted_later
    # Before: as on 10-20 s. The ids in flight when it moves pay the old plan's polls and a few
    # more; once the new latency is learned, the figures are those of 40-80 s.
    assert run.polls(0.1, 0.375) <= 4.0
    assert run.polls() <= 4.0 < fixed.polls() / 4
    assert run.polls(0.75) <= 4.0
    assert run.delay(0.75) <= 0.1 * 60
    assert run.schedules[-1].quantiles[1] == pytest.approx(60, rel=0.15)


def test_the_ids_in_flight_across_a_later_drift_pay_one_plan_and_a_search(drifted_later: Run) -> None:
    # The ids submitted in the 20 s after the latency moved. Nothing tells the shift before some
    # of them outlive the old plan (20 s in); once 20 have, a fit sets the old ids aside and the
    # ids in flight go on from where the oldest were last seen running, in waits of 0.4 of their
    # age. So the first few seconds' ids pay the old plan (9 polls) and that search (about 4); the
    # later ones skip the rest of the old plan. (Before, every one paid the old plan and its tail:
    # 12.7 polls; those submitted 20-40 s after the move, 15.)
    run = drifted_later
    assert run.polls(0.375, 0.425) <= 6.5
    assert run.polls(0.4, 0.425) <= 3.5  # submitted 10-20 s after the move
    assert run.polls(0.425, 0.475) <= 4.0  # 20-40 s after
    # Waits of 0.4 of the age find an id some 0.19 of its latency late on average (0.4 / ln 1.4 - 1).
    assert run.delay(0.375, 0.425) <= 0.22 * 60
    shifted = [s for s in run.schedules if s.observations == 0]
    assert shifted and all(s.running >= CONFIG.min_observations and s.beyond == 1.0 for s in shifted)


def test_a_latency_that_drifts_earlier_is_found_by_probes() -> None:
    # 40-80 s, then 10-20 s: the first polls find everything done, so some ids probe earlier.
    run = simulate(drift(uniform(40, 80), uniform(10, 20), 150.0), adaptive=True, n=4000)
    assert any(s.probe_age_s is not None and s.probe_share > 0 for s in run.schedules)
    assert run.polls(0.75) <= 4.5
    assert run.delay(0.75) <= 0.1 * 15
    assert run.schedules[-1].first_poll_s < 20


# ---- arrivals that stop: a warm-up drained, then the measured phase; a burst ------------------
# As bench/profiles.py and bench/run.py send them; measured over what follows the warm-up. When
# arrivals stop, the newest completions are the slow end of the last submissions, and while a
# burst completes, the window holds only the fast end of a single one.


@pytest.mark.parametrize(("latency", "median", "polls", "ratio"), [
    pytest.param(uniform(2, 4), 3.0, 4.0, 0.1, id="uniform 2-4 s"),
    pytest.param(uniform(10, 20), 15.0, 4.0, 0.1, id="uniform 10-20 s"),
    pytest.param(uniform(40, 80), 60.0, 4.0, 0.1, id="uniform 40-80 s"),
    pytest.param(lognormal(15, 0.5), 15.0, 4.3, 0.15, id="lognormal 15 s"),
])
def test_after_a_pause_the_figures_are_those_of_steady_arrivals(latency: Latency, median: float, polls: float,
                                                                 ratio: float) -> None:
    run = simulate(latency, adaptive=True, warmup=200, n=400)
    assert run.polls() <= polls
    assert run.delay() <= ratio * median


def test_after_a_pause_a_slow_latency_is_not_fitted_to_its_slow_end() -> None:
    # What the benchmark met at 40-80 s: the newest quarter of the window (the warm-up's slowest)
    # taken for a shift, the first poll locked at 79 s, 1.2 polls and a 15.5 s mean delay.
    run = simulate(uniform(40, 80), adaptive=True, warmup=200, n=400)
    assert run.polls() <= 4.0 and run.delay() <= 0.1 * 60
    learned = run.schedules[-1]
    assert learned.quantiles == pytest.approx((44, 60, 76), rel=0.1)
    assert learned.first_poll_s < 55


def test_a_burst_is_polled_as_on_the_fixed_schedule() -> None:
    # 1,000 at once from the cold start: every id is as old as the oldest the window has seen, so
    # the window never holds the tail, and the ids past the plan are most of them. Before, they
    # met waits for stragglers: a 3.5 s mean delay.
    fixed = simulate(uniform(10, 20), adaptive=False, n=1000, rate=math.inf)
    run = simulate(uniform(10, 20), adaptive=True, n=1000, rate=math.inf)
    assert run.delay() <= 1.05 * fixed.delay()
    assert run.polls() <= 1.1 * fixed.polls()
    assert run.schedules[-1].tail_ratio == CONFIG.unseen_ratio


def test_the_estimate_counts_the_ids_of_a_submission_not_done_yet() -> None:
    # 50 a second for 30 s, 10-20 s, looked at 30 s in: of the last submissions only the fast are
    # done. Taken at face value they pull the median down; each stands also for its slow siblings,
    # and the estimate is the one all of them would give once done.
    rng = random.Random(3)
    done = [(k / 50, rng.uniform(10, 20)) for k in range(1500)]
    observations = [Observation(latency - 0.5, latency, submitted_s=at) for at, latency in done]
    whole = estimate(observations).quantile(0.5)
    window, seen_until = face_value([o for o in observations if (o.submitted_s or 0.0) + o.hi_s <= 30],
                                    window_full=False)
    assert seen_until is not None and len(window) < 0.6 * len(observations)
    assert estimate(window).quantile(0.5) < whole - 0.5
    assert estimate(window, seen_until=seen_until).quantile(0.5) == pytest.approx(whole, abs=0.2)


def test_the_slow_end_of_the_last_submissions_is_no_shift() -> None:
    # 200 submitted at 10 a second, 40-80 s, all done, in order of completion: the newest quarter
    # of the window is the slowest, yet nothing moved.
    rng = random.Random(5)
    done = sorted(((k / 10, rng.uniform(40, 80)) for k in range(200)), key=lambda d: d[0] + d[1])
    learned = fit([Observation(latency - 1.0, latency, submitted_s=at) for at, latency in done], CONFIG)
    assert learned is not None and learned.observations == 200
    assert learned.quantiles[1] == pytest.approx(60, rel=0.08)
    assert learned.first_poll_s < 50
    assert learned.tail_ratio == CONFIG.tail_ratio  # the oldest submission is long done


def test_ids_still_running_put_mass_past_where_they_were_seen() -> None:
    rng = random.Random(4)
    done = [Observation(a - 1.0, a) for a in (rng.uniform(10, 20) for _ in range(300))]
    # A quarter still running past every completion: a quarter of the mass beyond the last edge,
    # where a plan does not reach (its quantiles there are lower bounds).
    past = estimate(done + [Observation(25.0, math.inf)] * 100)
    assert past.beyond == pytest.approx(0.25, abs=0.01)
    assert past.cdf(20.0) == pytest.approx(0.75, abs=0.01)
    assert past.quantile(0.9) == pytest.approx(25.0, rel=0.01)
    # Running inside the completions' span: spread over the ages past it, as those done there.
    within = estimate(done + [Observation(15.0, math.inf)] * 100)
    assert within.beyond < 0.001
    assert within.cdf(15.0) == pytest.approx(0.75 * estimate(done).cdf(15.0), abs=0.03)


def test_the_learner_keeps_ids_running_past_the_plan_one_record_each() -> None:
    learner = Learner(AdaptiveConfig(tiers=TIERS, window=4, min_observations=2, refit_every=2, refit_min_s=0.0))
    for hi in (10.0, 12.0, 14.0):
        learner.observe(Observation(hi - 1.0, hi, submitted_s=0.0))
    learner.observe(Running(30.0, 0.0))
    assert learner.running == 0  # the cold start: no plan to outlive
    learned = fit([Observation(9.0 + k % 5, 10.0 + k % 5, submitted_s=k / 10) for k in range(40)], CONFIG)
    assert learned is not None
    learner.follow(learned)
    end = learned.ages[-1]
    learner.observe(Running(end - 2.0, 1.0))
    assert learner.running == 0  # within the plan
    learner.observe(Running(end, 1.0))
    learner.observe(Running(end + 0.5, 2.0))
    assert learner.running == 2
    # Its next poll replaces an id's record, whatever the plan by then; so does its completion.
    learner.observe(Running(end * 1.4, 1.0, since_s=end))
    assert learner.running == 2
    assert sorted(o.lo_s for o in learner.take(0.0) if o.hi_s == math.inf) == [end + 0.5, end * 1.4]
    learner.observe(Observation(end * 1.4, end * 2.0, submitted_s=1.0))
    assert learner.running == 1
    for k in range(10):  # at most `window` of them
        learner.observe(Running(end + 1.0 + k, 3.0 + k))
    assert learner.running == 4 and len(learner) == 4


def test_a_shift_seen_only_in_ids_still_running_is_followed_from_where_they_were_seen() -> None:
    # 10-20 s for 30 s of submissions, all done; then 40 ids submitted after, none done, all seen
    # running at 22 s, past the plan.
    rng = random.Random(9)
    done = [Observation(a - 1.0, a, submitted_s=k / 10) for k, a in enumerate(rng.uniform(10, 20) for _ in range(300))]
    running = [Observation(22.0, math.inf, submitted_s=30 + k / 10) for k in range(40)]
    learned = fit(done + running, CONFIG)
    assert learned is not None
    assert (learned.observations, learned.running, learned.beyond) == (0, 40, 1.0)
    assert learned.first_poll_s >= 22.0 and learned.probe_age_s is None
    # An id polled on the old plan goes on to it, one polled there on to the waits past it.
    assert 15.0 + learned.next_wait(age_s=15.0) >= 22.0
    assert learned.next_wait(age_s=22.0) >= 0.4 * 22.0 - 1.0
    # Without them, the plan is the old one.
    steady = fit(done, CONFIG)
    assert steady is not None and steady.first_poll_s < 15.0 and steady.running == 0


def test_a_change_point_is_where_the_ranks_change_level_past_chance() -> None:
    rng = random.Random(8)
    level = [rng.random() for _ in range(400)]
    assert change_point(level, least=20, shift=0.15) is None
    step = level[:300] + [0.5 + rng.random() / 2 for _ in range(100)]
    assert change_point(step, least=20, shift=0.15) == pytest.approx(300, abs=25)
    # Past chance over 4,000 ids, but too small a move to set 3,000 aside for.
    nudge = [rng.random() for _ in range(3000)] + [0.2 + 0.8 * rng.random() for _ in range(1000)]
    assert change_point(nudge, least=20, shift=0.15) is None
    assert change_point(nudge, least=20, shift=0.05) == pytest.approx(3000, abs=250)
    # Submitted at once (a burst), the ids' order is their completion's: no change point in it.
    assert change_point(sorted(level), least=20, shift=0.15, submitted=[0.0] * 400) is None
    assert change_point(sorted(level), least=20, shift=0.15) is not None


def test_a_shift_is_told_by_submission() -> None:
    # 12-20 s for 30 s of submissions, then 50-72 s: the ids submitted after the change are the new
    # latency, whichever order the completions came in.
    rng = random.Random(6)
    done = [(k / 10, rng.uniform(12, 20)) for k in range(300)]
    done += [(30 + k / 10, rng.uniform(50, 72)) for k in range(100)]
    done.sort(key=lambda d: d[0] + d[1])
    learned = fit([Observation(latency - 1.0, latency, submitted_s=at) for at, latency in done], CONFIG)
    assert learned is not None and learned.observations == 100
    assert learned.first_poll_s >= 49.0


# ---- cold start, window, the rule of promise 4 -------------------------------------------------


def test_the_cold_start_is_the_configured_schedule() -> None:
    assert fit([Observation(0, 10.0)] * (CONFIG.min_observations - 1), CONFIG) is None
    run = simulate(uniform(10, 20), adaptive=True, n=30)
    # Every registration submitted before a single completion was seen: first poll at 10 s.
    early = [r for r in run.regs if r.arrived < 10.0]
    assert early and all(r.first_poll_age is not None and 10.0 <= r.first_poll_age < 10.1 for r in early)
    assert isinstance(fit([Observation(10.0, 12.0)] * CONFIG.min_observations, CONFIG), LearnedSchedule)


def test_the_window_keeps_the_last_observations_and_refits_when_due() -> None:
    learner = Learner(AdaptiveConfig(tiers=TIERS, window=3, min_observations=2, refit_every=2, refit_min_s=5.0))
    learner.observe(Observation(0, 1.0))
    assert not learner.due(0.0)  # below min_observations
    for hi in (2.0, 3.0, 4.0, 5.0):
        learner.observe(Observation(0, hi))
    assert len(learner) == 3
    assert learner.due(0.0)
    assert [o.hi_s for o in learner.take(0.0)] == [3.0, 4.0, 5.0]
    learner.observe(Observation(0, 6.0))
    learner.observe(Observation(0, 7.0))
    assert not learner.due(4.9)  # refit_min_s since the last fit
    assert learner.due(5.0)


def test_a_shift_sets_the_ids_before_it_aside() -> None:
    old = [Observation(12.0 + k % 8, 13.0 + k % 8) for k in range(300)]
    new = [Observation(50.0 + k % 20, 52.0 + k % 20) for k in range(100)]
    learned = fit(old + new, CONFIG)
    assert learned is not None and learned.observations == 100
    assert learned.first_poll_s >= 51.0
    steady = fit(old, CONFIG)
    assert steady is not None and steady.observations == 300


@pytest.mark.parametrize("seed", range(5))
def test_no_poll_before_the_earliest_completion_seen_except_probes(seed: int) -> None:
    rng = random.Random(seed)
    lo_s = rng.uniform(1, 30)
    # Every id seen processing first, then done within a few seconds: no completion before `earliest`.
    observations = [Observation(a, a + rng.uniform(0.2, 3)) for a in (lo_s + rng.uniform(0, lo_s) for _ in range(200))]
    earliest = min(o.hi_s for o in observations)
    learned = fit(observations, CONFIG)
    assert learned is not None
    assert learned.probe_age_s is None  # none was done at its first poll: nothing to probe for
    assert learned.first_poll_s >= earliest * 0.99  # ages are compared at 1 %
    for share in (0.0, 0.3, 0.99):
        assert _first_poll_age(learned, share) >= learned.first_poll_s


def test_probes_poll_earlier_only_for_their_share_of_ids() -> None:
    # Everything done at its first poll, at 10 s: the latency may have moved earlier.
    learned = fit([Observation(0, 10.0)] * 100, CONFIG)
    assert learned is not None and learned.first_poll_s == pytest.approx(10.0, abs=0.2)
    assert learned.probe_age_s is not None and learned.probe_age_s <= 5.0
    assert learned.probe_share == CONFIG.probe_share
    shares = [k / 1000 for k in range(1000)]
    early = [s for s in shares if _first_poll_age(learned, s) < learned.first_poll_s]
    assert len(early) == pytest.approx(CONFIG.probe_share * 1000, abs=1)
    # Spread from the deepest probe to just below the first poll, log-uniformly by share: some
    # land wherever the completions are, however far below the first poll they start.
    ages = sorted(_first_poll_age(learned, s) for s in early)
    assert ages[0] == pytest.approx(learned.probe_age_s, abs=0.05)
    assert 0.9 * learned.first_poll_s < ages[-1] < learned.first_poll_s
    median = ages[len(ages) // 2]
    assert median == pytest.approx(math.sqrt(learned.probe_age_s * 0.95 * learned.first_poll_s), rel=0.05)


def _first_poll_age(schedule: PollSchedule, share: float) -> float:
    age = 0.0
    for _ in range(10):
        wait = schedule.first_wait(age_s=age, share=share)
        if wait is None:
            return age
        age += wait
    raise AssertionError("the first poll is never reached")


# ---- waits on the ladder ----------------------------------------------------------------------


def test_the_ladder_is_a_bounded_set_of_wait_queues() -> None:
    assert len(LADDER_S) == 25 and LADDER_S[0] == 0.1 and LADDER_S[-1] == 409.6
    assert all(b / a == pytest.approx(math.sqrt(2), rel=0.01) for a, b in pairwise(LADDER_S))
    tiers = adaptive_tiers(10.0, 2.0)
    assert {10.0, 2.0} <= set(tiers) and len(tiers) <= 27
    assert adaptive_tiers(0.0, 0.2) == tuple(sorted({*LADDER_S, 0.2}))
    for t in tiers:  # each a queue whose TTL is its name
        assert wait_queue("p", t).arguments["x-message-ttl"] == round(t * 1000)
        assert wait_queue_name("p", t) == f"p.wait.{round(t * 1000)}ms"


def test_the_fixed_schedule_keeps_its_own_two_queues() -> None:
    assert COLD.tiers() == (2.0, 10.0)
    assert COLD.first_wait(age_s=0.0, share=0.0) == 10.0
    assert COLD.next_wait(age_s=12.0) == 2.0


@pytest.mark.parametrize(("a", "b"), [(0.1, 0.0), (2.0, 0.0), (10.0, 0.0), (9.051, 2.263), (12.8, 0.8),
                                      (36.204, 9.051), (51.2, 0.1), (0.2, 0.141)])
def test_a_first_poll_at_a_two_tier_age_takes_at_most_two_hops(a: float, b: float) -> None:
    target = round(a + b, 6)
    assert target in two_tier_ages(TIERS)
    age, hops = HOP_S, 0  # taken from pending a hop after submission
    while (remaining := target - age) > 0:
        wait = first_hop(remaining, TIERS)
        assert wait in TIERS
        age += wait + HOP_S
        hops += 1
    assert hops <= 2
    assert age - target <= (hops + 1) * HOP_S + 1e-9  # lands at it, late only by the hops


def test_a_first_poll_at_another_age_is_reached_in_a_few_hops_never_early() -> None:
    for target in (0.35, 3.7, 17.0, 61.0, 250.0):
        age, hops = HOP_S, 0
        while (remaining := target - age) > 0:
            age += first_hop(remaining, TIERS) + HOP_S
            hops += 1
        assert hops <= 5 and age >= target


def test_a_wait_is_the_shortest_tier_not_below_it() -> None:
    assert tier_not_below(1.9, TIERS) == 2.0
    assert tier_not_below(2.0, TIERS) == 2.0
    assert tier_not_below(3.3, TIERS) == 3.2  # within a late message's slack
    assert tier_not_below(3.5, TIERS) == 4.525
    assert tier_not_below(0.01, TIERS) == 0.1
    assert tier_not_below(10_000, TIERS) == TIERS[-1]


def test_after_a_poll_the_next_comes_at_the_next_planned_age() -> None:
    learned = fit([Observation(10.0 + k % 10, 11.0 + k % 10) for k in range(100)], CONFIG)
    assert learned is not None
    ages = learned.ages
    assert all(any(b - a == pytest.approx(t) for t in TIERS) for a, b in pairwise(ages))
    # Taken a little late at a planned age: on to the next one, one tier away.
    assert learned.next_wait(age_s=ages[0] + 0.03) == pytest.approx(ages[1] - ages[0])
    # Past the plan: waits that grow with the age.
    assert learned.next_wait(age_s=100.0) >= 0.4 * 100.0 - 5


def test_the_estimate_reads_intervals_and_first_poll_completions() -> None:
    # Half done at a first poll at 10 s; probes at 5 s found all of theirs done too: the mass lies
    # before 5 s, though no interval alone says so.
    dist = estimate([Observation(0, 10.0)] * 50 + [Observation(0, 5.0)] * 10)
    assert dist.cdf(5.0) > 0.5
    spread = estimate([Observation(10.0, 12.0)] * 10 + [Observation(12.0, 14.0)] * 10)
    assert spread.quantile(0.5) == pytest.approx(12.0, abs=0.2)
    assert spread.cdf(9.8) == 0.0  # ages are compared at 1 %


def test_observations_from_many_threads_fit_one_schedule_at_a_time() -> None:
    # What the poller's lock guards (services/poller's Learning does the same around a Learner).
    learner = Learner(AdaptiveConfig(tiers=TIERS, min_observations=10, refit_every=10, refit_min_s=0.0))
    lock = threading.Lock()
    fits: list[int] = []

    def worker(k: int) -> None:
        for j in range(200):
            with lock:
                learner.observe(Observation(10.0 + (k + j) % 10, 11.0 + (k + j) % 10))
                window = learner.take(0.0) if learner.due(0.0) else None
            if window is not None:
                assert fit(window, learner.config) is not None
                fits.append(len(window))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(learner) == 500 and fits


def test_completions_later_than_two_hops_reach_are_still_planned() -> None:
    learned = fit([Observation(900.0 + k, 910.0 + k) for k in range(50)], CONFIG)
    assert learned is not None and learned.first_poll_s >= 900.0
    assert _first_poll_age(learned, 0.99) >= learned.first_poll_s


# ---- the figures, printed: python tests/unit/test_poll_schedule.py -----------------------------


def _figures() -> None:
    """Polls and mean delay per latency and arrival pattern, adaptive against fixed, and the median
    CPU time of one fit on a full window (reported, never asserted)."""
    import statistics
    import time

    latencies: dict[str, Latency] = {"uniform 2-4": uniform(2, 4), "uniform 10-20": uniform(10, 20),
                                     "uniform 40-80": uniform(40, 80), "lognormal 15, 0.5": lognormal(15, 0.5)}
    patterns: dict[str, Callable[[Latency, bool], Run]] = {
        "steady": lambda latency, adaptive: simulate(latency, adaptive=adaptive),
        "pause": lambda latency, adaptive: simulate(latency, adaptive=adaptive, warmup=200, n=400),
        "burst": lambda latency, adaptive: simulate(latency, adaptive=adaptive, n=1000, rate=math.inf),
    }
    for pattern, run in patterns.items():
        start = 0.25 if pattern == "steady" else 0.0  # a steady run's first quarter is its cold start
        for name, latency in latencies.items():
            a, f = run(latency, True), run(latency, False)
            print(f"{pattern:7} {name:18} adaptive {a.polls(start):5.2f} polls {a.delay(start):5.2f} s"
                  f"   fixed {f.polls(start):5.2f} polls {f.delay(start):5.2f} s")
    # A drift: steady arrivals, 10-20 s then 40-80 s from registration 1,500 (150 s) on; the ids
    # submitted in the 20 s after it, and the last quarter.
    moved = drift(uniform(10, 20), uniform(40, 80), 150.0)
    a, f = simulate(moved, adaptive=True, n=4000), simulate(moved, adaptive=False, n=4000)
    for part, (start, end) in {"20 s after": (0.375, 0.425), "last quarter": (0.75, 1.0)}.items():
        print(f"drift   {part:18} adaptive {a.polls(start, end):5.2f} polls {a.delay(start, end):5.2f} s"
              f"   fixed {f.polls(start, end):5.2f} polls {f.delay(start, end):5.2f} s")
    regs = simulate(lognormal(15, 0.5), adaptive=True, n=1500).regs
    regs.sort(key=lambda r: r.arrived + r.latency + (r.delay or 0.0))
    observations = [Observation(r.processing_at, r.latency + (r.delay or 0.0), submitted_s=r.arrived) for r in regs]
    times = []
    for k in range(CONFIG.window, len(observations), 25):
        began = time.process_time()
        fit(observations[k - CONFIG.window:k], CONFIG)
        times.append(time.process_time() - began)
    print(f"fit on a window of {CONFIG.window} (lognormal): median {statistics.median(times) * 1000:.1f} ms CPU")


if __name__ == "__main__":
    _figures()
