"""The soak's outcome check (`bench/soak.py`'s `check`) against fake collections and failure logs:
a right set passes, and a wrong stage, a missing document or a stray record is reported. The
soak itself runs for half an hour; what it concludes is only as good as this check."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is scripts, not a package: imported by path, as its scripts import each other.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import soak

from regbridge.failure_index import QUEUED

REGISTERED, LEGACY, SUBMIT, VALIDATION = (soak.KINDS.index(k) for k in ("registered", "legacy", "submit", "validation"))


class Collection:
    """The part of a pymongo collection the check uses: find, with an `_id` `$in` filter or none,
    and its database by name (the failure index sits beside the users)."""

    def __init__(self, name: str, docs: list[dict[str, Any]], database: dict[str, Collection] | None = None) -> None:
        self.name = name
        self.docs = docs
        self.database = database if database is not None else {}

    def find(self, query: dict[str, Any], projection: dict[str, int] | None = None,
             batch_size: int = 0) -> list[dict[str, Any]]:
        wanted = query.get("_id", {}).get("$in")
        return [doc for doc in self.docs if wanted is None or doc["_id"] in wanted]


@dataclass
class Failures:
    """What FailureLog keeps: per message id (stage, user_id, legacy_request_id, digest)."""

    records: dict[str, list[tuple[str, str | None, str | None, str]]] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)
    record_ids: dict[str, str] = field(default_factory=dict)  # the index's key -> message id


def mid(i: int) -> str:
    return f"soak-{i:07d}"


def rid(i: int, stage: str) -> str:
    """The record's id as the services write it: the attempt key (user and message id) where a
    user could be read."""
    return mid(i) if stage == "validation" else f"{mid(i)}|mid:{mid(i)}"


def record(i: int, stage: str) -> dict[str, Any]:
    uid = None if stage == "validation" else mid(i)
    return {"message_id": mid(i), "user_id": uid, "legacy_request_id": f"R-{i}" if stage == "legacy" else None,
            "error": {"stage": stage, "reason": "no", "http_status": None}, "attempts": 1}


@dataclass
class World:
    """What a right run leaves for `kinds`: the users' documents, the records received and the
    failure index; the tests then spoil one thing."""

    kinds: bytearray
    users: list[dict[str, Any]] = field(default_factory=list)
    index: list[dict[str, Any]] = field(default_factory=list)
    failures: Failures = field(default_factory=Failures)

    def __post_init__(self) -> None:
        for i, kind in enumerate(self.kinds):
            name = soak.KINDS[kind]
            if name == "registered":
                self.users.append({"_id": mid(i), "registration_status": "registered"})
                continue
            if name != "validation":  # an invalid message names no user
                self.users.append({"_id": mid(i), "registration_status": "failed",
                                   "registration_error": {"stage": name}})
            failure = record(i, name)
            self.failures.records[mid(i)] = [(name, failure["user_id"], failure["legacy_request_id"],
                                              soak.digest(failure))]
            self.failures.record_ids[rid(i, name)] = mid(i)
            self.index.append({"_id": rid(i, name), "state": QUEUED, "stage": name, "body": json.dumps(failure)})

    def check(self) -> dict[str, Any]:
        database: dict[str, Collection] = {}
        users = Collection("users", self.users, database)
        database["users.failures"] = Collection("users.failures", self.index, database)
        return soak.check(self.kinds, self.failures, users)  # type: ignore[arg-type]


KINDS = bytearray([REGISTERED, LEGACY, SUBMIT, VALIDATION, REGISTERED, LEGACY])


def test_a_right_set_passes() -> None:
    result = World(bytearray(KINDS)).check()
    assert result["ok"], result["problems"]
    assert result["problems"] == []
    assert result["expected"] == {"registered": 2, "legacy": 2, "submit": 1, "validation": 1}
    assert result["verdict"] == "all 6 right (2 registered, 4 failed at the right stage)"


def test_a_failure_record_at_the_wrong_stage_is_reported() -> None:
    world = World(bytearray(KINDS))
    _stage, uid, request_id, digest = world.failures.records[mid(1)][0]
    world.failures.records[mid(1)] = [("submit", uid, request_id, digest)]
    result = world.check()
    assert not result["ok"]
    assert f"{mid(1)}: stage submit, expected legacy" in result["problems"]


def test_a_user_document_at_the_wrong_stage_is_reported() -> None:
    world = World(bytearray(KINDS))
    world.users[2]["registration_error"] = {"stage": "legacy"}  # soak-0000002, a `submit`
    result = world.check()
    assert not result["ok"]
    # A wrong document is not a document found right either: both are said.
    assert result["problems"] == [f"{mid(2)}: document failed (legacy), expected submit",
                                  f"{mid(2)}: no user document, expected submit"]


def test_a_missing_user_document_is_reported() -> None:
    world = World(bytearray(KINDS))
    world.users = [doc for doc in world.users if doc["_id"] != mid(4)]
    result = world.check()
    assert not result["ok"]
    assert result["problems"] == [f"{mid(4)}: no user document, expected registered"]


def test_a_missing_failure_record_is_reported() -> None:
    world = World(bytearray(KINDS))
    del world.failures.records[mid(3)]
    world.index = [entry for entry in world.index if entry["_id"] != mid(3)]
    result = world.check()
    assert result["problems"] == [f"{mid(3)}: no failure record, expected validation"]


def test_a_stray_record_is_reported() -> None:
    world = World(bytearray(KINDS))
    world.failures.stray.append("someone-else: {'stage': 'legacy'}")
    result = world.check()
    assert not result["ok"]
    assert result["problems"] == ["stray failure record someone-else: {'stage': 'legacy'}"]


def test_a_failure_record_for_a_registered_message_is_reported() -> None:
    world = World(bytearray(KINDS))
    failure = record(0, "legacy")
    world.failures.records[mid(0)] = [("legacy", mid(0), "R-0", soak.digest(failure))]
    world.index.append({"_id": mid(0), "state": QUEUED, "stage": "legacy", "body": json.dumps(failure)})
    result = world.check()
    assert not result["ok"]
    assert result["problems"] == [f"{mid(0)}: failure record(s) [('legacy', '{mid(0)}', 'R-0')], expected registered"]


def test_identical_copies_of_a_record_are_counted_not_wrong() -> None:
    world = World(bytearray(KINDS))
    world.failures.records[mid(5)] *= 2
    result = world.check()
    assert result["ok"], result["problems"]
    assert result["extra_records"] == 1


def test_an_index_entry_that_holds_no_published_record_is_reported() -> None:
    world = World(bytearray(KINDS))
    entry = next(e for e in world.index if e["_id"] == rid(1, "legacy"))
    entry["body"] = json.dumps({**record(1, "legacy"), "attempts": 2})
    result = world.check()
    assert result["problems"] == [f"{rid(1, 'legacy')}: the failure index entry holds no record that was published"]


def test_a_record_without_an_index_entry_is_reported() -> None:
    world = World(bytearray(KINDS))
    world.index = [entry for entry in world.index if entry["_id"] != rid(2, "submit")]
    result = world.check()
    assert result["problems"] == [f"{mid(2)}: a failure record without an index entry"]
