"""The operator command `registrations`, run as its console script against the real broker, the
Mongo-wire server and legacy-sim, with the services' own environment (the test's vhost and database)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import select
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import BIN, Broker, LegacySim, cli_env, wait_until
from harness import cli_ok as ok
from harness import run_cli as cli
from outcomes import FAILED, INBOUND, PENDING, Outcomes, good

from regbridge.messages import FailureError, FailureRecord
from regbridge.topology import wait_queue

pytestmark = pytest.mark.integration


def record(user_id: str | None, stage: str, *, original: Any = None, reason: str = "it went wrong",
           age_s: float = 60) -> bytes:
    return FailureRecord(
        original=good(user_id) if original is None and user_id else original, user_id=user_id,
        legacy_request_id=None, error=FailureError(stage, reason), attempts=1,
        failed_at=datetime.now(UTC) - timedelta(seconds=age_s),
    ).encode()


def drain_failed(broker: Broker) -> list[tuple[str | None, dict[str, Any]]]:
    """Take (and remove) every record: (message_id, record), in queue order."""
    return [(props.message_id, json.loads(body)) for props, body in broker.drain(FAILED)]


def failed_ids(env: dict[str, str], *args: str) -> list[str | None]:
    return [r["id"] for r in json.loads(ok(env, "failed", "list", "--json", *args))]


# ---- browsing the failure queue: never a loss, never a reorder --------------------------------
# (Under a delivery limit, killed midway, with other clients at once: test_delivery_limits.py.)


def test_failed_list_keeps_every_record_in_its_place(stack: Stack, broker: Broker,
                                                     failure_records: FailureRecords) -> None:
    env = stack.env
    published = [f"m-{i}" for i in range(25)]
    for i, mid in enumerate(published):
        stage = ("legacy", "submit", "validation")[i % 3]
        failure_records.publish(record(f"u-{i}" if stage != "validation" else None, stage,
                                       original=None if stage != "validation" else "not json {",
                                       reason=f"reason {i}\nwith a second line", age_s=7200 if i < 20 else 60),
                                message_id=mid)

    # Listed twice, in full, then in part, from the index and from the queue itself: the same
    # records in the same order each time.
    assert failed_ids(env) == published
    assert failed_ids(env, "--from-queue") == published
    assert [r["id"] for r in json.loads(ok(env, "failed", "list", "--json", "--limit", "3"))] == \
        published[:3]
    assert failed_ids(env, "--from-queue") == published
    assert failed_ids(env) == published

    table = ok(env, "failed", "list").splitlines()
    assert table[0].split() == ["ID", "STAGE", "USER_ID", "AGE", "REASON"]
    assert table[1].split()[:4] == ["m-0", "legacy", "u-0", "2h00m"]
    # One line per record: the reason's line feed is shown, not obeyed.
    assert table[1].endswith("reason 0\\u000awith a second line")
    assert table[3].split()[:3] == ["m-2", "validation", "-"]
    assert table[-1] == f"25 failure records on {FAILED}"

    legacy_only = json.loads(ok(env, "failed", "list", "--json", "--stage", "legacy"))
    assert [r["id"] for r in legacy_only] == published[0::3]
    assert [r["state"] for r in legacy_only] == ["queued"] * 9
    assert [r["seq"] for r in legacy_only] == sorted(r["seq"] for r in legacy_only)
    assert [r["position"] for r in json.loads(ok(env, "failed", "list", "--json", "--stage", "legacy",
                                                 "--from-queue"))] == list(range(1, 26, 3))
    assert [r["id"] for r in json.loads(ok(env, "failed", "list", "--json", "--user-id", "u-4"))] == ["m-4"]
    # --since takes a duration or a time.
    assert [r["id"] for r in json.loads(ok(env, "failed", "list", "--json", "--since", "10m"))] == \
        published[20:]
    cutoff = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "5 matching; 25 failure records" in ok(env, "failed", "list", "--since", cutoff)
    assert "2 shown; more match (--limit); 25 failure records" in \
        ok(env, "failed", "list", "--stage", "submit", "--limit", "2")
    assert "2 shown of 8 matching; 25 failure records" in \
        ok(env, "failed", "list", "--stage", "submit", "--limit", "2", "--from-queue")

    shown = json.loads(ok(env, "failed", "show", "m-4"))
    assert shown["id"] == "m-4" and shown["state"] == "queued" and shown["queue"] == FAILED
    assert shown["position"] is None and shown["copies"] is None and shown["properties"] is None
    assert shown["record"]["user_id"] == "u-4" and shown["record"]["error"]["stage"] == "submit"
    shown = json.loads(ok(env, "failed", "show", "m-4", "--from-queue"))
    assert shown["id"] == "m-4" and shown["position"] == 5 and shown["queue"] == FAILED and shown["copies"] == 1
    assert shown["properties"]["message_id"] == "m-4" and shown["properties"]["delivery_mode"] == 2
    assert shown["record"]["user_id"] == "u-4" and shown["record"]["error"]["stage"] == "submit"
    missing = cli(env, "failed", "show", "m-99")
    assert missing.returncode == 1 and "no record with id 'm-99'" in missing.stderr
    assert "Traceback" not in missing.stderr
    # An exact id wins (m-1, though m-10 ... m-19 start so too); a start shared by several is refused.
    assert json.loads(ok(env, "failed", "show", "m-1"))["id"] == "m-1"
    ambiguous = cli(env, "failed", "show", "m-")
    assert ambiguous.returncode == 1 and "5 or more records in" in ambiguous.stderr
    assert "give more of the id" in ambiguous.stderr
    ambiguous = cli(env, "failed", "show", "m-", "--from-queue")
    assert ambiguous.returncode == 1 and "25 records on" in ambiguous.stderr

    # After all that browsing, consumed for real: every record, once, in the order published.
    assert [mid for mid, _ in drain_failed(broker)] == published
    assert "no failure records" in ok(env, "failed", "list", "--from-queue")


def indexed(records: FailureRecords, count: int) -> None:
    """Wait until the services' entries of `count` records say `queued` (the executor writes them
    after each record's confirm)."""
    wait_until(lambda: list(records.states().values()) == ["queued"] * count, timeout=30,
               what=f"{count} failure records indexed")


