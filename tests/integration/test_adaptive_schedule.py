"""The adaptive poll schedule in the real pipeline: it starts as configured, learns from the
completions it sees, and moves its first poll to where registrations complete."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Service
from outcomes import INBOUND, Outcomes, good

pytestmark = pytest.mark.integration


def gauge(service: Service, name: str) -> float | None:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_the_poller_learns_that_registrations_complete_before_the_first_delay(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # legacy-sim completes in 0.3-0.6 s; the configured first poll is at 2 s (the cold start).
    stack.env.update(POLL_FIRST_DELAY_S="2", POLL_INTERVAL_S="0.5")
    stack.start("submitter")
    poller = stack.start("poller")
    assert gauge(poller, "poller_schedule_learned") == 0
    assert gauge(poller, "poller_schedule_first_poll_seconds") == 2.0
    sent = 0
    deadline = time.monotonic() + 60
    # A steady stream, as long as it takes: each plan is tried on registrations that come after it.
    while (gauge(poller, "poller_schedule_first_poll_seconds") or 2.0) >= 1.0:
        assert time.monotonic() < deadline, "the first poll never moved below 1 s"
        for _ in range(5):
            broker.publish(INBOUND, good(f"a-{sent}"))
            sent += 1
        time.sleep(0.25)
    learned_after = sent
    for _ in range(40):  # then some on the learned plan
        broker.publish(INBOUND, good(f"a-{sent}"))
        sent += 1
    Outcomes(broker, users).wait(registered=sent, failed=0, timeout=60)

    assert gauge(poller, "poller_schedule_learned") == 1
    assert (gauge(poller, "poller_schedule_observations") or 0) >= 20
    p10 = gauge(poller, 'poller_completion_age_seconds{percentile="10"}')
    p90 = gauge(poller, 'poller_completion_age_seconds{percentile="90"}')
    assert p10 is not None and p90 is not None and 0 < p10 <= p90 < 2.0
    stats = legacy.stats()
    polls = stats["polls_by_request"]
    issued = {r["user_id"]: rid for rid, r in stats["requests"].items()}
    late = [polls[issued[f"a-{i}"]] for i in range(learned_after, sent)]
    print(f"\n{sent} registrations, learned after {learned_after}; polls per registration "
          f"{sum(polls.values()) / len(polls):.2f} in all, {sum(late) / len(late):.2f} on the learned plan")
    assert sum(polls.values()) / len(polls) <= 4
    assert sum(late) / len(late) <= 4
