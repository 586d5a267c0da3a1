"""The failure index as the operator's command uses it, on the real broker and the Mongo-wire
server: list, show and status read it and leave the queue alone; reconcile brings it in line
with the queue; replay and discard keep it in line; and a list of 100,000 records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import harness
import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import BIN, Broker, cli_env
from harness import cli_ok as ok
from harness import run_cli as cli
from outcomes import FAILED, INBOUND, good
from pika.adapters.blocking_connection import BlockingChannel
from pymongo import MongoClient, monitoring
from registrations_cli import main as cli_main
from registrations_cli import mongo as cli_mongo
from registrations_cli.index import FailureIndex, entry_of

from regbridge import failure_index
from regbridge.failure_index import QUEUED
from regbridge.messages import FailureError, FailureRecord

pytestmark = pytest.mark.integration


def record(user_id: str, stage: str = "legacy", *, age_s: float = 60, reason: str = "it went wrong") -> bytes:
    return FailureRecord(original=good(user_id), user_id=user_id, legacy_request_id=None,
                         error=FailureError(stage, reason), attempts=1,
                         failed_at=datetime.now(UTC) - timedelta(seconds=age_s)).encode()


def ids(env: dict[str, str], *args: str) -> list[str]:
    return [r["id"] for r in json.loads(ok(env, "failed", "list", "-o", "json", *args))]


def delivery_counts(broker: Broker) -> list[int]:
    return [int((p.headers or {}).get("x-delivery-count", 0)) for p, _ in broker.drain(FAILED)]


# ---- reads ----------------------------------------------------------------------------------------


def test_list_show_and_status_read_the_index_and_never_touch_the_queue(
        stack: Stack, broker: Broker, users: Any, failure_records: FailureRecords) -> None:
    env = stack.env
    for i in range(6):
        failure_records.publish(record(f"u-{i % 2}", ("legacy", "submit")[i % 2]), message_id=f"m-{i}")
    # A browse of the queue holds this lock; while the test holds it, a command that cycled the
    # queue would wait for it, and none of these does.
    lock = broker.connection.channel()
    lock.queue_declare(f"{FAILED}.browse-lock", exclusive=True)
    began = time.monotonic()
    listed = cli(env, "failed", "list")
    assert listed.returncode == 0 and listed.stderr == ""  # the index and the queue agree: no warning
    assert listed.stdout.splitlines()[-1] == f"6 failure records on {FAILED}"
    assert ids(env, "--stage", "submit") == ["m-1", "m-3", "m-5"]
    assert ids(env, "--user-id", "u-0", "--limit", "2") == ["m-0", "m-2"]
    assert ids(env, "--id", "m-4", "--id", "m-2") == ["m-2", "m-4"]
    assert ids(env, "--reason", "went") == [f"m-{i}" for i in range(6)]
    assert ids(env, "--since", "10m") == [f"m-{i}" for i in range(6)] and ids(env, "--older-than", "10m") == []
    shown = json.loads(ok(env, "failed", "show", "m-3"))
    assert (shown["id"], shown["state"], shown["record"]["user_id"]) == ("m-3", "queued", "u-1")
    status = json.loads(ok(env, "status", "u-1", "--json"))
    assert [f["id"] for f in status["failures"]] == ["m-1", "m-3", "m-5"]
    assert time.monotonic() - began < 30
    lock.close()

    # Records the index does not know of: the list says so, once, with both numbers.
    failure_records.publish(record("u-9"), message_id="m-unindexed", indexed=False)
    failure_records.publish(record("u-9"), message_id="m-unindexed-2", indexed=False)
    warned = cli(env, "failed", "list")
    print(f"\nlist with 2 records unindexed: stderr {warned.stderr.strip()!r}")
    assert warned.returncode == 0 and warned.stderr.count("\n") == 1
    assert "holds 6 entries" in warned.stderr and f"{FAILED} holds 8 records" in warned.stderr
    assert "registrations failed reconcile" in warned.stderr
    assert warned.stdout.splitlines()[-1] == f"6 failure records in the index, 8 on {FAILED}"

    # Nothing was taken off the queue, or returned to it.
    assert delivery_counts(broker) == [0] * 8


def test_the_list_marks_entries_that_are_not_queued(stack: Stack, broker: Broker,
                                                    failure_records: FailureRecords) -> None:
    for i in range(3):
        failure_records.publish(record(f"u-{i}"), message_id=f"m-{i}")
    entry = entry_of("m-3", record("u-3"), fallback_time=datetime.now(UTC))
    failure_records.write(entry, failure_index.PUBLISHING)  # a service is publishing it right now
    table = ok(stack.env, "failed", "list").splitlines()
    assert table[0].split() == ["ID", "STATE", "STAGE", "USER_ID", "AGE", "REASON"]
    assert [line.split()[:2] for line in table[1:5]] == [["m-0", "queued"], ["m-1", "queued"], ["m-2", "queued"],
                                                         ["m-3", "publishing"]]
    assert [r["state"] for r in json.loads(ok(stack.env, "failed", "list", "--json"))] == \
        ["queued"] * 3 + ["publishing"]


def test_a_list_moves_the_starting_point_up_past_windows_that_emptied(
        stack: Stack, broker: Broker, failure_records: FailureRecords) -> None:
    """Seqs 0 to 24,999 were used and their entries deleted (records replayed long ago): a list
    reads the empty windows once, then starts from the lowest seq in use, though never within
    LOW_MARGIN of the newest (an entry may be on its way there)."""
    newest = 30_000
    failure_records.counters.update_one({"_id": failure_index.COUNTER_ID}, {"$set": {"next": newest}}, upsert=True)
    now = datetime.now(UTC)
    for seq in (25_000, 25_001, 29_999):
        entry = entry_of(f"m-{seq}", record(f"u-{seq}"), fallback_time=now)
        failure_records.entries.update_one({"_id": entry.record_id}, failure_index.entry_update(
            entry, QUEUED, seq=seq, now=now, token="t"), upsert=True)
    assert ids(stack.env, "--stage", "legacy") == ["m-25000", "m-25001", "m-29999"]
    assert failure_records.counters.find_one({"_id": failure_index.COUNTER_ID}).get("low") is None  # filtered
    assert ids(stack.env) == ["m-25000", "m-25001", "m-29999"]
    low = failure_records.counters.find_one({"_id": failure_index.COUNTER_ID})["low"]
    assert low == failure_index.safe_low(25_000, newest) == newest - failure_index.LOW_MARGIN
    assert ids(stack.env, "--limit", "1") == ["m-25000"]


# ---- reconcile ------------------------------------------------------------------------------------


def test_reconcile_brings_the_index_in_line_with_the_queue(stack: Stack, broker: Broker,
                                                           failure_records: FailureRecords) -> None:
    env = stack.env
    long_ago = datetime.now(UTC) - 2 * failure_index.RECONCILE_GRACE
    failure_records.publish(record("u-0"), message_id="m-kept")
    failure_records.publish(record("u-1"), message_id="m-new", indexed=False)  # on the queue, no entry
    copied = record("u-2")
    failure_records.publish(copied, message_id="m-copied", indexed=False)
    failure_records.publish(copied, message_id="m-copied", indexed=False)  # a second copy, byte for byte
    failure_records.publish(b"not a failure record", message_id="m-junk", indexed=False)
    failure_records.publish(record("u-3"), message_id="m-publishing", indexed=False)
    failure_records.write(entry_of("m-publishing", record("u-3"), fallback_time=long_ago), failure_index.PUBLISHING)
    # Entries without a record: one written long ago (its record was taken by someone), one just
    # now (its record may be on its way).
    failure_records.write(entry_of("m-gone", record("u-4"), fallback_time=long_ago), QUEUED, now=long_ago)
    failure_records.write(entry_of("m-coming", record("u-5"), fallback_time=long_ago), QUEUED)

    before = failure_records.states()
    dry = json.loads(ok(env, "failed", "reconcile", "--dry-run", "-o", "json"))
    assert (dry["added"], dry["confirmed"], dry["deleted"]) == \
        (["m-new", "m-copied", "m-junk"], ["m-publishing"], ["m-gone"])
    assert failure_records.states() == before  # a dry run writes nothing

    out = ok(env, "failed", "reconcile")
    print(f"\nreconcile: {out.strip()!r}")
    assert out.splitlines()[:5] == ["added m-new", "added m-copied", "added m-junk", "confirmed m-publishing",
                                    "deleted m-gone"]
    assert out.splitlines()[-1] == (f"6 records on {FAILED}, 5 ids (1 id with several copies): added 3, "
                                    f"confirmed 1, deleted 1 in {users_db(failure_records)}.users.failures")
    assert failure_records.states() == {"m-kept": "queued", "m-new": "queued", "m-copied": "queued",
                                        "m-junk": "queued", "m-publishing": "queued", "m-coming": "queued"}
    junk = failure_records.entry("m-junk")
    assert junk is not None and junk["stage"] == "?" and "malformed" in junk["reason"]
    # New entries come after the others, in queue order.
    assert ids(env) == ["m-kept", "m-publishing", "m-coming", "m-new", "m-copied", "m-junk"]
    assert ids(env, "--from-queue") == ["m-kept", "m-new", "m-copied", "m-junk", "m-publishing"]

    again = json.loads(ok(env, "failed", "reconcile", "-o", "json"))
    assert (again["added"], again["confirmed"], again["deleted"], again["copies"]) == ([], [], [], {"m-copied": 2})
    assert delivery_counts(broker) == [0] * 6


def users_db(records: FailureRecords) -> str:
    return str(records.entries.database.name)


# ---- replay and discard keep the index in line --------------------------------------------------


def test_replay_and_discard_remove_exactly_the_entries_of_the_records_that_left(
        stack: Stack, broker: Broker, failure_records: FailureRecords, tmp_path: Any) -> None:
    env = stack.env  # no service runs: replayed messages stay on the inbound queue
    for i in range(6):
        failure_records.publish(record(f"u-{i}", ("legacy", "submit", "timeout")[i % 3]), message_id=f"m-{i}")
    # What a replay or a discard sees of the rest of the queue is reconciled too.
    failure_records.publish(record("u-9", "submit"), message_id="m-unindexed", indexed=False)
    long_ago = datetime.now(UTC) - 2 * failure_index.RECONCILE_GRACE
    failure_records.write(entry_of("m-gone", record("u-8"), fallback_time=long_ago), QUEUED, now=long_ago)

    before = {k: failure_records.entry(k) for k in failure_records.states()}
    assert "would replay 2" in ok(env, "failed", "replay", "--stage", "legacy", "--dry-run")
    assert {k: failure_records.entry(k) for k in failure_records.states()} == before  # nothing written

    assert "replayed 2 failure records" in ok(env, "failed", "replay", "--stage", "legacy", "--yes")
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-0", "m-3"]
    assert set(failure_records.states()) == {"m-1", "m-2", "m-4", "m-5", "m-unindexed"}
    assert set(failure_records.states().values()) == {"queued"}

    export = tmp_path / "discarded.jsonl"
    assert "discarded 2 failure records" in ok(env, "failed", "discard", "--stage", "timeout", "--export",
                                               str(export), "--yes")
    assert set(failure_records.states()) == {"m-1", "m-4", "m-unindexed"}
    assert ids(env) == ids(env, "--from-queue") == ["m-1", "m-4", "m-unindexed"]
    listed = cli(env, "failed", "list")
    assert listed.stderr == "" and listed.stdout.splitlines()[-1] == f"3 failure records on {FAILED}"


def test_an_entry_a_service_rewrote_during_the_replay_survives(
        stack: Stack, broker: Broker, failure_records: FailureRecords, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        failure_records.publish(record(f"u-{i}"), message_id=f"m-{i}")
    marked = FailureIndex.mark_leaving

    def and_a_service_writes(self: FailureIndex, record_ids: Any, now: datetime | None = None) -> str:
        token = marked(self, record_ids, now)
        # The replayed registration of m-1 failed again at once: a service wrote its new
        # record's entry (same id, a token of its own) before the replay's cleanup.
        failure_records.write(entry_of("m-1", record("u-1", reason="failed again"), fallback_time=datetime.now(UTC)),
                              failure_index.PUBLISHING)
        return token

    monkeypatch.setattr(FailureIndex, "mark_leaving", and_a_service_writes)
    for name, value in stack.env.items():
        if name.startswith(("RABBITMQ_", "MONGODB_")):
            monkeypatch.setenv(name, value)
    assert cli_main.main(["failed", "replay", "--yes", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 3
    assert failure_records.states() == {"m-1": "publishing"}
    survivor = failure_records.entry("m-1")
    assert survivor is not None and survivor["reason"] == "failed again"


def test_replay_and_discard_refuse_without_mongodb(stack: Stack, broker: Broker,
                                                   failure_records: FailureRecords, tmp_path: Any) -> None:
    failure_records.publish(record("u-0"), message_id="m-0")
    env = {**stack.env, "MONGODB_URI": "mongodb://127.0.0.1:1/"}
    for args in (["failed", "replay", "--yes"],
                 ["failed", "discard", "--export", str(tmp_path / "x.jsonl"), "--yes"]):
        result = cli(env, *args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot reach MongoDB" in result.stderr
    assert broker.depth(INBOUND) == 0 and failure_records.states() == {"m-0": "queued"}
    assert delivery_counts(broker) == [0]


# ---- the figure: a list of 100,000 records -----------------------------------------------------

N = 100_000
BATCH = 2_000
STAGES = ("submit", "legacy", "timeout", "validation")


# Runs the command and reports its own wall time and peak memory. The command is not started
# from the test's process: a child's peak RSS counts what it had between fork and exec, which for
# a child of pytest holding 100,000 records is pytest's memory, not the command's.
_MEASURE = """
import resource, subprocess, sys, time
began = time.monotonic()
code = subprocess.run(sys.argv[1:]).returncode
took = time.monotonic() - began
print(f"measured {code} {took:.3f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
"""


def timed(env: dict[str, str], *args: str) -> tuple[str, float, int]:
    """stdout, wall time in s, and peak RSS in MB of one run of the command."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(BIN / "registrations"), *args], env=cli_env(env),
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    measured = result.stderr.strip().splitlines()[-1].split()
    assert measured[:2] == ["measured", "0"], result.stderr
    return result.stdout, float(measured[2]), int(measured[3]) // 1024


@pytest.fixture
def own_mongo() -> Iterator[harness.Mongo]:
    """A Mongo-wire server of the test's own: 100,000 inserts would keep the shared one busy for
    the tests that run beside this one."""
    server = harness.start_secantus()
    yield server
    server.stop()
    shutil.rmtree(server.storage, ignore_errors=True)


class Commands(monitoring.CommandListener):
    """Counts the commands a MongoClient sends, and the documents its cursors return."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.documents = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.sent[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        cursor = event.reply.get("cursor") or {}
        self.documents += len(cursor.get("firstBatch") or cursor.get("nextBatch") or [])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def counted_list(env: dict[str, str], broker: Broker, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[str], Commands, Counter[str]]:
    """`failed list ARGS -o json` in this process: the ids it lists, what it asked MongoDB, and
    which AMQP reads of a queue's messages it made (basic.get, basic.consume). The browse lock is
    held meanwhile by another connection, so that a cycle of the queue could not even start."""
    commands = Commands()
    amqp: Counter[str] = Counter()

    def client(*a: Any, **k: Any) -> MongoClient[dict[str, Any]]:
        return MongoClient(*a, event_listeners=[commands], **k)

    def counting(method: str) -> Any:
        original = getattr(BlockingChannel, method)

        def call(self: BlockingChannel, *a: Any, **k: Any) -> Any:
            amqp[method] += 1
            return original(self, *a, **k)
        return call

    lock = broker.connection.channel()
    lock.queue_declare(f"{FAILED}.browse-lock", exclusive=True)
    with monkeypatch.context() as patch:
        for name, value in env.items():
            if name.startswith(("RABBITMQ_", "MONGODB_")):
                patch.setenv(name, value)
        patch.setattr(cli_mongo, "MongoClient", client)
        for method in ("basic_get", "basic_consume"):
            patch.setattr(BlockingChannel, method, counting(method))
        capsys.readouterr()
        code = cli_main.main(["failed", "list", *args, "-o", "json"])
        out, err = capsys.readouterr()
    lock.close()
    assert code == 0, err
    return [r["id"] for r in json.loads(out)], commands, amqp


@pytest.mark.long
def test_list_of_100000_records(stack: Stack, broker: Broker, own_mongo: harness.Mongo,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(own_mongo.uri, tz_aware=True)
    failure_records = FailureRecords(broker, client["figure"])
    now = datetime.now(UTC)
    began = time.monotonic()
    # Every thousandth record is u-000777's; the last five are the only `poll` ones.
    records = [FailureRecord(original=good(f"u-{i % 997:06d}"), user_id=f"u-{i % 997:06d}" if i % 1000 else "u-777",
                             legacy_request_id=None,
                             error=FailureError("poll" if i >= N - 5 else STAGES[i % 4], "it went wrong"), attempts=1,
                             failed_at=now - timedelta(seconds=N - i)) for i in range(N)]
    bodies = [r.encode() for r in records]
    broker.publish_in_order(FAILED, [(f"r-{i:06d}", body) for i, body in enumerate(bodies)], timeout=120)
    written = now
    for start in range(0, N, BATCH):
        failure_records.entries.insert_many([
            {"_id": f"r-{i:06d}", "state": QUEUED, "stage": r.error.stage, "reason": r.error.reason,
             "user_id": r.user_id, "legacy_request_id": None, "failed_at": r.failed_at,
             "body": bodies[i].decode(), "written_at": written, "token": "bulk", "seq": i}
            for i, r in enumerate(records[start:start + BATCH], start=start)], ordered=False)
    failure_records.counters.update_one({"_id": failure_index.COUNTER_ID}, {"$set": {"next": N}}, upsert=True)
    setup_s = time.monotonic() - began

    client.close()
    env = {**stack.env, "MONGODB_URI": own_mongo.uri, "MONGODB_DATABASE": "figure"}
    figures = []

    def run(label: str, *args: str) -> str:
        out, took, rss = timed(env, *args)
        figures.append(f"{label}: {took:.2f} s, max RSS {rss} MB")
        return out

    listed = run("failed list --limit 20", "failed", "list", "--limit", "20", "-o", "json")
    assert [r["id"] for r in json.loads(listed)] == [f"r-{i:06d}" for i in range(20)]
    table = run("failed list --limit 20 (table)", "failed", "list", "--limit", "20")
    assert table.splitlines()[-1] == f"20 shown; more match (--limit); 100000 failure records on {FAILED}"
    legacy = run("--stage legacy", "failed", "list", "--limit", "20", "--stage", "legacy", "-o", "json")
    assert [r["id"] for r in json.loads(legacy)] == [f"r-{i:06d}" for i in range(1, 80, 4)]
    poll = run("--stage poll (5 at the end: every window read)", "failed", "list", "--limit", "20", "--stage",
               "poll", "-o", "json")
    assert [r["id"] for r in json.loads(poll)] == [f"r-{i:06d}" for i in range(N - 5, N)]
    user = run("--user-id u-777", "failed", "list", "--limit", "20", "--user-id", "u-777", "-o", "json")
    assert [r["id"] for r in json.loads(user)] == [f"r-{i:06d}" for i in range(0, 20_000, 1000)]
    shown = run("failed show", "failed", "show", "r-099999")
    assert json.loads(shown)["record"]["error"]["stage"] == "poll"

    # What the time cannot show on a fast machine: a list of 20 reads the counter and one window of
    # the index (the bound leaves room for the 20 bodies read apart), and not the queue.
    broker.reconnect()  # its connection sat idle through the setup, past the broker's heartbeat timeout
    depth_before = broker.depth(FAILED)
    listed_ids, commands, amqp = counted_list(env, broker, monkeypatch, capsys, "--limit", "20")
    assert listed_ids == [f"r-{i:06d}" for i in range(20)]
    reads = commands.sent["find"] + commands.sent["getMore"]
    assert commands.sent["find"] <= 3 and reads <= 3 + failure_index.WINDOW // 100, commands.sent
    assert commands.documents <= 1 + failure_index.WINDOW + 20, commands.documents
    assert amqp == Counter() and broker.depth(FAILED) == depth_before == N
    figures.append(f"in-process list --limit 20: MongoDB commands {dict(commands.sent)}, {commands.documents} "
                   f"documents returned; AMQP basic.get/consume {sum(amqp.values())}")

    # The whole index, no --limit: written window by window, each window's bodies with it, so the
    # command's memory is that of --limit 20, not of 100,000 records.
    _, _, small = timed(env, "failed", "list", "--limit", "20", "-o", "jsonl")
    every, took, rss = timed(env, "failed", "list", "-o", "jsonl")
    figures.append(f"failed list -o jsonl (all {N:,}): {took:.2f} s, max RSS {rss} MB ({small} MB with --limit 20)")
    lines = every.splitlines()
    assert len(lines) == N and json.loads(lines[0])["id"] == "r-000000" and json.loads(lines[-1])["id"] == "r-099999"
    assert rss < small + 40, figures[-1]
    print(f"\nfigure: 100,000 failure records (setup {setup_s:.1f} s); " + "; ".join(figures))
