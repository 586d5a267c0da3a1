"""The failure queue's index (`regbridge.failure_index`), from the operator's side: what `failed
list`, `failed show` and `status` read instead of the queue, and what `replay`, `discard` and
`reconcile` keep in line with it.

Every read is an index equality or a bounded index range: a window of `WINDOW` seqs, an `_id`
lookup or prefix, one user's entries. Anything else (a scan, a sort on the server) costs the
whole collection on some MongoDB-wire servers, which at 100,000 entries is seconds. A walk
starts at the counter's `low`, which walks that find nothing below it move up (never past
`failure_index.safe_low`), so that emptied windows are not read again and again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import DeleteOne, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database

from regbridge import failure_index
from regbridge.failure_index import QUEUED, IndexEntry, Reconciliation, Seen
from regbridge.messages import DecodeError, FailureRecord

from .records import Failure, Filter
from .settings import CliSettings

UNREADABLE_STAGE = "?"  # the stage of an entry whose record does not decode
BULK = 1000  # entries written in one round trip


@dataclass(frozen=True)
class Entry:
    """One entry as read: the fields a list shows, and the record's body when it was asked for."""

    record_id: str
    seq: int | None
    state: str
    stage: str
    reason: str
    user_id: str | None
    failed_at: datetime | None
    body: str | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Entry:
        failed_at = doc.get("failed_at")
        if isinstance(failed_at, datetime) and failed_at.tzinfo is None:
            failed_at = failed_at.replace(tzinfo=UTC)
        seq = doc.get("seq")
        return cls(str(doc["_id"]), seq if isinstance(seq, int) else None, str(doc.get("state") or "?"),
                   str(doc.get("stage") or UNREADABLE_STAGE), str(doc.get("reason") or ""),
                   doc.get("user_id") if isinstance(doc.get("user_id"), str) else None,
                   failed_at if isinstance(failed_at, datetime) else None,
                   doc.get("body") if isinstance(doc.get("body"), str) else None)

    @property
    def readable(self) -> bool:
        return self.stage != UNREADABLE_STAGE

    def failure(self) -> Failure:
        """The record as the queue holds it (its body must have been read)."""
        return Failure.parse(0, (self.body or "").encode("utf-8"), record_id=self.record_id)


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    more: bool  # more entries match beyond the limit


def entry_of(record_id: str, body: bytes, *, fallback_time: datetime) -> IndexEntry:
    """The entry of a record found on the queue: an unreadable one is still indexed (stage `?`,
    the decode problem as its reason), so that the index lists whatever the queue holds."""
    text = body.decode("utf-8", errors="replace")
    try:
        record = FailureRecord.decode(body)
    except DecodeError as exc:
        user_id = Failure.parse(0, body).user_id
        return IndexEntry(record_id, UNREADABLE_STAGE, exc.reason, user_id, None, fallback_time, text)
    failed_at = record.failed_at if record.failed_at.tzinfo is not None else record.failed_at.replace(tzinfo=UTC)
    return IndexEntry(record_id, record.error.stage, record.error.reason, record.user_id, record.legacy_request_id,
                      failed_at, text)


def _time_query(flt: Filter) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    if flt.since is not None:
        bounds["$gte"] = flt.since
    if flt.older_than is not None:
        bounds["$lt"] = flt.older_than
    return {"failed_at": bounds} if bounds else {}


def _matches(entry: Entry, flt: Filter) -> bool:
    """What the server's query cannot say: the reason's pattern, and that an unreadable record's
    time is not known (its `failed_at` is when it was indexed), so no age filter takes it."""
    if flt.reason is not None and not flt.reason.search(entry.reason):
        return False
    return entry.readable or (flt.since is None and flt.older_than is None)


