"""`failed replay` stopped midway and run again (issue 13). A first Ctrl-C or SIGTERM stops the
sends after the record in hand and puts the held records not sent back behind the others; the
same command run again replays them, so each record reaches the inbound queue once. A SIGKILL
can send one record twice. On the real broker, with no service consuming the inbound queue: it
keeps what the replay sends, to be counted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
import pytest
from failure_records import FailureRecords
from harness import BIN, Broker, cli_env, wait_until
from outcomes import FAILED, INBOUND, good
from pika.adapters.blocking_connection import BlockingChannel
from registrations_cli import main as cli_main
from test_delivery_limits import limit_every_queue

from regbridge.messages import FailureError, FailureRecord

pytestmark = pytest.mark.integration

FAILED_AT = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def env(amqp_url: str, mongo: harness.Mongo, database: str) -> dict[str, str]:
    """The command's environment: the test's vhost and database, every other setting its default."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("POLL_", "LEGACY_SIM_"))},
            "RABBITMQ_URL": amqp_url, "MONGODB_URI": mongo.uri, "MONGODB_DATABASE": database}


def record(i: int, stage: str) -> bytes:
    user = f"u-{i}"
    return FailureRecord(original=good(user), user_id=user, legacy_request_id=None,
                         error=FailureError(stage, f"reason {i}"), attempts=1, failed_at=FAILED_AT).encode()


