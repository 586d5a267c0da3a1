"""`registrations failed replay | discard`: the failure queue redriven and pruned, each by one
cycle of the queue, with the failure index kept in line. A record is addressed by its id
(`records.record_id_of`): copies of one record that a crash window made are replayed or
discarded once (`records.Failure.copy_key`), and distinct records are each taken on their own."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika

from . import broker, mongo
from .confirm import Consent
from .cycle import MAX_HOLD_S, Cycle, Drop, Record, Send, Stop, exact_copy, finishing_first
from .errors import FAILED, INTERRUPTED, PARTIAL, USAGE, CliError
from .index import FailureIndex
from .listing import failures_of
from .output import Output
from .progress import Progress
from .reconcile import Keeper
from .records import CopyKey, Failure, Filter
from .sanitize import visible
from .settings import CliSettings
from .table import plural

REASON_WIDTH = 60
INDEX_ANSWER_S = 120.0  # a replay reads every entry's state once: a large index takes a while


@dataclass(frozen=True)
class ReplayOptions:
    filter: Filter
    limit: int | None = None
    dry_run: bool = False
    rate: float | None = None  # replays a second at most
    progress: bool = False  # bars on stderr while the queue goes round and while the chosen records are sent
    max_hold_s: float = MAX_HOLD_S  # no record held unacked longer (see `cycle.Cycle.has_room`)


class _Tally:
    """What stayed on the queue after a cycle, as `left` counts it: each record once however many
    copies it has (`records.Failure.copy_key`). Keys only: the records themselves are not kept."""

    def __init__(self) -> None:
        self.keys: set[CopyKey] = set()

    def add(self, record: Record) -> None:
        self.keys.add(failures_of([record])[0].copy_digest)

    @property
    def left(self) -> int:
        return len(self.keys)


@dataclass
class _Pass:
    """One cycle of a replay (or of its dry run): what it chose, and how it went."""

    cycle: Cycle
    chosen: dict[int, Failure]
    tally: _Tally
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


def _put_back_to(tally: _Tally, keeper: Keeper | None) -> Callable[[Record], None]:
    def put_back(record: Record) -> None:
        tally.add(record)
        if keeper is not None:
            keeper.put_back(record)
    return put_back


def _replay_pass(options: ReplayOptions, settings: CliSettings, *, on_chosen: Callable[[Failure], None] | None,
                 quiet: bool = False, on_held: Callable[[int], None] | None = None,
                 keeper: Keeper | None = None, replayed: set[CopyKey] | None = None,
                 stop: Stop | None = None) -> _Pass:
    """One cycle. `replayed`: the copy keys of the records an earlier pass of this replay sent;
    this pass drops a copy of one (a crash window's duplicate, which the earlier pass left out).
    A new failure of a registration just replayed is another attempt, so another id: the next
    replay's to take."""
    failed, inbound = settings.failed_queue, settings.inbound_queue
    chosen: dict[int, Failure] = {}
    chosen_ids: dict[CopyKey, int] = {}  # copy key -> position of the copy replayed
    tally = _Tally()
    earlier = replayed or set()
    holding = not options.dry_run  # a dry run holds nothing: it needs no bound

    def route(record: Record) -> Send | Drop | None:
        [failure] = failures_of([record])
        # Only the records there when the cycle started are taken, so a replay that fails again
        # waits for the next replay: this one never goes round in circles.
        if not options.filter.matches(failure):
            return None
        if failure.copy_key in chosen_ids:
            # A copy of a record replayed in this cycle: it leaves once that one has gone, and
            # stays if that one could not go.
            return None if options.dry_run else Drop(copy_of=chosen_ids[failure.copy_key])
        if failure.copy_key in earlier:
            return Drop()
        if options.limit is not None and len(chosen) >= options.limit:
            return None
        if not failure.has_original:
            if not quiet:
                print(visible(f"skipped #{failure.position}: {failure.reason} (no original to replay)"),
                      file=sys.stderr)
            return None
        if holding and not cycle.has_room():
            return None  # it would be held too long by the time it went: the next pass takes it
        chosen[record.position] = failure
        chosen_ids[failure.copy_key] = record.position
        return None if options.dry_run else Send(inbound, failure.replay_body(), _properties(failure, failed))

    def sent(record: Record) -> None:
        if on_chosen is not None:
            on_chosen(chosen[record.position])

    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        broker.require_queue(connection, inbound, settings)
        # A dry run is a browse: a signal lets it end, then stops the command.
        cycle = Cycle(connection, failed, route, on_sent=sent, on_held=on_held, rate=options.rate,
                      before_leaving=keeper.before_leaving if keeper is not None else None,
                      stoppable=not options.dry_run, max_hold_s=options.max_hold_s if holding else None,
                      stop=stop, keep=False, on_put_back=_put_back_to(tally, keeper), progress=options.progress)
        # Stopped midway (a lost broker): what was sent is sent, so say it was in part.
        problem = _run(cycle, keeper, lambda: bool(cycle.sent))
    if options.dry_run and on_chosen is not None:
        for failure in chosen.values():  # in queue order
            on_chosen(failure)
    return _Pass(cycle, chosen, tally, problem)


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
    after the question was answered is left for the next replay.

    Ctrl-C or SIGTERM stops the sends after the record in hand; the chosen records not sent go
    back onto the failure queue, behind the others, and the same command run again replays
    them (those replayed are gone from the queue, so none is replayed twice)."""
    failed, inbound = settings.failed_queue, settings.inbound_queue
    limit_given = options.limit
    if not options.dry_run and consent is not None and consent.needs_asking:
        counted = len(_replay_pass(ReplayOptions(options.filter, options.limit, dry_run=True,
                                                 progress=options.progress), settings,
                                   on_chosen=None, quiet=True).chosen)
        if counted == 0:
            out.summary(f"no failure record on {failed} matches: nothing to replay")
            if not out.is_table:
                out.document(_replay_document(options, settings, [], 0, None), jsonl_rows=[])
            return 0
        consent.require(f"replay {plural(counted, 'failure record')} from {failed} to {inbound}?",
                        "nothing was replayed (the answer was not yes)")
        options = replace(options, limit=counted, dry_run=False)

    verb = "would replay" if options.dry_run else "replayed"
    done: list[Failure] = []

    def report(failure: Failure) -> None:
        done.append(failure)
        if out.format == "jsonl":
            out.row(_replay_row(failure, options.dry_run))
        elif out.is_table:
            out.line(_action_line(verb, failure))

    bar: list[Progress] = []
    passes: list[_Pass] = []

    def held(total: int) -> None:
        for previous in bar:
            previous.close()
        label = "replaying" if len(passes) == 0 else f"replaying (pass {len(passes) + 1})"
        bar[:] = [Progress(total, sys.stderr, enabled=options.progress and not options.dry_run, label=label)]

    def report_and_advance(failure: Failure) -> None:
        report(failure)
        if bar:
            bar[0].advance()

    # Passes: each a whole cycle that holds no record longer than `max_hold_s`; the matching
    # records one pass left out, the next takes, until none is left out (a dry run holds nothing:
    # one pass).
    stop = Stop(failed, stoppable=not options.dry_run)
    replayed: set[CopyKey] = set()
    between = False  # a signal came between two passes
    try:
        with finishing_first(stop):
            while True:
                limit = None if options.limit is None else options.limit - len(done)
                result = _replay_pass(replace(options, limit=limit), settings, on_chosen=report_and_advance,
                                      on_held=held, keeper=Keeper(index) if index is not None else None,
                                      replayed=replayed, stop=stop)
                passes.append(result)
                replayed.update(failure.copy_key for failure in failures_of(result.cycle.sent))
                cycle = result.cycle
                if (options.dry_run or cycle.refused is not None or cycle.interrupted or not cycle.left_out
                        or result.index_problem is not None or (limit is not None and len(cycle.sent) >= limit)):
                    break
                if not result.chosen:
                    raise CliError(f"no record could be held within --max-hold {options.max_hold_s:g} s at this "
                                   f"rate: {cycle.left_out} left out, none sent; give a longer --max-hold (under "
                                   "the broker's consumer_timeout) or a higher --rate", PARTIAL if done else FAILED)
                if stop.requested:
                    between = True
                    break
    finally:
        for previous in bar:
            previous.close()
    moved = sum(len(p.cycle.sent) for p in passes)
    chosen = sum(len(p.chosen) for p in passes)
    left = passes[-1].tally.left
    stopped = None
    code = PARTIAL if moved else FAILED
    interrupted = cycle.interrupted or between
    if cycle.refused is not None:
        record, why = cycle.refused
        stopped = (f"the broker did not take the replay of #{record.position} to {inbound} ({why}); stopped "
                   f"after {moved}: that record and the rest are still on {failed}, behind the others")
    elif interrupted:
        again = ("run the same command again to replay them" if limit_given is None else
                 f"run it again with --limit {limit_given - moved} to replay as many more (the first that "
                 "match, in queue order)")
        stopped = (f"interrupted: {moved} of {chosen} replayed; the rest are still "
                   f"on {failed}, behind the others; {again}")
        code = PARTIAL if moved else INTERRUPTED
    if out.format == "json":
        out.document(_replay_document(options, settings, done, left, stopped, interrupted=interrupted,
                                      passes=len(passes)))
    if stopped is not None:
        raise CliError(stopped, code)
    several = f" in {len(passes)} passes (--max-hold)" if len(passes) > 1 else ""
    out.summary(f"{verb} {plural(len(done), 'failure record')} to {inbound}{several}; {left} left on {failed}"
                f"{' (nothing was moved: --dry-run)' if options.dry_run else ''}")
    problems = [p.index_problem for p in passes if p.index_problem is not None]
    if problems:
        raise CliError(problems[-1], PARTIAL)
    return 0


def _action_line(verb: str, failure: Failure) -> str:
    """One record replayed or discarded, on one line whatever its fields hold."""
    return (f"{verb} {visible(failure.record_id)}  {visible(failure.stage):<10}  "
            f"user_id={visible(failure.user_id or '-')}")


def _replay_row(failure: Failure, dry_run: bool) -> dict[str, Any]:
    return {"action": "would_replay" if dry_run else "replayed", "id": failure.record_id, "position": failure.position,
            "stage": failure.stage, "user_id": failure.user_id, "message_id": failure.message_id}


def _replay_document(options: ReplayOptions, settings: CliSettings, done: list[Failure], left: int,
                     stopped: str | None, *, interrupted: bool = False, passes: int = 1) -> dict[str, Any]:
    return {"dry_run": options.dry_run, "from": settings.failed_queue, "to": settings.inbound_queue,
            "records": [_replay_row(f, options.dry_run) for f in done], "count": len(done), "left": left,
            "passes": passes,
            "complete": stopped is None, **({"stopped": stopped} if stopped else {}),
            **({"interrupted": True} if interrupted else {})}


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
    progress: bool = False  # a bar on stderr while the queue goes round


def export_lines(records: list[Record], queue: str) -> list[str]:
    """One JSON line per record (byte-identical copies of one record are one line; copies whose
    bodies differ, such as a redelivery's record written again, are a line each, so that no body
    removed is missing from the file), holding what it takes to publish the record again: its
    properties and its exact body."""
    lines: dict[tuple[str, bytes], str] = {}
    for failure, record in zip(failures_of(records), records, strict=True):
        key = (failure.record_id, record.body)
        if key in lines:
            continue
        try:
            body: dict[str, str] = {"body": record.body.decode("utf-8")}
        except UnicodeDecodeError:
            body = {"body_base64": base64.b64encode(record.body).decode("ascii")}
        # Without the delivery count the broker added to this delivery: it is no property of the record.
        properties = broker.properties_view(exact_copy(record.properties))
        lines[key] = json.dumps({"id": failure.record_id, "queue": queue,
                                 "discarded_at": datetime.now(UTC).isoformat(), "properties": properties,
                                 **body}, ensure_ascii=True)
    return list(lines.values())


def write_durably(path: Path, lines: list[str]) -> None:
    """Append `lines` to `path` and wait until they are on disk: a discard removes nothing that
    a power cut could take from the file. Appending, so that a discard run again after a crash
    never overwrites what the first run kept."""
    created = not path.exists()
    data = memoryview("".join(line + "\n" for line in lines).encode("utf-8"))
    # Unbuffered: a buffered file would retry its failed write when it is closed.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            # A full disk can take part of a line: cut it off, or the next run's first line
            # would follow it and neither could be read back.
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
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
    it again). Ctrl-C or SIGTERM before the file is written removes nothing: the chosen records go
    back, behind the others; once it is written, the removals (acks, no waiting) finish."""
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
        counting = DiscardOptions(flt, None, limit, dry_run=True, progress=options.progress)
        counted = len(_discard_pass(counting, settings).chosen)
        if counted == 0:
            out.summary(f"no failure record on {failed} matches: nothing to discard")
            if not out.is_table:
                out.document(_discard_document(options, settings, [], 0), jsonl_rows=[])
            return 0
        consent.require(f"discard {plural(counted, 'failure record')} from {failed} for good (kept in "
                        f"{options.export})?", "nothing was discarded (the answer was not yes)")
        limit = counted
    result = _discard_pass(replace(options, limit=limit), settings,
                           Keeper(index) if index is not None else None)
    left = result.tally.left
    if result.cycle.interrupted:
        stopped = (f"interrupted before the records were written to {options.export}: nothing was discarded; the "
                   f"{len(result.chosen)} chosen are still on {failed}, behind the others; run the same command "
                   "again to discard them")
        if out.format == "json":
            out.document({**_discard_document(options, settings, [], left), "complete": False, "stopped": stopped,
                          "interrupted": True})
        raise CliError(stopped, INTERRUPTED)
    done = list(result.chosen.values())
    verb = "would discard" if options.dry_run else "discarded"
    if out.format == "json":
        out.document(_discard_document(options, settings, done, left))
    elif out.format == "jsonl":
        for failure in done:
            out.row(_discard_row(failure, options.dry_run))
    else:
        for failure in done:
            out.line(_action_line(verb, failure))
    kept = f"; written to {options.export}" if options.export is not None and not options.dry_run and done else ""
    out.summary(f"{verb} {plural(len(done), 'failure record')} from {failed}{kept}; {left} left"
                f"{' (nothing was removed: --dry-run)' if options.dry_run else ''}")
    if result.index_problem is not None:
        raise CliError(result.index_problem, PARTIAL)
    return 0


def _discard_pass(options: DiscardOptions, settings: CliSettings, keeper: Keeper | None = None) -> _Pass:
    failed = settings.failed_queue
    chosen: dict[int, Failure] = {}
    chosen_ids: set[tuple[str, bytes | None]] = set()

    def route(record: Record) -> Drop | None:
        [failure] = failures_of([record])
        if not options.filter.matches(failure):
            return None
        if failure.copy_key not in chosen_ids:
            if options.limit is not None and len(chosen) >= options.limit:
                return None
            chosen[record.position] = failure
            chosen_ids.add(failure.copy_key)
        return None if options.dry_run else Drop()

    def keep(records: list[Record]) -> None:
        assert options.export is not None
        try:
            write_durably(options.export, export_lines(records, failed))
        except OSError as exc:
            raise CliError(f"cannot write {options.export} ({exc.strerror or exc}); nothing was discarded") from None

    tally = _Tally()
    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        cycle = Cycle(connection, failed, route, before_drops=keep,
                      before_leaving=keeper.before_leaving if keeper is not None else None,
                      stoppable=not options.dry_run, keep=False, on_put_back=_put_back_to(tally, keeper),
                      progress=options.progress)
        problem = _run(cycle, keeper, lambda: bool(cycle.dropped))
    return _Pass(cycle, chosen, tally, problem)


def _discard_row(failure: Failure, dry_run: bool) -> dict[str, Any]:
    return {"action": "would_discard" if dry_run else "discarded", "id": failure.record_id,
            "position": failure.position, "stage": failure.stage, "user_id": failure.user_id}


def _discard_document(options: DiscardOptions, settings: CliSettings, done: list[Failure],
                      left: int) -> dict[str, Any]:
    return {"dry_run": options.dry_run, "from": settings.failed_queue,
            "export": str(options.export) if options.export is not None else None,
            "records": [_discard_row(f, options.dry_run) for f in done], "count": len(done), "left": left}
