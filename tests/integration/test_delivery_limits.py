"""Delivery limits: RabbitMQ 4.0-4.2 give every quorum queue a limit of 20 and count every return
against it. Modelled here by a policy on every queue of the test's vhost; the browse of the
failure queue must never count against it, and the pipeline must keep working under it."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pika.exceptions
import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import BIN, Broker, cli_env, cli_ok, rabbitmqctl, wait_until
from outcomes import FAILED, Outcomes, check_exact, mixed_load
from pika.adapters.blocking_connection import BlockingChannel
from registrations_cli import broker as cli_broker
from registrations_cli.cycle import Cycle
from registrations_cli.settings import from_env

from regbridge.messages import FailureError, FailureRecord

pytestmark = pytest.mark.integration

LIMIT = 20  # RabbitMQ 4.x's default


def vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def limit_every_queue(url: str, limit: int = LIMIT) -> None:
    """What RabbitMQ 4.0-4.2 do by default, as a policy: the queues that exist now get it at once."""
    vhost = vhost_of(url)
    rabbitmqctl("set_policy", "-p", vhost, "limit", ".*", json.dumps({"delivery-limit": limit}), "--apply-to",
                "queues")

    def applied() -> bool:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name",
                              "policy"], check=True, capture_output=True, text=True, timeout=60).stdout
        rows = [line.split("\t") for line in out.splitlines() if line.strip()]
        return all(len(row) == 2 and row[1] == "limit" for row in rows)

    wait_until(applied, timeout=30, what="the delivery-limit policy on every queue", every=0.2)


def cli(env: dict[str, str], *args: str) -> str:
    return cli_ok(env, *args, timeout=120)

def record(user_id: str | None, stage: str, i: int) -> bytes:
    return FailureRecord(
        original={"user_id": user_id, "name": f"FAIL {i}"} if user_id else f"not json {i}", user_id=user_id,
        legacy_request_id=None, error=FailureError(stage, f"reason {i}"), attempts=1,
        failed_at=datetime.now(UTC) - timedelta(minutes=60 - i),
    ).encode()


def properties(i: int) -> pika.BasicProperties:
    """Every kind of property and header a record might carry, to show a copy keeps them all."""
    return pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=2, priority=i % 3,
        correlation_id=f"corr-{i}", reply_to="nobody", message_id=f"m-{i}", timestamp=1_800_000_000 + i,
        type="failure", app_id="poller",
        headers={"x-regbridge-seq": i, "big": 2**40 + i, "text": f"ação {i}", "flag": i % 2 == 0,
                 "raw": b"\x00\xff", "nested": {"list": [i, "x", {"deep": None}]},
                 "when": datetime(2026, 11, 27, 12, 0, i % 60, tzinfo=UTC)},
    )


def publish_records(broker: Broker, n: int, *, users: int = 5, records: FailureRecords | None = None) -> list[str]:
    """`n` records; with `records`, each with its index entry, as the services write them."""
    for i in range(n):
        stage = ("legacy", "submit", "validation")[i % 3]
        user = f"u-{i % users}" if stage != "validation" else None
        if records is not None:
            records.publish(record(user, stage, i), message_id=None, properties=properties(i))
        else:
            broker.channel.basic_publish("", FAILED, record(user, stage, i), properties(i), mandatory=True)
    return [f"m-{i}" for i in range(n)]


def drain(broker: Broker) -> list[tuple[pika.BasicProperties, bytes]]:
    taken: list[tuple[pika.BasicProperties, bytes]] = broker.drain(FAILED)
    return taken


def same_properties(got: pika.BasicProperties, want: pika.BasicProperties) -> None:
    names = ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
             "expiration", "message_id", "timestamp", "type", "user_id", "app_id")
    assert {n: getattr(got, n) for n in names} == {n: getattr(want, n) for n in names}
    headers = {k: v for k, v in (got.headers or {}).items() if k != "x-delivery-count"}
    assert headers == want.headers


def delivery_counts(taken: list[tuple[pika.BasicProperties, bytes]]) -> list[int]:
    """How often the broker says each message was returned, in queue order."""
    return [int((p.headers or {}).get("x-delivery-count", 0)) for p, _ in taken]


def returned(taken: list[tuple[pika.BasicProperties, bytes]]) -> list[str]:
    return [p.message_id for (p, _), n in zip(taken, delivery_counts(taken), strict=True) if n]


def browsing(client: Broker) -> bool:
    """Whether a browse of the failure queue holds its lock (on another connection)."""
    try:
        client.connection.channel().queue_declare(f"{FAILED}.browse-lock", passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return bool(exc.reply_code == 405)  # RESOURCE_LOCKED: another connection's exclusive queue
    return False


# ---- what the broker does ---------------------------------------------------------------------


def test_what_the_broker_does_with_a_returned_message(broker: Broker, amqp_url: str) -> None:
    """The facts the browse and the queue arguments rest on, on this broker: every return counts
    and a message returned past the limit is gone; a queue argument and a policy combine, the
    lower limit applying; on a queue with a limit a closed channel's messages go back to the
    head (which is where a browse killed midway leaves the record in its hand)."""
    channel = broker.channel
    for name, args in (("arg-high", {"x-delivery-limit": 100}), ("arg-low", {"x-delivery-limit": 2})):
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum", **args})
        channel.basic_publish("", name, b"x", pika.BasicProperties(delivery_mode=2))
    for i in range(15):
        broker.publish(FAILED, {"i": i}, message_id=f"m-{i}")
    limit_every_queue(amqp_url, 3)

    def returns_survived(queue: str) -> int:
        for n in range(10):
            method, _, _ = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return n - 1  # the last return dropped it
            channel.basic_nack(method.delivery_tag, requeue=True)
        raise AssertionError(f"{queue}: still there after 10 returns")

    assert returns_survived("arg-high") == 3  # the policy's 3, lower than the argument's 100
    assert returns_survived("arg-low") == 2  # the argument's 2, lower than the policy's 3

    held = broker.connection.channel()
    for _ in range(12):
        held.basic_get(FAILED, auto_ack=False)
    held.close()  # hands the twelve back
    after = drain(broker)
    ids = [p.message_id for p, _ in after]
    assert sorted(ids[:12]) == sorted(f"m-{i}" for i in range(12))  # ahead of the rest (in an order of
    assert ids[12:] == ["m-12", "m-13", "m-14"]  # the broker's own, from ten messages on)
    assert delivery_counts(after) == [1] * 12 + [0] * 3  # and each return counted


# ---- browsing never counts --------------------------------------------------------------------


@pytest.mark.long
def test_fifty_browses_under_a_delivery_limit_lose_nothing_and_reorder_nothing(
        stack: Stack, broker: Broker, users: Any, amqp_url: str, failure_records: FailureRecords) -> None:
    limit_every_queue(amqp_url)
    published = publish_records(broker, 25, records=failure_records)
    env = stack.env
    began = time.monotonic()
    for i in range(50):
        path = i % 5
        if path in (0, 1):
            listed = json.loads(cli(env, "failed", "list", "--from-queue", "--json"))
            assert [r["message_id"] for r in listed] == published
        elif path == 2:
            mine = json.loads(cli(env, "status", "u-1", "--json"))["failures"]
            assert [r["id"] for r in mine] == [f"m-{i}" for i in (1, 6, 16, 21)]
        elif path == 3:
            shown = json.loads(cli(env, "failed", "show", "m-7", "--from-queue"))
            assert shown["properties"]["message_id"] == "m-7"
            assert shown["properties"]["headers"]["x-delivery-count"] == 0  # never returned
        else:
            assert "would replay 9 failure records" in cli(env, "failed", "replay", "--stage", "legacy", "--dry-run")
    took = time.monotonic() - began

    after = drain(broker)
    counts = delivery_counts(after)
    print(f"\nfigure: 50 browses of {len(published)} records under delivery-limit {LIMIT}: {len(after)} records "
          f"after, returns counted (max x-delivery-count) {max(counts, default=0)}, {took:.1f} s")
    assert [p.message_id for p, _ in after] == published
    assert set(counts) == {0}
    for i, (props, body) in enumerate(after):
        same_properties(props, properties(i))
        assert FailureRecord.decode(body).error.reason == f"reason {i}"


def test_a_replay_under_a_delivery_limit_keeps_the_rest_in_order(stack: Stack, broker: Broker,
                                                                 amqp_url: str) -> None:
    limit_every_queue(amqp_url)
    published = publish_records(broker, 30)
    out = cli(stack.env, "failed", "replay", "--stage", "submit", "--limit", "4", "--yes")
    assert "replayed 4 failure records to registrations; 26 left on" in out
    replayed = [f"m-{i}" for i in (1, 4, 7, 10)]
    assert [p.message_id for p, _ in broker.drain("registrations")] == replayed
    for _ in range(25):
        cli(stack.env, "failed", "list", "--from-queue", "--json")
    after = drain(broker)
    assert [p.message_id for p, _ in after] == [m for m in published if m not in replayed]
    assert set(delivery_counts(after)) == {0}


# ---- a browse that dies midway ----------------------------------------------------------------


class Killed(Exception):
    """Stands for the command dying: nothing after it runs but the socket closing."""


def cycle_until_killed(url: str, *, method: str, call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One cycle of the failure queue, in this process, that dies on the `call`-th call of the
    channel's `method`, before that call does anything."""
    calls = [0]
    original = getattr(BlockingChannel, method)

    def dying(self: BlockingChannel, *args: Any, **kwargs: Any) -> Any:
        if method != "basic_publish" or args[1] == FAILED:
            calls[0] += 1
            if calls[0] == call:
                raise Killed
        return original(self, *args, **kwargs)

    settings = from_env({"RABBITMQ_URL": url})
    with monkeypatch.context() as patch:
        patch.setattr(BlockingChannel, method, dying)
        with pytest.raises(Killed), cli_broker.connect(settings) as connection:
            Cycle(connection, FAILED).run()


