"""The MongoDB adapter: the users' registration fields, and each message's latest attempt.

Users (`MONGODB_COLLECTION`, `_id` = user_id): only the contract's four fields are written,
under the rule of `lifecycle.may_record`, expressed here as update filters so that a write
that must not happen matches nothing (no read-then-write race between services).

Attempts (`<collection>.attempts`, `_id` = the inbound message's attempt key): the legacy
request id a message got, and whether its failure was already recorded. It is what lets a
*redelivered* message skip a second POST, and a duplicate pending message skip a second
failure record. A message published anew (a replay) is a new attempt and overwrites it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection

from regbridge.batching import Batcher
from regbridge.messages import FailureError


@dataclass(frozen=True)
class UserState:
    status: str | None
    request_id: str | None


@dataclass(frozen=True)
class Attempt:
    request_id: str | None
    failed: bool
    error: FailureError | None = None  # what the failure record said, to finish its recording


class Store(Protocol):
    """What the services need from MongoDB; unit tests pass a fake."""

    def user(self, user_id: str) -> UserState: ...
    def attempt(self, key: str) -> Attempt | None: ...
    def reset_attempt(self, key: str) -> None: ...
    def record_attempt_failed(self, key: str, *, user_id: str | None, request_id: str | None,
                              error: FailureError | None = None) -> None: ...
    def record_submitted(self, user_id: str, request_id: str) -> bool: ...
    def record_accepted(self, key: str, *, user_id: str, request_id: str) -> bool: ...
    def record_registered(self, user_id: str, request_id: str) -> bool: ...
    def record_failed(self, user_id: str, request_id: str | None, error: FailureError) -> bool: ...
    def ping(self) -> bool: ...


# `lifecycle.may_record` as two update filters, each a plain equality or `$nin`/`$ne` beside the
# `_id` (a `$nor`/`$or` filter made the Mongo-wire server scan the whole collection per write):
# first the common case, a document in no final state (or none yet, through the upsert) ...
_OPEN = {"registration_status": {"$nin": ["registered", "failed"]}}


def _failed_by_another_attempt(request_id: str | None) -> dict[str, Any]:
    """... then, only if that was refused: a failure of another attempt, which a new one may replace."""
    if request_id is None:
        return {"registration_status": "failed"}
    return {"registration_status": "failed", "legacy_request_id": {"$ne": request_id}}


class MongoStore:
    def __init__(self, client: MongoClient[dict[str, Any]], database: str, users: str, attempts: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), batcher: Batcher | None = None) -> None:
        self._client = client
        self._users: Collection[dict[str, Any]] = client[database][users]
        self._attempts: Collection[dict[str, Any]] = client[database][attempts]
        self._clock = clock
        # Every operation goes through the batcher: one round trip carries what many worker
        # threads asked for meanwhile (see regbridge.batching).
        self._batcher = batcher or Batcher(name="mongo-writes")
        # Lookups travel apart from writes, so that a write (the request id recorded after a
        # 201, which ends the window for a second submission) never waits behind a batch of them.
        self._reads = Batcher(name="mongo-reads") if batcher is None else batcher

    def _find(self, collection: Collection[dict[str, Any]], key: str,
              projection: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return self._reads.find_one(collection, key, projection)

    def _update(self, collection: Collection[dict[str, Any]], op: UpdateOne) -> bool:
        """Apply an update; False when an upsert met an existing document its filter excluded."""
        return self._batcher.update(collection, op)

    def user(self, user_id: str) -> UserState:
        doc = self._find(self._users, user_id, {"registration_status": 1, "legacy_request_id": 1})
        if doc is None:
            return UserState(None, None)
        return UserState(doc.get("registration_status"), doc.get("legacy_request_id"))

    def attempt(self, key: str) -> Attempt | None:
        doc = self._find(self._attempts, key)
        if doc is None:
            return None
        error = doc.get("error")
        failure = (FailureError(str(error.get("stage")), str(error.get("reason")), error.get("http_status"))
                   if isinstance(error, dict) else None)
        return Attempt(doc.get("legacy_request_id"), bool(doc.get("failed")), failure)

    def reset_attempt(self, key: str) -> None:
        """A message delivered anew is a new attempt: forget what an earlier one got."""
        self._update(self._attempts, UpdateOne({"_id": key}, {"$set": {"legacy_request_id": None, "failed": False,
                                                                      "updated_at": self._clock()}}))

    def record_attempt_failed(self, key: str, *, user_id: str | None, request_id: str | None,
                              error: FailureError | None = None) -> None:
        stored = None if error is None else {"stage": error.stage, "reason": error.reason,
                                             "http_status": error.http_status}
        self._update(self._attempts, UpdateOne(
            {"_id": key},
            {"$set": {"user_id": user_id, "legacy_request_id": request_id, "failed": True, "error": stored,
                      "updated_at": self._clock()}},
            upsert=True,
        ))

    def _write(self, user_id: str, request_id: str | None, update: dict[str, Any],
               first: Future[bool] | None = None) -> bool:
        """Write unless `may_record` forbids it; False when it does. An upsert whose filter excludes
        the existing document meets its `_id` and is refused as a duplicate key."""
        if first is None:
            first = self._batcher.update_later(self._users, UpdateOne({"_id": user_id, **_OPEN}, update, upsert=True))
        if first.result():
            return True
        # Rare: the document is final. Only a failure of another attempt may still be replaced.
        result = self._users.update_one({"_id": user_id, **_failed_by_another_attempt(request_id)}, update)
        return result.matched_count > 0

    def record_accepted(self, key: str, *, user_id: str, request_id: str) -> bool:
        """The attempt's request id and the user's `submitted`, in one round trip: both are
        written before the registration is handed on, in whichever order the server applies them."""
        attempt = self._batcher.update_later(self._attempts, UpdateOne(
            {"_id": key},
            {"$set": {"user_id": user_id, "legacy_request_id": request_id, "failed": False,
                      "updated_at": self._clock()}},
            upsert=True,
        ))
        user = self._batcher.update_later(self._users, UpdateOne(
            {"_id": user_id, **_OPEN}, self._submitted(request_id), upsert=True))
        attempt.result()
        return self._write(user_id, request_id, self._submitted(request_id), first=user)

    def _submitted(self, request_id: str) -> dict[str, Any]:
        return {"$set": {"registration_status": "submitted", "legacy_request_id": request_id,
                         "registration_updated_at": self._clock()},
                "$unset": {"registration_error": ""}}

    def record_submitted(self, user_id: str, request_id: str) -> bool:
        return self._write(user_id, request_id, self._submitted(request_id))

    def record_registered(self, user_id: str, request_id: str) -> bool:
        return self._write(user_id, request_id, {
            "$set": {"registration_status": "registered", "legacy_request_id": request_id,
                     "registration_updated_at": self._clock()},
            "$unset": {"registration_error": ""},
        })

    def record_failed(self, user_id: str, request_id: str | None, error: FailureError) -> bool:
        return self._write(user_id, request_id, {
            "$set": {"registration_status": "failed", "legacy_request_id": request_id,
                     "registration_updated_at": self._clock(),
                     "registration_error": {"stage": error.stage, "reason": error.reason}},
        })

    def ping(self) -> bool:
        try:
            self._client.admin.command("ping")
        except Exception:
            return False
        return True


def connect(uri: str, *, pool_size: int, timeout_s: float = 5.0) -> MongoClient[dict[str, Any]]:
    # A small pool: writes queue in the client rather than pile onto the server at once.
    return MongoClient(uri, maxPoolSize=pool_size, serverSelectionTimeoutMS=int(timeout_s * 1000),
                       connectTimeoutMS=int(timeout_s * 1000), socketTimeoutMS=int(timeout_s * 2000),
                       tz_aware=True, retryWrites=False)
