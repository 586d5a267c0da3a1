"""Two users' messages that reuse one inbound message_id fail as two records: each has its own id
(its attempt key, in the `x-record-id` header), so the failure index lists both, each user's
status shows their own, a replay sends both and a discard exports both. The AMQP message_id of
both stays the inbound one (the contract). Copies of one record (same id, same body) are still
one record: listed once, replayed once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import Broker, wait_until
from harness import cli_ok as ok
from harness import run_cli as cli
from outcomes import FAILED, INBOUND, good

from regbridge.failure_index import QUEUED
from regbridge.plans import RECORD_ID_HEADER

pytestmark = pytest.mark.integration

USERS = ("u-A", "u-B")


def _fail_both(stack: Stack, broker: Broker, failure_records: FailureRecords) -> dict[str, str]:
    """Both users' registrations, one inbound message_id, refused by the legacy system through
    the real services, which are then stopped: each user's record id, by user."""
    stack.start("submitter")
    stack.start("poller")
    stamp = int(time.time())
    for user in USERS:
        broker.publish(INBOUND, good(user, name="FAIL Maria"), message_id="dup", timestamp=stamp)
    wait_until(lambda: sorted(failure_records.states().values()) == [QUEUED, QUEUED] and broker.depth(FAILED) == 2,
               timeout=90, what="two failure records, indexed")
    stack.stop_all()
    return {user: f"{user}|mid:dup|ts:{stamp}" for user in USERS}


def _listed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(ok(env, "failed", "list", "-o", "json", *args))
    return listed


def test_two_users_records_under_one_message_id_are_listed_shown_and_replayed_each(
        stack: Stack, broker: Broker, users: Any, failure_records: FailureRecords) -> None:
    env = stack.env
    ids = _fail_both(stack, broker, failure_records)
    assert set(failure_records.states()) == set(ids.values())

    listed = _listed(env)
    assert sorted((r["id"], r["record"]["user_id"]) for r in listed) == sorted((i, u) for u, i in ids.items())
    table = ok(env, "failed", "list", "--no-headers").splitlines()
    assert sum(1 for line in table if line.startswith(("u-A|mid:dup", "u-B|mid:dup"))) == 2, table
    from_queue = _listed(env, "--from-queue")
    assert sorted(r["id"] for r in from_queue) == sorted(ids.values())
    # The contract: the inbound message_id is kept on the derived message; the id is a header.
    assert {r["message_id"] for r in from_queue} == {"dup"} and {r["copies"] for r in from_queue} == {1}
    for user in USERS:
        shown = json.loads(ok(env, "failed", "show", ids[user], "--from-queue", "-o", "json"))
        assert shown["properties"]["headers"][RECORD_ID_HEADER] == ids[user]
        status = json.loads(cli(env, "status", user, "--json").stdout)
        assert [(f["id"], f["record"]["user_id"]) for f in status["failures"]] == [(ids[user], user)]

    # A copy of u-A's record, byte for byte, as a crash window leaves it: still one record.
    taken = {p.headers[RECORD_ID_HEADER]: (p, b) for p, b in broker.drain(FAILED)}
    for record_id in (ids["u-A"], ids["u-A"], ids["u-B"]):
        props, body = taken[record_id]
        failure_records.publish(body, message_id=None, properties=props, indexed=False)
    copies = {r["id"]: r["copies"] for r in _listed(env, "--from-queue")}
    assert copies == {ids["u-A"]: 2, ids["u-B"]: 1}
    assert len(_listed(env)) == 2

    replayed = json.loads(ok(env, "failed", "replay", "--id", ids["u-A"], "--yes", "-o", "json"))
    assert [(r["id"], r["user_id"]) for r in replayed["records"]] == [(ids["u-A"], "u-A")] and replayed["left"] == 1
    replayed = json.loads(ok(env, "failed", "replay", "--stage", "legacy", "--yes", "-o", "json"))
    assert [(r["id"], r["user_id"]) for r in replayed["records"]] == [(ids["u-B"], "u-B")] and replayed["left"] == 0
    sent = broker.drain(INBOUND)
    assert sorted((json.loads(b)["user_id"], p.message_id) for p, b in sent) == [("u-A", "dup"), ("u-B", "dup")]
    assert broker.depth(FAILED) == 0 and failure_records.states() == {}
    print(f"\ntwo users under message_id 'dup': ids {sorted(ids.values())}; each replayed once")