@pytest.mark.parametrize(("method", "kill", "expected"), [
    # between two records: 12 put back, the rest not reached
    ("basic_get", "before the 13th get", lambda p: p[12:] + p[:12]),
    # the 12th in hand, no copy yet: the broker returns it to the head
    ("basic_publish", "before the 12th copy", lambda p: p[11:] + p[:11]),
    # the 12th copied and confirmed, its original not acked: there twice
    ("basic_ack", "before the 12th ack", lambda p: p[11:] + p[:11] + [p[11]]),
])
def test_a_browse_killed_midway_loses_nothing(broker: Broker, amqp_url: str, monkeypatch: pytest.MonkeyPatch,
                                              method: str, kill: str, expected: Any) -> None:
    limit_every_queue(amqp_url)
    published = publish_records(broker, 30)
    cycle_until_killed(amqp_url, method=method, call=13 if method == "basic_get" else 12, monkeypatch=monkeypatch)
    after = drain(broker)
    assert [p.message_id for p, _ in after] == expected(published), kill
    assert returned(after) == ([] if method == "basic_get" else ["m-11"])  # only the record in hand
    assert max(delivery_counts(after)) <= 1


def rotation_of(published: list[str], after: list[str]) -> int:
    """Where `after` starts in `published`, if it is `published` rotated, allowing what a death
    mid-cycle returns to the head: the record in hand, and the one before it when the queue had
    not yet applied that one's ack (a quorum queue settles through its log, so a get can be
    served before an earlier ack is). Those come back in either order, and one whose copy was
    already confirmed is also at the back. Fails otherwise."""
    assert set(after) == set(published), f"lost: {set(published) - set(after)}"
    assert len(after) - len(published) <= 2, f"{len(after) - len(published)} duplicates"
    for returned in (0, 1, 2):
        head, rest = after[:returned], after[returned:]
        positions = sorted(published.index(m) for m in head)
        if head and positions != list(range(positions[0], positions[0] + returned)):
            continue  # what comes back is the record in hand and the one just before it
        if head and rest and published.index(rest[0]) != (positions[-1] + 1) % len(published):
            continue  # the rest starts with the record after the one in hand
        only_at_head = [m for m in head if m not in rest]
        ring = [m for m in published if m not in only_at_head]
        if len(rest) != len(ring) or not rest:
            continue
        start = ring.index(rest[0])
        if rest == ring[start:] + ring[:start]:
            return published.index(rest[0])
    raise AssertionError("not a rotation of the queue")


