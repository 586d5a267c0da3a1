"""The MongoDB adapter: the users' registration fields, and each message's latest attempt.

Users (`MONGODB_COLLECTION`, `_id` = user_id): only the contract's four fields are written,
under the rule of `lifecycle.may_record`, expressed here as update filters so that a write
that must not happen matches nothing (no read-then-write race between services).

Attempts (`<collection>.attempts`, `_id` = the inbound message's attempt key): the legacy
request id a message got, and whether its failure was already recorded. It is what lets a
*redelivered* message skip a second POST, and a duplicate pending message skip a second
failure record. A message published anew (a replay) is a new attempt and overwrites it.

Failures (`<collection>.failures`, `_id` = the failure record's id): the failure queue's index
(`regbridge.failure_index`), with its sequence counter in `<collection>.counters`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pymongo import MongoClient, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, OperationFailure

from regbridge import failure_index
from regbridge.batching import Batcher
from regbridge.durable import retryable
from regbridge.lifecycle import State
from regbridge.messages import FailureError
from regbridge.plans import AttemptAccepted, AttemptFailed, RecordIndexed, UserStatus, Write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserState:
    status: str | None
    request_id: str | None


@dataclass(frozen=True)
class Attempt:
    request_id: str | None
    failed: bool
    error: FailureError | None = None  # what the failure record said, to finish its recording
    # Set when a later publish of the message cleared an earlier attempt: part of its
    # Idempotency-Key, so that the legacy API tells the two apart.
    publish: str | None = None


class WriteRefused(RuntimeError):
    """MongoDB refused a write for good (a schema validator, a document too large): trying
    again cannot help. `reason` is the server's message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Store(Protocol):
    """What the services need from MongoDB; unit tests pass a fake."""

    def user(self, user_id: str) -> UserState: ...
    def attempt(self, key: str) -> Attempt | None: ...
    def reset_attempt(self, key: str, publish: str) -> None: ...

    def apply(self, write: Write) -> bool:
        """Carry out `write`; False when the status rule left the document as it was. Raises
        `WriteRefused` when the server refuses it for good, a driver error during an outage."""
        ...

    def ping(self) -> bool: ...


# `lifecycle.may_record` as two update filters, each a plain equality or `$nin`/`$ne` beside the
# `_id` (a `$nor`/`$or` filter makes the Mongo-wire server scan the whole collection per write):
# first the common case, a document in no final state (or none yet, through the upsert) ...
_OPEN = {"registration_status": {"$nin": [State.REGISTERED.value, State.FAILED.value]}}


def _failed_by_another_attempt(request_id: str | None) -> dict[str, Any]:
    """... then, only if that was refused: a failure of another attempt, which a new one may replace."""
    if request_id is None:
        return {"registration_status": State.FAILED.value}
    return {"registration_status": State.FAILED.value, "legacy_request_id": {"$ne": request_id}}


# Codes that the server gives a write because of the document itself: a schema validator, a
# document over 16 MiB, a field it cannot store. The same write would be refused again. Other
# errors (permissions, an outage) say nothing about the registration and must not fail it.
_REFUSED_FOR_GOOD = frozenset({2, 9, 14, 28, 52, 55, 56, 57, 66, 121, 10334, 17419, 17420})


def _error_doc(error: FailureError | None) -> dict[str, Any] | None:
    return None if error is None else {"stage": error.stage, "reason": error.reason,
                                       "http_status": error.http_status}


