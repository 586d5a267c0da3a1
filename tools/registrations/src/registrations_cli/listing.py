"""`registrations failed list | show`: the failure records, read from the failure index (the
queue left alone), or with `--from-queue` from the queue itself by a cycle (`cycle.py`), which
also shows what only the queue knows: each record's place, its copies and its AMQP properties."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from regbridge.failure_index import QUEUED

from . import broker, mongo
from .cycle import Cycle, Record
from .errors import CliError
from .index import Entry, FailureIndex
from .output import Output
from .records import Failure, Filter, first_copies
from .sanitize import warn
from .settings import CliSettings
from .table import plural, truncate
from .timefmt import format_age

REASON_WIDTH = 60
Copies = dict[tuple[str, bytes | None], int]  # copies of each record (`Failure.copy_key`)

def failures_of(records: list[Record]) -> list[Failure]:
    return [Failure.parse(r.position, r.body, message_id=r.properties.message_id, headers=r.properties.headers,
                          properties=broker.properties_view(r.properties)) for r in records]


def read(connection: BlockingConnection, settings: CliSettings) -> list[Failure]:
    """Every record on the failure queue, in order, by one cycle: the queue is left in its order."""
    broker.require_queue(connection, settings.failed_queue, settings)
    return failures_of(Cycle(connection, settings.failed_queue, progress=sys.stderr.isatty()).run().records)


@dataclass(frozen=True)
class Row:
    """One line of a table of records, read from the index or from the queue."""

    id: str
    stage: str
    user_id: str | None
    failed_at: datetime | None
    reason: str
    state: str | None = None  # the entry's state; None when read from the queue

    @classmethod
    def of_failure(cls, failure: Failure, copies: Copies | None = None) -> Row:
        times = (copies or {}).get(failure.copy_key, 1)
        return cls(failure.record_id + (f" (x{times})" if times > 1 else ""), failure.stage,
                   failure.user_id, failure.failed_at, failure.reason)

    @classmethod
    def of_entry(cls, entry: Entry) -> Row:
        return cls(entry.record_id, entry.stage, entry.user_id, entry.failed_at if entry.readable else None,
                   entry.reason, entry.state)


def table(rows: list[Row], now: datetime, *, indent: str = "", out: Output | None = None) -> str:
    """ID, STAGE, USER_ID, AGE, REASON; and STATE after ID when some row's entry is not `queued`
    (its record is being published, or leaving: see regbridge.failure_index)."""
    states = any(r.state not in (None, QUEUED) for r in rows)
    cells = [[r.id, *([r.state or "-"] if states else []), r.stage, r.user_id or "-",
              format_age((now - r.failed_at).total_seconds()) if r.failed_at else "?",
              truncate(r.reason, REASON_WIDTH)] for r in rows]
    headers = ["ID", *(["STATE"] if states else []), "STAGE", "USER_ID", "AGE", "REASON"]
    return (out or Output()).table(headers, cells, right=["AGE"], indent=indent)


def _view(failure: Failure, now: datetime, copies: Copies) -> dict[str, Any]:
    return {**failure.view(now), "copies": copies.get(failure.copy_key, 1)}


def entry_view(entry: Entry, body: str, now: datetime) -> dict[str, Any]:
    """An entry as `--json` shows it: the keys of a record read from the queue, its `state` and
    `seq`; `position` and `copies` are the queue's to know (`--from-queue`), so null here."""
    view = Failure.parse(0, body.encode("utf-8"), record_id=entry.record_id).view(now)
    view["message_id"] = None  # the AMQP property is the queue's to know: `--from-queue`
    return {**view, "position": None, "copies": None, "state": entry.state, "seq": entry.seq}


@dataclass(frozen=True)
class ListOptions:
    filter: Filter
    limit: int | None = None
    from_queue: bool = False


def list_records(options: ListOptions, settings: CliSettings, out: Output) -> int:
    if options.from_queue:
        return _list_from_queue(options, settings, out)
    now = datetime.now(UTC)
    queue = settings.failed_queue
    if not out.is_table:
        # Written as they are read, window by window, each window's bodies with it: memory holds
        # one window whatever the index holds.
        with mongo.database(settings) as db:
            index = FailureIndex(db, settings)
            warn_if_apart(index.size(), queue_depth(settings), index.name, queue)
            out.rows(entry_view(e, e.body or "", now) for e in index.walk(options.filter, options.limit, bodies=True))
        return 0
    with mongo.database(settings) as db:
        index = FailureIndex(db, settings)
        page = index.page(options.filter, options.limit)
        size = index.size()
    depth = queue_depth(settings)
    warn_if_apart(size, depth, index.name, queue)
    shown = page.entries
    if shown:
        out.line(table([Row.of_entry(e) for e in shown], now, out=out))
        out.summary("")
    elif size == 0 and depth == 0:
        out.summary(f"no failure records on {queue}")
        return 0
    parts = []
    if page.more:
        parts.append(f"{len(shown)} shown; more match (--limit)")
    elif options.filter.active:
        parts.append(f"{len(shown)} matching")
    if depth == size:
        parts.append(f"{plural(size, 'failure record')} on {queue}")
    else:
        on_queue = "unknown" if depth is None else str(depth)
        parts.append(f"{plural(size, 'failure record')} in the index, {on_queue} on {queue}")
    out.summary("; ".join(parts))
    return 0


