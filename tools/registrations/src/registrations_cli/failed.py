"""`registrations failed list | show | replay | discard`: the failure queue, browsed without loss,
redriven, and pruned. A record is addressed by its id, its AMQP message_id
(`regbridge.plans.Subject.record_id`): copies of one record that a crash window made share it, so
each is listed once, and replayed or discarded once."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingConnection

from regbridge.failure_index import QUEUED

from . import broker, mongo
from .confirm import Consent
from .cycle import Cycle, Drop, Record, Send, exact_copy
from .errors import FAILED, PARTIAL, USAGE, CliError
from .index import Entry, FailureIndex
from .output import Output
from .progress import Progress
from .reconcile import Keeper
from .records import Failure, Filter, first_copies
from .settings import CliSettings
from .table import plural, truncate
from .timefmt import format_age

REASON_WIDTH = 60
INDEX_ANSWER_S = 120.0  # a replay reads every entry's state once: a large index takes a while


def failures_of(records: list[Record]) -> list[Failure]:
    return [Failure.parse(r.position, r.body, message_id=r.properties.message_id,
                          properties=broker.properties_view(r.properties)) for r in records]


def read(connection: BlockingConnection, settings: CliSettings) -> list[Failure]:
    """Every record on the failure queue, in order, by one cycle: the queue is left in its order."""
    broker.require_queue(connection, settings.failed_queue, settings)
    return failures_of(Cycle(connection, settings.failed_queue).run().records)


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
    def of_failure(cls, failure: Failure, copies: dict[str, int] | None = None) -> Row:
        times = (copies or {}).get(failure.message_id or "", 1)
        return cls((failure.message_id or "-") + (f" (x{times})" if times > 1 else ""), failure.stage,
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


def _view(failure: Failure, now: datetime, copies: dict[str, int]) -> dict[str, Any]:
    return {**failure.view(now), "copies": copies.get(failure.message_id or "", 1)}


def entry_view(entry: Entry, body: str, now: datetime) -> dict[str, Any]:
    """An entry as `--json` shows it: the keys of a record read from the queue, its `state` and
    `seq`; `position` and `copies` are the queue's to know (`--from-queue`), so null here."""
    view = Failure.parse(0, body.encode("utf-8"), message_id=entry.record_id).view(now)
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
    with mongo.database(settings) as db:
        index = FailureIndex(db, settings)
        page = index.page(options.filter, options.limit)
        bodies = index.bodies(e.record_id for e in page.entries) if not out.is_table else {}
        size = index.size()
    depth = queue_depth(settings)
    queue = settings.failed_queue
    warn_if_apart(size, depth, index.name, queue)
    shown = page.entries
    if not out.is_table:
        views = [entry_view(e, bodies.get(e.record_id, ""), now) for e in shown]
        out.document(views, jsonl_rows=views)
        return 0
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
    print(f"registrations: the index {index} holds {size} entries but {queue} holds {held} records; "
          "`registrations failed reconcile` compares them record by record", file=sys.stderr)


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
    """The record whose id is `wanted`, or the one whose id alone starts with it (ids of records
    without a message_id are long: a unique prefix will do, as with git's commits)."""
    exact = [f for f in failures if f.message_id == wanted]
    if exact:
        return exact[0]
    prefixed = {f.message_id: f for f in failures if f.message_id is not None and f.message_id.startswith(wanted)}
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
        "id": failure.message_id,
        "copies": copies.get(failure.message_id or "", 1),
        "position": failure.position,
        "queue": settings.failed_queue,
        "age_s": round(failure.age_s(now), 3) if failure.failed_at else None,
        "properties": failure.properties,
        "record": failure.view(now)["record"],
        **({"problem": failure.problem} if failure.problem else {}),
    })
    return 0


@dataclass(frozen=True)
class ReplayOptions:
    filter: Filter
    limit: int | None = None
    dry_run: bool = False
    rate: float | None = None  # replays a second at most
    progress: bool = False  # a bar on stderr while the chosen records are sent


@dataclass
class _Pass:
    """One cycle of a replay (or of its dry run): what it chose, and how it went."""

    cycle: Cycle
    chosen: dict[int, Failure]
    index_problem: str | None = None  # why the index could not follow (the queue's part is done)


def _run(cycle: Cycle, keeper: Keeper | None, moved: Callable[[], bool]) -> str | None:
    """Run `cycle`; with a `keeper`, settle the index after it, however it ends. A stop midway
    exits 3 when some records were moved already."""
    try:
        cycle.run()
    except CliError as exc:
        problem = keeper.settle(cycle, whole=False) if keeper is not None else None
        raise CliError(str(exc) + (f"; {problem}" if problem else ""), PARTIAL if moved() else exc.code) from None
    except BaseException:
        if keeper is not None:
            keeper.settle(cycle, whole=False)
        raise
    return keeper.settle(cycle, whole=True) if keeper is not None else None