def fill(records: FailureRecords, n: int, *, other_every: int,
         copy_of: int | None = None) -> tuple[list[str], list[str]]:
    """`n` legacy records on the failure queue, and before every `other_every`-th one a record of
    another stage, each with an id of its own (with `copy_of`, a second copy of that legacy record
    at the end); published in order (Broker.publish_in_order), then indexed in bulk.
    Returns the legacy ids and the others', each in queue order."""
    legacy: list[str] = []
    others: list[str] = []
    messages: list[tuple[str, bytes]] = []
    indexed: dict[str, bytes] = {}  # a copy's entry is its first record's

    def publish(mid: str, body: bytes) -> None:
        messages.append((mid, body))
        indexed.setdefault(mid, body)

    for i in range(n):
        if i % other_every == 0:
            others.append(f"o-{i}")
            publish(others[-1], record(i, ("submit", "validation")[i // other_every % 2]))
        legacy.append(f"r-{i}")
        publish(legacy[-1], record(i, "legacy"))
    if copy_of is not None:
        publish(f"r-{copy_of}", record(copy_of, "legacy"))
    records.broker.publish_in_order(FAILED, messages)
    records.index_many(list(indexed.items()))
    return legacy, others


def drained(broker: Broker, queue: str) -> tuple[list[str], list[int]]:
    """Every message on `queue`, taken: their ids and their delivery counts, in queue order."""
    taken = broker.drain(queue)
    return ([p.message_id for p, _ in taken], [int((p.headers or {}).get("x-delivery-count", 0)) for p, _ in taken])


# ---- the command as a process -------------------------------------------------------------------


@dataclass
class Run:
    code: int
    took_s: float
    stdout: str
    stderr: str
    max_rss_mb: float


class Replay:
    """`registrations failed replay ...` as a child process, its output in files (10,000 lines)."""

    def __init__(self, env: dict[str, str], args: list[str], out: Path) -> None:
        self.out, self.err = out.with_suffix(".out"), out.with_suffix(".err")
        with open(self.out, "wb") as stdout, open(self.err, "wb") as stderr:
            self.began = time.monotonic()
            self.process = subprocess.Popen([str(BIN / "registrations"), "failed", "replay", *args],
                                            env=cli_env(env), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 180) -> Run:
        # wait4 rather than Popen.wait: it gives this child's own peak memory.
        wait_until(lambda: os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT),
                   timeout=timeout, what="the replay to end", every=0.05)
        _, status, usage = os.wait4(self.process.pid, 0)
        self.process.returncode = os.waitstatus_to_exitcode(status)
        return Run(self.process.returncode, time.monotonic() - self.began, self.out.read_text(),
                   self.err.read_text(), usage.ru_maxrss / 1024)


def until_sent(broker: Broker, replay: Replay, count: int) -> tuple[float, int, float, int]:
    """Wait until the inbound queue holds `count` messages, watching the replay's first send on
    the way: (when the first was seen, how many then, when `count` was reached, how many then)."""
    first: list[tuple[float, int]] = []

    def reached() -> bool:
        assert replay.running(), f"the replay ended first:\n{replay.err.read_text()[-2000:]}"
        depth = broker.depth(INBOUND)
        if depth and not first:
            first.append((time.monotonic(), depth))
        return depth >= count

    wait_until(reached, timeout=180, what=f"{count} replays on {INBOUND}", every=0.02)
    return first[0][0], first[0][1], time.monotonic(), broker.depth(INBOUND)


INTERRUPTED = re.compile(r"interrupted: (\d+) of (\d+) replayed; the rest are still on registrations.failed, "
                         r"behind the others; run the same command again to replay them")


# ---- the figure of issue 13 -------------------------------------------------------------------


@pytest.mark.long
def test_a_replay_of_10000_interrupted_halfway_and_run_again_replays_each_record_once(
        broker: Broker, env: dict[str, str], amqp_url: str, tmp_path: Path,
        failure_records: FailureRecords) -> None:
    # A rate this machine's broker can keep (a send waits for its confirm: about 3 ms on a quorum queue).
    n, rate = 10_000, 300.0
    legacy, others = fill(failure_records, n, other_every=100)
    # A delivery limit of 0: a record handed back to the failure queue even once would be gone, and
    # missing below. The interrupt must put records back as copies, never hand them back.
    limit_every_queue(amqp_url, 0)
    command = ["--stage", "legacy", "--rate", f"{rate:g}", "--yes"]

    first = Replay(env, command, tmp_path / "first")
    t0, d0, t1, d1 = until_sent(broker, first, n // 2)
    first.process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    stopped = first.wait()
    stop_s = time.monotonic() - signalled
    assert stopped.code == 3, stopped.stderr
    assert "stopping after the record in hand" in stopped.stderr and "Traceback" not in stopped.stderr
    match = INTERRUPTED.search(stopped.stderr)
    assert match, stopped.stderr
    sent_first, chosen = int(match[1]), int(match[2])
    assert chosen == n and 0 < sent_first < n
    assert broker.depth(INBOUND) == sent_first
    assert sum(line.startswith("replayed r-") for line in stopped.stdout.splitlines()) == sent_first

    second = Replay(env, command, tmp_path / "second")
    resumed = second.wait()
    assert resumed.code == 0, resumed.stderr
    assert f"replayed {n - sent_first} failure records to {INBOUND}; {len(others)} left on {FAILED}" in resumed.stdout

    inbound, _ = drained(broker, INBOUND)
    twice = [mid for mid, times in Counter(inbound).items() if times > 1]
    assert len(inbound) == n and not twice and set(inbound) == set(legacy)
    assert inbound == legacy  # the first run's in order, then the rest in theirs
    left, counts = drained(broker, FAILED)
    assert left == others and set(counts) == {0}
    assert failure_records.states() == dict.fromkeys(others, "queued")  # the index followed both runs
    print(f"\nreplay of {n:,} records (+{len(others)} others kept) at --rate {rate:g}: "
          f"{(d1 - d0) / (t1 - t0):.0f}/s achieved; first run {stopped.took_s:.1f} s (first send after "
          f"{t0 - first.began:.1f} s, the take), SIGINT after {sent_first:,} "
          f"sent, stopped {stop_s:.1f} s after it (the {n - sent_first:,} unsent put back); second run "
          f"{resumed.took_s:.1f} s; each record on {INBOUND} once, the others in order, none returned; "
          f"CLI max RSS {stopped.max_rss_mb:.0f} / {resumed.max_rss_mb:.0f} MB")


def test_a_replay_killed_halfway_and_run_again_sends_at_most_the_record_in_hand_twice(
        broker: Broker, env: dict[str, str], tmp_path: Path, failure_records: FailureRecords) -> None:
    """The record whose send was confirmed and whose original was not acked is sent again by the
    next run. A quorum queue applies an ack through its log, so the record before it can come back
    as well when its ack had not been applied (test_delivery_limits.py sees the same of a browse):
    at most those two, one after the other."""
    n = 1_000
    legacy, others = fill(failure_records, n, other_every=20)
    command = ["--stage", "legacy", "--rate", "1000", "--yes"]

    first = Replay(env, command, tmp_path / "first")
    until_sent(broker, first, n // 2)
    first.process.kill()
    killed = first.wait()
    assert killed.code == -signal.SIGKILL
    sent = broker.depth(INBOUND)
    # The broker hands back what the dead command held: every record not sent, and perhaps the
    # one whose send was confirmed but not acked.
    wait_until(lambda: broker.depth(FAILED) >= len(others) + n - sent, timeout=30,
               what="the broker to hand back the held records", every=0.05)

    resumed = Replay(env, command, tmp_path / "second").wait()
    assert resumed.code == 0, resumed.stderr

    # The index: the dead command never settled the entries it had marked `leaving`; they are
    # younger than reconcile's grace, so only a reconcile with no grace may delete them. After it,
    # the index and the queue agree id for id (the queue holds the others only, as checked below).
    stale = Counter(failure_records.states().values())
    reconciled = harness.run_cli({**env, "RECONCILE_GRACE_S": "0"}, "failed", "reconcile", "-o", "json")
    assert reconciled.returncode == 0, reconciled.stderr
    assert json.loads(reconciled.stdout)["added"] == []  # every record on the queue had its entry
    assert failure_records.states() == dict.fromkeys(others, "queued")

    inbound, _ = drained(broker, INBOUND)
    times = Counter(inbound)
    twice = sorted(mid for mid, k in times.items() if k > 1)
    assert set(inbound) == set(legacy), f"never replayed: {sorted(set(legacy) - set(inbound))[:10]}"
    assert max(times.values()) <= 2, twice
    assert len(twice) <= 1 or (len(twice) == 2 and abs(legacy.index(twice[0]) - legacy.index(twice[1])) == 1), twice
    left, counts = drained(broker, FAILED)
    assert left == others and set(counts) == {0}
    print(f"\nreplay of {n:,} records killed (SIGKILL) after {sent:,} sent, then run again: every record "
          f"replayed, {len(twice)} twice {twice}; the {len(others)} others in order; index before reconcile "
          f"{dict(stale)}, after: {len(others)} queued, one per record on {FAILED}")


# ---- in this process: the signal at a chosen call ---------------------------------------------


@contextmanager
def signal_at(monkeypatch: pytest.MonkeyPatch, method: str, call: int, signals: list[int],
              when: Callable[[tuple[Any, ...]], bool] = lambda args: True) -> Iterator[None]:
    """`signals`, sent to this process right after the `call`-th call of the channel's `method`
    (among those `when` accepts) has returned: the record in hand is done when they arrive."""
    calls = [0]
    original = getattr(BlockingChannel, method)

    def then_signal(self: BlockingChannel, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if when(args):
            calls[0] += 1
            if calls[0] == call:
                for signum in signals:
                    os.kill(os.getpid(), signum)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(BlockingChannel, method, then_signal)
        yield


def to_inbound(args: tuple[Any, ...]) -> bool:
    return bool(args[1] == INBOUND)


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str],
        *args: str) -> tuple[int, str, str]:
    for name in ("RABBITMQ_URL", "MONGODB_URI", "MONGODB_DATABASE"):
        monkeypatch.setenv(name, env[name])
    code = cli_main.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_signal_during_the_sends_stops_after_the_record_in_hand(
        broker: Broker, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        failure_records: FailureRecords) -> None:
    legacy, others = fill(failure_records, 30, other_every=5, copy_of=2)  # r-2's copy, at the end, goes with it
    replay = ("failed", "replay", "--stage", "legacy", "--yes", "-o", "json")
    with signal_at(monkeypatch, "basic_publish", 10, [signal.SIGTERM], when=to_inbound):
        code, out, err = run(monkeypatch, capsys, env, *replay)
    assert code == 3, err
    doc = json.loads(out)
    assert (doc["count"], doc["complete"], doc["interrupted"]) == (10, False, True)
    assert "interrupted: 10 of 30 replayed" in doc["stopped"] and "interrupted: 10 of 30 replayed" in err
    assert [r["id"] for r in doc["records"]] == legacy[:10]
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == legacy[:10]
    left, counts = drained(broker, FAILED)
    assert left == others + legacy[10:] and set(counts) == {0}  # the unsent behind the others; no copy of r-2
    # The index followed: the sent records' entries are gone, the unsent ones' queued again.
    assert failure_records.states() == dict.fromkeys(others + legacy[10:], "queued")
    for mid in left:
        broker.publish(FAILED, record(int(mid[2:]), "legacy" if mid.startswith("r-") else "submit"), message_id=mid)

    code, out, err = run(monkeypatch, capsys, env, *replay)
    assert code == 0 and json.loads(out)["count"] == 20, err
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == legacy[10:]
    assert drained(broker, FAILED)[0] == others


def test_a_signal_during_the_take_sends_nothing_and_keeps_the_order(
        broker: Broker, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        failure_records: FailureRecords) -> None:
    legacy, others = fill(failure_records, 30, other_every=5)
    with signal_at(monkeypatch, "basic_get", 8, [signal.SIGINT]):
        code, out, err = run(monkeypatch, capsys, env, "failed", "replay", "--stage", "legacy", "--yes",
                             "-o", "json")
    assert code == 130, err
    assert "finishing the browse first" in err and "go back onto registrations.failed unsent" in err
    assert "interrupted: 0 of 30 replayed" in err
    doc = json.loads(out)
    assert (doc["count"], doc["complete"], doc["interrupted"], doc["left"]) == (0, False, True, 36)
    assert broker.depth(INBOUND) == 0
    left, counts = drained(broker, FAILED)
    # Every record went round: the others in their order, then the chosen in theirs.
    assert left == others + legacy and set(counts) == {0}


def test_a_second_signal_stops_at_once_and_loses_nothing(
        broker: Broker, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        failure_records: FailureRecords) -> None:
    legacy, others = fill(failure_records, 30, other_every=5)
    with signal_at(monkeypatch, "basic_publish", 5, [signal.SIGINT, signal.SIGINT], when=to_inbound):
        code, _, err = run(monkeypatch, capsys, env, "failed", "replay", "--stage", "legacy", "--yes")
    assert code == 130 and err.rstrip().endswith("registrations: interrupted"), err
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == legacy[:5]
    # The held records went back to the head (one return each), r-4 too: its send was confirmed,
    # its ack never made. That is the record a crash can replay twice.
    wait_until(lambda: broker.depth(FAILED) == len(others) + 26, timeout=30, what="the held records back")
    left, _ = drained(broker, FAILED)
    assert sorted(left) == sorted(others + legacy[4:])


def test_a_discard_interrupted_before_its_export_removes_nothing(
        broker: Broker, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path, failure_records: FailureRecords) -> None:
    legacy, others = fill(failure_records, 30, other_every=5)
    export = tmp_path / "gone.jsonl"
    with signal_at(monkeypatch, "basic_get", 20, [signal.SIGINT]):
        code, _, err = run(monkeypatch, capsys, env, "failed", "discard", "--stage", "legacy", "--yes",
                           "--export", str(export))
    assert code == 130, err
    assert "interrupted before the records were written" in err and "nothing was discarded" in err
    assert export.read_text() == ""
    left, counts = drained(broker, FAILED)
    assert left == others + legacy and set(counts) == {0}


def test_an_interrupted_replay_with_a_limit_says_how_many_more_to_ask_for(
        broker: Broker, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        failure_records: FailureRecords) -> None:
    legacy, _ = fill(failure_records, 30, other_every=5)
    with signal_at(monkeypatch, "basic_publish", 4, [signal.SIGINT], when=to_inbound):
        code, _, err = run(monkeypatch, capsys, env, "failed", "replay", "--stage", "legacy", "--limit", "12",
                           "--yes")
    assert code == 3 and "interrupted: 4 of 12 replayed" in err and "run it again with --limit 8" in err, err
    code, _, err = run(monkeypatch, capsys, env, "failed", "replay", "--stage", "legacy", "--limit", "8", "--yes")
    assert code == 0, err
    # The limit takes the first that match, in queue order: those it left out before come ahead of
    # the 8 put back at the tail. Twelve in all, none twice.
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == legacy[:4] + legacy[12:20]
    queue_order = [m for i in range(30) for m in ([f"o-{i}"] if i % 5 == 0 else []) + [f"r-{i}"]]
    assert drained(broker, FAILED)[0] == [m for m in queue_order if m not in legacy[:20]] + legacy[4:12]