class MongoStore:
    def __init__(self, client: MongoClient[dict[str, Any]], database: str, users: str, attempts: str,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), batcher: Batcher | None = None,
                 *, failures: str | None = None, counters: str | None = None) -> None:
        self._client = client
        self._users: Collection[dict[str, Any]] = client[database][users]
        self._attempts: Collection[dict[str, Any]] = client[database][attempts]
        self._failures: Collection[dict[str, Any]] = client[database][failures or f"{users}.failures"]
        self._seqs = SeqBlocks(client[database][counters or f"{users}.counters"])
        self._indexed = threading.Event()
        self._indexing = threading.Lock()
        self._clock = clock
        # Every operation goes through the batcher: one round trip carries what many worker
        # threads asked for meanwhile (see regbridge.batching).
        self._batcher = batcher or Batcher(name="mongo-writes")
        # Lookups travel apart from writes, so that a write (the request id recorded after a
        # 201, which ends the window for a second submission) never waits behind a batch of them.
        self._reads = Batcher(name="mongo-reads") if batcher is None else batcher

    def user(self, user_id: str) -> UserState:
        doc = self._reads.find_one(self._users, user_id, {"registration_status": 1, "legacy_request_id": 1})
        if doc is None:
            return UserState(None, None)
        return UserState(doc.get("registration_status"), doc.get("legacy_request_id"))

    def attempt(self, key: str) -> Attempt | None:
        doc = self._reads.find_one(self._attempts, key)
        if doc is None:
            return None
        error = doc.get("error")
        failure = (FailureError(str(error.get("stage")), str(error.get("reason")), error.get("http_status"))
                   if isinstance(error, dict) else None)
        return Attempt(doc.get("legacy_request_id"), bool(doc.get("failed")), failure, doc.get("publish"))

    def reset_attempt(self, key: str, publish: str) -> None:
        """A message published anew is a new attempt: forget what an earlier one got, and keep
        the new publish's mark (upserted, so that a redelivery finds it)."""
        cleared = {"legacy_request_id": None, "failed": False, "error": None, "publish": publish,
                   "updated_at": self._clock()}
        self._batcher.update(self._attempts, UpdateOne({"_id": key}, {"$set": cleared}, upsert=True))

    def apply(self, write: Write) -> bool:
        try:
            if isinstance(write, AttemptAccepted):
                return self._accepted(write)
            if isinstance(write, AttemptFailed):
                return self._attempt(write.attempt_key, write.user_id, write.request_id, write.error)
            if isinstance(write, RecordIndexed):
                return self._index(write)
            return self._status(write)
        except OperationFailure as exc:
            if exc.code not in _REFUSED_FOR_GOOD:
                raise  # an outage is waited out; anything else is the runtime's to hand back
            reason = (exc.details or {}).get("errmsg") or str(exc)
            raise WriteRefused(f"MongoDB refused the write (code {exc.code}): {reason}"[:500]) from exc

    def _attempt_op(self, key: str, user_id: str | None, request_id: str | None,
                    error: FailureError | None, *, failed: bool) -> UpdateOne:
        return UpdateOne({"_id": key}, {"$set": {
            "user_id": user_id, "legacy_request_id": request_id, "failed": failed, "error": _error_doc(error),
            "updated_at": self._clock()}}, upsert=True)

    def _attempt(self, key: str, user_id: str | None, request_id: str | None, error: FailureError) -> bool:
        return self._batcher.update(self._attempts, self._attempt_op(key, user_id, request_id, error, failed=True))

    def _index(self, write: RecordIndexed) -> bool:
        self.ensure_failure_indexes()
        now = self._clock()
        if write.entry is None:
            op = UpdateOne({"_id": write.record_id, "state": failure_index.PUBLISHING, "token": write.token},
                           failure_index.state_update(write.state, now=now, token=write.token))
        else:
            op = UpdateOne({"_id": write.record_id}, failure_index.entry_update(
                write.entry, write.state, seq=self._seqs.take(), now=now, token=write.token), upsert=True)
        return self._batcher.update(self._failures, op)

    def ensure_failure_indexes(self) -> None:
        """The indexes the failure index's readers walk, created with the first entry this
        process writes: on the bridge's own collection, new or small when it first fills, so
        the build is cheap. Once per process, whatever the answer: an index that cannot be
        made (one that exists under another name) slows readers down, and must never keep a
        failure from its record."""
        if self._indexed.is_set():
            return
        with self._indexing:
            if self._indexed.is_set():
                return
            for name, keys in failure_index.INDEXES:
                try:
                    self._failures.create_index(keys, name=name)
                except OperationFailure as exc:
                    if retryable(exc):
                        raise  # an outage: the write that asked is waited out, and asks again
                    log.warning("cannot create the failure index's index %s: %s", name, exc,
                                extra={"event": "index_not_created"})
            self._indexed.set()

    def _accepted(self, write: AttemptAccepted) -> bool:
        """The attempt's request id and the user's `submitted`, in one round trip: both are
        written before the registration is handed on, in whichever order the server applies them."""
        attempt = self._batcher.update_later(self._attempts, self._attempt_op(
            write.attempt_key, write.user_id, write.request_id, None, failed=False))
        update = self._update(UserStatus(write.user_id, State.SUBMITTED, write.request_id))
        user = self._batcher.update_later(self._users, UpdateOne({"_id": write.user_id, **_OPEN}, update, upsert=True))
        attempt.result()
        return self._user(write.user_id, write.request_id, update, user)

    def _status(self, write: UserStatus) -> bool:
        update = self._update(write)
        first = self._batcher.update_later(self._users, UpdateOne({"_id": write.user_id, **_OPEN}, update, upsert=True))
        return self._user(write.user_id, write.request_id, update, first)

    def _update(self, write: UserStatus) -> dict[str, Any]:
        fields: dict[str, Any] = {"registration_status": write.status.value, "legacy_request_id": write.request_id,
                                  "registration_updated_at": self._clock()}
        if write.status is State.FAILED and write.error is not None:
            fields["registration_error"] = {"stage": write.error.stage, "reason": write.error.reason}
            return {"$set": fields}
        return {"$set": fields, "$unset": {"registration_error": ""}}

    def _user(self, user_id: str, request_id: str | None, update: dict[str, Any], first: Future[bool]) -> bool:
        """Whether the user's document took `update`. An upsert whose filter excludes the existing
        document meets its `_id` and is refused as a duplicate key: the document is final, and
        only a failure of another attempt may still be replaced."""
        if first.result():
            return True
        result = self._users.update_one({"_id": user_id, **_failed_by_another_attempt(request_id)}, update)
        return result.matched_count > 0

    def ping(self) -> bool:
        try:
            self._client.admin.command("ping")
        except Exception:
            return False
        return True


