"""MongoDB operations from many worker threads, sent as few round trips.

Each worker hands one operation (an update, or a lookup by `_id`) to the batcher and waits for
its own answer, exactly as if it had made the call itself; a single thread sends whatever has
gathered meanwhile as one `bulk_write` (unordered) or one `find({"_id": {"$in": ...}})` per
collection. A worker still acks only once its own write is acknowledged; the server does far
less work for one batch of 100 than for 100 single writes, and the client's pool stays small.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, OperationFailure, WriteConcernError

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000


@dataclass
class _Write:
    collection: Collection[dict[str, Any]]
    op: UpdateOne
    future: Future[bool] = field(default_factory=Future)


@dataclass
class _Read:
    collection: Collection[dict[str, Any]]
    key: str
    projection: Mapping[str, Any] | None
    future: Future[dict[str, Any] | None] = field(default_factory=Future)


class Batcher:
    def __init__(self, *, max_batch: int = 200, name: str = "mongo-batcher") -> None:
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Write | _Read] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def update(self, collection: Collection[dict[str, Any]], op: UpdateOne) -> bool:
        """Apply `op` (an upsert); False when it was refused as a duplicate key (the filter
        excluded an existing document). Raises what the driver raised for the batch."""
        return self.update_later(collection, op).result()

    def update_later(self, collection: Collection[dict[str, Any]], op: UpdateOne) -> Future[bool]:
        """`update` without waiting: several writes of one worker travel in the same batch."""
        item = _Write(collection, op)
        self._queue.put(item)
        return item.future

    def find_one(self, collection: Collection[dict[str, Any]], key: str,
                 projection: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        item = _Read(collection, key, projection)
        self._queue.put(item)
        return item.future.result()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Whatever arrived while the last batch was on the wire goes in this one: no timer,
            # so a lone operation waits for nothing.
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            writes: dict[str, list[_Write]] = {}
            reads: dict[tuple[str, str], list[_Read]] = {}
            for item in batch:
                if isinstance(item, _Write):
                    writes.setdefault(item.collection.full_name, []).append(item)
                else:
                    reads.setdefault((item.collection.full_name, repr(item.projection)), []).append(item)
            for group in writes.values():
                self._write(group)
            for group_reads in reads.values():
                self._read(group_reads)

    @staticmethod
    def _write(group: list[_Write]) -> None:
        collection = group[0].collection
        try:
            collection.bulk_write([w.op for w in group], ordered=False)
        except BulkWriteError as exc:
            Batcher._settle_partly(group, exc.details)
            return
        except Exception as exc:  # an outage: every caller sees it and retries
            for write in group:
                write.future.set_exception(exc)
            return
        for write in group:
            write.future.set_result(True)

    @staticmethod
    def _settle_partly(group: list[_Write], details: Mapping[str, Any]) -> None:
        """Each write of a bulk that failed in part gets its own answer. A write that the server
        applied but did not acknowledge at the requested write concern may be rolled back
        after a failover: not a success, but an outage to wait out and write again."""
        failed = {e["index"]: e for e in details.get("writeErrors", [])}
        concern = details.get("writeConcernErrors") or []
        for index, write in enumerate(group):
            error = failed.get(index)
            if error is None and concern:
                write.future.set_exception(WriteConcernError(str(concern[0].get("errmsg")), concern[0].get("code"),
                                                             concern[0]))
            elif error is None:
                write.future.set_result(True)
            elif error.get("code") == DUPLICATE_KEY:
                write.future.set_result(False)
            else:
                write.future.set_exception(OperationFailure(str(error.get("errmsg")), error.get("code"), error))

    @staticmethod
    def _read(group: list[_Read]) -> None:
        collection = group[0].collection
        try:
            found = {doc["_id"]: doc for doc in
                     collection.find({"_id": {"$in": list({r.key for r in group})}}, group[0].projection)}
        except Exception as exc:
            for read in group:
                read.future.set_exception(exc)
            return
        for read in group:
            read.future.set_result(found.get(read.key))