def test_failed_list_shows_the_records_the_services_wrote(stack: Stack, broker: Broker, users: Any,
                                                          failure_records: FailureRecords) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, b"this is not json", message_id="bad-json")
    broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="m-bad-cpf")
    broker.publish(INBOUND, good("refused", name="FAIL Maria"), message_id="m-refused")
    wait_until(lambda: broker.depth(FAILED) == 3, timeout=30, what="three failure records")
    indexed(failure_records, 3)

    listed = json.loads(ok(stack.env, "failed", "list", "--json"))
    assert sorted(r["record"]["error"]["stage"] for r in listed) == ["legacy", "submit", "validation"]
    by_stage = {r["record"]["error"]["stage"]: r for r in listed}
    # No user could be read from it: its id is its message_id and a digest of its body (invalid
    # bodies repeat); its message_id stays "bad-json".
    assert by_stage["validation"]["id"] == "mid:bad-json|sha256:" + hashlib.sha256(b"this is not json").hexdigest()
    assert by_stage["legacy"]["id"] == "refused|mid:m-refused"
    assert by_stage["legacy"]["record"]["user_id"] == "refused"
    text = ok(stack.env, "failed", "list", "--stage", "submit")
    assert "bad-cpf" in text and "refused" not in text
    assert broker.depth(FAILED) == 3


# ---- replay --------------------------------------------------------------------------------------


def test_replay_after_the_cause_is_fixed_registers_and_empties_the_failure_queue(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim, failure_records: FailureRecords) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("replay-me", name="FAIL at first"), message_id="mid-replay")
    broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="mid-bad-cpf")  # fails for good
    wait_until(lambda: broker.depth(FAILED) == 2, timeout=30, what="two failure records")
    indexed(failure_records, 2)
    failed_rid = users.find_one({"_id": "replay-me"})["legacy_request_id"]

    status = ok(stack.env, "status", "replay-me")
    assert "registration_status      failed" in status
    assert "registration_error       legacy: rejected by the legacy system" in status
    assert "1 failure record on registrations.failed" in status

    legacy.configure(fail_prefix="")
    moved = ok(stack.env, "failed", "replay", "--stage", "legacy", "--yes")
    assert "replayed replay-me|mid:mid-replay " in moved and "user_id=replay-me" in moved  # its id: the attempt key
    assert "replayed 1 failure record to registrations; 1 left on registrations.failed" in moved

    wait_until(lambda: (users.find_one({"_id": "replay-me"}) or {}).get("registration_status") == "registered",
               timeout=30, what="the replayed registration to be registered")
    broker.wait_drained(FAILED, timeout=30)
    doc = users.find_one({"_id": "replay-me"})
    assert doc["legacy_request_id"] != failed_rid and "registration_error" not in doc
    # A new attempt under the same message_id: submitted again, and recorded as an attempt of its
    # own (the replay's mark sets it apart from the attempt that failed).
    assert legacy.stats()["submissions_by_user"]["replay-me"] == 2
    attempts = {a["_id"]: a for a in users.database["users.attempts"].find({"user_id": "replay-me"})}
    assert len(attempts) == 2 and all(k.startswith("replay-me|mid:mid-replay") for k in attempts)
    assert {a["legacy_request_id"] for a in attempts.values()} == {failed_rid, doc["legacy_request_id"]}
    assert [a["failed"] for a in attempts.values() if a["legacy_request_id"] == failed_rid] == [True]

    # Only the record that did not match is left, in the index too; nothing new failed.
    assert failure_records.states() == {"bad-cpf|mid:mid-bad-cpf": "queued"}
    left = drain_failed(broker)
    assert [(mid, r["error"]["stage"]) for mid, r in left] == [("mid-bad-cpf", "submit")]
    status = ok(stack.env, "status", "replay-me")
    assert "registration_status      registered" in status and "no failure record on" in status


def test_replay_filters_dry_run_and_what_is_published(stack: Stack, broker: Broker,
                                                      failure_records: FailureRecords) -> None:
    env = stack.env  # no service runs: replayed messages stay on the inbound queue to be looked at
    specs = [("m-0", "u-0", "legacy", None), ("m-1", "u-1", "submit", None), ("m-2", "u-2", "legacy", None),
             (None, "u-3", "legacy", None), ("m-4", None, "validation", "not json {"),
             ("m-5", None, "validation", ["an", "array"]), ("m-6", "u-0", "timeout", None)]
    order: list[str] = []
    for mid, uid, stage, original in specs:
        entry = failure_records.publish(record(uid, stage, original=original), message_id=mid)
        assert entry is not None
        order.append(entry.record_id)  # its message_id; a record without one: a digest of its body
    failure_records.publish(b"not a failure record", message_id="m-junk")
    order.append("m-junk")
    assert order[3].startswith("sha256:")

    def queue_and_index(expected: list[str]) -> bool:
        # Every record has an entry, in queue order.
        return failed_ids(env, "--from-queue") == expected and failed_ids(env) == expected

    dry = ok(env, "failed", "replay", "--stage", "legacy", "--dry-run")
    assert [line.split()[2] for line in dry.splitlines() if line.startswith("would replay ") and "user_id=" in line] \
        == ["m-0", "m-2", order[3]] and "nothing was moved" in dry
    assert broker.depth(INBOUND) == 0 and queue_and_index(order)

    # --limit: the first matching record only.
    out = ok(env, "failed", "replay", "--stage", "legacy", "--limit", "1", "--yes")
    assert "replayed m-0 " in out and "replayed 1 failure record to" in out
    [(props, body)] = broker.drain(INBOUND)
    assert props.message_id == "m-0" and props.delivery_mode == 2 and props.timestamp
    assert props.headers["x-replayed-from"] == FAILED
    assert json.loads(body) == good("u-0")
    assert queue_and_index(order[1:])

    # --user-id, across stages; the rest stay in order.
    ok(env, "failed", "replay", "--user-id", "u-0", "-y")
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-6"]
    remaining = [*order[1:6], "m-junk"]
    assert queue_and_index(remaining)

    # A record without a message_id gets a fresh one; a string original goes back as its text,
    # anything else as JSON; a record with no original is never replayed (nor removed).
    out = ok(env, "failed", "replay", "--yes")
    assert "replayed 5 failure records" in out
    published = broker.drain(INBOUND)
    assert [p.message_id for p, _ in published][:2] == ["m-1", "m-2"]
    assert published[2][0].message_id not in (None, "")  # the record of u-3 had none
    assert [b for _, b in published][3:] == [b"not json {", b'["an","array"]']
    assert queue_and_index(["m-junk"])