def _replay_pass(options: ReplayOptions, settings: CliSettings, *, on_chosen: Callable[[Failure], None] | None,
                 quiet: bool = False, on_held: Callable[[int], None] | None = None,
                 keeper: Keeper | None = None) -> _Pass:
    failed, inbound = settings.failed_queue, settings.inbound_queue
    chosen: dict[int, Failure] = {}
    chosen_ids: set[str] = set()

    def route(record: Record) -> Send | Drop | None:
        [failure] = failures_of([record])
        # Only the records there when the cycle started are taken, so a replay that fails again
        # waits for the next replay: this one never goes round in circles.
        if not options.filter.matches(failure):
            return None
        if failure.message_id in chosen_ids:
            # A copy of a record replayed in this cycle: it leaves once that one has gone, and
            # stays if that one could not go.
            return None if options.dry_run else Drop()
        if options.limit is not None and len(chosen) >= options.limit:
            return None
        if not failure.has_original:
            if not quiet:
                print(f"skipped #{failure.position}: {failure.reason} (no original to replay)", file=sys.stderr)
            return None
        chosen[record.position] = failure
        if failure.message_id is not None:
            chosen_ids.add(failure.message_id)
        return None if options.dry_run else Send(inbound, failure.replay_body(), _properties(failure, failed))

    def sent(record: Record) -> None:
        if on_chosen is not None:
            on_chosen(chosen[record.position])

    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        broker.require_queue(connection, inbound, settings)
        cycle = Cycle(connection, failed, route, on_sent=sent, on_held=on_held, rate=options.rate,
                      before_leaving=keeper.before_leaving if keeper is not None else None)
        # Stopped midway (a lost broker): what was sent is sent, so say it was in part.
        problem = _run(cycle, keeper, lambda: bool(cycle.sent))
    if options.dry_run and on_chosen is not None:
        for record in cycle.records:
            if record.position in chosen:
                on_chosen(chosen[record.position])
    return _Pass(cycle, chosen, problem)


def replay(options: ReplayOptions, settings: CliSettings, out: Output, consent: Consent | None = None) -> int:
    if options.dry_run:
        return _replay(options, settings, out, consent, None)
    with _index(settings) as index:
        return _replay(options, settings, out, consent, index)


@contextmanager
def _index(settings: CliSettings) -> Iterator[FailureIndex]:
    """The failure index, reached before the queue is touched: a replay or a discard that could
    not keep it in line does not start."""
    with mongo.database(settings, answer_timeout_s=INDEX_ANSWER_S) as db:
        index = FailureIndex(db, settings)
        index.counter()
        yield index


def _replay(options: ReplayOptions, settings: CliSettings, out: Output, consent: Consent | None,
            index: FailureIndex | None) -> int:
    """Republish each matching record's `original` to the inbound queue (same message_id), and
    remove the record only once the broker has confirmed the republished message. One cycle of
    the failure queue: the other records go round and keep their order, and the chosen ones are
    sent last, so a replay that fails again at once lands behind them. A crash at any point loses
    nothing: at worst a record stays behind whose registration was replayed.

    With `consent` that has to ask, a dry run counts the records first and the question names
    that count; the replay then takes at most that many, so that a record that matched only
    after the question was answered is left for the next replay."""
    failed, inbound = settings.failed_queue, settings.inbound_queue
    if not options.dry_run and consent is not None and consent.needs_asking:
        counted = len(_replay_pass(ReplayOptions(options.filter, options.limit, dry_run=True), settings,
                                   on_chosen=None, quiet=True).chosen)
        if counted == 0:
            out.summary(f"no failure record on {failed} matches: nothing to replay")
            if not out.is_table:
                out.document(_replay_document(options, settings, [], 0, None), jsonl_rows=[])
            return 0
        consent.require(f"replay {plural(counted, 'failure record')} from {failed} to {inbound}?",
                        "nothing was replayed (the answer was not yes)")
        options = ReplayOptions(options.filter, counted, dry_run=False, rate=options.rate, progress=options.progress)

    verb = "would replay" if options.dry_run else "replayed"
    done: list[Failure] = []

    def report(failure: Failure) -> None:
        done.append(failure)
        if out.format == "jsonl":
            out.row(_replay_row(failure, options.dry_run))
        elif out.is_table:
            out.line(f"{verb} {failure.message_id or '#' + str(failure.position)}  {failure.stage:<10}  "
                     f"user_id={failure.user_id or '-'}")

    bar: list[Progress] = []

    def held(total: int) -> None:
        bar.append(Progress(total, sys.stderr, enabled=options.progress and not options.dry_run, label="replaying"))

    def report_and_advance(failure: Failure) -> None:
        report(failure)
        if bar:
            bar[0].advance()

    try:
        result = _replay_pass(options, settings, on_chosen=report_and_advance, on_held=held,
                              keeper=Keeper(index) if index is not None else None)
    finally:
        if bar:
            bar[0].close()
    cycle = result.cycle
    moved = len(cycle.sent)
    left = _left(cycle)
    stopped = None
    if cycle.refused is not None:
        record, why = cycle.refused
        stopped = (f"the broker did not take the replay of #{record.position} to {inbound} ({why}); stopped "
                   f"after {moved}: that record and the rest are still on {failed}, behind the others")
    if out.format == "json":
        out.document(_replay_document(options, settings, done, left, stopped))
    if stopped is not None:
        raise CliError(stopped, PARTIAL if moved else FAILED)
    out.summary(f"{verb} {plural(len(done), 'failure record')} to {inbound}; {left} left on {failed}"
                f"{' (nothing was moved: --dry-run)' if options.dry_run else ''}")
    if result.index_problem is not None:
        raise CliError(result.index_problem, PARTIAL)
    return 0


