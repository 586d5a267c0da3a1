"""`registrations failed list | show | replay`: the failure queue, browsed without loss, and redriven."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingConnection

from . import broker
from .confirm import Consent
from .cycle import Cycle, Record, Send
from .errors import FAILED, PARTIAL, CliError
from .output import Output
from .records import Failure, Filter
from .settings import CliSettings
from .table import plural, truncate
from .timefmt import format_age

REASON_WIDTH = 60


def failures_of(records: list[Record]) -> list[Failure]:
    return [Failure.parse(r.position, r.body, message_id=r.properties.message_id,
                          properties=broker.properties_view(r.properties)) for r in records]


def read(connection: BlockingConnection, settings: CliSettings) -> list[Failure]:
    """Every record on the failure queue, in order, by one cycle: the queue is left in its order."""
    broker.require_queue(connection, settings.failed_queue, settings)
    return failures_of(Cycle(connection, settings.failed_queue).run().records)


def table(failures: list[Failure], now: datetime, *, indent: str = "", out: Output | None = None) -> str:
    rows = [[f.position, f.stage, f.user_id or "-", format_age(f.age_s(now)) if f.failed_at else "?",
             truncate(f.reason, REASON_WIDTH)] for f in failures]
    return (out or Output()).table(["#", "STAGE", "USER_ID", "AGE", "REASON"], rows, right=["#", "AGE"],
                                   indent=indent)


@dataclass(frozen=True)
class ListOptions:
    filter: Filter
    limit: int | None = None


def list_records(options: ListOptions, settings: CliSettings, out: Output) -> int:
    now = datetime.now(UTC)
    with broker.connect(settings) as connection:
        failures = read(connection, settings)
    shown = [f for f in failures if options.filter.matches(f)]
    matching = len(shown)
    if options.limit is not None:
        shown = shown[: options.limit]
    if not out.is_table:
        views = [f.view(now) for f in shown]
        out.document(views, jsonl_rows=views)
        return 0
    queue = settings.failed_queue
    if not failures:
        out.summary(f"no failure records on {queue}")
        return 0
    if shown:
        out.line(table(shown, now, out=out))
        out.summary("")
    parts = []
    if len(shown) < matching:
        parts.append(f"{len(shown)} shown of {matching} matching")
    elif options.filter.active:
        parts.append(f"{matching} matching")
    parts.append(f"{plural(len(failures), 'failure record')} on {queue}")
    out.summary("; ".join(parts))
    return 0


def show(position: int, settings: CliSettings, out: Output) -> int:
    with broker.connect(settings) as connection:
        failures = read(connection, settings)
    if not 1 <= position <= len(failures):
        held = f"holds {len(failures)} records" if failures else "is empty"
        raise CliError(f"no record #{position}: {settings.failed_queue} {held}")
    failure = failures[position - 1]
    now = datetime.now(UTC)
    if out.is_table:
        out.line(table([failure], now, out=out))
        return 0
    out.document({
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


@dataclass
class _Pass:
    """One cycle of a replay (or of its dry run): what it chose, and how it went."""

    cycle: Cycle
    chosen: dict[int, Failure]


def _replay_pass(options: ReplayOptions, settings: CliSettings, *, on_chosen: Callable[[Failure], None] | None,
                 quiet: bool = False) -> _Pass:
    failed, inbound = settings.failed_queue, settings.inbound_queue
    chosen: dict[int, Failure] = {}

    def route(record: Record) -> Send | None:
        [failure] = failures_of([record])
        # Only the records there when the cycle started are taken, so a replay that fails again
        # waits for the next replay: this one never goes round in circles.
        if not options.filter.matches(failure):
            return None
        if options.limit is not None and len(chosen) >= options.limit:
            return None
        if not failure.has_original:
            if not quiet:
                print(f"skipped #{failure.position}: {failure.reason} (no original to replay)", file=sys.stderr)
            return None
        chosen[record.position] = failure
        return None if options.dry_run else Send(inbound, failure.replay_body(), _properties(failure, failed))

    def sent(record: Record) -> None:
        if on_chosen is not None:
            on_chosen(chosen[record.position])

    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        broker.require_queue(connection, inbound, settings)
        cycle = Cycle(connection, failed, route, on_sent=sent)
        try:
            cycle.run()
        except CliError as exc:
            # Stopped midway (a lost broker): what was sent is sent, so say it was in part.
            raise CliError(str(exc), PARTIAL if cycle.sent else exc.code) from None
    if options.dry_run and on_chosen is not None:
        for record in cycle.records:
            if record.position in chosen:
                on_chosen(chosen[record.position])
    return _Pass(cycle, chosen)


def replay(options: ReplayOptions, settings: CliSettings, out: Output, consent: Consent | None = None) -> int:
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
        options = ReplayOptions(options.filter, counted, dry_run=False)

    verb = "would replay" if options.dry_run else "replayed"
    done: list[Failure] = []

    def report(failure: Failure) -> None:
        done.append(failure)
        if out.format == "jsonl":
            out.row(_replay_row(failure, options.dry_run))
        elif out.is_table:
            out.line(f"{verb} #{failure.position}  {failure.stage:<10}  user_id={failure.user_id or '-'}  "
                     f"message_id={failure.message_id or '-'}")

    result = _replay_pass(options, settings, on_chosen=report)
    cycle = result.cycle
    moved = len(cycle.sent)
    left = len(cycle.records) - moved
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
    return 0


def _replay_row(failure: Failure, dry_run: bool) -> dict[str, Any]:
    return {"action": "would_replay" if dry_run else "replayed", "position": failure.position,
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