def test_replay_never_takes_a_record_that_arrived_after_it_started(stack: Stack, broker: Broker, users: Any,
                                                                   failure_records: FailureRecords) -> None:
    """A replayed message that fails again at once comes back as a new record while the replay is
    still running: it waits for the next replay (no loop), and the records left in place keep
    their place ahead of it."""
    stack.start("submitter")
    started = datetime.now(UTC) - timedelta(seconds=1)
    failure_records.publish(record("stays-1", "legacy"), message_id="stays-1")
    for i in range(30):
        failure_records.publish(record(None, "validation", original=f"still not json {i}"), message_id=f"v-{i}")
    failure_records.publish(record("stays-2", "legacy"), message_id="stays-2")
    out = ok(stack.env, "failed", "replay", "--stage", "validation", "--yes")
    assert "replayed 30 failure records" in out
    wait_until(lambda: broker.depth(FAILED) == 32, timeout=30, what="the 30 replays to fail again")
    after = drain_failed(broker)
    assert [mid for mid, _ in after[:2]] == ["stays-1", "stays-2"]
    again = after[2:]
    assert sorted(r["original"] for _, r in again) == sorted(f"still not json {i}" for i in range(30))
    # Each of them is the new failure of its replay: every old record was replayed exactly once.
    assert all(datetime.fromisoformat(r["failed_at"]) > started for _, r in again)


def test_a_replay_redelivered_before_the_submitter_handled_it_is_not_lost(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    submitter = stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("unlucky", name="FAIL once"), message_id="mid-unlucky")
    wait_until(lambda: broker.depth(FAILED) == 1, timeout=30, what="the failure record")
    legacy.configure(fail_prefix="")
    assert submitter.terminate() == 0
    ok(stack.env, "failed", "replay", "--yes")
    # A submitter took the replay and died before handling it (or its connection dropped while the
    # message sat in its prefetch): the broker redelivers it, flagged redelivered.
    channel = broker.connection.channel()
    method, _, _ = channel.basic_get(INBOUND, auto_ack=False)
    assert method is not None
    channel.close()
    stack.start("submitter")
    # Registered, or failed again with a record: either is an outcome; neither must take long.
    # (Not "the pipeline is empty": a message in transit between a wait queue and pending is
    # counted in neither for a moment.)
    wait_until(lambda: (users.find_one({"_id": "unlucky"}) or {}).get("registration_status") == "registered"
               or broker.depth(FAILED) == 1, timeout=30, what="an outcome for the replay")
    doc = users.find_one({"_id": "unlucky"})
    assert doc["registration_status"] == "registered" or broker.depth(FAILED) == 1, \
        f"the replay vanished: {doc}, {broker.depth(FAILED)} failure records, " \
        f"{legacy.stats()['submissions_by_user']} submissions"


# ---- publish -------------------------------------------------------------------------------------


def test_publish_jsonl_and_csv_register_everyone(stack: Stack, broker: Broker, users: Any,
                                                 tmp_path: Path) -> None:
    stack.start("submitter")
    stack.start("poller")
    jsonl = tmp_path / "batch.jsonl"
    jsonl.write_text("\n".join(json.dumps(good(f"j-{i}")) for i in range(3)) + "\n\n")
    csv = tmp_path / "batch.csv"
    csv.write_text("user_id,name,email,cpf\nc-0,Ana Souza,ana@example.com,01234567890\n"
                   "c-1,\"Souza, Bruno\",bruno@example.com,12345678909\n")
    assert "published 3 registrations from" in ok(stack.env, "publish", str(jsonl))
    assert "published 2 registrations from" in ok(stack.env, "publish", str(csv))
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=5, failed=0)
    assert outcomes.registered() == {"j-0", "j-1", "j-2", "c-0", "c-1"}
    ok(stack.env, "init-indexes")
    stats = json.loads(ok(stack.env, "stats", "--json"))
    assert stats["outcomes"]["registered"] == 5


def test_publish_sets_the_message_properties(stack: Stack, broker: Broker, tmp_path: Path) -> None:
    rows = [{**good(f"p-{i}"), "ref": f"ref-{i}"} for i in range(3)]
    jsonl = tmp_path / "rows.txt"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    result = cli(stack.env, "publish", str(jsonl), "--format", "jsonl", "--message-id-field", "ref")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    taken = broker.drain(INBOUND)
    assert [json.loads(b) for _, b in taken] == rows
    assert [p.message_id for p, _ in taken] == ["ref-0", "ref-1", "ref-2"]
    assert all(p.delivery_mode == 2 and p.content_type == "application/json" for p, _ in taken)
    assert all(abs(p.timestamp - datetime.now(UTC).timestamp()) < 60 for p, _ in taken)

    csv = tmp_path / "rows.csv"
    csv.write_text("user_id,name,email,cpf\nq-0,Ana,ana@example.com,00000000191\n")
    ok(stack.env, "publish", str(csv))
    [(props, body)] = broker.drain(INBOUND)
    assert json.loads(body) == {"user_id": "q-0", "name": "Ana", "email": "ana@example.com", "cpf": "00000000191"}
    assert len(props.message_id) == 36  # a fresh UUID