def _left(cycle: Cycle) -> int:
    """Records left on the queue after the cycle, each counted once however many copies it has."""
    gone = {id(r) for r in cycle.sent} | {id(r) for r in cycle.dropped}
    return len(first_copies(failures_of([r for r in cycle.records if id(r) not in gone]))[0])


def _replay_row(failure: Failure, dry_run: bool) -> dict[str, Any]:
    return {"action": "would_replay" if dry_run else "replayed", "id": failure.message_id, "position": failure.position,
            "stage": failure.stage, "user_id": failure.user_id, "message_id": failure.message_id}


def _replay_document(options: ReplayOptions, settings: CliSettings, done: list[Failure], left: int,
                     stopped: str | None) -> dict[str, Any]:
    return {"dry_run": options.dry_run, "from": settings.failed_queue, "to": settings.inbound_queue,
            "records": [_replay_row(f, options.dry_run) for f in done], "count": len(done), "left": left,
            "complete": stopped is None, **({"stopped": stopped} if stopped else {})}


def _properties(failure: Failure, failed_queue: str) -> pika.BasicProperties:
    original = failure.data["original"] if isinstance(failure.data, dict) else None
    return pika.BasicProperties(
        delivery_mode=2,
        content_type=None if isinstance(original, str) else "application/json",
        # The record's message_id carries on (it names the registration across its messages);
        # a record without one gets a fresh one, so that this attempt is told from earlier ones.
        message_id=failure.message_id or str(uuid.uuid4()),
        timestamp=int(time.time()),
        headers={"x-replayed-from": failed_queue, "x-replayed-at": datetime.now(UTC).isoformat()},
    )


@dataclass(frozen=True)
class DiscardOptions:
    filter: Filter
    export: Path | None  # required unless dry_run
    limit: int | None = None
    dry_run: bool = False


def export_lines(records: list[Record], queue: str) -> list[str]:
    """One JSON line per record id (copies of one record are one line), holding what it takes to
    publish the record again: its properties and its exact body."""
    lines: dict[str, str] = {}
    for failure, record in zip(failures_of(records), records, strict=True):
        key = failure.message_id if failure.message_id is not None else f"#{failure.position}"
        if key in lines:
            continue
        try:
            body: dict[str, str] = {"body": record.body.decode("utf-8")}
        except UnicodeDecodeError:
            body = {"body_base64": base64.b64encode(record.body).decode("ascii")}
        # Without the delivery count the broker added to this delivery: it is no property of the record.
        properties = broker.properties_view(exact_copy(record.properties))
        lines[key] = json.dumps({"id": failure.message_id, "queue": queue,
                                 "discarded_at": datetime.now(UTC).isoformat(), "properties": properties,
                                 **body}, ensure_ascii=False)
    return list(lines.values())


def write_durably(path: Path, lines: list[str]) -> None:
    """Append `lines` to `path` and wait until they are on disk: a discard removes nothing that
    a power cut could take from the file. Appending, so that a discard run again after a crash
    never overwrites what the first run kept."""
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as file:
        file.write("".join(line + "\n" for line in lines))
        file.flush()
        os.fsync(file.fileno())
    if created:  # the new file's name is on disk too
        directory = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def discard(options: DiscardOptions, settings: CliSettings, out: Output, consent: Consent | None = None) -> int:
    if options.dry_run:
        return _discard(options, settings, out, consent, None)
    with _index(settings) as index:
        return _discard(options, settings, out, consent, index)


