"""A replay slower than the broker's consumer_timeout (issue 13). RabbitMQ closes a channel whose
oldest unacked delivery, a `basic.get`'s too, is older than `consumer_timeout` (30 minutes by
default), and hands back every record the channel held. A replay holds its chosen records
unacked from their take until each is sent at `--rate`, so a slow replay of many records would
be cut off: `--max-hold` keeps every hold under a bound, in passes. On a broker of the tests' own,
with a consumer_timeout of a few seconds (set on that node only)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
from failure_records import FailureRecords
from harness import Broker, wait_until
from outcomes import FAILED, INBOUND
from rabbit_cluster import ctl
from test_replay_resume import Replay, drained, fill

pytestmark = pytest.mark.integration

CONSUMER_TIMEOUT_MS = 4000


@pytest.fixture
def env(amqp_url: str, mongo: harness.Mongo, database: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("POLL_", "LEGACY_SIM_"))},
            "RABBITMQ_URL": amqp_url, "MONGODB_URI": mongo.uri, "MONGODB_DATABASE": database}


def node_of(url: str) -> str:
    return harness.node_args(url)[1]


def limit_every_queue(url: str, limit: int) -> None:
    """A delivery limit on every queue of the test's vhost, on its own node."""
    vhost = url.rsplit("/", 1)[1]
    node = node_of(url)
    ctl(node, "set_policy", "-p", vhost, "limit", ".*", json.dumps({"delivery-limit": limit}),
        "--apply-to", "queues")

    def applied() -> bool:
        rows = [line.split("\t") for line in ctl(node, "list_queues", "-p", vhost, "--no-table-headers", "name",
                                                 "policy").splitlines() if line.strip()]
        return all(len(row) == 2 and row[1] == "limit" for row in rows)

    wait_until(applied, timeout=30, what="the delivery-limit policy on every queue", every=0.2)


@pytest.fixture
def short_consumer_timeout(amqp_url: str) -> Iterator[int]:
    """consumer_timeout of a few seconds on the tests' own node, checked every second (a channel
    looks at its oldest unacked delivery on its tick, once a minute by default); both are read
    when a channel opens. Put back as they were afterwards."""
    node = node_of(amqp_url)
    keys = ("consumer_timeout", "channel_tick_interval")
    before = {k: ctl(node, "eval", f"application:get_env(rabbit, {k}).").strip() for k in keys}
    ctl(node, "eval", f"application:set_env(rabbit, consumer_timeout, {CONSUMER_TIMEOUT_MS}).")
    ctl(node, "eval", "application:set_env(rabbit, channel_tick_interval, 1000).")
    yield CONSUMER_TIMEOUT_MS
    for key, was in before.items():
        if was.startswith("{ok,"):
            ctl(node, "eval", f"application:set_env(rabbit, {key}, {was[4:-1]}).")
        else:
            ctl(node, "eval", f"application:unset_env(rabbit, {key}).")


@pytest.mark.own_broker  # its consumer_timeout is lowered
def test_a_replay_slower_than_the_consumer_timeout_sends_each_record_once_in_passes(
        broker: Broker, env: dict[str, str], amqp_url: str, tmp_path: Path, failure_records: FailureRecords,
        short_consumer_timeout: int) -> None:
    # 24 records at 4 a second: 6 s of sends, held from their take, against a timeout of 4 s. A
    # replay that held them all would lose its channel; its held records would go back to the
    # head, each a return, and under a delivery limit of 0 a return drops the record.
    n, rate, max_hold_s = 24, 4.0, 2.0
    legacy, others = fill(failure_records, n, other_every=6)
    limit_every_queue(amqp_url, 0)
    run = Replay(env, ["--stage", "legacy", "--rate", f"{rate:g}", "--max-hold", f"{max_hold_s:g}", "--yes",
                       "-o", "json"], tmp_path / "replay").wait(timeout=60)
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr
    doc = json.loads(run.stdout)
    inbound, _ = drained(broker, INBOUND)
    assert len(inbound) == n and Counter(inbound).most_common(1)[0][1] == 1, inbound
    assert inbound == legacy  # pass after pass, each a run of the matching records in queue order
    left, counts = drained(broker, FAILED)
    assert left == others and set(counts) == {0}  # none returned, none lost
    assert failure_records.states() == dict.fromkeys(others, "queued")
    assert doc["count"] == n and doc["left"] == len(others) and doc["passes"] > 1
    print(f"\nreplay of {n} records at --rate {rate:g} with --max-hold {max_hold_s:g} s against a "
          f"consumer_timeout of {short_consumer_timeout / 1000:g} s: {doc['passes']} passes, {run.took_s:.1f} s, "
          f"each record on {INBOUND} once, in order, none returned")