class SeqBlocks:
    """Sequence numbers for index entries, taken from the counter `SEQ_BLOCK` at a time: one
    round trip per block, not per failure. A block not used up within `SEQ_BLOCK_MAX_AGE_S` is
    dropped, so that seqs stay close to the order the records failed in across processes."""

    def __init__(self, counters: Collection[dict[str, Any]], clock: Callable[[], float] = time.monotonic) -> None:
        self._counters = counters
        self._clock = clock
        self._lock = threading.Lock()
        self._next = self._end = 0
        self._taken_at = 0.0

    def take(self) -> int:
        with self._lock:
            if self._next >= self._end or self._clock() - self._taken_at > failure_index.SEQ_BLOCK_MAX_AGE_S:
                try:
                    doc = self._take_block()
                except DuplicateKeyError:  # two processes made the counter at once: it exists now
                    doc = self._take_block()
                assert doc is not None  # an upsert that returns the document after
                self._end = int(doc["next"])
                self._next = self._end - failure_index.SEQ_BLOCK
                self._taken_at = self._clock()
            seq = self._next
            self._next += 1
            return seq

    def _take_block(self) -> dict[str, Any] | None:
        return self._counters.find_one_and_update(
            {"_id": failure_index.COUNTER_ID}, {"$inc": {"next": failure_index.SEQ_BLOCK}},
            upsert=True, return_document=ReturnDocument.AFTER)


def connect(uri: str, *, pool_size: int, timeout_s: float = 5.0) -> MongoClient[dict[str, Any]]:
    # A small pool: writes queue in the client rather than pile onto the server at once.
    return MongoClient(uri, maxPoolSize=pool_size, serverSelectionTimeoutMS=int(timeout_s * 1000),
                       connectTimeoutMS=int(timeout_s * 1000), socketTimeoutMS=int(timeout_s * 2000),
                       tz_aware=True, retryWrites=False)