def _discard(options: DiscardOptions, settings: CliSettings, out: Output, consent: Consent | None,
             index: FailureIndex | None) -> int:
    """Remove the matching records for good, each written to the export file first. One cycle:
    the others go round and keep their order; the chosen ones are held, written and synced to
    the file together, and only then acked. At least once: a crash leaves every removed record in
    the file, and at worst a record in the file that is still on the queue (a second run appends
    it again)."""
    failed = settings.failed_queue
    if not options.dry_run and options.export is None:
        raise CliError("failed discard removes records for good: give --export FILE to keep them (or --dry-run)",
                       USAGE)
    flt, limit = options.filter, options.limit
    if not options.dry_run and options.export is not None:
        # A file that cannot be written is found before the queue is touched: once the cycle has
        # taken the records, a failed write can only put them back behind the others.
        try:
            write_durably(options.export, [])
        except OSError as exc:
            raise CliError(f"cannot write {options.export} ({exc.strerror or exc}); nothing was discarded") from None
    if not options.dry_run and consent is not None and consent.needs_asking:
        counted = len(_discard_pass(DiscardOptions(flt, None, limit, dry_run=True), settings).chosen)
        if counted == 0:
            out.summary(f"no failure record on {failed} matches: nothing to discard")
            if not out.is_table:
                out.document(_discard_document(options, settings, [], 0), jsonl_rows=[])
            return 0
        consent.require(f"discard {plural(counted, 'failure record')} from {failed} for good (kept in "
                        f"{options.export})?", "nothing was discarded (the answer was not yes)")
        limit = counted
    result = _discard_pass(DiscardOptions(flt, options.export, limit, options.dry_run), settings,
                           Keeper(index) if index is not None else None)
    done = list(result.chosen.values())
    left = _left(result.cycle)
    verb = "would discard" if options.dry_run else "discarded"
    if out.format == "json":
        out.document(_discard_document(options, settings, done, left))
    elif out.format == "jsonl":
        for failure in done:
            out.row(_discard_row(failure, options.dry_run))
    else:
        for failure in done:
            out.line(f"{verb} {failure.message_id or '#' + str(failure.position)}  {failure.stage:<10}  "
                     f"user_id={failure.user_id or '-'}")
    kept = f"; written to {options.export}" if options.export is not None and not options.dry_run and done else ""
    out.summary(f"{verb} {plural(len(done), 'failure record')} from {failed}{kept}; {left} left"
                f"{' (nothing was removed: --dry-run)' if options.dry_run else ''}")
    if result.index_problem is not None:
        raise CliError(result.index_problem, PARTIAL)
    return 0


def _discard_pass(options: DiscardOptions, settings: CliSettings, keeper: Keeper | None = None) -> _Pass:
    failed = settings.failed_queue
    chosen: dict[int, Failure] = {}
    chosen_ids: set[str] = set()

    def route(record: Record) -> Drop | None:
        [failure] = failures_of([record])
        if not options.filter.matches(failure):
            return None
        if failure.message_id is None or failure.message_id not in chosen_ids:
            if options.limit is not None and len(chosen) >= options.limit:
                return None
            chosen[record.position] = failure
            if failure.message_id is not None:
                chosen_ids.add(failure.message_id)
        return None if options.dry_run else Drop()

    def keep(records: list[Record]) -> None:
        assert options.export is not None
        try:
            write_durably(options.export, export_lines(records, failed))
        except OSError as exc:
            raise CliError(f"cannot write {options.export} ({exc.strerror or exc}); nothing was discarded") from None

    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        cycle = Cycle(connection, failed, route, before_drops=keep,
                      before_leaving=keeper.before_leaving if keeper is not None else None)
        problem = _run(cycle, keeper, lambda: bool(cycle.dropped))
    return _Pass(cycle, chosen, problem)


def _discard_row(failure: Failure, dry_run: bool) -> dict[str, Any]:
    return {"action": "would_discard" if dry_run else "discarded", "id": failure.message_id,
            "position": failure.position, "stage": failure.stage, "user_id": failure.user_id}


def _discard_document(options: DiscardOptions, settings: CliSettings, done: list[Failure],
                      left: int) -> dict[str, Any]:
    return {"dry_run": options.dry_run, "from": settings.failed_queue,
            "export": str(options.export) if options.export is not None else None,
            "records": [_discard_row(f, options.dry_run) for f in done], "count": len(done), "left": left}