def test_two_users_records_under_one_message_id_are_discarded_into_two_lines(
        stack: Stack, broker: Broker, users: Any, failure_records: FailureRecords, tmp_path: Path) -> None:
    env = stack.env
    ids = _fail_both(stack, broker, failure_records)
    export = tmp_path / "discarded.jsonl"
    done = json.loads(ok(env, "failed", "discard", "--stage", "legacy", "--export", str(export), "--yes",
                         "-o", "json"))
    assert sorted(r["id"] for r in done["records"]) == sorted(ids.values()) and done["left"] == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert sorted((line["id"], json.loads(line["body"])["user_id"]) for line in lines) == \
        sorted((i, u) for u, i in ids.items())
    assert {line["properties"]["message_id"] for line in lines} == {"dup"}
    assert broker.depth(FAILED) == 0 and failure_records.states() == {}


def test_records_an_earlier_release_wrote_under_one_message_id_are_each_their_own(
        stack: Stack, broker: Broker, failure_records: FailureRecords, tmp_path: Path) -> None:
    """No header: the id is the message_id, which both share. Only byte-identical bodies are
    copies: replay by that id sends both users' registrations, and a discard exports both."""
    env = stack.env
    bodies = {user: json.dumps({"original": good(user), "user_id": user, "legacy_request_id": None,
                                "error": {"stage": "legacy", "reason": f"refused {user}", "http_status": None},
                                "attempts": 1, "failed_at": "2026-12-01T10:00:00+00:00"}).encode()
              for user in USERS}
    for body in (bodies["u-A"], bodies["u-B"], bodies["u-A"]):  # the third: a copy of the first
        failure_records.publish(body, message_id="dup")
    listed = _listed(env, "--from-queue")
    assert [(r["id"], r["record"]["user_id"], r["copies"]) for r in listed] == [("dup", "u-A", 2), ("dup", "u-B", 1)]
    reconciled = json.loads(ok(env, "failed", "reconcile", "--dry-run", "-o", "json"))
    assert reconciled["shared_by_distinct"] == ["dup"]

    export = tmp_path / "kept.jsonl"
    discarded = json.loads(ok(env, "failed", "discard", "--id", "dup", "--dry-run", "-o", "json"))
    assert sorted(r["user_id"] for r in discarded["records"]) == ["u-A", "u-B"]
    replayed = json.loads(ok(env, "failed", "replay", "--id", "dup", "--yes", "-o", "json"))
    assert sorted(r["user_id"] for r in replayed["records"]) == ["u-A", "u-B"] and replayed["left"] == 0
    assert sorted(json.loads(b)["user_id"] for _, b in broker.drain(INBOUND)) == ["u-A", "u-B"]
    assert broker.depth(FAILED) == 0

    for body in (bodies["u-A"], bodies["u-B"], bodies["u-A"]):
        failure_records.publish(body, message_id="dup")
    ok(env, "failed", "discard", "--id", "dup", "--export", str(export), "--yes")
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert sorted(json.loads(line["body"])["user_id"] for line in lines) == ["u-A", "u-B"]
    assert broker.depth(FAILED) == 0


def test_invalid_messages_that_share_a_body_are_each_their_own_record(
        stack: Stack, broker: Broker, users: Any, failure_records: FailureRecords, tmp_path: Path) -> None:
    # Malformed bodies repeat (one publisher's broken encoder): no user can be read, so no
    # attempt key; each message's own id and publish still name its record, and none is taken for
    # a copy of another, which a discard or a replay would drop.
    env = stack.env
    stack.start("submitter")
    for n, message_id in enumerate(("bad-1", "bad-2", None, None)):
        broker.publish(INBOUND, b"{not json", message_id=message_id, timestamp=1_700_000_000 + n)
    wait_until(lambda: len(failure_records.states()) == 4 and broker.depth(FAILED) == 4
               and set(failure_records.states().values()) == {QUEUED}, timeout=60, what="four indexed records")
    stack.stop_all()
    listed = _listed(env)
    assert len({r["id"] for r in listed}) == 4 and {r["record"]["error"]["stage"] for r in listed} == {"validation"}
    assert {r["copies"] for r in _listed(env, "--from-queue")} == {1}
    export = tmp_path / "invalid.jsonl"
    out = json.loads(ok(env, "failed", "discard", "--stage", "validation", "--export", str(export), "--yes",
                        "-o", "json"))
    assert len(out["records"]) == 4 and broker.depth(FAILED) == 0
    assert len(export.read_text().splitlines()) == 4
