"""Keeping the failure index in line with the failure queue: `registrations failed reconcile`, and
the index's side of every cycle that moves records (`failed replay`, `failed discard`).

Both compare one whole cycle of the queue with the index, id by id (`failure_index.reconcile`):
the queue is what counts, the index follows it. Only a cycle that went all the way round says
what the queue holds; a cycle stopped midway settles the records it moved and nothing else.

`failed reconcile` leaves alone an entry without a record that was written within the grace
(`failure_index.RECONCILE_GRACE`): its record may be on its way, or a replay may be removing it.
`RECONCILE_GRACE_S` sets that grace in seconds, for the command only; 0 deletes every such entry
at once, which is right only when no service and no other command is writing the index (after
an outage, in a test). A `publishing` entry keeps its own, longer grace whatever it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError

from regbridge import failure_index
from regbridge.failure_index import IndexEntry, Reconciliation

from . import broker, mongo
from .cycle import Cycle, Record
from .errors import USAGE, CliError
from .index import FailureIndex, entry_of
from .output import Output
from .sanitize import warn
from .settings import CliSettings
from .table import plural


@dataclass(frozen=True)
class Found:
    """What one whole cycle found: each record id with its first copy and its count of copies,
    and how many records carry no id (they cannot be indexed)."""

    first: dict[str, Record]
    copies: dict[str, int]
    without_id: int

    @classmethod
    def of(cls, records: list[Record]) -> Found:
        first: dict[str, Record] = {}
        copies: dict[str, int] = {}
        without_id = 0
        for record in records:
            record_id = record.properties.message_id
            if not record_id:
                without_id += 1
                continue
            first.setdefault(record_id, record)
            copies[record_id] = copies.get(record_id, 0) + 1
        return cls(first, copies, without_id)

    def entries(self, ids: tuple[str, ...], now: datetime) -> dict[str, IndexEntry]:
        return {i: entry_of(i, self.first[i].body, fallback_time=_sent_at(self.first[i], now)) for i in ids}


def _sent_at(record: Record, now: datetime) -> datetime:
    stamp = record.properties.timestamp
    return datetime.fromtimestamp(stamp, UTC) if isinstance(stamp, int) else now


GRACE_ENV = "RECONCILE_GRACE_S"


def grace_of(environ: Mapping[str, str]) -> timedelta:
    """The grace `failed reconcile` gives an entry without a record (see the module's docstring)."""
    text = environ.get(GRACE_ENV, "").strip()
    if not text:
        return failure_index.RECONCILE_GRACE
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise CliError(f"{GRACE_ENV} must be a number of seconds, 0 or more (it is {text[:40]!r})", USAGE)
    return timedelta(seconds=seconds)


def bring_in_line(index: FailureIndex, found: Found, *, started_at: datetime, leave_out: frozenset[str] = frozenset(),
                  dry_run: bool = False, grace: timedelta = failure_index.RECONCILE_GRACE) -> Reconciliation:
    """Compare the index with what a whole cycle started at `started_at` found, and apply the
    difference unless `dry_run`. The ids in `leave_out` are the caller's to settle."""
    seen = {i: s for i, s in index.seen().items() if i not in leave_out}
    on_queue = [i for i in found.first if i not in leave_out]
    found_now = failure_index.reconcile(on_queue, seen, started_at=started_at, grace=grace)
    # Added in queue order, so that their seqs list them as the queue holds them.
    missing = set(found_now.add)
    reconciliation = Reconciliation(tuple(i for i in on_queue if i in missing), found_now.confirm, found_now.delete)
    if not dry_run:
        now = datetime.now(UTC)
        index.apply(reconciliation, found.entries(reconciliation.add, now), now)
    return reconciliation


def run(settings: CliSettings, out: Output, *, dry_run: bool = False) -> int:
    failed = settings.failed_queue
    grace = grace_of(os.environ)
    with mongo.database(settings, answer_timeout_s=None) as db:
        index = FailureIndex(db, settings)
        index.counter()  # MongoDB answers before the queue is touched
        started_at = datetime.now(UTC)
        with broker.connect(settings) as connection:
            broker.require_queue(connection, failed, settings)
            records = Cycle(connection, failed).run().records
        found = Found.of(records)
        done = bring_in_line(index, found, started_at=started_at, dry_run=dry_run, grace=grace)
    if found.without_id:
        warn(f"{plural(found.without_id, 'record')} on {failed} without a message_id: the index "
             "cannot hold such records (`failed list --from-queue` shows them)")
    shared = {i: n for i, n in found.copies.items() if n > 1}
    if out.format == "json":
        out.document(_document(done, found, shared, settings, index.name, dry_run, len(records)))
    elif out.format == "jsonl":
        for row in _rows(done, dry_run):
            out.row(row)
    else:
        verb = "would add" if dry_run else "added"
        for row in _rows(done, dry_run):
            out.line(f"{row['action'].replace('_', ' ')} {row['id']}")
        copies = f" ({plural(len(shared), 'id')} with several copies)" if shared else ""
        out.summary(f"{plural(len(records), 'record')} on {failed}, {plural(len(found.first), 'id')}{copies}: "
                    f"{verb} {len(done.add)}, {'would confirm' if dry_run else 'confirmed'} {len(done.confirm)}, "
                    f"{'would delete' if dry_run else 'deleted'} {len(done.delete)} in {index.name}"
                    f"{' (nothing was changed: --dry-run)' if dry_run else ''}")
    return 0


def _rows(done: Reconciliation, dry_run: bool) -> list[dict[str, Any]]:
    """One per change, as replay's rows are: `added` (or `would_add`), `confirmed`, `deleted`."""
    def action(did: str, would: str) -> str:
        return f"would_{would}" if dry_run else did

    return ([{"action": action("added", "add"), "id": i} for i in done.add]
            + [{"action": action("confirmed", "confirm"), "id": i} for i in done.confirm]
            + [{"action": action("deleted", "delete"), "id": i} for i, _ in done.delete])


def _document(done: Reconciliation, found: Found, shared: dict[str, int], settings: CliSettings, index: str,
              dry_run: bool, records: int) -> dict[str, Any]:
    return {"dry_run": dry_run, "queue": settings.failed_queue, "index": index, "records": records,
            "ids": len(found.first), "without_id": found.without_id, "copies": shared,
            "added": list(done.add), "confirmed": list(done.confirm), "deleted": [i for i, _ in done.delete]}


class Keeper:
    """The index's side of a cycle that moves records: before the chosen records leave, their
    entries are marked `leaving` (one write); after the cycle, the entries of those that left are
    deleted (unless a service wrote them since), those that stayed are `queued` again, and a
    whole cycle brings the rest of the index in line."""

    def __init__(self, index: FailureIndex) -> None:
        self.index = index
        self.started_at = datetime.now(UTC)
        self.token: str | None = None
        self.held: frozenset[str] = frozenset()

    def before_leaving(self, records: list[Record]) -> None:
        self.held = frozenset(r.properties.message_id for r in records if r.properties.message_id)
        self.token = self.index.mark_leaving(self.held)

    def settle(self, cycle: Cycle, *, whole: bool) -> str | None:
        """After the cycle (`whole`: it went all the way round): None, or why the index could not
        be brought in line (the queue's part is done either way)."""
        gone = {id(r) for r in cycle.sent} | {id(r) for r in cycle.dropped}
        stayed = [r for r in cycle.records if id(r) not in gone]
        staying = {r.properties.message_id for r in stayed if r.properties.message_id}
        left = {r.properties.message_id for r in cycle.records if id(r) in gone and r.properties.message_id} - staying
        try:
            if self.token is not None:
                self.index.remove(left, self.token)
                self.index.restore(self.held - left, self.token)
            if whole:
                bring_in_line(self.index, Found.of(stayed), started_at=self.started_at, leave_out=self.held)
        except PyMongoError as exc:
            text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return (f"the failure index was not brought in line with the queue ({text}); "
                    "`registrations failed reconcile` does it")
        return None
