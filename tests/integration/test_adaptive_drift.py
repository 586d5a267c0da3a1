"""The adaptive poll schedule through a drift of the legacy system's latency, in the real
pipeline: legacy-sim completes in 0.2-0.4 s, then, mid-run with registrations in flight, in
0.8-1.6 s. The poller follows it (its learned median moves), polls per registration stay
bounded on either side of the drift, and every registration ends registered."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Service
from outcomes import INBOUND, Outcomes, good

pytestmark = pytest.mark.integration

MEDIAN = 'poller_completion_age_seconds{percentile="50"}'


def gauge(service: Service, name: str) -> float | None:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


class Stream:
    """A steady stream of good registrations, `a-0`, `a-1`, ...: each plan is tried on the
    registrations that come after it, so learning needs arrivals, not a burst."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sent = 0

    def publish(self, n: int) -> range:
        first = self.sent
        for _ in range(n):
            self.broker.publish(INBOUND, good(f"a-{self.sent}"))
            self.sent += 1
        return range(first, self.sent)

    def until(self, condition: Callable[[], bool], *, what: str, timeout: float) -> range:
        """Publish 5 registrations every 0.25 s until `condition` holds; the ids published."""
        first = self.sent
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what} within {timeout} s ({self.sent - first} published meanwhile)"
            self.publish(5)
            time.sleep(0.25)  # the pace of arrivals; the loop waits on `condition`
        return range(first, self.sent)


def test_polls_stay_bounded_and_the_schedule_follows_a_drift_in_latency(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    legacy.configure(latency_profile="uniform:0.2,0.4")
    # The cold start (first poll at 1 s, then every 0.3 s) is well above the fast latency.
    stack.env.update(POLL_FIRST_DELAY_S="1", POLL_INTERVAL_S="0.3", POLL_DEADLINE_S="30")
    stack.start("submitter")
    poller = stack.start("poller")
    stream = Stream(broker)

    def learned_fast() -> bool:
        median = gauge(poller, MEDIAN)
        return gauge(poller, "poller_schedule_learned") == 1 and median is not None and median < 0.7

    stream.until(learned_fast, what="the poller to learn that registrations complete in under 0.7 s", timeout=25)
    before = stream.publish(40)  # on the plan learned for the fast latency
    median_before = gauge(poller, MEDIAN)
    assert median_before is not None

    # The drift: registrations in flight keep the latency they were given; new ones take longer.
    legacy.configure(latency_profile="uniform:0.8,1.6")

    def learned_slow() -> bool:
        return (gauge(poller, MEDIAN) or 0.0) >= 0.8

    after = stream.until(learned_slow, what="the learned median to reach the new latency", timeout=25)
    after = range(after.start, stream.publish(40).stop)  # and some on the plan learned after it

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=stream.sent, failed=0, timeout=60)
    assert outcomes.registered() == {f"a-{i}" for i in range(stream.sent)}
    assert outcomes.failures == []

    stats = legacy.stats()
    polls = stats["polls_by_request"]
    issued = {r["user_id"]: rid for rid, r in stats["requests"].items()}
    assert len(issued) == stream.sent  # one legacy registration each

    def mean_polls(ids: range) -> float:
        return sum(polls[issued[f"a-{i}"]] for i in ids) / len(ids)

    median_after = gauge(poller, MEDIAN)
    print(f"\n{stream.sent} registrations; polls per registration {sum(polls.values()) / len(polls):.2f} in all, "
          f"{mean_polls(before):.2f} before the drift ({len(before)}), {mean_polls(after):.2f} after it "
          f"({len(after)}); learned median {median_before:.2f} s -> {median_after} s")
    assert mean_polls(before) <= 6
    assert mean_polls(after) <= 6
    assert sum(polls.values()) / len(polls) <= 6
    assert median_after is not None and median_after >= 0.8 > median_before