def test_publish_of_a_bad_file_publishes_nothing_and_names_the_lines(stack: Stack, broker: Broker,
                                                                     tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(good("b-1")), "{not json", json.dumps(good("b-3")),
                              json.dumps({"name": "no id"}), json.dumps(good("b-5")), "[1, 2]"]) + "\n")
    result = cli(stack.env, "publish", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}:2: message body is not JSON" in result.stderr
    assert f"{bad}:4: message has no user_id" in result.stderr
    assert f"{bad}:6: message body is JSON but not an object" in result.stderr
    assert "invalid rows: 3 of 6; nothing was published" in result.stderr
    assert broker.depth(INBOUND) == 0

    csv = tmp_path / "bad.csv"
    csv.write_text("user_id,name,email,cpf\nok-1,A,a@example.com,12345678909\n,B,b@example.com,12345678909\n"
                   "ok-3,C,c@example.com\n")
    result = cli(stack.env, "publish", str(csv))
    assert result.returncode == 1
    assert f"{csv}:3: user_id must be a non-empty string" in result.stderr
    assert f"{csv}:4: has 3 fields; the header (line 1) has 4" in result.stderr
    assert broker.depth(INBOUND) == 0

    result = cli(stack.env, "publish", str(bad), "--skip-invalid", "--quiet")
    assert result.returncode == 0 and "published 3 registrations" in result.stdout
    assert "3 invalid rows skipped" in result.stdout
    assert [json.loads(b)["user_id"] for _, b in broker.drain(INBOUND)] == ["b-1", "b-3", "b-5"]

    for args, message in [(["publish", str(tmp_path / "missing.jsonl")], "cannot read"),
                          (["publish", str(tmp_path / "rows.xml")], "pass --format jsonl or --format csv")]:
        result = cli(stack.env, *args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_publish_to_a_queue_nobody_declared_fails_clearly(stack: Stack, tmp_path: Path) -> None:
    # No `broker` fixture and no service: the vhost is empty.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(good("x")) + "\n")
    result = cli(stack.env, "publish", str(rows))
    assert result.returncode == 1
    assert "queue 'registrations' does not exist" in result.stderr
    assert "guest:guest" not in result.stderr and "***@" in result.stderr


# ---- status and stats ---------------------------------------------------------------------------


def test_status_of_users_in_every_state(stack: Stack, broker: Broker, users: Any,
                                        failure_records: FailureRecords) -> None:
    now = datetime.now(UTC)
    users.insert_one({"_id": "done", "registration_status": "registered", "legacy_request_id": "AB583C-X",
                      "registration_updated_at": now})
    failure_records.publish(record("gone", "timeout", reason="still processing after 300 s"), message_id="m-gone")
    text = ok(stack.env, "status", "done")
    assert "registration_status      registered" in text and "legacy_request_id        AB583C-X" in text
    assert "registration_error       -" in text and "no failure record on" in text

    text = ok(stack.env, "status", "gone")
    assert "no document in" in text and "timeout" in text and "still processing after 300 s" in text
    as_json = json.loads(ok(stack.env, "status", "gone", "--json"))
    assert as_json["document"] is None and as_json["failures"][0]["id"] == "m-gone"
    assert as_json["failures"][0]["state"] == "queued"

    unknown = cli(stack.env, "status", "nobody")
    assert unknown.returncode == 1 and "nothing known about user 'nobody'" in unknown.stderr
    assert broker.depth(FAILED) == 1  # looked at, not taken


def test_stats_counts_each_stage_and_outcome(stack: Stack, broker: Broker, users: Any) -> None:
    env = {**stack.env, "POLL_FIRST_DELAY_S": "30"}
    waiting = wait_queue(PENDING, 30)
    broker.channel.queue_declare(waiting.name, durable=True, arguments=dict(waiting.arguments))
    for i in range(2):
        broker.publish(INBOUND, good(f"s-{i}"))
    for _ in range(3):
        broker.publish(waiting.name, b"{}")
    broker.publish(PENDING, b"{}")
    broker.publish(FAILED, record("f-0", "legacy"))
    users.insert_many([{"_id": "a", "registration_status": "registered"},
                       {"_id": "b", "registration_status": "submitted"},
                       {"_id": "c", "registration_status": "registered"}])
    ok(env, "init-indexes")  # users are counted on it (test_cli_stats.py: without it)

    snapshot = json.loads(ok(env, "stats", "--json"))
    assert snapshot["stages"] == {"inbound": 2, "pending": 1, "waiting": 3, "failed": 1}
    assert snapshot["outcomes"] == {"submitted": 1, "registered": 2, "failed": 0}
    # The interval's wait queue (POLL_INTERVAL_S) was never declared: left out, not an error.
    assert list(snapshot["queues"]) == [INBOUND, PENDING, waiting.name, FAILED]

    table = ok(env, "stats")
    assert "by stage: inbound=2  pending=1  waiting=3  failed=1" in table
    assert "***@" in table and "guest:guest" not in table

    lines = ok(env, "stats", "--watch", "0.1", "--count", "2").splitlines()
    assert len(lines) == 2
    assert all("inbound=2" in line and "waiting=3" in line and "registered=2" in line for line in lines)


def test_errors_are_one_line_without_credentials(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "RABBITMQ_URL": "amqp://bob:s3cret@127.0.0.1:1/x",
           "MONGODB_URI": "mongodb://bob:s3cret@127.0.0.1:1/"}
    for args in (["failed", "list"], ["stats"], ["failed", "replay", "--yes"]):
        result = cli(env, *args)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("registrations: ")
        assert "s3cret" not in result.stderr and "bob" not in result.stderr
    result = cli({**env, "POLL_INTERVAL_S": "soon"}, "stats")
    assert result.returncode == 2 and "POLL_INTERVAL_S" in result.stderr


def test_a_list_of_brokers_reaches_the_one_that_answers(stack: Stack, broker: Broker) -> None:
    # The first node listed is down; the command goes on to the next, as the services do.
    down = broker.url.replace("127.0.0.1:5672", "127.0.0.1:1").replace("guest:guest", "bob:s3cret")
    env = {**stack.env, "RABBITMQ_URL": f"{down},{broker.url}", "RABBITMQ_URL_ORDER": "listed"}
    broker.publish(FAILED, record("u-list", "legacy"), message_id="u-list")
    assert "u-list" in ok(env, "failed", "list", "--from-queue")
    # Every node down: one line naming each node, credentials hidden.
    result = cli({**env, "RABBITMQ_URL": f"{down},{down.replace(':1/', ':2/')}"}, "failed", "list", "--from-queue")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "127.0.0.1:1" in result.stderr and "127.0.0.1:2" in result.stderr and "s3cret" not in result.stderr


# ---- output formats, confirmation, exit codes ---------------------------------------------------


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def jsonl(text: str) -> list[Any]:
    return [json.loads(line) for line in lines_of(text)]


def test_every_command_speaks_json_jsonl_and_no_headers(stack: Stack, broker: Broker, users: Any,
                                                       tmp_path: Path, failure_records: FailureRecords) -> None:
    env = stack.env  # no service runs: what is published or replayed stays on the inbound queue
    hostile = "rejected: \u202egnp.exe\u202c \u0085\u009b2J \x1b[31m"
    for mid, uid, stage, reason in [("m-0", "u-0", "legacy", hostile), ("m-1", "u-1", "submit", "bad cpf"),
                                    ("m-2", "u-0", "legacy", "refused")]:
        failure_records.publish(record(uid, stage, reason=reason), message_id=mid)
    users.insert_one({"_id": "u-0", "registration_status": "failed", "legacy_request_id": "AB583C-X",
                      "registration_updated_at": datetime.now(UTC)})
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(good(f"p-{i}")) for i in range(2)) + "\n")
    checked: list[str] = []

    def run(*args: str) -> str:
        checked.append(" ".join(args))
        return ok(env, *args)

    # publish: the rows it published, with their message ids.
    doc = json.loads(run("publish", str(rows), "-o", "json"))
    assert doc["published"] == 2 and [r["user_id"] for r in doc["rows"]] == ["p-0", "p-1"]
    assert all(len(r["message_id"]) == 36 for r in doc["rows"]) and doc["invalid"] == []
    assert [r["line"] for r in jsonl(run("publish", str(rows), "-o", "jsonl"))] == [1, 2]
    assert lines_of(run("publish", str(rows), "--no-headers"))[0].startswith("published 2 registrations")
    assert len(broker.drain(INBOUND)) == 6

    # failed list: one document; one object per line; rows only. --json is -o json.
    listed = run("failed", "list", "-o", "json")
    assert [r["id"] for r in json.loads(listed)] == ["m-0", "m-1", "m-2"]
    def ageless(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "age_s"} for r in records]

    assert ageless(json.loads(run("failed", "list", "--json"))) == ageless(json.loads(listed))
    # The hostile reason survives as data but reaches the terminal escaped, never raw.
    assert json.loads(listed)[0]["record"]["error"]["reason"] == hostile
    assert not {"\u202e", "\u0085", "\u009b", "\x1b"} & set(listed) and "\\u202e" in listed
    assert [r["id"] for r in jsonl(run("failed", "list", "-o", "jsonl", "--stage", "legacy"))] == ["m-0", "m-2"]
    assert [r["position"] for r in jsonl(run("failed", "list", "-o", "jsonl", "--stage", "legacy",
                                             "--from-queue"))] == [1, 3]
    bare = lines_of(run("failed", "list", "--no-headers"))
    assert [line.split()[:3] for line in bare] == [["m-0", "legacy", "u-0"], ["m-1", "submit", "u-1"],
                                                   ["m-2", "legacy", "u-0"]]

    # failed show: JSON by default (the record in full), one line with jsonl, a table row on request.
    assert json.loads(run("failed", "show", "m-1"))["record"]["user_id"] == "u-1"
    assert json.loads(run("failed", "show", "m-1", "--from-queue"))["properties"]["message_id"] == "m-1"
    [one] = jsonl(run("failed", "show", "m-1", "-o", "jsonl"))
    assert one["record"]["user_id"] == "u-1"
    table = lines_of(run("failed", "show", "m-1", "-o", "table"))
    assert table[0].split() == ["ID", "STAGE", "USER_ID", "AGE", "REASON"] and table[1].split()[:3] == \
        ["m-1", "submit", "u-1"]
    assert [line.split()[:2] for line in lines_of(run("failed", "show", "m-1", "-o", "table", "--no-headers"))] == \
        [["m-1", "submit"]]

    # failed replay: the dry run, then the real one, in each form.
    dry = json.loads(run("failed", "replay", "--dry-run", "--stage", "legacy", "-o", "json"))
    assert (dry["dry_run"], dry["count"], dry["left"], dry["complete"]) == (True, 2, 3, True)
    assert [r["message_id"] for r in dry["records"]] == ["m-0", "m-2"]
    assert [r["action"] for r in jsonl(run("failed", "replay", "--dry-run", "-o", "jsonl"))] == ["would_replay"] * 3
    assert [line.split()[:3] for line in lines_of(run("failed", "replay", "--dry-run", "--no-headers"))] == \
        [["would", "replay", "m-0"], ["would", "replay", "m-1"], ["would", "replay", "m-2"]]
    [moved] = jsonl(run("failed", "replay", "--stage", "submit", "--yes", "-o", "jsonl"))
    assert (moved["action"], moved["message_id"], moved["user_id"]) == ("replayed", "m-1", "u-1")
    done = json.loads(run("failed", "replay", "--user-id", "u-0", "--limit", "1", "--yes", "-o", "json"))
    assert (done["count"], done["left"], [r["message_id"] for r in done["records"]]) == (1, 1, ["m-0"])
    assert lines_of(run("failed", "replay", "--yes", "--no-headers")) == \
        ["replayed m-2  legacy      user_id=u-0"]
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-1", "m-0", "m-2"]
    failure_records.publish(record("u-0", "legacy", reason="refused again"), message_id="m-3")

    # status: the document and the records; rows only with --no-headers.
    status = json.loads(run("status", "u-0", "-o", "json"))
    assert status["document"]["legacy_request_id"] == "AB583C-X" and status["failures"][0]["id"] == "m-3"
    assert json.loads(run("status", "u-0", "--json"))["document"] == status["document"]
    [line] = jsonl(run("status", "u-0", "-o", "jsonl"))
    assert line["user_id"] == "u-0" and line["document"]["registration_status"] == "failed"
    bare = lines_of(run("status", "u-0", "--no-headers"))
    assert bare[0].split() == ["registration_status", "failed"] and bare[-1].split()[:3] == ["m-3", "legacy", "u-0"]
    assert not any(line.startswith(("user ", "1 failure record")) or "STAGE" in line for line in bare)

    # init-indexes (stats counts users by status only on its index), and inspect.
    assert json.loads(run("init-indexes", "-o", "json"))["state"] in ("created", "found")
    assert [r["state"] for r in jsonl(run("init-indexes", "-o", "jsonl"))] == ["found"]
    inspected = json.loads(run("inspect", "-o", "json"))
    assert inspected["source"] == "management" and {q["name"] for q in inspected["queues"]} >= {INBOUND, FAILED}
    assert {r["name"] for r in jsonl(run("inspect", "-o", "jsonl"))} == {q["name"] for q in inspected["queues"]}
    assert not any("READY" in line for line in lines_of(run("inspect", "--no-headers")))

    # stats: the snapshot in each form.
    snapshot = json.loads(run("stats", "-o", "json"))
    assert snapshot["stages"]["failed"] == 1 and snapshot["outcomes"]["failed"] == 1
    [streamed] = jsonl(run("stats", "-o", "jsonl"))
    assert streamed["stages"] == snapshot["stages"]
    bare = lines_of(run("stats", "--no-headers"))
    assert bare[0].split()[:2] == ["inbound", INBOUND] and not any("STAGE" in line or "broker" in line
                                                                   for line in bare)
    print(f"\n-o json/jsonl and --no-headers: {len(checked)} command lines over publish, failed list/show/replay, "
          "status and stats, every JSON parsed")