def test_a_browse_killed_with_sigkill_loses_nothing(stack: Stack, broker: Broker, amqp_url: str) -> None:
    limit_every_queue(amqp_url)
    n = 1000
    for i in range(n):
        broker.publish(FAILED, record(f"u-{i}", "legacy", i), message_id=f"m-{i}")
    published = [f"m-{i}" for i in range(n)]
    browse = subprocess.Popen([str(BIN / "registrations"), "failed", "list", "--from-queue"],
                              env=cli_env(stack.env),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    wait_until(lambda: browsing(broker), timeout=30, what="the browse to start", every=0.01)
    time.sleep(0.3)
    browse.kill()
    browse.wait()
    after = [p.message_id for p, _ in drain(broker)]
    start = rotation_of(published, after)
    assert 0 < start < n, f"the kill did not land mid-cycle (rotated by {start})"


def test_ctrl_c_lets_the_browse_finish_first(stack: Stack, broker: Broker, amqp_url: str) -> None:
    n = 600
    for i in range(n):
        broker.publish(FAILED, record(f"u-{i}", "legacy", i), message_id=f"m-{i}")
    browse = subprocess.Popen([str(BIN / "registrations"), "failed", "list", "--from-queue", "--json"],
                              env=cli_env(stack.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: browsing(broker), timeout=30, what="the browse to start", every=0.01)
    time.sleep(0.2)
    browse.send_signal(signal.SIGINT)
    out, err = browse.communicate(timeout=60)
    assert browse.returncode == 130 and "finishing the browse first" in err and out == ""
    assert [p.message_id for p, _ in drain(broker)] == [f"m-{i}" for i in range(n)]


# ---- other clients at the same time -----------------------------------------------------------


def test_two_browses_at_once_each_see_every_record_in_order(stack: Stack, broker: Broker) -> None:
    published = publish_records(broker, 200)
    browses = [subprocess.Popen([str(BIN / "registrations"), "failed", "list", "--from-queue", "--json"],
                                env=cli_env(stack.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    for browse in browses:
        out, err = browse.communicate(timeout=120)
        assert browse.returncode == 0, err
        assert [r["message_id"] for r in json.loads(out)] == published
    assert [p.message_id for p, _ in drain(broker)] == published


@pytest.fixture
def publisher(amqp_url: str) -> Iterator[Broker]:
    """A second client, as a service publishing failures while the browse runs."""
    client = Broker(amqp_url)
    yield client
    client.close()


def test_records_published_during_a_browse_are_kept_and_the_others_keep_their_order(
        stack: Stack, broker: Broker, publisher: Broker, amqp_url: str) -> None:
    limit_every_queue(amqp_url)
    published = publish_records(broker, 400)
    arrivals = [f"new-{i}" for i in range(40)]

    def publish_meanwhile() -> None:
        wait_until(lambda: browsing(publisher), timeout=30, what="the browse to start", every=0.005)
        time.sleep(0.1)  # past the browse's first get, which counts what it will take
        for mid in arrivals:
            publisher.publish(FAILED, record(mid, "legacy", 0), message_id=mid)
            time.sleep(0.01)

    thread = threading.Thread(target=publish_meanwhile)
    thread.start()
    try:
        listed = [r["message_id"] for r in json.loads(cli(stack.env, "failed", "list", "--from-queue", "--json"))]
    finally:
        thread.join()
    assert listed == published  # the records there when the browse started, in their order
    after = [p.message_id for p, _ in drain(broker)]
    assert sorted(after) == sorted(published + arrivals)  # nothing lost, nothing twice
    assert [m for m in after if m in set(published)] == published
    assert [m for m in after if m.startswith("new-")] == arrivals
    # The new ones landed among the copies, behind those put back before they came.
    assert after[0] == published[0]


# ---- the pipeline under the limit -------------------------------------------------------------


def test_the_pipeline_under_a_delivery_limit_with_browses_running(stack: Stack, broker: Broker, users: Any,
                                                                  amqp_url: str) -> None:
    """50 registrations, a mix of outcomes, through both services on queues limited to 20
    deliveries, while the operator's command browses the failure queue again and again as the
    failure records arrive: each message gets its exact outcome, with no extra copy."""
    limit_every_queue(amqp_url)
    stack.start("submitter")
    stack.start("poller")
    stop = threading.Event()
    browses: list[str] = []
    errors: list[BaseException] = []

    def with_the_command() -> None:
        while not stop.is_set():
            cli(stack.env, "failed", "list", "--from-queue", "--json")
            status = subprocess.run([str(BIN / "registrations"), "status", "load-3", "--json"], env=cli_env(stack.env),
                                    capture_output=True, text=True, timeout=120)
            assert status.returncode in (0, 1) and "Traceback" not in status.stderr, status.stderr
            browses.extend(["list", "status"])

    def in_process() -> None:
        settings = from_env({"RABBITMQ_URL": amqp_url})
        with cli_broker.connect(settings) as connection:
            while not stop.is_set():
                Cycle(connection, FAILED).run()
                browses.append("cycle")
                time.sleep(0.02)

    def recording(target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)
        return run

    threads = [threading.Thread(target=recording(t)) for t in (with_the_command, in_process)]
    for thread in threads:
        thread.start()
    try:
        expected = mixed_load(broker, 50, seed=10)
        want_failed = sum(1 for v in expected.values() if v != "registered")
        outcomes = Outcomes(broker, users)
        wait_until(lambda: broker.depth(FAILED) >= want_failed and len(outcomes.registered()) == 50 - want_failed,
                   timeout=120, what="every outcome", every=0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert browses.count("list") >= 1 and browses.count("cycle") >= 10, browses
    assert check_exact(outcomes, expected) == 0
