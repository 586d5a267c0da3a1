"""Hazards of production brokers that a healthy test broker never shows, each on the real broker
with the real services: one section per hazard."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Any

import pytest
from conftest import Stack
from harness import Broker, LegacySim, Service, wait_until
from outcomes import INBOUND, Outcomes, check_exact, good

pytestmark = pytest.mark.integration


def entries(service: Service) -> list[dict[str, Any]]:
    """The service's JSON log lines."""
    found = []
    for line in service.log().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def logged(service: Service, event: str) -> list[dict[str, Any]]:
    return [entry for entry in entries(service) if entry.get("event") == event]


def logged_at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"]).timestamp()


def second_submissions(legacy: LegacySim) -> int:
    by_user = legacy.stats()["submissions_by_user"]
    return sum(by_user.values()) - len(by_user)


# ---- SIGTERM with a slow legacy API -------------------------------------------------------------

# How long a POST begun before the signal may take to reach legacy-sim over loopback: a POST
# arriving later than this after the signal was begun after it.
IN_TRANSIT_S = 0.1


def test_sigterm_with_a_slow_legacy_api_starts_no_post_after_the_signal(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # Every answer takes 1 s; a third of the POSTs are refused with Retry-After 5 s, so that some
    # registrations sit in a deferred retry when the signal comes. Two workers and a prefetch of
    # 16 leave most of what the submitter holds queued, not started.
    legacy.configure(response_delay_s=1.0, post_503_rate=0.3, retry_after_s=5.0)
    stack.env.update(WORKERS="2", SUBMIT_BACKOFF_MAX_S="10", SUBMIT_MAX_ATTEMPTS="8")
    submitter = stack.start("submitter")
    expected = {f"slow-{i}": "registered" for i in range(40)}
    for user_id in expected:
        broker.publish(INBOUND, good(user_id), message_id=user_id)
    wait_until(lambda: legacy.stats(summary=True)["post_503_total"] >= 2, timeout=30,
               what="retries deferred with work in flight")
    began = time.monotonic()
    assert submitter.terminate(timeout=20) == 0
    took = time.monotonic() - began
    assert took < 10  # SHUTDOWN_TIMEOUT_S
    (signal,) = logged(submitter, "signal")
    (handed,) = logged(submitter, "handed_back")
    queued, held = map(int, re.findall(r"\d+", handed["msg"]))
    arrivals = legacy.stats()["post_arrivals"]
    late = [round(at - logged_at(signal), 3) for at in arrivals if at > logged_at(signal) + IN_TRANSIT_S]
    print(f"stopped in {took:.2f} s; handed back {queued} queued and {held} deferred; "
          f"{len(arrivals)} POSTs, late ones at {late}")
    # The stop met all three kinds of work: queued, deferred, and in flight (which finished).
    assert queued > 0 and held > 0
    assert late == []
    assert not logged(submitter, "shutdown_timeout")
    # What was handed back is done by the next run, and the POSTs in flight at the signal were
    # recorded: none is made a second time.
    legacy.configure(response_delay_s=0.0, post_503_rate=0.0, retry_after_s=0.1)
    stack.env["WORKERS"] = "8"
    stack.start("submitter")
    stack.start("poller")
    assert check_exact(Outcomes(broker, users), expected) == 0
    assert second_submissions(legacy) == 0