def on_a_terminal(env: dict[str, str], answer: str, *args: str) -> tuple[int, str, str]:
    """Run the command with stdin and stderr on a pseudo-terminal (stdout a pipe, as in
    `registrations ... | tee`): wait for its question, type `answer`, return (exit code, what the
    terminal showed, stdout)."""
    master, slave = os.openpty()
    process = subprocess.Popen([str(BIN / "registrations"), *args], env=cli_env(env), stdin=slave, stderr=slave,
                               stdout=subprocess.PIPE, text=True)
    os.close(slave)
    shown = b""

    def read_terminal(until: bytes | None, timeout: float) -> None:
        nonlocal shown
        deadline = time.monotonic() + timeout
        while until is None or until not in shown:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                if until is None:
                    return
                raise AssertionError(f"no {until!r} on the terminal after {timeout} s; it showed {shown!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the command has exited and closed its side
                return
            if not chunk:
                return
            shown += chunk

    try:
        read_terminal(b"[y/N] ", 60)
        os.write(master, answer.encode())
        stdout, _ = process.communicate(timeout=60)
        read_terminal(None, 1)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return process.returncode, shown.decode(errors="replace"), stdout


def test_replay_asks_on_a_terminal_and_moves_nothing_on_no(stack: Stack, broker: Broker,
        failure_records: FailureRecords) -> None:
    for i in range(4):
        failure_records.publish(record(f"u-{i}", ("legacy", "submit")[i % 2]), message_id=f"m-{i}")

    code, shown, stdout = on_a_terminal(stack.env, "n\n", "failed", "replay", "--stage", "legacy")
    print(f"\nterminal, answered n: exit {code}; it showed {shown!r}")
    assert f"replay 2 failure records from {FAILED} to {INBOUND}? [y/N] " in shown
    assert code == 1 and "nothing was replayed (the answer was not yes)" in shown and stdout == ""
    assert broker.depth(INBOUND) == 0 and failed_ids(stack.env) == ["m-0", "m-1", "m-2", "m-3"]

    code, shown, stdout = on_a_terminal(stack.env, "y\n", "failed", "replay", "--stage", "legacy")
    print(f"terminal, answered y: exit {code}; it showed {shown!r}; stdout {stdout!r}")
    assert code == 0 and "replay 2 failure records" in shown
    assert "replayed 2 failure records to registrations; 2 left on registrations.failed" in stdout
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-0", "m-2"]
    assert failed_ids(stack.env) == ["m-1", "m-3"]

    # The question counts what matches; --limit counts too.
    code, shown, _ = on_a_terminal(stack.env, "yes\n", "failed", "replay", "--limit", "1")
    assert code == 0 and "replay 1 failure record from" in shown
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-1"]


def test_replay_without_a_terminal_refuses_unless_told_yes(stack: Stack, broker: Broker,
        failure_records: FailureRecords) -> None:
    failure_records.publish(record("u-0", "legacy"), message_id="m-0")
    refused = cli(stack.env, "failed", "replay")  # stdin is /dev/null: no terminal to ask on
    print(f"\nno terminal, no --yes: exit {refused.returncode}; stderr {refused.stderr!r}")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("registrations: failed replay changes the queues and asks first, but there is "
                                     "no terminal to ask on: pass --yes (-y)")
    assert broker.depth(FAILED) == 1 and broker.depth(INBOUND) == 0
    assert "would replay 1 failure record" in ok(stack.env, "failed", "replay", "--dry-run")  # asks nothing
    assert "replayed 1 failure record" in ok(stack.env, "failed", "replay", "-y")
    assert broker.depth(FAILED) == 0 and broker.depth(INBOUND) == 1


def test_a_replay_or_a_publish_stopped_midway_exits_3(stack: Stack, broker: Broker, tmp_path: Path,
                                                      failure_records: FailureRecords) -> None:
    # An inbound queue that takes two messages and refuses the rest.
    small = "small-inbound"
    broker.channel.queue_declare(small, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    env = {**stack.env, "INBOUND_QUEUE": small}
    for i in range(5):
        failure_records.publish(record(f"u-{i}", "legacy"), message_id=f"m-{i}")

    result = cli(env, "failed", "replay", "--yes", "-o", "json")
    print(f"\nreplay into a queue that takes 2 of 5: exit {result.returncode}; stderr {result.stderr.strip()!r}")
    assert result.returncode == 3 and "stopped after 2" in result.stderr
    doc = json.loads(result.stdout)
    assert (doc["count"], doc["complete"], [r["message_id"] for r in doc["records"]]) == (2, False, ["m-0", "m-1"])
    assert broker.depth(small) == 2 and failed_ids(env) == ["m-2", "m-3", "m-4"]
    # The index followed: the two replayed records' entries are gone, the refused ones are queued again.
    assert failure_records.states() == {"m-2": "queued", "m-3": "queued", "m-4": "queued"}
    assert failed_ids(env, "--from-queue") == ["m-2", "m-3", "m-4"]

    # Nothing moved at all: a failure, not a partial success.
    result = cli(env, "failed", "replay", "--yes")
    assert result.returncode == 1 and "stopped after 0" in result.stderr
    assert failed_ids(env) == ["m-2", "m-3", "m-4"]

    broker.drain(small)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(good(f"p-{i}")) for i in range(4)) + "\n")
    result = cli(env, "publish", str(rows))
    print(f"publish of 4 into a queue that takes 2: exit {result.returncode}; stderr {result.stderr.strip()!r}")
    assert result.returncode == 3 and "2 of 4 rows were published (through line 2)" in result.stderr
    assert broker.depth(small) == 2
    assert cli(env, "publish", str(rows)).returncode == 1  # full from the first row: nothing published


