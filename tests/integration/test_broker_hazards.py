"""Hazards of production brokers that a healthy test broker never shows, each on the real broker
with the real services: one section per hazard."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Mongo, Service, node_args, rabbitmqctl, service_env, wait_until
from outcomes import INBOUND, PENDING, Outcomes, check_exact, good, mixed_load

from regbridge.amqp import AmqpRuntime, TopologyConflict
from regbridge.brokers import node_of
from regbridge.process import EXIT_TOPOLOGY_CONFLICT
from regbridge.topology import GROUP_SIZE_ARG, submitter_queues, wait_queue, wait_queue_name, work_queue

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


def metric(service: Service, name: str) -> float:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def readiness(service: Service) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{service.http}/readyz", timeout=2)
    return response.status_code, response.json()


def vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


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


# ---- a queue that exists with other arguments ---------------------------------------------------

CONFLICTS = {
    # Someone declared the inbound queue first, as a classic queue.
    "classic inbound": (INBOUND, {}, "x-queue-type"),
    # A wait queue of this name with another TTL (an older version, a hand-made queue).
    "wait queue TTL": (wait_queue_name(PENDING, 0.3),
                       {**wait_queue(PENDING, 0.3).arguments, "x-message-ttl": 500}, "x-message-ttl"),
    # Another TTL, from a release that declared no initial group size: the group size is
    # adopted, the TTL still stops the service.
    "older wait queue TTL": (wait_queue_name(PENDING, 0.3),
                             {**wait_queue(PENDING, 0.3).with_group_size(None).arguments, "x-message-ttl": 500},
                             "x-message-ttl"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_a_queue_with_other_arguments_stops_the_service_with_one_clear_error(
        case: str, amqp_url: str, mongo: Mongo, database: str, legacy: LegacySim, tmp_path: Path) -> None:
    queue, arguments, differs = CONFLICTS[case]
    broker = Broker(amqp_url)
    broker.channel.queue_declare(queue, durable=True, arguments=arguments)
    broker.close()
    # The fixed schedule: its submitter declares the first delay's wait queue (the adaptive one's
    # hands on to the pending queue, and its poller declares the wait queues).
    env = service_env(rabbitmq_url=amqp_url, mongodb_uri=mongo.uri, database=database, legacy_url=legacy.url,
                      extra={"POLL_SCHEDULE": "fixed"})
    submitter = Service("submitter", env, tmp_path / "submitter.log").start()
    assert submitter.process is not None
    began = time.monotonic()
    code = submitter.process.wait(30)
    print(f"exited with {code} after {time.monotonic() - began:.2f} s")
    # Not a reconnect loop: one connection, one error naming the queue and the argument, an exit
    # status an orchestrator shows (EX_CONFIG).
    assert code == EXIT_TOPOLOGY_CONFLICT
    log = entries(submitter)
    errors = [entry for entry in log if entry["level"] in ("error", "critical")]
    assert len(errors) == 1, errors
    (error,) = errors
    assert error["event"] == "topology_conflict" and error["queue"] == queue
    assert repr(queue) in error["msg"] and repr(differs) in error["msg"]
    assert "PRECONDITION_FAILED" in error["msg"]
    assert sum(1 for entry in log if entry.get("event") == "connecting") == 1
    assert not [entry for entry in log if entry.get("event") == "reconnect_wait"]


def test_queues_of_an_older_release_or_another_group_size_are_adopted_not_refused(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    # What a release before the group size declared (none), and a queue made on 5 nodes: both
    # differ from the default of 3 only in an argument that counts at creation.
    specs = submitter_queues(inbound=INBOUND, pending=PENDING, failed="registrations.failed", first_delay_s=0.3)
    sizes = {INBOUND: None, PENDING: 5}
    for spec in specs:
        broker.channel.queue_delete(spec.name)
        broker.channel.queue_declare(spec.name, durable=True,
                                     arguments=dict(spec.with_group_size(sizes.get(spec.name, 3)).arguments))
    submitter = stack.start("submitter")
    stack.start("poller")
    adopted = {entry["queue"] for entry in logged(submitter, "group_size_adopted")}
    assert adopted == {spec.name for spec in specs if sizes.get(spec.name, 3) != 3} == {INBOUND, PENDING}
    assert not logged(submitter, "topology_conflict") and not logged(submitter, "reconnect_wait")
    assert sum(1 for entry in entries(submitter) if entry.get("event") == "connecting") == 1
    expected = {f"old-{i}": "registered" for i in range(20)}
    for user_id in expected:
        broker.publish(INBOUND, good(user_id), message_id=user_id)
    assert check_exact(Outcomes(broker, users), expected) == 0
    # A queue made now by the services is created with the group size (3, one node here).
    assert GROUP_SIZE_ARG in str(subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", broker.url.rsplit("/", 1)[1], "name", "arguments"],
        check=True, capture_output=True, text=True, timeout=60).stdout)


def test_a_runtime_that_meets_a_conflict_is_not_alive_and_raises(amqp_url: str) -> None:
    broker = Broker(amqp_url)
    broker.channel.queue_declare(INBOUND, durable=True)  # classic
    broker.close()
    runtime = AmqpRuntime(url=amqp_url, queues=[work_queue(INBOUND)], consume=[INBOUND], workers=1, prefetch=1,
                          shutdown_timeout_s=5)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            runtime.run(lambda _delivery: None)
        except BaseException as exc:
            raised.append(exc)

    assert runtime.alive()  # a loop turning, no conflict known yet
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], TopologyConflict)
    assert "'x-queue-type'" in str(raised[0])
    assert not runtime.alive() and not runtime.connected


# ---- a queue that refuses hops ------------------------------------------------------------------


@contextmanager
def policy(vhost: str, name: str, pattern: str, definition: dict[str, Any]) -> Iterator[None]:
    rabbitmqctl("set_policy", "-p", vhost, name, pattern, json.dumps(definition), "--apply-to", "queues")
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", vhost, name], capture_output=True, timeout=60)


@pytest.mark.long
def test_a_refused_hop_backs_off_and_is_counted(stack: Stack, broker: Broker, users: Any, legacy: LegacySim,
                                                amqp_url: str) -> None:
    # The poll interval's wait queue has a length limit of 0 with reject-publish: the broker
    # refuses the still-processing registrations' hops to it. A quorum queue checks the limit
    # against a count that lags, so it lets one message in whenever it is empty; a 2 s interval
    # keeps that one there long enough that the refusals are nearly all there is.
    n = 20
    legacy.configure(latency_min_s=15.0, latency_max_s=15.0)
    stack.env.update(POLL_SCHEDULE="fixed", POLL_INTERVAL_S="2", POLL_DEADLINE_S="120")
    interval_queue = wait_queue_name(PENDING, 2.0)
    with policy(vhost_of(amqp_url), "refuse-polls", f"^{re.escape(interval_queue)}$",
                {"max-length": 0, "overflow": "reject-publish"}):
        stack.start("submitter")
        poller = stack.start("poller")
        for i in range(n):
            broker.publish(INBOUND, good(f"hop-{i}"), message_id=f"hop-{i}")
        wait_until(lambda: metric(poller, "poller_hops_refused_total") >= n, timeout=30,
                   what="every registration's hop refused once")
        before = legacy.stats(summary=True)["polls_total"]
        window = 10.0
        time.sleep(window)
        polls = legacy.stats(summary=True)["polls_total"] - before
        refused = metric(poller, "poller_hops_refused_total")
        print(f"{polls} polls in {window:.0f} s for {n} registrations whose hop is refused; {refused:.0f} refusals")
        # A delivery handed back at once would be polled again at once: hundreds a second. Held
        # back for a pause that doubles while the queue keeps refusing, each registration is
        # polled about once in the window.
        assert polls / window <= n / 5
        assert len(logged(poller, "hop_refused")) >= 1
    # The limit lifted, every registration still gets its outcome, and none was submitted twice.
    Outcomes(broker, users).wait(registered=n, failed=0, timeout=90)
    assert second_submissions(legacy) == 0


# ---- a broker alarm ------------------------------------------------------------------------------


def watermark(url: str) -> list[str]:
    """The arguments that set the memory watermark of `url`'s node back to what it is now.
    Read before the load starts: each `rabbitmqctl` call takes seconds on a busy machine."""
    previous = subprocess.run(["rabbitmqctl", *node_args(url), "-q", "eval",
                               "vm_memory_monitor:get_vm_memory_high_watermark()."],
                              check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    absolute = re.fullmatch(r"\{absolute,\s*(\d+)\}", previous)
    restore = ["absolute", absolute.group(1)] if absolute else [previous]
    float(restore[-1])  # a value we can set back, or no alarm at all
    return restore


@contextmanager
def memory_alarm(url: str, restore: list[str]) -> Iterator[None]:
    """A memory alarm on the broker of `url` (a node of the tests' own), for as short a time as
    the caller needs; `restore` (from `watermark`) is always set back."""
    rabbitmqctl("set_vm_memory_high_watermark", "0.000001", url=url)
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *restore, url=url)


def slow_pipeline(stack: Stack, legacy: LegacySim) -> tuple[Service, Service]:
    """A submitter and a poller that take about twenty seconds over 200 registrations, so that
    both are publishing when the alarm comes: setting it takes seconds, and the
    broker blocks a connection only when it next publishes. Each registration takes 1.5 to
    2.5 s, so that the poller keeps sending ids back to wait (a publish) rather than only
    finishing them (no publish)."""
    legacy.configure(response_delay_s=0.4, latency_min_s=1.5, latency_max_s=2.5)
    stack.env["WORKERS"] = "4"
    return stack.start("submitter"), stack.start("poller")


def blocked_everywhere(*services: Service) -> bool:
    def blocked(service: Service) -> bool:
        status, body = readiness(service)
        checks = {k: body.get(k) for k in ("broker", "publishing", "mongodb")}
        # Still connected while blocked: the answer names the node.
        return (status, checks) == (503, {"broker": True, "publishing": False, "mongodb": True}) \
            and body.get("broker_node") == node_of(service.env["RABBITMQ_URL"])

    return all(blocked(s) for s in services)


@pytest.mark.own_broker  # restarts it, or raises its alarm
def test_a_memory_alarm_blocks_publishing_reports_it_and_every_registration_ends_once(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    restore = watermark(broker.url)
    submitter, poller = slow_pipeline(stack, legacy)
    expected = mixed_load(broker, 200, seed=21)
    wait_until(lambda: legacy.stats(summary=True)["submissions_total"] >= 20, timeout=30, what="work in flight")
    with memory_alarm(broker.url, restore):
        raised = time.monotonic()
        wait_until(lambda: blocked_everywhere(submitter, poller), timeout=15,
                   what="/readyz of both services to report publishing blocked")
        # Held a few seconds with confirms not coming: nothing may give up on them.
        time.sleep(max(0.0, 6 - (time.monotonic() - raised)))
        assert blocked_everywhere(submitter, poller)
    wait_until(lambda: submitter.ready() and poller.ready(), timeout=30, what="both ready again")
    for service in (submitter, poller):
        assert logged(service, "broker_blocked") and logged(service, "broker_unblocked")
        assert metric(service, f"{service.name}_broker_blocks_total") >= 1
        assert metric(service, f"{service.name}_broker_blocked") == 0
    # Exactly one outcome each, and not one duplicate failure record.
    assert check_exact(Outcomes(broker, users), expected) == 0
    assert second_submissions(legacy) == 0


@pytest.mark.own_broker  # restarts it, or raises its alarm
def test_sigterm_while_the_broker_blocks_publishing_ends_within_the_deadline(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    timeout_s = 4.0
    stack.env["SHUTDOWN_TIMEOUT_S"] = str(timeout_s)
    restore = watermark(broker.url)
    submitter, poller = slow_pipeline(stack, legacy)
    expected = mixed_load(broker, 200, seed=22)
    wait_until(lambda: legacy.stats(summary=True)["submissions_total"] >= 20, timeout=30, what="work in flight")
    with memory_alarm(broker.url, restore):
        wait_until(lambda: blocked_everywhere(submitter), timeout=15, what="the submitter blocked")
        began = time.monotonic()
        assert submitter.terminate(timeout=timeout_s + 5) == 0
        took = time.monotonic() - began
    print(f"the submitter stopped in {took:.2f} s while blocked")
    # The confirms never came: the futures failed when the runtime stopped, on time.
    assert took < timeout_s
    submitter.start()
    submitter.wait_ready()
    # A failure record the broker read only after the alarm is the documented window of a
    # connection lost with a record unconfirmed: identical copies, never a conflicting one.
    extra = check_exact(Outcomes(broker, users), expected)
    print(f"extra identical failure records: {extra}")
    assert extra <= 4
    assert poller.process is not None and poller.process.poll() is None
