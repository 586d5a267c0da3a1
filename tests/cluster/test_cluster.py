"""On a three-node RabbitMQ cluster, losing a node stops nothing and loses nothing.

Two submitters and two pollers run against a cluster of three nodes started on this machine
(`rabbit_cluster`): one pair prefers the first node, the other the second, and each knows all
three. Registrations keep arriving at a steady rate while the test
  (a) SIGKILLs the node that leads `registrations.pending`,
  (b) brings it back,
  (c) restarts the three nodes one at a time, as a rolling upgrade does (each stop waits until
      every quorum queue keeps a majority without that node: `rabbitmq-upgrade
      await_online_quorum_plus_one`),
  (d) with CLUSTER_MAJORITY_LOSS=1 only, kills two nodes of three for a while, then brings
      them back: without a majority the queues stop, and what the services report meanwhile
      is recorded.
Then every registration is held to its exact outcome, the longest gap in progress through (a)
to (c) is bounded, and the legacy API saw no second registration. The stall of each step is
printed.

RabbitMQ 4.0-4.2 count every return of a message (a channel closed with it unacked, as a lost
node does) toward a delivery limit of 20 by default. That is modelled by a policy of 20 on every
queue: node losses must not wear a message out either.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import requests
from conftest import Stack
from harness import Broker, LegacySim, Mongo, Service, service_env, unavailable, wait_until
from outcomes import FAILED, Outcomes, check_exact, mixed_load
from rabbit_cluster import Cluster, ClusterUnavailable, Node, ctl, rabbit_cluster

pytestmark = pytest.mark.integration

MIN_REGISTRATIONS = 300
PUBLISH_EVERY_S = 0.5  # a chunk of CHUNK registrations each time: 8 a second
CHUNK = 4
MAX_GAP_S = 30.0
MAJORITY_LOST_S = 10.0  # how long (d) keeps two nodes down
# (d) runs only when asked: after a majority loss, one run of three beside the rest of
# `make test` left registrations unfinished minutes after the nodes were back (a window in
# docs/guarantees.md, not yet understood), while every run alone resumed.
MAJORITY_LOSS = os.environ.get("CLUSTER_MAJORITY_LOSS") == "1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0 or shutil.which("rabbitmq-server") is None:
        unavailable("the cluster test starts RabbitMQ nodes as the rabbitmq user: it needs root and the "
                    "rabbitmq-server package")
    with ExitStack() as stack:
        try:
            started = stack.enter_context(rabbit_cluster(3))
        except ClusterUnavailable as exc:
            unavailable(f"cannot start a three-node RabbitMQ cluster on this machine: {exc}")
            raise
        yield started


class ClusterBroker(Broker):
    """The test's own client: connects to any node that answers, and publishes through losses."""

    def __init__(self, cluster: Cluster, first: int = 0) -> None:
        self.cluster = cluster
        self._next = first
        self.sent_at: dict[str, float] = {}  # message_id -> when the broker first confirmed it
        super().__init__(cluster.nodes[first].url)

    def connect(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            node = self.cluster.nodes[self._next % len(self.cluster.nodes)]
            self._next += 1
            try:
                self.url = node.url
                self.connection = pika.BlockingConnection(pika.URLParameters(node.url))
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def publish(self, queue: str, body: bytes | dict[str, Any], *, message_id: str | None = None,
                timestamp: int | None = None) -> None:
        # Until confirmed: a publish whose confirm a lost node swallowed is sent again, and its
        # copy shares the message id (the pipeline's attempt key dedupes it).
        deadline = time.monotonic() + 90
        while True:
            try:
                super().publish(queue, body, message_id=message_id, timestamp=timestamp)
                if message_id is not None:
                    self.sent_at.setdefault(message_id, time.monotonic())
                return
            except (pika.exceptions.AMQPError, OSError):
                if time.monotonic() > deadline:
                    raise
                self.close()
                self.connect()

    def in_pipeline(self, exclude: str) -> int:
        return sum(n for name, n in self.cluster.messages().items() if name != exclude)


@dataclass
class Progress:
    """Finished registrations in MongoDB over time, sampled by a thread of its own."""

    users: Any
    changes: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            count = self.users.count_documents({"registration_status": {"$in": ["registered", "failed"]}})
            if count != last:
                self.changes.append((time.monotonic(), count))
                last = count
            time.sleep(0.1)

    def count(self) -> int:
        return self.changes[-1][1] if self.changes else 0

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] with no registration finished."""
        times = [start, *(t for t, _ in self.changes if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(times))

    def longest_stall(self, start: float, end: float, due: list[float]) -> float:
        """The longest time in [start, end] with registrations waiting and none finished. `due`
        holds, sorted, when each registration that ends in a user document was published: a gap
        counts from when work was there to do, since the test's own publisher may pause (a
        confirm held while a node restarts) with the pipeline empty, which is no stall of it."""
        points = [(start, self._count_at(start)), *((t, n) for t, n in self.changes if start < t < end)]
        longest = 0.0
        for (a, count), b in zip(points, [t for t, _ in points[1:]] + [end], strict=True):
            # Finished so far: `count`; work waits once more than that were published.
            waiting_from = due[count] if count < len(due) else b
            longest = max(longest, b - max(a, waiting_from))
        return longest

    def _count_at(self, moment: float) -> int:
        return max((n for t, n in self.changes if t <= moment), default=0)


@dataclass
class Publisher:
    """Registrations at a steady rate, through whichever node answers, until stopped."""

    broker: ClusterBroker
    expected: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(5)
        chunk = 0
        while not self.stop.is_set() or len(self.expected) < MIN_REGISTRATIONS:
            self.expected.update(mixed_load(self.broker, CHUNK, seed=rng.randrange(1 << 30), prefix=f"c{chunk}"))
            chunk += 1
            time.sleep(PUBLISH_EVERY_S)


def readiness(service: Service) -> tuple[int, dict[str, Any]]:
    try:
        answer = requests.get(f"{service.http}/readyz", timeout=2)
    except requests.RequestException:
        return 0, {}
    return answer.status_code, json.loads(answer.text)


def node_of(service: Service) -> str | None:
    status, body = readiness(service)
    return body.get("broker_node") if status == 200 else None


def test_losing_a_node_and_a_rolling_restart_stop_nothing_and_lose_nothing(
        cluster: Cluster, mongo: Mongo, database: str, users: Any, legacy: LegacySim, tmp_path: Path) -> None:
    first, second, third = cluster.nodes
    ctl(first.name, "set_policy", "-p", "/", "limit", ".*", json.dumps({"delivery-limit": 20}),
        "--apply-to", "queues")
    listed = {node.name: ",".join(n.url for n in (node, *[m for m in cluster.nodes if m is not node]))
              for node in cluster.nodes}
    env = service_env(rabbitmq_url=first.url, mongodb_uri=mongo.uri, database=database, legacy_url=legacy.url,
                      extra={"RABBITMQ_URL_ORDER": "listed", "POLL_DEADLINE_S": "180", "WORKERS": "8"})
    stack = Stack(env, tmp_path)
    try:
        run_the_steps(cluster, stack, listed, users, legacy, first, second, third)
    finally:
        stack.stop_all()


def run_the_steps(cluster: Cluster, stack: Stack, listed: dict[str, str], users: Any, legacy: LegacySim,
                  first: Node, second: Node, third: Node) -> None:
    pair_a = [stack.start(name, RABBITMQ_URL=listed[first.name]) for name in ("submitter", "poller")]
    pair_b = [stack.start(name, RABBITMQ_URL=listed[second.name]) for name in ("submitter", "poller")]
    assert [node_of(s) for s in pair_a] == [first.address] * 2
    assert [node_of(s) for s in pair_b] == [second.address] * 2
    # QUORUM_INITIAL_GROUP_SIZE (3): every queue the services made has a member on each node.
    members = ctl(first.name, "list_queues", "-p", "/", "--no-table-headers", "name", "members")
    assert len(members.splitlines()) >= 4
    for line in members.splitlines():
        assert all(node.name in line for node in cluster.nodes), line

    progress = Progress(users)
    publisher = Publisher(ClusterBroker(cluster, first=2))
    threads = [threading.Thread(target=progress.run, daemon=True), threading.Thread(target=publisher.run, daemon=True)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    steps: list[tuple[str, float, float]] = []

    def advanced(by: int) -> None:
        floor = progress.count() + by
        wait_until(lambda: progress.count() >= floor, timeout=60, what=f"{by} more registrations to finish",
                   every=0.1)

    def step(label: str, action: Any) -> None:
        start = time.monotonic()
        action()
        advanced(15)  # the pipeline runs again, whatever the step left behind
        steps.append((label, start, time.monotonic()))

    advanced(20)  # registrations in flight on both pairs
    leader = cluster.node(cluster.leader("registrations.pending"))
    step(f"SIGKILL {leader.name}, the leader of registrations.pending", leader.kill)
    # The clients that were on it are on another node now.
    wait_until(lambda: all(node_of(s) not in (None, leader.address) for s in stack.services), timeout=60,
               what="every service connected to a node that is up")
    step(f"{leader.name} back", lambda: (leader.start(), leader.await_startup()))
    for node in cluster.nodes:
        def restart(node: Node = node) -> None:
            cluster.await_quorum_plus_one(node)
            node.stop()
            node.start()
            node.await_startup()
        step(f"rolling restart: {node.name}", restart)
    majority_lost = majority_back = time.monotonic()
    seen = ""
    if MAJORITY_LOSS:
        seen = lose_the_majority(cluster, stack, progress, [first, second])
        advanced(15)
        majority_back = time.monotonic()

    publisher.stop.set()
    threads[1].join(120)
    outcomes = Outcomes(ClusterBroker(cluster), users)
    try:
        extra = check_exact(outcomes, publisher.expected, timeout=240)
    except AssertionError as exc:
        # Where the unfinished ones are, read before the cluster is torn down.
        # `messages` beside ready and unacked: a quorum queue's total also counts what it holds to
        # dead-letter at least once, which neither of the other two shows.
        queues = ctl(cluster.running().name, "list_queues", "-p", "/", "name", "messages", "messages_ready",
                     "messages_unacknowledged", "consumers", "leader", "members")
        raise AssertionError(f"{str(exc)[:2000]}\nthe cluster's queues:\n{queues}") from None
    progress.stop.set()
    threads[0].join(10)
    finished = progress.changes[-1][0]

    print(f"\n{len(publisher.expected)} registrations through a three-node cluster in "
          f"{finished - began:.1f} s; extra failure records: {extra}")
    for label, start, end in steps:
        print(f"  {label}: longest stall {progress.longest_gap(start, end):.2f} s (step took {end - start:.1f} s)")
    if MAJORITY_LOSS:
        print(f"  two of three nodes down for {MAJORITY_LOST_S:.0f} s, then back: longest stall "
              f"{progress.longest_gap(majority_lost, majority_back):.2f} s; {seen}")
    sent = publisher.broker.sent_at
    due = sorted(sent[uid] for uid, kind in publisher.expected.items() if kind != "validation" and uid in sent)
    whole = max(progress.longest_stall(began, majority_lost, due), progress.longest_stall(majority_back, finished, due))
    quiet = max(progress.longest_gap(began, majority_lost), progress.longest_gap(majority_back, finished))
    pause = max((b - a for a, b in itertools.pairwise(sorted(sent.values()))), default=0.0)
    print(f"  longest stall outside the majority loss: {whole:.2f} s with work waiting ({quiet:.2f} s with "
          f"nothing finished; the test's publisher paused up to {pause:.2f} s); "
          f"failure queue now {cluster.messages().get(FAILED, 0)} records")

    assert whole <= MAX_GAP_S
    assert len(publisher.expected) >= MIN_REGISTRATIONS
    by_user = legacy.stats()["submissions_by_user"]
    assert sum(by_user.values()) - len(by_user) == 0  # no second registration
    # A record is copied only when a lost node swallowed the confirm of one already sent.
    assert extra <= 4 * len(steps)
    for service in stack.services:
        assert service.process is not None and service.process.poll() is None, f"{service.name} exited"


def lose_the_majority(cluster: Cluster, stack: Stack, progress: Progress, lost: list[Node]) -> str:
    """Kill `lost` (two of three), wait, bring them back. Returns what was seen meanwhile: how
    many registrations finished after the first seconds (work already in hand may finish; no
    new work is delivered), and the services' readiness."""
    for node in lost:
        node.kill()
    # The outage lasts MAJORITY_LOST_S, sampled throughout; after its first seconds the work
    # that was already in hand has finished or stopped.
    killed = time.monotonic()
    settled: int | None = None
    states: set[tuple[str, int]] = set()
    while time.monotonic() - killed < MAJORITY_LOST_S:
        states.update((s.name, readiness(s)[0]) for s in stack.services)
        if settled is None and time.monotonic() - killed >= 3:
            settled = progress.count()
        time.sleep(0.5)
    assert settled is not None
    finished_meanwhile = progress.count() - settled
    for node in lost:
        node.start()
    for node in lost:
        node.await_startup()
    ready = sorted(f"{name} {'ready' if code == 200 else f'not ready ({code})'}" for name, code in states)
    return f"{finished_meanwhile} finished while the majority was lost; readiness seen: {', '.join(ready)}"
