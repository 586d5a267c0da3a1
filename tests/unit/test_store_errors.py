"""How MongoDB's errors reach the executor: outages are retried, refusals for good are named,
a write concern not met is no success. With stand-ins for the collection, no server."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pymongo import UpdateOne
from pymongo.errors import AutoReconnect, BulkWriteError, OperationFailure, WriteConcernError

from regbridge.batching import Batcher
from regbridge.durable import Durable, HandBack, retryable
from regbridge.lifecycle import State
from regbridge.plans import UserStatus
from regbridge.store import MongoStore, WriteRefused


class Collection:
    """Answers every bulk write with what it is told to raise."""

    full_name = "registry.users"

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.calls = 0

    def bulk_write(self, ops: list[UpdateOne], ordered: bool) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error

    def update_one(self, *_: Any) -> Any:
        raise AssertionError("not reached")


def _bulk_error(details: dict[str, Any]) -> BulkWriteError:
    return BulkWriteError({"writeErrors": [], "writeConcernErrors": [], **details})


def test_a_write_concern_not_met_is_not_a_success() -> None:
    concern = {"writeConcernErrors": [{"code": 64, "errmsg": "waiting for replication timed out"}]}
    collection: Any = Collection(_bulk_error(concern))
    future = Batcher().update_later(collection, UpdateOne({"_id": "u"}, {"$set": {"a": 1}}))
    with pytest.raises(WriteConcernError) as raised:
        future.result(timeout=5)
    assert retryable(raised.value)


@pytest.mark.parametrize(("code", "refused"), [(121, True), (10334, True), (17419, True), (13, False), (8000, False)])
def test_only_a_refusal_of_the_document_itself_is_for_good(code: int, refused: bool) -> None:
    errors = {"writeErrors": [{"index": 0, "code": code, "errmsg": "Document failed validation"}]}
    client: Any = {"registry": {"users": Collection(_bulk_error(errors)), "users.attempts": Collection(None),
                             "users.failures": Collection(None), "users.counters": Collection(None)}}

    class Client(dict[str, Any]):
        pass

    store = MongoStore(Client(client), "registry", "users", "users.attempts", batcher=Batcher())  # type: ignore[arg-type]
    write = UserStatus("u-1", State.REGISTERED, "R1")
    if refused:
        with pytest.raises(WriteRefused) as raised:
            store.apply(write)
        assert f"code {code}" in raised.value.reason and "Document failed validation" in raised.value.reason
    else:
        with pytest.raises(OperationFailure) as other:
            store.apply(write)
        assert not isinstance(other.value, WriteRefused)


@pytest.mark.parametrize(("error", "expected"), [
    (AutoReconnect("connection refused"), True),
    (OperationFailure("not primary", 10107), True),
    (OperationFailure("interrupted at shutdown", 11600), True),
    (OperationFailure("retry me", 1, {"errorLabels": ["RetryableWriteError"]}), True),
    (OperationFailure("not authorized", 13), False),
    (OperationFailure("Document failed validation", 121), False),
    (ValueError("a bug"), False),
])
def test_what_counts_as_an_outage(error: Exception, expected: bool) -> None:
    assert retryable(error) is expected


def test_durable_waits_out_an_outage_and_hands_back_when_stopping() -> None:
    stopping = threading.Event()
    answers: list[Exception | str] = [AutoReconnect("down"), AutoReconnect("down"), "ok"]
    retries: list[int] = []

    def operation() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert Durable(stopping, on_retry=lambda: retries.append(1), max_delay_s=0.0)(operation) == "ok"
    assert len(retries) == 2
    stopping.set()
    with pytest.raises(HandBack):
        Durable(stopping, max_delay_s=0.0)(lambda: (_ for _ in ()).throw(AutoReconnect("down")))
