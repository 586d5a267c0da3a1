"""A failing legacy API is protected: 2,000 registrations in flight, the API down for 20 s.

The pollers would poll every waiting id every POLL_INTERVAL_S whatever the answers; with the
circuit breaker each replica sends the calls that open it, then a few probes, and after the
API is back the rate ramps up instead of surging. Every registration still gets its exact
outcome, including those published during the outage, whose held POSTs spend no attempt.
"""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Service, wait_until
from outcomes import Outcomes, check_exact, mixed_load

from regbridge.settings import poller_settings

pytestmark = pytest.mark.integration

OUTAGE_S = 20.0
IN_FLIGHT = 2000
DURING_OUTAGE = 100
AFTER_S = 8
LIMITS = poller_settings({}).breaker_limits()


def requests_seen(legacy: LegacySim) -> int:
    """Every request legacy-sim answered on its two /v1 endpoints."""
    s = legacy.stats(summary=True)
    return int(s["submissions_total"] + s["rejected_total"] + s["polls_total"] + s["unknown_polls_total"]
               + s["post_503_total"] + s["get_503_total"])


def sample(service: Service, name: str) -> float:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def closed(service: Service) -> bool:
    return sample(service, f'{service.name}_legacy_breaker_state{{state="closed"}}') == 1.0


@pytest.mark.long
def test_a_down_legacy_api_gets_only_probes_and_every_registration_its_outcome(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # Registrations take 8-15 s: all of them are still processing when the API goes down.
    legacy.configure(latency_min_s=8, latency_max_s=15)
    # The fixed schedule: every waiting id polled every second from its fourth, the load the
    # breaker must hold off (2,000 a second, against a few probes). Nothing completes before 8 s,
    # so earlier polls would add work to the run and nothing to what it shows.
    stack.env.update(POLL_SCHEDULE="fixed", POLL_FIRST_DELAY_S="4", POLL_INTERVAL_S="1", POLL_DEADLINE_S="180")
    submitter = stack.start("submitter")
    pollers = [stack.start("poller"), stack.start("poller")]
    replicas = 1 + len(pollers)
    began = time.monotonic()
    expected = mixed_load(broker, IN_FLIGHT, seed=21, prefix="flight")
    to_submit = sum(1 for kind in expected.values() if kind != "validation")
    wait_until(lambda: (s := legacy.stats(summary=True))["submissions_total"] + s["rejected_total"] >= to_submit,
               timeout=60, what="every registration submitted")
    submitted_s = time.monotonic() - began
    before = requests_seen(legacy)
    time.sleep(3.0)
    normal_rate = (requests_seen(legacy) - before) / 3.0

    legacy.configure(down=True)
    start = requests_seen(legacy)
    time.sleep(OUTAGE_S / 2)
    # Registrations that arrive during the outage: the submitter holds their POSTs.
    expected.update(mixed_load(broker, DURING_OUTAGE, seed=22, prefix="outage"))
    time.sleep(OUTAGE_S / 2)
    states_down = [closed(service) for service in (submitter, *pollers)]
    held = {s.name: sample(s, f'{s.name}_legacy_calls_not_sent_total{{reason="breaker"}}')
            for s in (submitter, pollers[0])}
    during = requests_seen(legacy) - start
    # Registrations submitted after the outage complete within a second.
    legacy.configure(down=False, latency_min_s=0.3, latency_max_s=0.6)

    after = [requests_seen(legacy)]
    for _ in range(AFTER_S):
        time.sleep(1.0)
        after.append(requests_seen(legacy))
    per_second = [b - a for a, b in itertools.pairwise(after)]
    extra = check_exact(Outcomes(broker, users), expected, timeout=120)

    cap = LIMITS.probe_rps * replicas * OUTAGE_S
    print(f"\n{IN_FLIGHT} in flight (submitted in {submitted_s:.1f} s), {replicas} replicas; "
          f"normal rate {normal_rate:.0f} requests/s; during the {OUTAGE_S:.0f} s outage {during} requests "
          f"(cap {cap:.0f}: {LIMITS.probe_rps:g}/s x {replicas} x {OUTAGE_S:.0f} s); "
          f"held by the breaker: {held}; requests in each of the {AFTER_S} s after recovery: {per_second}; "
          f"all {len(expected)} outcomes exact ({extra} extra copies) {time.monotonic() - began:.0f} s after start")
    assert during < cap
    assert not any(states_down), "every breaker was open or half-open at the end of the outage"
    assert all(count > 0 for count in held.values())
    # A ramp, not a surge: the seconds after recovery send less, together, than one second at the cap.
    assert sum(per_second) < LIMITS.max_rps * replicas
    assert extra == 0
    assert all(closed(service) for service in (submitter, *pollers))