# ---- ids: copies of one record are one record -------------------------------------------------


def test_copies_of_one_record_are_listed_once_and_replayed_once(stack: Stack, broker: Broker,
        failure_records: FailureRecords) -> None:
    env = stack.env  # no service runs: what a replay publishes stays on the inbound queue
    copy = record("u-5", "legacy", reason="rejected by the legacy system")
    for mid, body in [("m-5", copy), ("m-6", record("u-6", "legacy")), ("m-5", copy), ("m-7", record("u-7", "submit"))]:
        failure_records.publish(body, message_id=mid)
    # The index holds one entry per id; the queue itself counts the copies.
    assert failed_ids(env) == ["m-5", "m-6", "m-7"]
    listed = json.loads(ok(env, "failed", "list", "-o", "json", "--from-queue"))
    assert [(r["id"], r["copies"]) for r in listed] == [("m-5", 2), ("m-6", 1), ("m-7", 1)]
    assert "m-5 (x2)" in ok(env, "failed", "list", "--from-queue")
    assert json.loads(ok(env, "failed", "show", "m-5", "--from-queue"))["copies"] == 2

    done = json.loads(ok(env, "failed", "replay", "--id", "m-5", "--yes", "-o", "json"))
    assert (done["count"], [r["id"] for r in done["records"]], done["left"]) == (1, ["m-5"], 2)
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-5"]  # once, for both copies
    assert failed_ids(env) == ["m-6", "m-7"] and failed_ids(env, "--from-queue") == ["m-6", "m-7"]
    print("two copies of m-5: listed once, replayed once, both removed")


