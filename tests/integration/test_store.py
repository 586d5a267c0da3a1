"""The status rule (`lifecycle.may_record`) as MongoStore's update filters carry it out, on a real
Mongo-wire server: every starting state against every write."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from harness import Mongo
from pymongo import MongoClient

from regbridge.failure_index import COUNTER_ID, INDEXES, LEAVING, PUBLISHING, QUEUED, SEQ_BLOCK, IndexEntry
from regbridge.lifecycle import State, may_record
from regbridge.messages import FailureError
from regbridge.plans import AttemptAccepted, AttemptFailed, RecordIndexed, UserStatus
from regbridge.store import Attempt, MongoStore, SeqBlocks, connect

pytestmark = pytest.mark.integration

STARTS: list[tuple[str, str | None] | None] = [
    None, ("submitted", "R1"), ("registered", "R1"), ("failed", "R1"), ("failed", None)]
WRITES = ["submitted", "registered", "failed"]


@pytest.fixture
def store(mongo: Mongo, database: str) -> Any:
    client = connect(mongo.uri, pool_size=2)
    yield MongoStore(client, database, "users", "users.attempts"), client[database]["users"]
    client.drop_database(database)
    client.close()


@pytest.mark.parametrize(("start", "write", "request_id"),
                         list(itertools.product(STARTS, WRITES, ["R1", "R2"])))
def test_writes_follow_the_status_rule(store: Any, start: tuple[str, str | None] | None, write: str,
                                       request_id: str) -> None:
    mongo_store, users = store
    if start is not None:
        users.insert_one({"_id": "u", "registration_status": start[0], "legacy_request_id": start[1]})
    before = users.find_one({"_id": "u"})
    allowed = may_record(start[0] if start else None, start[1] if start else None, request_id)

    error = FailureError("legacy", "no") if write == "failed" else None
    written = mongo_store.apply(UserStatus("u", State(write), request_id, error))

    after = users.find_one({"_id": "u"})
    assert written == allowed
    if allowed:
        assert after["registration_status"] == write
        assert after["legacy_request_id"] == request_id
        assert ("registration_error" in after) == (write == "failed")
    else:
        assert after == before


def test_attempts_are_recorded_and_replaced(store: Any) -> None:
    mongo_store, _ = store
    assert mongo_store.attempt("k") is None
    assert mongo_store.apply(AttemptAccepted("k", "u", "R1"))
    assert mongo_store.attempt("k").request_id == "R1" and not mongo_store.attempt("k").failed
    mongo_store.apply(AttemptFailed("k", "u", "R1", FailureError("legacy", "no", 200)))
    assert mongo_store.attempt("k").failed
    assert mongo_store.attempt("k").error == FailureError("legacy", "no", 200)
    mongo_store.reset_attempt("k", "p2")  # a new publish of the same message clears it before its POST
    assert mongo_store.attempt("k") == Attempt(None, False, publish="p2")
    assert mongo_store.apply(AttemptAccepted("k", "u", "R2"))
    assert mongo_store.attempt("k").request_id == "R2" and not mongo_store.attempt("k").failed


def test_operator_shaped_ids_are_plain_values(store: Any, mongo: Mongo, database: str) -> None:
    mongo_store, users = store
    users.insert_many([{"_id": "a", "registration_status": "registered"}, {"_id": "b"}])
    # A user id is always a string by the time it reaches the store; '$gt' is just text here.
    assert mongo_store.user("$gt").status is None
    assert mongo_store.apply(UserStatus("$gt", State.SUBMITTED, "R9"))
    client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
    assert client[database]["users"].find_one({"_id": "a"})["registration_status"] == "registered"
    client.close()


def test_concurrent_operations_share_round_trips_and_keep_their_own_answers(store: Any) -> None:
    """Many threads at once: each gets its own answer out of the shared batches."""
    from concurrent.futures import ThreadPoolExecutor

    mongo_store, users = store
    users.insert_many([{"_id": f"reg-{i}", "registration_status": "registered", "legacy_request_id": "R0"}
                       for i in range(0, 200, 2)])  # the even ones may not be written again

    def one(i: int) -> tuple[bool, str | None]:
        written = mongo_store.apply(UserStatus(f"reg-{i}", State.SUBMITTED, f"R{i}"))
        return written, mongo_store.user(f"reg-{i}").status

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(200)))
    for i, (written, status) in enumerate(answers):
        if i % 2 == 0:
            assert (written, status) == (False, "registered")
        else:
            assert (written, status) == (True, "submitted")
    assert users.count_documents({"registration_status": "submitted"}) == 100


def test_record_accepted_writes_the_attempt_and_the_user_together(store: Any) -> None:
    mongo_store, users = store
    assert mongo_store.apply(AttemptAccepted("k1", "new", "R1"))
    assert mongo_store.attempt("k1").request_id == "R1"
    assert users.find_one({"_id": "new"})["registration_status"] == "submitted"
    users.insert_one({"_id": "done", "registration_status": "registered", "legacy_request_id": "R0"})
    assert not mongo_store.apply(AttemptAccepted("k2", "done", "R2"))
    assert mongo_store.attempt("k2").request_id == "R2"  # the attempt is on record all the same
    assert users.find_one({"_id": "done"})["legacy_request_id"] == "R0"


# ---- the failure queue's index -------------------------------------------------------------------


def _entry(record_id: str, reason: str = "no") -> IndexEntry:
    return IndexEntry(record_id, "legacy", reason, "u-1", "R1", datetime(2026, 12, 1, tzinfo=UTC), '{"x":1}')


def test_an_entry_keeps_its_place_when_its_record_is_published_again(store: Any) -> None:
    mongo_store, users = store
    failures = users.database["users.failures"]
    assert mongo_store.apply(RecordIndexed("m-1", PUBLISHING, "t1", _entry("m-1")))
    assert mongo_store.apply(RecordIndexed("m-2", PUBLISHING, "t2", _entry("m-2")))
    first = failures.find_one({"_id": "m-1"})
    assert first["state"] == PUBLISHING and first["body"] == '{"x":1}' and first["user_id"] == "u-1"
    assert first["failed_at"] == datetime(2026, 12, 1, tzinfo=UTC) and first["token"] == "t1"
    assert mongo_store.apply(RecordIndexed("m-1", PUBLISHING, "t3", _entry("m-1", "again")))  # a redelivery's
    again = failures.find_one({"_id": "m-1"})
    assert again["reason"] == "again" and again["token"] == "t3"
    assert again["seq"] == first["seq"] < failures.find_one({"_id": "m-2"})["seq"]
    assert {i["name"] for i in failures.list_indexes()} >= {name for name, _ in INDEXES}


def test_queued_moves_only_the_entry_its_own_publish_wrote(store: Any) -> None:
    mongo_store, users = store
    failures = users.database["users.failures"]
    mongo_store.apply(RecordIndexed("m-1", PUBLISHING, "t1", _entry("m-1")))
    mongo_store.apply(RecordIndexed("m-1", QUEUED, "t1"))
    assert failures.find_one({"_id": "m-1"})["state"] == QUEUED
    mongo_store.apply(RecordIndexed("m-2", PUBLISHING, "t2", _entry("m-2")))
    failures.update_one({"_id": "m-2"}, {"$set": {"state": LEAVING, "token": "cli"}})  # a reader took it meanwhile
    mongo_store.apply(RecordIndexed("m-2", QUEUED, "t2"))
    assert failures.find_one({"_id": "m-2"})["state"] == LEAVING
    failures.delete_one({"_id": "m-2"})  # ... and removed it: nothing brings it back
    mongo_store.apply(RecordIndexed("m-2", QUEUED, "t2"))
    assert failures.find_one({"_id": "m-2"}) is None


def test_an_index_that_exists_under_another_name_does_not_stop_entries(store: Any) -> None:
    mongo_store, users = store
    failures = users.database["users.failures"]
    failures.create_index([("seq", 1)], name="someone_elses")
    assert mongo_store.apply(RecordIndexed("m-1", PUBLISHING, "t1", _entry("m-1")))
    assert failures.find_one({"_id": "m-1"})["state"] == PUBLISHING


def test_seqs_come_in_blocks_from_one_counter_shared_by_processes(mongo: Mongo, database: str) -> None:
    client = connect(mongo.uri, pool_size=2)
    try:
        counters = client[database]["users.counters"]
        a, b = SeqBlocks(counters), SeqBlocks(counters)
        taken = [a.take(), a.take(), b.take(), a.take(), b.take()]
        assert len(set(taken)) == len(taken)
        assert taken[:2] == [0, 1] and taken[2] == SEQ_BLOCK and taken[3] == 2
        assert counters.find_one({"_id": COUNTER_ID})["next"] == 2 * SEQ_BLOCK
    finally:
        client.drop_database(database)
        client.close()