class FailureIndex:
    def __init__(self, db: Database[dict[str, Any]], settings: CliSettings) -> None:
        self.entries: Collection[dict[str, Any]] = db[settings.failures_collection]
        self.counters: Collection[dict[str, Any]] = db[settings.counters_collection]
        self.name = f"{settings.mongodb_database}.{settings.failures_collection}"

    # ---- reading ------------------------------------------------------------------------------

    def counter(self) -> tuple[int, int]:
        """(next seq, low): where a walk ends and where it starts."""
        doc = self.counters.find_one({"_id": failure_index.COUNTER_ID}) or {}
        return int(doc.get("next") or 0), int(doc.get("low") or 0)

    def size(self) -> int:
        """Entries, from the collection's metadata (no document read)."""
        return int(self.entries.estimated_document_count())

    def page(self, flt: Filter, limit: int | None = None, *, bodies: bool = False) -> Page:
        """The entries that match, in seq order, `limit` at most."""
        return self._limited(list(self.walk(flt, None if limit is None else limit + 1, bodies=bodies)), limit)

    def walk(self, flt: Filter, limit: int | None = None, *, bodies: bool = False) -> Iterator[Entry]:
        """The entries that match, in seq order, `limit` at most, read window by window as they are
        taken: memory holds one window (with `bodies`, one window's bodies), whatever the index holds."""
        projection = None if bodies else {"body": 0}
        query = _time_query(flt)
        if flt.stage is not None:
            query["stage"] = flt.stage
        if flt.ids is not None or flt.user_id is not None:
            # A handful of entries, found directly by `_id` or on `user_id_1_seq_1`.
            if flt.ids is not None:
                query["_id"] = {"$in": sorted(flt.ids)}
            if flt.user_id is not None:
                query["user_id"] = flt.user_id
            found = sorted((Entry.of(d) for d in self.entries.find(query, projection)),
                           key=lambda e: (e.seq is None, e.seq or 0))
            yield from [e for e in found if _matches(e, flt)][:limit]
            return
        yield from self._walk(query, flt, limit, projection)

    def _walk(self, query: dict[str, Any], flt: Filter, limit: int | None,
              projection: dict[str, int] | None) -> Iterator[Entry]:
        next_seq, low = self.counter()
        start = failure_index.window_of(low)[0]
        found = 0
        lowest: int | None = None
        whole = not query and flt.reason is None  # every entry is a match: the first one found is the lowest
        while start < next_seq and (limit is None or found < limit):
            docs = sorted(self.entries.find({**query, "seq": {"$gte": start, "$lt": start + failure_index.WINDOW}},
                                            projection), key=lambda d: int(d["seq"]))
            if whole and lowest is None and docs:
                lowest = int(docs[0]["seq"])
            for doc in docs:
                entry = Entry.of(doc)
                if _matches(entry, flt) and (limit is None or found < limit):
                    found += 1
                    yield entry
            start += failure_index.WINDOW
        if whole:
            self._raise_low(low, failure_index.safe_low(lowest, next_seq))

    def _raise_low(self, low: int, new_low: int) -> None:
        if new_low > low:
            self.counters.update_one({"_id": failure_index.COUNTER_ID}, {"$max": {"low": new_low}})

    @staticmethod
    def _limited(found: list[Entry], limit: int | None) -> Page:
        if limit is not None and len(found) > limit:
            return Page(found[:limit], True)
        return Page(found, False)

    def get(self, wanted: str) -> Entry | None:
        doc = self.entries.find_one({"_id": wanted})
        return Entry.of(doc) if doc is not None else None

    def starting_with(self, prefix: str, limit: int) -> list[Entry]:
        """Entries whose id starts with `prefix`, `limit` at most (an `_id` range)."""
        docs = self.entries.find({"_id": {"$gte": prefix, "$lt": prefix + "\uffff"}}, {"body": 0}).limit(limit)
        return sorted((Entry.of(d) for d in docs), key=lambda e: e.record_id)

    def of_user(self, user_id: str) -> list[Entry]:
        return self.page(Filter(user_id=user_id), bodies=True).entries

    def ids(self) -> frozenset[str]:
        """Every entry's id (and nothing else of it)."""
        return frozenset(str(d["_id"]) for d in self.entries.find({}, {"_id": 1}))

    def seen(self) -> dict[str, Seen]:
        """What `failure_index.reconcile` compares: every entry's id, state and last write. It
        reads the whole collection, as the pass of the queue it goes with reads the whole queue."""
        seen: dict[str, Seen] = {}
        for doc in self.entries.find({}, {"state": 1, "written_at": 1, "token": 1}):
            written = doc.get("written_at")
            if not isinstance(written, datetime):
                written = datetime.min.replace(tzinfo=UTC)
            elif written.tzinfo is None:
                written = written.replace(tzinfo=UTC)
            seen[str(doc["_id"])] = Seen(str(doc.get("state")), written, doc.get("token"))
        return seen

    # ---- writing ------------------------------------------------------------------------------

    def _write(self, ops: list[UpdateOne] | list[DeleteOne]) -> tuple[int, int]:
        """(modified, deleted), in bulks of `BULK`. One operation per entry, each an `_id`
        equality: a filter of thousands of ids in `$in` costs more than in proportion on some
        MongoDB-wire servers, and one huge write would outlast the socket's timeout."""
        modified = deleted = 0
        for start in range(0, len(ops), BULK):
            result = self.entries.bulk_write(ops[start:start + BULK], ordered=False)
            modified, deleted = modified + result.modified_count, deleted + result.deleted_count
        return modified, deleted

    def mark_leaving(self, ids: Iterable[str], now: datetime | None = None) -> str:
        """Marks the entries of records about to leave the queue; the token names this write."""
        token = failure_index.new_token()
        update = failure_index.state_update(failure_index.LEAVING, now=now or datetime.now(UTC), token=token)
        self._write([UpdateOne({"_id": i}, update) for i in sorted(set(ids))])
        return token

    def remove(self, ids: Iterable[str], token: str) -> int:
        """Deletes the entries of records that left, unless a service wrote them since `mark_leaving`
        (the record failed again under the same id: the new entry is its own)."""
        return self._write([DeleteOne({"_id": i, "token": token}) for i in sorted(set(ids))])[1]

    def restore(self, ids: Iterable[str], token: str, now: datetime | None = None) -> int:
        """Back to `queued`: the records were marked to leave but stayed."""
        update = failure_index.state_update(QUEUED, now=now or datetime.now(UTC), token=failure_index.new_token())
        return self._write([UpdateOne({"_id": i, "token": token}, update) for i in sorted(set(ids))])[0]

    def apply(self, reconciliation: Reconciliation, entries: Mapping[str, IndexEntry],
              now: datetime | None = None) -> None:
        """Carry out `reconciliation`; `entries` holds the entry to add for each id in its `add`."""
        now = now or datetime.now(UTC)
        ops: list[UpdateOne] = []
        if reconciliation.add:
            count = len(reconciliation.add)
            doc = self.counters.find_one_and_update({"_id": failure_index.COUNTER_ID}, {"$inc": {"next": count}},
                                                    upsert=True, return_document=ReturnDocument.AFTER)
            assert doc is not None  # an upsert that returns the document after
            first = int(doc["next"]) - count
            token = failure_index.new_token()
            for seq, record_id in enumerate(reconciliation.add, start=first):
                ops.append(UpdateOne({"_id": record_id}, failure_index.entry_update(
                    entries[record_id], QUEUED, seq=seq, now=now, token=token), upsert=True))
        if reconciliation.confirm:
            token = failure_index.new_token()
            ops.extend(UpdateOne({"_id": record_id}, failure_index.state_update(QUEUED, now=now, token=token))
                       for record_id in reconciliation.confirm)
        self._write(ops)
        # Only the write that reconcile saw: an entry written since is someone's news.
        self._write([DeleteOne({"_id": record_id, "token": token_seen})
                     for record_id, token_seen in reconciliation.delete])