def queue_depth(settings: CliSettings) -> int | None:
    """The failure queue's ready messages (a passive declare), or None when the broker cannot tell."""
    try:
        with broker.connect(settings) as connection:
            info = broker.queue_info(connection, settings.failed_queue)
    except (CliError, pika.exceptions.AMQPError):
        return None
    return None if info is None else info.ready


def warn_if_apart(size: int, depth: int | None, index: str, queue: str) -> None:
    """One line on stderr when the index's size and the queue's depth differ. Both are counts from
    metadata: a record being published or replayed right now, copies of one record, or records a
    consumer holds make them differ for a moment; a lasting difference is what reconcile is for."""
    if depth == size:
        return
    held = "an unknown number of" if depth is None else str(depth)
    warn(f"the index {index} holds {size} entries but {queue} holds {held} records; "
         "`registrations failed reconcile` compares them record by record")


def _list_from_queue(options: ListOptions, settings: CliSettings, out: Output) -> int:
    now = datetime.now(UTC)
    with broker.connect(settings) as connection:
        failures, copies = first_copies(read(connection, settings))
    shown = [f for f in failures if options.filter.matches(f)]
    matching = len(shown)
    if options.limit is not None:
        shown = shown[: options.limit]
    if not out.is_table:
        views = [_view(f, now, copies) for f in shown]
        out.document(views, jsonl_rows=views)
        return 0
    queue = settings.failed_queue
    if not failures:
        out.summary(f"no failure records on {queue}")
        return 0
    if shown:
        out.line(table([Row.of_failure(f, copies) for f in shown], now, out=out))
        out.summary("")
    parts = []
    if len(shown) < matching:
        parts.append(f"{len(shown)} shown of {matching} matching")
    elif options.filter.active:
        parts.append(f"{matching} matching")
    parts.append(f"{plural(len(failures), 'failure record')} on {queue}")
    out.summary("; ".join(parts))
    return 0


def find(failures: list[Failure], wanted: str, queue: str) -> Failure:
    """The record whose id is `wanted`, or the one whose id alone starts with it (ids are long:
    a unique prefix will do, as with git's commits)."""
    exact = [f for f in failures if f.record_id == wanted]
    if exact:
        return exact[0]
    prefixed = {f.record_id: f for f in failures if f.record_id.startswith(wanted)}
    if len(prefixed) == 1:
        return next(iter(prefixed.values()))
    if prefixed:
        some = ", ".join(sorted(str(k) for k in prefixed)[:5])
        raise CliError(f"{len(prefixed)} records on {queue} have ids starting with {wanted!r} ({some}"
                       f"{', ...' if len(prefixed) > 5 else ''}): give more of the id")
    held = f"holds {plural(len(failures), 'record')}" if failures else "is empty"
    raise CliError(f"no record with id {wanted!r}: {queue} {held} (`registrations failed list` shows their ids)")


PREFIX_SHOWN = 5


def find_entry(index: FailureIndex, wanted: str) -> Entry:
    """The entry whose id is `wanted`, or the one whose id alone starts with it."""
    exact = index.get(wanted)
    if exact is not None:
        return exact
    prefixed = index.starting_with(wanted, PREFIX_SHOWN + 1)
    if len(prefixed) == 1:
        found = index.get(prefixed[0].record_id)
        if found is not None:
            return found
    if prefixed:
        some = ", ".join(e.record_id for e in prefixed[:PREFIX_SHOWN])
        many = f"{PREFIX_SHOWN} or more" if len(prefixed) > PREFIX_SHOWN else str(len(prefixed))
        raise CliError(f"{many} records in {index.name} have ids starting with {wanted!r} ({some}"
                       f"{', ...' if len(prefixed) > PREFIX_SHOWN else ''}): give more of the id")
    raise CliError(f"no record with id {wanted!r} in the index {index.name} (`registrations failed list` shows "
                   "their ids; `registrations failed reconcile` indexes records the index lacks)")


def show(wanted: str, settings: CliSettings, out: Output, *, from_queue: bool = False) -> int:
    if from_queue:
        return _show_from_queue(wanted, settings, out)
    with mongo.database(settings) as db:
        entry = find_entry(FailureIndex(db, settings), wanted)
    now = datetime.now(UTC)
    if out.is_table:
        out.line(table([Row.of_entry(entry)], now, out=out))
        return 0
    view = entry_view(entry, entry.body or "", now)
    out.document({
        "id": entry.record_id,
        "copies": None,
        "position": None,
        "queue": settings.failed_queue,
        "state": entry.state,
        "seq": entry.seq,
        "age_s": view["age_s"],
        "properties": None,  # the queue's to know: `--from-queue`
        "record": view["record"],
        **({"problem": view["problem"]} if "problem" in view else {}),
    })
    return 0


def _show_from_queue(wanted: str, settings: CliSettings, out: Output) -> int:
    with broker.connect(settings) as connection:
        failures, copies = first_copies(read(connection, settings))
    failure = find(failures, wanted, settings.failed_queue)
    now = datetime.now(UTC)
    if out.is_table:
        out.line(table([Row.of_failure(failure, copies)], now, out=out))
        return 0
    out.document({
        "id": failure.record_id,
        "copies": copies.get(failure.copy_key, 1),
        "position": failure.position,
        "queue": settings.failed_queue,
        "age_s": round(failure.age_s(now), 3) if failure.failed_at else None,
        "properties": failure.properties,
        "record": failure.view(now)["record"],
        **({"problem": failure.problem} if failure.problem else {}),
    })
    return 0
