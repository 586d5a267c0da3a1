"""`registrations failed list | show | replay`: the failure queue, browsed without loss, and redriven."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingConnection

from . import broker
from .cycle import Cycle, Record, Send
from .errors import CliError
from .records import Failure, Filter
from .settings import CliSettings
from .table import plural, render, truncate
from .timefmt import format_age

REASON_WIDTH = 60


def failures_of(records: list[Record]) -> list[Failure]:
    return [Failure.parse(r.position, r.body, message_id=r.properties.message_id,
                          properties=broker.properties_view(r.properties)) for r in records]


def read(connection: BlockingConnection, settings: CliSettings) -> list[Failure]:
    """Every record on the failure queue, in order, by one cycle: the queue is left in its order."""
    broker.require_queue(connection, settings.failed_queue, settings)
    return failures_of(Cycle(connection, settings.failed_queue).run().records)


def table(failures: list[Failure], now: datetime, *, indent: str = "") -> str:
    rows = [[f.position, f.stage, f.user_id or "-", format_age(f.age_s(now)) if f.failed_at else "?",
             truncate(f.reason, REASON_WIDTH)] for f in failures]
    return render(["#", "STAGE", "USER_ID", "AGE", "REASON"], rows, right=["#", "AGE"], indent=indent)


def dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ListOptions:
    filter: Filter
    limit: int | None = None
    json: bool = False


def list_records(options: ListOptions, settings: CliSettings) -> int:
    now = datetime.now(UTC)
    with broker.connect(settings) as connection:
        failures = read(connection, settings)
    shown = [f for f in failures if options.filter.matches(f)]
    matching = len(shown)
    if options.limit is not None:
        shown = shown[: options.limit]
    if options.json:
        print(dump([f.view(now) for f in shown]))
        return 0
    queue = settings.failed_queue
    if not failures:
        print(f"no failure records on {queue}")
        return 0
    if shown:
        print(table(shown, now) + "\n")
    parts = []
    if len(shown) < matching:
        parts.append(f"{len(shown)} shown of {matching} matching")
    elif options.filter.active:
        parts.append(f"{matching} matching")
    parts.append(f"{plural(len(failures), 'failure record')} on {queue}")
    print("; ".join(parts))
    return 0


def show(position: int, settings: CliSettings) -> int:
    with broker.connect(settings) as connection:
        failures = read(connection, settings)
    if not 1 <= position <= len(failures):
        held = f"holds {len(failures)} records" if failures else "is empty"
        raise CliError(f"no record #{position}: {settings.failed_queue} {held}")
    failure = failures[position - 1]
    now = datetime.now(UTC)
    print(dump({
        "position": failure.position,
        "queue": settings.failed_queue,
        "age_s": round(failure.age_s(now), 3) if failure.failed_at else None,
        "properties": failure.properties,
        "record": failure.view(now)["record"],
        **({"problem": failure.problem} if failure.problem else {}),
    }))
    return 0


@dataclass(frozen=True)
class ReplayOptions:
    filter: Filter
    limit: int | None = None
    dry_run: bool = False


def replay(options: ReplayOptions, settings: CliSettings) -> int:
    """Republish each matching record's `original` to the inbound queue (same message_id), and
    remove the record only once the broker has confirmed the republished message. One cycle of
    the failure queue: the other records go round and keep their order, and the chosen ones are
    sent last, so a replay that fails again at once lands behind them. A crash at any point loses
    nothing: at worst a record stays behind whose registration was replayed."""
    failed, inbound = settings.failed_queue, settings.inbound_queue
    verb = "would replay" if options.dry_run else "replayed"
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
            print(f"skipped #{failure.position}: {failure.reason} (no original to replay)", file=sys.stderr)
            return None
        chosen[record.position] = failure
        return None if options.dry_run else Send(inbound, failure.replay_body(), _properties(failure, failed))

    def report(record: Record) -> None:
        failure = chosen[record.position]
        print(f"{verb} #{failure.position}  {failure.stage:<10}  user_id={failure.user_id or '-'}  "
              f"message_id={failure.message_id or '-'}")

    with broker.connect(settings) as connection:
        broker.require_queue(connection, failed, settings)
        broker.require_queue(connection, inbound, settings)
        cycle = Cycle(connection, failed, route, on_sent=report).run()
    if options.dry_run:
        for record in cycle.records:
            if record.position in chosen:
                report(record)
    moved = len(cycle.sent)
    if cycle.refused is not None:
        record, why = cycle.refused
        raise CliError(f"the broker did not take the replay of #{record.position} to {inbound} ({why}); stopped "
                       f"after {moved}: that record and the rest are still on {failed}, behind the others")
    done = len(chosen) if options.dry_run else moved
    print(f"{verb} {plural(done, 'failure record')} to {inbound}; {len(cycle.records) - moved} left on {failed}"
          f"{' (nothing was moved: --dry-run)' if options.dry_run else ''}")
    return 0


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
