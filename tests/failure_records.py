"""Failure records written the way the services write them: the record's entry in the failure
index `publishing`, the record on the failure queue (confirmed), then the entry `queued`
(regbridge.executor, regbridge.failure_index). Tests that put records on the queue for the
operator's command to find use this, so that the command's index agrees with the queue."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pika
from harness import Broker
from pymongo import ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from registrations_cli.index import entry_of
from registrations_cli.records import record_id_of

from regbridge import failure_index
from regbridge.failure_index import PUBLISHING, QUEUED, IndexEntry
from regbridge.plans import RECORD_ID_HEADER

FAILED = "registrations.failed"


class FailureRecords:
    def __init__(self, broker: Broker, db: Database[dict[str, Any]], collection: str = "users",
                 queue: str = FAILED) -> None:
        self.broker = broker
        self.queue = queue
        self.entries: Collection[dict[str, Any]] = db[f"{collection}.failures"]
        self.counters: Collection[dict[str, Any]] = db[f"{collection}.counters"]
        for name, keys in failure_index.INDEXES:
            self.entries.create_index(keys, name=name)

    def take_seq(self, count: int = 1) -> int:
        """The first of `count` seqs from the counter, as the services' SeqBlocks take them."""
        doc = self.counters.find_one_and_update({"_id": failure_index.COUNTER_ID}, {"$inc": {"next": count}},
                                                upsert=True, return_document=ReturnDocument.AFTER)
        assert doc is not None
        return int(doc["next"]) - count

    def publish(self, body: bytes | Mapping[str, Any], *, message_id: str | None, record_id: str | None = None,
                properties: pika.BasicProperties | None = None, indexed: bool = True) -> IndexEntry | None:
        """Publish one record (confirmed); with `indexed`, its entry is written around the
        publish, under the id the CLI reads from it (`records.record_id_of`). With `record_id`,
        as the services write it: that id in its header, its message_id `message_id` (the
        inbound one) or else the id. Without, as an earlier release wrote it: no header.
        `properties`: the message's own (they win over both)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {RECORD_ID_HEADER: record_id} if record_id is not None else None
        props = properties or pika.BasicProperties(delivery_mode=2, message_id=message_id or record_id,
                                                   headers=headers)
        read_id, _ = record_id_of(props.message_id, props.headers, data)
        if not indexed:
            self.broker.channel.basic_publish("", self.queue, data, props, mandatory=True)
            return None
        entry = entry_of(read_id, data, fallback_time=datetime.now(UTC))
        self.write(entry, PUBLISHING)
        self.broker.channel.basic_publish("", self.queue, data, props, mandatory=True)
        self.write(entry, QUEUED)
        return entry

    def index_many(self, records: list[tuple[str, bytes]], *, batch: int = 2_000) -> None:
        """Entries `queued` for records already on the queue, in bulk: their seqs from one
        increment of the counter, in the order given (for tests that publish thousands fast)."""
        if not records:
            return
        first = self.take_seq(len(records))
        now = datetime.now(UTC)
        ops = [UpdateOne({"_id": record_id}, failure_index.entry_update(
            entry_of(record_id, body, fallback_time=now), QUEUED, seq=seq, now=now, token="bulk"), upsert=True)
            for seq, (record_id, body) in enumerate(records, start=first)]
        for start in range(0, len(ops), batch):
            self.entries.bulk_write(ops[start:start + batch], ordered=False)

    def write(self, entry: IndexEntry, state: str, *, now: datetime | None = None, token: str | None = None) -> str:
        """The entry's upsert in `state` (its seq taken only if it is new); the token it wrote."""
        token = token or failure_index.new_token()
        seq = self.take_seq() if self.entries.find_one({"_id": entry.record_id}, {"_id": 1}) is None else -1
        self.entries.bulk_write([UpdateOne({"_id": entry.record_id}, failure_index.entry_update(
            entry, state, seq=seq, now=now or datetime.now(UTC), token=token), upsert=True)])
        return token

    def entry(self, record_id: str) -> dict[str, Any] | None:
        return self.entries.find_one({"_id": record_id})

    def states(self) -> dict[str, str]:
        return {str(d["_id"]): str(d["state"]) for d in self.entries.find({}, {"state": 1})}
