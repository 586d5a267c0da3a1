"""Nothing lost: crashes, broker cuts and restarts, legacy and MongoDB outages, SIGTERM under load.

Each test puts a few hundred registrations in flight with sub-second latencies, injects its
fault while they are in flight, and then holds every message to its exact outcome.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Mongo, Service, rabbitmqctl, wait_until
from outcomes import INBOUND, Outcomes, check_exact, good, index_agrees, mixed_load

pytestmark = pytest.mark.integration


def submissions_so_far(legacy: LegacySim) -> int:
    return int(legacy.stats(summary=True)["submissions_total"])


def second_submissions(legacy: LegacySim) -> int:
    """Registrations beyond each user's first. A POST legacy-sim answered from its key store
    (its Idempotency-Key seen before) registers nothing and is not counted here."""
    by_user = legacy.stats()["submissions_by_user"]
    return sum(by_user.values()) - len(by_user)


def metric(service: Service, name: str) -> float:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def vhost_of(broker: Broker) -> str:
    return broker.url.rsplit("/", 1)[1]


def test_sigkill_of_every_service_several_times(stack: Stack, broker: Broker, users: Any,
                                                legacy: LegacySim) -> None:
    legacy.configure(post_503_rate=0.03, get_503_rate=0.03)
    stack.env["WORKERS"] = "16"  # up to 16 POSTs in flight at a kill, each made again on its redelivery
    submitters = [stack.start("submitter"), stack.start("submitter")]
    pollers = [stack.start("poller"), stack.start("poller")]
    victims = [submitters[0], pollers[0], submitters[1], pollers[1], submitters[0], pollers[1]]
    rng = random.Random(3)
    expected: dict[str, str] = {}
    # Publish in chunks; after each, kill one copy once the legacy API has seen some of the chunk,
    # so that every kill lands with work in flight. The killed copy is restarted at once.
    for chunk, victim in enumerate(victims):
        # Counted before publishing: a fast submitter may have taken the whole chunk by the next read.
        floor = submissions_so_far(legacy) + 10
        expected.update(mixed_load(broker, 60, seed=rng.randrange(1 << 30), prefix=f"kill{chunk}"))
        wait_until(lambda f=floor: submissions_so_far(legacy) >= f, timeout=30, what="work in flight")
        victim.kill()
        victim.start()
    for service in submitters + pollers:
        service.wait_ready()
    outcomes = Outcomes(broker, users)
    extra_records = check_exact(outcomes, expected, timeout=180)
    unsure = index_agrees(outcomes)
    # A POST in flight at the moment of a kill is made again on its redelivery, with the same
    # Idempotency-Key: legacy-sim answers it from its key store and registers nothing new.
    kills = sum(1 for v in victims if v.name == "submitter")
    dupes = second_submissions(legacy)
    replays = legacy.stats(summary=True)["idempotent_replays_total"]
    print(f"second registrations: {dupes}, POSTs replayed from the key store: {replays}, "
          f"extra failure records: {extra_records}, index entries left unsure: {unsure}, for {len(expected)} "
          "messages, "
          f"{kills} submitter kills and {len(victims) - kills} poller kills")
    assert dupes == 0
    # A record is duplicated only by a kill between its confirm and the attempt's mark.
    assert extra_records <= len(victims)


def test_a_post_that_timed_out_registers_nothing_new(stack: Stack, broker: Broker, users: Any,
                                                     legacy: LegacySim) -> None:
    # Every first POST outlasts the submitter's read timeout, and legacy-sim registers it all
    # the same: the submitter retries, with the same Idempotency-Key, and gets the same 201.
    stack.env.update(LEGACY_TIMEOUT_S="0.5", SUBMIT_BACKOFF_BASE_S="0.2", SUBMIT_BACKOFF_MAX_S="1",
                     SUBMIT_MAX_ATTEMPTS="10")
    legacy.configure(accept_latency_s=1.0)
    submitter = stack.start("submitter")
    stack.start("poller")
    expected = {f"slow-{i}": "registered" for i in range(30)}
    for user_id in expected:
        broker.publish(INBOUND, good(user_id), message_id=user_id)
    wait_until(lambda: submissions_so_far(legacy) >= len(expected), timeout=60,
               what="every timed-out first POST to be registered")
    legacy.configure(accept_latency_s=0.005)
    assert check_exact(Outcomes(broker, users), expected) == 0
    stats = legacy.stats()
    timeouts = metric(submitter, 'submitter_submissions_total{result="transient"}')
    print(f"timed-out POSTs: {timeouts:.0f}, POSTs replayed from the key store: "
          f"{stats['idempotent_replays_total']}, second registrations: {second_submissions(legacy)}, "
          f"for {len(expected)} messages")
    assert timeouts >= len(expected)
    assert stats["idempotent_replays_total"] >= len(expected)
    assert stats["submissions_by_user"] == dict.fromkeys(expected, 1)
    # Each user holds the request id of its one registration.
    registered = {r["user_id"]: rid for rid, r in stats["requests"].items()}
    for user_id, request_id in registered.items():
        assert users.find_one({"_id": user_id})["legacy_request_id"] == request_id


def test_broker_connections_cut_under_load(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    expected = mixed_load(broker, 300, seed=11)
    wait_until(lambda: submissions_so_far(legacy) >= 60, timeout=30, what="work in flight")
    subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "-p", vhost_of(broker), "test: cut"],
                   check=True, capture_output=True, timeout=60)
    broker.reconnect()
    # A failure record whose confirm the cut swallowed is sent again, identical (check_exact
    # holds every copy to its original): at most the records in flight at the cut, a small share
    # of the failures, never one per failure as a resend loop would make.
    failures = sum(kind != "registered" for kind in expected.values())
    assert check_exact(Outcomes(broker, users), expected) <= max(4, failures // 4)
    assert metric(submitter, "submitter_broker_reconnects_total") >= 1
    assert metric(poller, "poller_broker_reconnects_total") >= 1
    # The services lived through it: no restart, and nothing was submitted twice.
    assert submitter.process is not None and submitter.process.poll() is None
    assert poller.process is not None and poller.process.poll() is None
    assert second_submissions(legacy) == 0


@pytest.mark.own_broker  # restarts it, or raises its alarm
def test_broker_restart_under_load(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    expected = mixed_load(broker, 200, seed=12)
    wait_until(lambda: submissions_so_far(legacy) >= 40, timeout=30, what="work in flight")
    in_hand = 'submitter_deliveries_in_hand{queue="registrations"}'
    wait_until(lambda: metric(submitter, in_hand) > 0, timeout=30, what="deliveries in the submitter's hand")
    rabbitmqctl("stop_app", url=broker.url)
    try:
        wait_until(lambda: not submitter.ready() and not poller.ready(), timeout=30,
                   what="both services to report not ready")
        # The broker took back what they held, and no depth is reported that no one reads.
        for service in (submitter, poller):
            text = requests.get(f"{service.http}/metrics", timeout=5).text
            assert f"{service.name}_queue_messages{{" not in text
            assert re.search(rf"^{service.name}_deliveries_in_hand\{{.*\}} 0\.0$", text, re.MULTILINE)
    finally:
        rabbitmqctl("start_app", url=broker.url)
    broker.reconnect()
    failures = sum(kind != "registered" for kind in expected.values())
    assert check_exact(Outcomes(broker, users), expected) <= max(4, failures // 4)  # as above
    assert metric(submitter, "submitter_broker_reconnects_total") >= 1
    assert second_submissions(legacy) == 0
    # Every delivery settled, and the depths read again on the new connection.
    wait_until(lambda: metric(submitter, in_hand) == 0
               and metric(poller, 'poller_deliveries_in_hand{queue="registrations.pending"}') == 0,
               timeout=30, what="nothing left in hand")
    assert metric(poller, "poller_retries_deferred") == 0
    wait_until(lambda: 'submitter_queue_messages{queue="registrations"}' in
               requests.get(f"{submitter.http}/metrics", timeout=5).text, timeout=30, what="depths read again")


def test_legacy_down_for_a_while(stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # A budget that outlasts the outage: 0.2 + 0.4 + 0.8 + 1.6 + 2 + ... seconds of backoff.
    stack.env.update(SUBMIT_BACKOFF_BASE_S="0.2", SUBMIT_BACKOFF_MAX_S="2", SUBMIT_MAX_ATTEMPTS="8")
    # A slow intake, so that the outage meets registrations both before and after their POST.
    stack.env["WORKERS"] = "4"
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    expected = mixed_load(broker, 200, seed=13)
    wait_until(lambda: submissions_so_far(legacy) >= 50, timeout=30, what="work in flight")
    legacy.configure(down=True)
    began = time.monotonic()
    # Down until both services' circuit breakers have opened (LEGACY_BREAKER_FAILURES refusals
    # in a row on each endpoint) and held calls back, and on until a probe of each has failed too.
    wait_until(lambda: all(metric(s, f'{s.name}_legacy_calls_not_sent_total{{reason="breaker"}}') > 0
                           for s in (submitter, poller)), timeout=30, what="both circuit breakers to open")
    opened = legacy.stats(summary=True)
    wait_until(lambda: (s := legacy.stats(summary=True))["post_503_total"] > opened["post_503_total"]
               and s["get_503_total"] > opened["get_503_total"], timeout=30, what="a failed probe on each endpoint")
    outage = time.monotonic() - began
    legacy.configure(down=False)
    assert check_exact(Outcomes(broker, users), expected) == 0
    stats = legacy.stats(summary=True)
    # Bounded retries, no hot loop: each registration's POSTs are bounded by the budget, and polls
    # keep their interval (prefetch bounds what is polled at once).
    assert stats["post_503_total"] <= len(expected) * 8
    assert stats["get_503_total"] <= len(expected) * (outage / 0.2 + 2)
    assert second_submissions(legacy) == 0


def test_mongodb_unreachable_for_a_while(stack: Stack, broker: Broker, users: Any, legacy: LegacySim,
                                         mongo: Mongo) -> None:
    if mongo.process is None:
        pytest.skip("needs the SecantusDB the tests start, to stop and restart it")
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    expected = mixed_load(broker, 200, seed=14)
    wait_until(lambda: submissions_so_far(legacy) >= 50, timeout=30, what="work in flight")
    mongo.stop()
    try:
        wait_until(lambda: not submitter.ready() and not poller.ready(), timeout=30,
                   what="/readyz to report the outage")
        wait_until(lambda: metric(submitter, "submitter_store_retries_total") > 0
                   and metric(poller, "poller_store_retries_total") > 0, timeout=30,
                   what="both services to wait on MongoDB")
        assert submitter.process is not None and submitter.process.poll() is None
        assert poller.process is not None and poller.process.poll() is None
    finally:
        mongo.start()
    wait_until(lambda: submitter.ready() and poller.ready(), timeout=60, what="ready again")
    assert check_exact(Outcomes(broker, users), expected) == 0
    assert second_submissions(legacy) == 0


def test_sigterm_under_load_hands_back_and_exits_zero(stack: Stack, broker: Broker, users: Any,
                                                      legacy: LegacySim) -> None:
    legacy.configure(post_503_rate=0.2)  # some registrations sit in a backoff when the signal comes
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    expected = mixed_load(broker, 300, seed=15)
    wait_until(lambda: submissions_so_far(legacy) >= 60, timeout=30, what="work in flight")
    began = time.monotonic()
    assert submitter.terminate(timeout=15) == 0
    assert poller.terminate(timeout=15) == 0
    assert time.monotonic() - began < 15  # SHUTDOWN_TIMEOUT_S is 10 in the tests
    assert "shutdown timeout" not in submitter.log() + poller.log()
    submitter.start()
    poller.start()
    assert check_exact(Outcomes(broker, users), expected) == 0
    assert second_submissions(legacy) == 0
