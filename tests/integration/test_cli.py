"""The operator command `registrations`, run as its console script against the real broker, the
Mongo-wire server and legacy-sim, with the services' own environment (the test's vhost and database)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from harness import BIN, Broker, LegacySim, wait_until
from outcomes import FAILED, INBOUND, PENDING, Outcomes, good

from regbridge.messages import FailureError, FailureRecord
from regbridge.topology import wait_queue

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "registrations"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(env: dict[str, str], *args: str) -> str:
    result = cli(env, *args)
    assert result.returncode == 0, f"registrations {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


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


def failed_ids(env: dict[str, str]) -> list[str | None]:
    return [r["message_id"] for r in json.loads(ok(env, "failed", "list", "--json"))]


# ---- browsing the failure queue: never a loss, never a reorder --------------------------------
# (Under a delivery limit, killed midway, with other clients at once: test_delivery_limits.py.)


def test_failed_list_keeps_every_record_in_its_place(stack: Stack, broker: Broker) -> None:
    env = stack.env
    published = [f"m-{i}" for i in range(25)]
    for i, mid in enumerate(published):
        stage = ("legacy", "submit", "validation")[i % 3]
        broker.publish(FAILED, record(f"u-{i}" if stage != "validation" else None, stage,
                                      original=None if stage != "validation" else "not json {",
                                      reason=f"reason {i}\nwith a second line", age_s=7200 if i < 20 else 60),
                       message_id=mid)

    # Listed twice, in full, then in part: the same records in the same order each time.
    assert failed_ids(env) == published
    assert failed_ids(env) == published
    assert [r["message_id"] for r in json.loads(ok(env, "failed", "list", "--json", "--limit", "3"))] == \
        published[:3]
    assert failed_ids(env) == published

    table = ok(env, "failed", "list").splitlines()
    assert table[0].split() == ["#", "STAGE", "USER_ID", "AGE", "REASON"]
    assert table[1].split()[:4] == ["1", "legacy", "u-0", "2h00m"]
    assert table[1].endswith("reason 0 with a second line")
    assert table[3].split()[:3] == ["3", "validation", "-"]
    assert table[-1] == f"25 failure records on {FAILED}"

    legacy_only = json.loads(ok(env, "failed", "list", "--json", "--stage", "legacy"))
    assert [r["message_id"] for r in legacy_only] == published[0::3]
    assert [r["position"] for r in legacy_only] == list(range(1, 26, 3))
    assert [r["message_id"] for r in json.loads(ok(env, "failed", "list", "--json", "--user-id", "u-4"))] == ["m-4"]
    # --since takes a duration or a time.
    assert [r["message_id"] for r in json.loads(ok(env, "failed", "list", "--json", "--since", "10m"))] == \
        published[20:]
    cutoff = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "5 matching; 25 failure records" in ok(env, "failed", "list", "--since", cutoff)
    assert "2 shown of 8 matching; 25 failure records" in ok(env, "failed", "list", "--stage", "submit", "--limit", "2")

    shown = json.loads(ok(env, "failed", "show", "5"))
    assert shown["position"] == 5 and shown["queue"] == FAILED
    assert shown["properties"]["message_id"] == "m-4" and shown["properties"]["delivery_mode"] == 2
    assert shown["record"]["user_id"] == "u-4" and shown["record"]["error"]["stage"] == "submit"
    missing = cli(env, "failed", "show", "26")
    assert missing.returncode == 1 and "no record #26" in missing.stderr and "Traceback" not in missing.stderr

    # After all that browsing, consumed for real: every record, once, in the order published.
    assert [mid for mid, _ in drain_failed(broker)] == published
    assert "no failure records" in ok(env, "failed", "list")


def test_failed_list_shows_the_records_the_services_wrote(stack: Stack, broker: Broker, users: Any) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, b"this is not json", message_id="bad-json")
    broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="m-bad-cpf")
    broker.publish(INBOUND, good("refused", name="FAIL Maria"), message_id="m-refused")
    wait_until(lambda: broker.depth(FAILED) == 3, timeout=30, what="three failure records")

    listed = json.loads(ok(stack.env, "failed", "list", "--json"))
    assert sorted(r["record"]["error"]["stage"] for r in listed) == ["legacy", "submit", "validation"]
    by_stage = {r["record"]["error"]["stage"]: r for r in listed}
    assert by_stage["validation"]["message_id"] == "bad-json"
    assert by_stage["legacy"]["record"]["user_id"] == "refused"
    text = ok(stack.env, "failed", "list", "--stage", "submit")
    assert "bad-cpf" in text and "refused" not in text
    assert broker.depth(FAILED) == 3


# ---- replay --------------------------------------------------------------------------------------


def test_replay_after_the_cause_is_fixed_registers_and_empties_the_failure_queue(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim) -> None:
    stack.start("submitter")
    stack.start("poller")
    broker.publish(INBOUND, good("replay-me", name="FAIL at first"), message_id="mid-replay")
    broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="mid-bad-cpf")  # fails for good
    wait_until(lambda: broker.depth(FAILED) == 2, timeout=30, what="two failure records")
    failed_rid = users.find_one({"_id": "replay-me"})["legacy_request_id"]

    status = ok(stack.env, "status", "replay-me")
    assert "registration_status      failed" in status
    assert "registration_error       legacy: rejected by the legacy system" in status
    assert "1 failure record on registrations.failed" in status

    legacy.configure(fail_prefix="")
    moved = ok(stack.env, "failed", "replay", "--stage", "legacy")
    assert "replayed #" in moved and "user_id=replay-me" in moved and "message_id=mid-replay" in moved
    assert "replayed 1 failure record to registrations; 1 left on registrations.failed" in moved

    wait_until(lambda: (users.find_one({"_id": "replay-me"}) or {}).get("registration_status") == "registered",
               timeout=30, what="the replayed registration to be registered")
    wait_until(lambda: broker.in_pipeline(exclude=FAILED) == 0, timeout=30, what="the pipeline to drain")
    doc = users.find_one({"_id": "replay-me"})
    assert doc["legacy_request_id"] != failed_rid and "registration_error" not in doc
    # A new attempt under the same message_id: submitted again, and recorded as an attempt of its
    # own (the replay's mark sets it apart from the attempt that failed).
    assert legacy.stats()["submissions_by_user"]["replay-me"] == 2
    attempts = {a["_id"]: a for a in users.database["users.attempts"].find({"user_id": "replay-me"})}
    assert len(attempts) == 2 and all(k.startswith("replay-me|mid:mid-replay") for k in attempts)
    assert {a["legacy_request_id"] for a in attempts.values()} == {failed_rid, doc["legacy_request_id"]}
    assert [a["failed"] for a in attempts.values() if a["legacy_request_id"] == failed_rid] == [True]

    # Only the record that did not match is left; nothing new failed.
    left = drain_failed(broker)
    assert [(mid, r["error"]["stage"]) for mid, r in left] == [("mid-bad-cpf", "submit")]
    status = ok(stack.env, "status", "replay-me")
    assert "registration_status      registered" in status and "no failure record on" in status


def test_replay_filters_dry_run_and_what_is_published(stack: Stack, broker: Broker) -> None:
    env = stack.env  # no service runs: replayed messages stay on the inbound queue to be looked at
    specs = [("m-0", "u-0", "legacy", None), ("m-1", "u-1", "submit", None), ("m-2", "u-2", "legacy", None),
             (None, "u-3", "legacy", None), ("m-4", None, "validation", "not json {"),
             ("m-5", None, "validation", ["an", "array"]), ("m-6", "u-0", "timeout", None)]
    for mid, uid, stage, original in specs:
        broker.publish(FAILED, record(uid, stage, original=original), message_id=mid)
    broker.publish(FAILED, b"not a failure record", message_id="m-junk")
    order = [s[0] for s in specs] + ["m-junk"]

    dry = ok(env, "failed", "replay", "--stage", "legacy", "--dry-run")
    assert dry.count("would replay #") == 3 and "nothing was moved" in dry
    assert broker.depth(INBOUND) == 0 and failed_ids(env) == order

    # --limit: the first matching record only.
    out = ok(env, "failed", "replay", "--stage", "legacy", "--limit", "1")
    assert "replayed #1 " in out and "replayed 1 failure record to" in out
    [(props, body)] = broker.drain(INBOUND)
    assert props.message_id == "m-0" and props.delivery_mode == 2 and props.timestamp
    assert props.headers["x-replayed-from"] == FAILED
    assert json.loads(body) == good("u-0")
    assert failed_ids(env) == order[1:]

    # --user-id, across stages; the rest stay in order.
    ok(env, "failed", "replay", "--user-id", "u-0")
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == ["m-6"]
    remaining = [*order[1:6], "m-junk"]
    assert failed_ids(env) == remaining

    # A record without a message_id gets a fresh one; a string original goes back as its text,
    # anything else as JSON; a record with no original is never replayed (nor removed).
    out = ok(env, "failed", "replay")
    assert "replayed 5 failure records" in out
    published = broker.drain(INBOUND)
    assert [p.message_id for p, _ in published][:2] == ["m-1", "m-2"]
    assert published[2][0].message_id not in (None, "")  # the record of u-3 had none
    assert [b for _, b in published][3:] == [b"not json {", b'["an","array"]']
    assert failed_ids(env) == ["m-junk"]


def test_replay_never_takes_a_record_that_arrived_after_it_started(stack: Stack, broker: Broker,
                                                                   users: Any) -> None:
    """A replayed message that fails again at once comes back as a new record while the replay is
    still running: it waits for the next replay (no loop), and the records left in place keep
    their place ahead of it."""
    stack.start("submitter")
    started = datetime.now(UTC) - timedelta(seconds=1)
    broker.publish(FAILED, record("stays-1", "legacy"), message_id="stays-1")
    for i in range(30):
        broker.publish(FAILED, record(None, "validation", original=f"still not json {i}"), message_id=f"v-{i}")
    broker.publish(FAILED, record("stays-2", "legacy"), message_id="stays-2")
    out = ok(stack.env, "failed", "replay", "--stage", "validation")
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
    ok(stack.env, "failed", "replay")
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


def test_status_of_users_in_every_state(stack: Stack, broker: Broker, users: Any) -> None:
    now = datetime.now(UTC)
    users.insert_one({"_id": "done", "registration_status": "registered", "legacy_request_id": "AB583C-X",
                      "registration_updated_at": now})
    broker.publish(FAILED, record("gone", "timeout", reason="still processing after 300 s"), message_id="m-gone")
    text = ok(stack.env, "status", "done")
    assert "registration_status      registered" in text and "legacy_request_id        AB583C-X" in text
    assert "registration_error       -" in text and "no failure record on" in text

    text = ok(stack.env, "status", "gone")
    assert "no document in" in text and "timeout" in text and "still processing after 300 s" in text
    as_json = json.loads(ok(stack.env, "status", "gone", "--json"))
    assert as_json["document"] is None and as_json["failures"][0]["message_id"] == "m-gone"

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
    for args in (["failed", "list"], ["stats"], ["failed", "replay"]):
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
    assert "u-list" in ok(env, "failed", "list")
    # Every node down: one line naming each node, credentials hidden.
    result = cli({**env, "RABBITMQ_URL": f"{down},{down.replace(':1/', ':2/')}"}, "failed", "list")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "127.0.0.1:1" in result.stderr and "127.0.0.1:2" in result.stderr and "s3cret" not in result.stderr
