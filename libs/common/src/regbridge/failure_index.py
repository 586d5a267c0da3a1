"""The failure queue's index: one MongoDB document per failure record id, so that a reader
finds, lists and shows records without taking them off the queue.

The queue stays the failure queue the contract describes (the DLQ, what counts); the index is
what reads it cheaply. Two writes cannot be one, so the index says how sure it is of each entry:

    publishing  a service is publishing the record, or died doing so: it may not be on the queue
    queued      the broker confirmed the record: it is on the queue (unless a reader outside
                the bridge took it; `reconcile` finds that)
    leaving     the CLI is replaying or discarding it: it may be gone already

The executor writes `publishing` before the publish and `queued` after the confirm (a move of
its own entry only, named by its token), so a record on the queue always has an entry (the
one exception: an entry that could not be written, refused or in error, which is logged and
counted: nothing may keep a failure from its record). The CLI writes `leaving` before a record leaves and
deletes the entry after the record's ack, only if no service wrote it since (its `token`).
`reconcile` compares the whole queue with the index, id by id, and brings the index into line.

Order: `seq`, from one counter per collection, handed out in blocks; a reader walks windows of
`seq` (an index range of bounded size, fast on any MongoDB) from the lowest it knows of.

Pure code: no I/O. `regbridge.store` writes entries; `registrations_cli` reads them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

PUBLISHING = "publishing"
QUEUED = "queued"
LEAVING = "leaving"
STATES = (PUBLISHING, QUEUED, LEAVING)

COUNTER_ID = "failure-records"  # the counter document, in `<collection>.counters`
SEQ_BLOCK = 32  # seqs a process takes at once: one counter round trip per block of failures
SEQ_BLOCK_MAX_AGE_S = 5.0  # a block older than this is dropped, so that seq follows time closely
WINDOW = 1000  # seqs a reader asks for at once: an index range of at most this many entries
# How far behind the newest seq a reader may move its starting point: an entry is inserted
# just after its seq is taken, and a process that took a seq this many failures ago and has
# not inserted yet is not waited for (reconcile would still find its record).
LOW_MARGIN = 10 * WINDOW
# An entry written this recently is left alone by reconcile: a removal may be under way, or a
# record published just before the pass may have landed behind it.
RECONCILE_GRACE = timedelta(minutes=2)
# ... and a `publishing` entry, for longer: its publish may be held by a broker alarm, with no
# timeout, and once its record lands nothing but the next reconcile would index it again.
PUBLISHING_GRACE = timedelta(hours=1)

# The indexes a reader needs; each service creates them with the first entry it writes.
INDEXES: tuple[tuple[str, list[tuple[str, int]]], ...] = (
    ("seq_1", [("seq", 1)]),
    ("stage_1_seq_1", [("stage", 1), ("seq", 1)]),
    ("user_id_1_seq_1", [("user_id", 1), ("seq", 1)]),
    ("state_1", [("state", 1)]),
)


@dataclass(frozen=True)
class IndexEntry:
    """What the index holds of one failure record: the fields readers filter on, and the record
    exactly as it was published."""

    record_id: str
    stage: str
    reason: str
    user_id: str | None
    legacy_request_id: str | None
    failed_at: datetime
    body: str  # the record's JSON, as published


def new_token() -> str:
    return uuid.uuid4().hex


def entry_update(entry: IndexEntry, state: str, *, seq: int, now: datetime, token: str) -> dict[str, Any]:
    """The upsert of an entry in `state`: every field set, the `seq` only when it is inserted
    (an entry keeps its place when its record is published again)."""
    return {
        "$set": {"state": state, "stage": entry.stage, "reason": entry.reason, "user_id": entry.user_id,
                 "legacy_request_id": entry.legacy_request_id, "failed_at": entry.failed_at, "body": entry.body,
                 "written_at": now, "token": token},
        "$setOnInsert": {"seq": seq},
    }


def state_update(state: str, *, now: datetime, token: str) -> dict[str, Any]:
    """A change of state only (the record is out already; its body is not at hand)."""
    return {"$set": {"state": state, "written_at": now, "token": token}}


@dataclass(frozen=True)
class Seen:
    """What `reconcile` knows of an entry: its state, when and by which write it was written."""

    state: str
    written_at: datetime
    token: str | None = None


@dataclass(frozen=True)
class Reconciliation:
    """What brings the index into line with the queue: entries to add (records on the queue
    with none), to mark `queued` (on the queue, not marked so), and to delete (not on the
    queue, and not written within the grace); each deletion names the write it removes."""

    add: tuple[str, ...]
    confirm: tuple[str, ...]
    delete: tuple[tuple[str, str | None], ...]

    @property
    def changes(self) -> int:
        return len(self.add) + len(self.confirm) + len(self.delete)


def reconcile(on_queue: Iterable[str], entries: Mapping[str, Seen], *, started_at: datetime,
              grace: timedelta = RECONCILE_GRACE, publishing_grace: timedelta = PUBLISHING_GRACE) -> Reconciliation:
    """`on_queue`: every record id that one whole pass of the queue found, started at
    `started_at`. An entry not found is deleted only if it was last written before the pass
    started, by more than `grace` (`publishing_grace` for an entry still `publishing`): a
    record published meanwhile may land behind the pass, and a removal under way is the CLI's
    to finish."""
    present = set(on_queue)
    add = tuple(sorted(i for i in present if i not in entries))
    confirm = tuple(sorted(i for i in present if i in entries and entries[i].state != QUEUED))

    def stale(seen: Seen) -> bool:
        return seen.written_at < started_at - (publishing_grace if seen.state == PUBLISHING else grace)

    delete = tuple(sorted((i, seen.token) for i, seen in entries.items() if i not in present and stale(seen)))
    return Reconciliation(add, confirm, delete)


def window_of(seq: int) -> tuple[int, int]:
    """The window of `WINDOW` seqs that holds `seq`: [start, end)."""
    start = seq - seq % WINDOW
    return start, start + WINDOW


def safe_low(lowest_found: int | None, next_seq: int) -> int:
    """Where readers may start from now on: the lowest seq found, but never within `LOW_MARGIN`
    of the newest (see LOW_MARGIN)."""
    bound = max(0, next_seq - LOW_MARGIN)
    return bound if lowest_found is None else min(lowest_found, bound)