# ---- discard: written first, then removed ----------------------------------------------------


def test_discard_writes_each_record_to_its_export_before_removing_it(stack: Stack, broker: Broker, tmp_path: Path,
                                                                      failure_records: FailureRecords) -> None:
    env = stack.env
    month = 40 * 86400
    bodies = {"m-0": record(None, "validation", original="not json {", age_s=month),
              "m-1": record(None, "validation", original="{also not", age_s=60),
              "m-2": record("u-2", "legacy", age_s=month),
              "m-3": record(None, "validation", original=["an", "array"], age_s=month)}
    for mid, body in [*bodies.items(), ("m-0", bodies["m-0"])]:  # m-0 twice: a crash window's copy
        failure_records.publish(body, message_id=mid)
    chosen = ("failed", "discard", "--stage", "validation", "--older-than", "30d")

    refused = cli(env, *chosen, "--yes")
    assert refused.returncode == 2 and "give --export FILE" in refused.stderr
    no_terminal = cli(env, *chosen, "--export", str(tmp_path / "x.jsonl"))
    assert no_terminal.returncode == 2 and "no terminal to ask on" in no_terminal.stderr
    dry = json.loads(ok(env, *chosen, "--dry-run", "-o", "json"))
    assert (dry["count"], [r["id"] for r in dry["records"]]) == (2, ["m-0", "m-3"])
    unwritable = cli(env, *chosen, "--export", str(tmp_path / "no-such-dir" / "x.jsonl"), "--yes")
    assert unwritable.returncode == 1 and "nothing was discarded" in unwritable.stderr
    listed = json.loads(ok(env, "failed", "list", "-o", "json", "--from-queue"))  # all there, in order
    assert [(r["id"], r["copies"]) for r in listed] == [("m-0", 2), ("m-1", 1), ("m-2", 1), ("m-3", 1)]
    assert failure_records.states() == dict.fromkeys(bodies, "queued")

    export = tmp_path / "discarded.jsonl"
    done = json.loads(ok(env, *chosen, "--export", str(export), "--yes", "-o", "json"))
    assert (done["count"], done["left"], done["export"]) == (2, 2, str(export))
    kept = [json.loads(line) for line in export.read_text().splitlines()]
    assert [k["id"] for k in kept] == ["m-0", "m-3"]  # one line per record, its copies included
    assert [k["body"].encode() for k in kept] == [bodies["m-0"], bodies["m-3"]]
    assert all(k["queue"] == FAILED and k["properties"]["message_id"] == k["id"] for k in kept)
    assert failed_ids(env) == ["m-1", "m-2"] and failed_ids(env, "--from-queue") == ["m-1", "m-2"]
    # Run again: nothing left to take, and the file is appended to, never rewritten.
    assert "discarded 0 failure records" in ok(env, *chosen, "--export", str(export), "--yes")
    assert len(export.read_text().splitlines()) == 2
    print(f"discard: 2 records (3 messages) written to {export.name}, then removed; 2 left in order")


