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
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.errors import PyMongoError

from regbridge import failure_index
from regbridge.failure_index import IndexEntry, Reconciliation

from . import broker, mongo
from .cycle import Cycle, Record
from .errors import USAGE, CliError
from .index import FailureIndex, entry_of
from .listing import failures_of
from .output import Output
from .records import CopyKey
from .sanitize import warn
from .settings import CliSettings
from .table import one_line, plural


def id_of(record: Record) -> str:
    return failures_of([record])[0].record_id


class Found:
    """What one whole cycle found, record by record as it went round: each record id
    (`records.record_id_of`) with its first copy and its count of copies, and the ids that
    distinct records share (`records.Failure.copy_key`: records an earlier release wrote under one
    inbound message_id), of which the index holds one entry each. Of an id the index already held
    when the cycle started (`known`), the first copy is not kept, only its count: the index's
    entry stands for it, so memory grows with the ids, not with the records' bodies."""

    def __init__(self, known: frozenset[str] = frozenset()) -> None:
        self.first: dict[str, Record | None] = {}  # None: not kept, the index holds it
        self.copies: dict[str, int] = {}
        self.records = 0
        self._known = known
        self._keys: dict[str, CopyKey] = {}  # each id's first copy key, digested
        self._shared: set[str] = set()

    @property
    def shared_by_distinct(self) -> frozenset[str]:
        return frozenset(self._shared)

    def add(self, record: Record) -> None:
        self.records += 1
        [failure] = failures_of([record])
        record_id, key = failure.record_id, failure.copy_digest
        if record_id not in self.first:
            self.first[record_id] = None if record_id in self._known else record
            self._keys[record_id] = key
        elif key != self._keys[record_id]:
            self._shared.add(record_id)
        self.copies[record_id] = self.copies.get(record_id, 0) + 1

    @classmethod
    def of(cls, records: list[Record]) -> Found:
        found = cls()
        for record in records:
            found.add(record)
        return found

    def entries(self, ids: tuple[str, ...], now: datetime) -> dict[str, IndexEntry]:
        """The entries to add for `ids`, each from its first copy: those not kept are left out."""
        return {i: entry_of(i, r.body, fallback_time=_sent_at(r, now))
                for i in ids if (r := self.first.get(i)) is not None}


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
    # An id the index held at the start and lost since has no first copy kept: the next reconcile
    # adds it (it is rare: only a reconcile or a replay deletes entries, and one cycle runs at once).
    missing = {i for i in found_now.add if found.first.get(i) is not None}
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
        found = Found(index.ids())
        with broker.connect(settings) as connection:
            broker.require_queue(connection, failed, settings)
            Cycle(connection, failed, keep=False, on_put_back=found.add, progress=sys.stderr.isatty()).run()
        records = found.records
        done = bring_in_line(index, found, started_at=started_at, dry_run=dry_run, grace=grace)
    if found.shared_by_distinct:
        some = ", ".join(sorted(found.shared_by_distinct)[:5])
        warn(f"{plural(len(found.shared_by_distinct), 'id')} on {failed} named by distinct records ({some}): "
             "records an earlier release wrote under one inbound message_id; the index holds one entry "
             "for each id (`failed list --from-queue` shows every record, and replay and discard take each)")
    shared = {i: n for i, n in found.copies.items() if n > 1}
    if out.format == "json":
        out.document(_document(done, found, shared, settings, index.name, dry_run, records))
    elif out.format == "jsonl":
        for row in _rows(done, dry_run):
            out.row(row)
    else:
        verb = "would add" if dry_run else "added"
        for row in _rows(done, dry_run):
            out.line(f"{row['action'].replace('_', ' ')} {one_line(str(row['id']))}")
        copies = f" ({plural(len(shared), 'id')} with several copies)" if shared else ""
        out.summary(f"{plural(records, 'record')} on {failed}, {plural(len(found.first), 'id')}{copies}: "
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
            "ids": len(found.first), "shared_by_distinct": sorted(found.shared_by_distinct), "copies": shared,
            "added": list(done.add), "confirmed": list(done.confirm), "deleted": [i for i, _ in done.delete]}


class Keeper:
    """The index's side of a cycle that moves records: before the chosen records leave, their
    entries are marked `leaving` (one write); after the cycle, the entries of those that left are
    deleted (unless a service wrote them since), those that stayed are `queued` again, and a
    whole cycle brings the rest of the index in line. The cycle tells it each record it puts back
    (`put_back`): what stayed is kept as `Found` keeps it, by id."""

    def __init__(self, index: FailureIndex) -> None:
        self.index = index
        self.started_at = datetime.now(UTC)
        self.token: str | None = None
        self.held: frozenset[str] = frozenset()
        self.stayed = Found(index.ids())

    def put_back(self, record: Record) -> None:
        self.stayed.add(record)

    def before_leaving(self, records: list[Record]) -> None:
        self.held = frozenset(id_of(r) for r in records)
        self.token = self.index.mark_leaving(self.held)

    def settle(self, cycle: Cycle, *, whole: bool) -> str | None:
        """After the cycle (`whole`: it went all the way round): None, or why the index could not
        be brought in line (the queue's part is done either way)."""
        staying = set(self.stayed.first)
        left = {id_of(r) for r in [*cycle.sent, *cycle.dropped]} - staying
        try:
            if self.token is not None:
                self.index.remove(left, self.token)
                self.index.restore(self.held - left, self.token)
            if whole:
                bring_in_line(self.index, self.stayed, started_at=self.started_at, leave_out=self.held)
        except PyMongoError as exc:
            text = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return (f"the failure index was not brought in line with the queue ({text}); "
                    "`registrations failed reconcile` does it")
        return None
