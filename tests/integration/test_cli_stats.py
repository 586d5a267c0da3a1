"""`registrations stats`, `init-indexes` and `inspect`, run as the console script against the
real broker (the test's vhost, its management API) and the Mongo-wire server."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pika
import pytest
import stats_scale
from harness import BIN, Broker, Mongo, free_port, service_env, wait_until

from regbridge.topology import wait_queue_name

pytestmark = pytest.mark.integration

INBOUND, PENDING, FAILED = "registrations", "registrations.pending", "registrations.failed"


@pytest.fixture
def env(amqp_url: str, mongo: Mongo, database: str) -> dict[str, str]:
    return service_env(rabbitmq_url=amqp_url, mongodb_uri=mongo.uri, database=database,
                       legacy_url="http://127.0.0.1:9")


def cli(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "registrations"), *args], env={**env, **extra}, capture_output=True,
                          text=True, timeout=120)


def ok(env: dict[str, str], *args: str, **extra: str) -> str:
    result = cli(env, *args, **extra)
    assert result.returncode == 0, f"registrations {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


# ---- stats and its index ------------------------------------------------------------------------


def test_stats_counts_users_only_on_the_index_that_init_indexes_creates(env: dict[str, str], users: Any) -> None:
    mix = {"submitted": 5, "registered": 7, "failed": 2, None: 3}
    users.insert_many([{"_id": f"u-{status}-{i}", **({"registration_status": status} if status else {})}
                       for status, n in mix.items() for i in range(n)])

    # No index: nothing is counted by status, and the command says how to get the counts.
    shown = json.loads(ok(env, "stats", "--json"))
    assert shown["outcomes"] is None and shown["users_estimated"] == 17
    assert "registrations init-indexes" in shown["outcomes_unavailable"]
    table = ok(env, "stats")
    assert "users by status: not counted (no index on registration_status" in table
    assert "about 17 users in all (estimated" in table
    assert "users~17 (by status: run registrations init-indexes)" in ok(env, "stats", "--count", "1")

    assert "would create index registration_status_1" in ok(env, "init-indexes", "--dry-run")
    assert [ix["name"] for ix in users.list_indexes()] == ["_id_"]
    out = ok(env, "init-indexes")
    where = f"{env['MONGODB_DATABASE']}.users"
    assert out.startswith(f"created index registration_status_1 {{registration_status: 1}} on {where} in ")
    assert "found index registration_status_1" in ok(env, "init-indexes")  # idempotent
    assert [ix["name"] for ix in users.list_indexes()] == ["_id_", "registration_status_1"]

    shown = json.loads(ok(env, "stats", "--json"))
    assert shown["outcomes"] == {"submitted": 5, "registered": 7, "failed": 2}
    assert "users_estimated" not in shown
    line = ok(env, "stats", "--count", "1")
    assert "submitted=5" in line and "registered=7" in line and "failed=2" in line

    # The count stats runs is served by the index: only the matching documents are examined.
    plans = stats_scale.explain_counts(users)
    assert plans["submitted"] == {"stage": "IXSCAN", "index": "registration_status_1", "keys_examined": 5,
                                  "docs_examined": 5}
    assert plans["failed"]["docs_examined"] == 2

    # An index an operator made another way, led by the field, is used as it is.
    users.drop_index("registration_status_1")
    users.create_index([("registration_status", 1), ("registration_updated_at", -1)], name="by_status_and_time")
    assert "found index by_status_and_time" in ok(env, "init-indexes")
    assert json.loads(ok(env, "stats", "--json"))["outcomes"]["submitted"] == 5


def test_stats_on_many_users_prints_its_figures(env: dict[str, str], users: Any) -> None:
    """Measured, never asserted: STATS_USERS users (50,000 by default; bench/stats.py runs 1,000,000)."""
    n = int(os.environ.get("STATS_USERS", "50000"))
    figures = stats_scale.measure(users, env, n)
    per_status = n // 100
    assert figures["stats_without_index_shows"] == {"outcomes": None, "users_estimated": n}
    assert figures["stats_with_index_outcomes"] == figures["unindexed_counts"]
    assert figures["explain"]["submitted"]["docs_examined"] == per_status  # the index, not a scan


# ---- inspect -----------------------------------------------------------------------------------


class HoldingConsumer:
    """A consumer that takes up to `prefetch` messages and holds them unacknowledged."""

    def __init__(self, url: str, queue: str, prefetch: int) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=prefetch)
        self.held: list[int] = []
        self.channel.basic_consume(queue, lambda _ch, method, _p, _b: self.held.append(method.delivery_tag))

    def take(self, n: int) -> None:
        wait_until(lambda: self.connection.process_data_events(0.1) or len(self.held) >= n, timeout=10,
                   what=f"{n} deliveries")

    def close(self) -> None:
        self.connection.close()  # what it held goes back to the queue


def inspected(env: dict[str, str], **extra: str) -> dict[str, dict[str, Any]]:
    shown = json.loads(ok(env, "inspect", "--json", **extra))
    assert shown["source"] == "management"
    return {q["name"]: q for q in shown["queues"]}


def test_inspect_shows_ready_unacked_consumers_and_rates(env: dict[str, str], broker: Broker,
                                                         amqp_url: str) -> None:
    wait_2s = wait_queue_name(PENDING, 2.0)
    broker.channel.queue_declare(wait_2s, durable=True)  # as the poller would, for POLL_INTERVAL_S=2
    for i in range(5):
        broker.publish(INBOUND, {"n": i})
    for i in range(2):
        broker.publish(FAILED, {"n": i})
    consumer = HoldingConsumer(amqp_url, INBOUND, prefetch=2)
    try:
        consumer.take(2)
        want = {"ready": 3, "unacked": 2, "consumers": 1}
        # The API's counts are statistics, refreshed every 5 s by default.

        def settled() -> dict[str, dict[str, Any]] | None:
            q = inspected(env, POLL_INTERVAL_S="2")
            return q if {k: q[INBOUND][k] for k in want} == want and q[FAILED]["ready"] == 2 else None

        queues = wait_until(settled, timeout=30, what="the management API to show the held deliveries", every=1)
        assert [q["stage"] for q in queues.values()] == ["inbound", "pending", "waiting", "failed"]
        assert queues[wait_2s] == {**queues[wait_2s], "exists": True, "ready": 0, "unacked": 0}
        assert queues[FAILED]["unacked"] == 0 and queues[FAILED]["consumers"] == 0
        for q in queues.values():  # rates may be 0 on a quiet queue; they are always there
            assert set(q["rates"]) == {"publish", "deliver_get", "ack", "redeliver"}
            assert all(isinstance(r, float) and r >= 0 for r in q["rates"].values())

        table = ok(env, "inspect", POLL_INTERVAL_S="2")
        lines = table.splitlines()
        assert lines[0] == f"management API http://127.0.0.1:15672 (vhost {amqp_url.rsplit('/', 1)[1]!r})"
        assert lines[2].split() == ["STAGE", "QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/S", "DELIVER/S", "ACK/S",
                                    "REDELIVER/S"]
        assert lines[3].split()[:5] == ["inbound", INBOUND, "3", "2", "1"]
        assert lines[-1].split()[:5] == ["failed", FAILED, "2", "0", "0"]
        print(table)

        # RABBITMQ_MANAGEMENT_URL as the charts' Secret holds it for KEDA, the vhost in its path.
        vhost = amqp_url.rsplit("/", 1)[1]
        explicit = inspected(env, RABBITMQ_MANAGEMENT_URL=f"http://guest:guest@127.0.0.1:15672/{vhost}")
        assert {k: explicit[INBOUND][k] for k in want} == want

        # Not reachable: one line on stderr, exit 1, and the AMQP depths, labelled; no credentials.
        down = cli(env, "inspect", RABBITMQ_MANAGEMENT_URL=f"http://guest:pw-Xy9@127.0.0.1:{free_port()}/")
        assert down.returncode == 1
        assert down.stderr.count("\n") == 1 and "management API at http://127.0.0.1:" in down.stderr
        assert "not usable" in down.stderr and "AMQP passive-declare depths instead" in down.stderr
        assert "pw-Xy9" not in down.stderr + down.stdout and "guest:guest" not in down.stdout
        assert down.stdout.splitlines()[0].startswith("AMQP passive declare on amqp://***@127.0.0.1:5672/")
        assert "ready and consumers only" in down.stdout.splitlines()[0]
        assert down.stdout.splitlines()[2].split() == ["STAGE", "QUEUE", "READY", "CONSUMERS"]
        assert down.stdout.splitlines()[3].split() == ["inbound", INBOUND, "3", "1"]
        fallback = json.loads(cli(env, "inspect", "--json",
                                  RABBITMQ_MANAGEMENT_URL=f"http://127.0.0.1:{free_port()}").stdout)
        assert fallback["source"] == "amqp" and "not usable" in fallback["problem"]
        assert fallback["queues"][0] == {"stage": "inbound", "name": INBOUND, "exists": True, "ready": 3,
                                         "unacked": None, "consumers": 1, "rates": None}

        refused = cli(env, "inspect", RABBITMQ_MANAGEMENT_URL="http://guest:pw-Xy9@127.0.0.1:15672/")
        assert refused.returncode == 1 and "HTTP 401: it refused the credentials" in refused.stderr
        assert "pw-Xy9" not in refused.stderr + refused.stdout
    finally:
        consumer.close()


def test_inspect_reports_the_rates_of_a_busy_queue(env: dict[str, str], broker: Broker) -> None:
    """Rates are what the management API computed from its samples, which it takes every
    `collect_statistics_interval` (5 s on this broker): the traffic goes on over several intervals,
    and the busy queue's rates in and out must then show, while a quiet queue's stay at 0."""
    began = time.monotonic()
    busy: dict[str, float] = {}
    quiet: dict[str, float] = {}
    moved = 0

    def traffic_shows() -> bool:
        nonlocal busy, quiet, moved
        for i in range(10):  # in, and out by basic.get with an ack each
            broker.publish(INBOUND, {"n": i})
            method, _, _ = broker.channel.basic_get(INBOUND, auto_ack=False)
            assert method is not None and method.delivery_tag is not None
            broker.channel.basic_ack(method.delivery_tag)
            moved += 1
        queues = inspected(env)
        busy, quiet = queues[INBOUND]["rates"], queues[FAILED]["rates"]
        return all(busy[k] > 0 for k in ("publish", "deliver_get", "ack"))

    wait_until(traffic_shows, timeout=60, what=f"publish, deliver and ack rates > 0 on {INBOUND}", every=0.5)
    print(f"\nfigure: inspect showed rates on {INBOUND} after {time.monotonic() - began:.1f} s and {moved} messages "
          f"in and out: {busy}; quiet {FAILED}: {quiet}")
    assert quiet == {"publish": 0.0, "deliver_get": 0.0, "ack": 0.0, "redeliver": 0.0}