def test_discard_asks_on_a_terminal_and_removes_nothing_on_no(stack: Stack, broker: Broker, tmp_path: Path,
                                                              failure_records: FailureRecords) -> None:
    env = stack.env
    for i in range(4):
        failure_records.publish(record(None, ("validation", "legacy")[i % 2], original=f"bad {i}"), message_id=f"m-{i}")
    export = tmp_path / "kept.jsonl"
    earlier = '{"id": "from an earlier discard"}\n'
    export.write_text(earlier)
    discard = ("failed", "discard", "--stage", "validation", "--export", str(export))

    code, shown, stdout = on_a_terminal(env, "n\n", *discard)
    print(f"\nterminal, answered n: exit {code}; it showed {shown!r}")
    assert f"discard 2 failure records from {FAILED} for good (kept in {export})? [y/N] " in shown
    assert code == 1 and "nothing was discarded (the answer was not yes)" in shown and stdout == ""
    assert export.read_text() == earlier
    assert failed_ids(env, "--from-queue") == ["m-0", "m-1", "m-2", "m-3"]
    assert failure_records.states() == dict.fromkeys(["m-0", "m-1", "m-2", "m-3"], "queued")

    code, shown, stdout = on_a_terminal(env, "y\n", *discard)
    print(f"terminal, answered y: exit {code}; it showed {shown!r}; stdout {stdout!r}")
    assert code == 0 and "discard 2 failure records" in shown
    assert f"discarded 2 failure records from {FAILED}; written to {export}; 2 left" in stdout
    lines = export.read_text().splitlines(keepends=True)
    assert lines[0] == earlier and [json.loads(line)["id"] for line in lines[1:]] == ["m-0", "m-2"]
    assert failed_ids(env, "--from-queue") == ["m-1", "m-3"]
    assert failure_records.states() == {"m-1": "queued", "m-3": "queued"}


def file_size_limit(limit: int) -> Any:
    """For a child: writes past `limit` bytes fail with EFBIG, as a full disk fails them with
    ENOSPC (SIGXFSZ ignored, or it would kill the child instead)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_discard_whose_export_cannot_be_written_removes_nothing(stack: Stack, broker: Broker, tmp_path: Path,
                                                                  failure_records: FailureRecords) -> None:
    env = stack.env
    ids = [f"m-{i}" for i in range(6)]
    for i, mid in enumerate(ids):
        failure_records.publish(record(None, ("validation", "legacy")[i % 2], original=f"bad {i}"), message_id=mid)
    chosen, others = ids[0::2], ids[1::2]

    # /dev/full opens, and takes no sync: the check made before the queue is touched refuses it.
    full = cli(env, "failed", "discard", "--stage", "validation", "--export", "/dev/full", "--yes")
    print(f"\n--export /dev/full: exit {full.returncode}, {full.stderr.strip()!r}")
    assert full.returncode == 1 and full.stderr.count("\n") == 1
    assert "cannot write /dev/full" in full.stderr and "nothing was discarded" in full.stderr
    assert failed_ids(env, "--from-queue") == ids

    # A file that takes the check (nothing written) and then fails the write of the records, after
    # the take: the held records go round, behind the others (cycle.py), nothing is removed, and
    # the file is left as it was, so that the next run's lines do not follow a torn one.
    export = tmp_path / "kept.jsonl"
    result = subprocess.run([str(BIN / "registrations"), "failed", "discard", "--stage", "validation", "--export",
                             str(export), "--yes"], env=cli_env(env), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, preexec_fn=file_size_limit(100))
    print(f"export write failing after the take: exit {result.returncode}, {result.stderr.strip()!r}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot write {export} ({os.strerror(errno.EFBIG)}); nothing was discarded" in result.stderr
    assert result.stdout == ""
    assert export.read_bytes() == b""
    assert failure_records.states() == dict.fromkeys(ids, "queued")
    after = broker.drain(FAILED)
    assert [p.message_id for p, _ in after] == others + chosen
    assert {int((p.headers or {}).get("x-delivery-count", 0)) for p, _ in after} == {0}  # none returned


# ---- replay at a rate, with a progress bar ------------------------------------------------------


def test_a_replay_keeps_to_its_rate_and_shows_its_progress(stack: Stack, broker: Broker,
        failure_records: FailureRecords) -> None:
    env = stack.env  # no service runs: the replayed messages stay on the inbound queue
    ids = [f"r-{i}" for i in range(30)]
    for mid in ids:
        failure_records.publish(record(mid, "legacy"), message_id=mid)
    rate = 20.0
    began = time.monotonic()
    code, shown, _ = on_a_terminal(env, "y\n", "failed", "replay", "--rate", str(rate))
    took = time.monotonic() - began
    assert code == 0, shown
    # The bars, drawn in place on the terminal, reached the end: the take's (each record taken,
    # out of the count the first get reported), then the sends'.
    assert f"going round [{'#' * 30}] 100% {len(ids)}/{len(ids)}" in shown
    assert f"replaying [{'#' * 30}] 100% {len(ids)}/{len(ids)}" in shown
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ids  # each once, in order
    # Thirty sends at twenty a second cannot take less than 29/20 s, whatever the machine.
    assert took >= (len(ids) - 1) / rate
    print(f"replayed {len(ids)} records at --rate {rate:.0f}: {took:.2f} s, {len(ids) / took:.1f} a second")
