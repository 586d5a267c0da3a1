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
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from . import broker
from .errors import CliError
from .records import Failure, Filter
from .settings import CliSettings
from .table import plural, render, truncate
from .timefmt import format_age

REASON_WIDTH = 60


def failures_of(held: list[broker.Held]) -> list[Failure]:
    return [Failure.parse(h.position, h.body, message_id=h.properties.message_id,
                          properties=broker.properties_view(h.properties)) for h in held]


def read(connection: BlockingConnection, settings: CliSettings) -> list[Failure]:
    """Every record on the failure queue, in order; the queue is left exactly as it was."""
    broker.require_queue(connection, settings.failed_queue, settings)
    with broker.Browse(connection, settings.failed_queue) as browse:
        return failures_of(browse.read_all())


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
    remove the record only once the broker has confirmed the republished message. A crash at
    any point loses nothing: at worst a record stays behind whose registration was replayed."""
    failed, inbound = settings.failed_queue, settings.inbound_queue
    verb = "would replay" if options.dry_run else "replayed"
    moved = 0
    with broker.connect(settings) as connection:
        at_start = broker.require_queue(connection, failed, settings)
        broker.require_queue(connection, inbound, settings)
        with broker.Browse(connection, failed) as browse:
            held = browse.read_all()
            chosen: list[tuple[broker.Held, Failure]] = []
            for h, failure in zip(held, failures_of(held), strict=True):
                # A record that arrived after the start (perhaps a replay failing again) waits for
                # the next replay: this one never goes round in circles.
                if h.position > at_start.ready or not options.filter.matches(failure):
                    continue
                if options.limit is not None and len(chosen) >= options.limit:
                    break
                if not failure.has_original:
                    print(f"skipped #{failure.position}: {failure.reason} (no original to replay)", file=sys.stderr)
                    continue
                chosen.append((h, failure))

            channel = None if options.dry_run else connection.channel()
            if channel is not None:
                channel.confirm_delivery()
            for h, failure in chosen:
                if channel is not None:
                    try:
                        channel.basic_publish("", inbound, failure.replay_body(), _properties(failure, failed),
                                              mandatory=True)
                    except (pika.exceptions.UnroutableError, pika.exceptions.NackError):
                        raise CliError(f"the broker did not take the replay of #{failure.position} to {inbound}; "
                                       f"stopped after {moved} (that record and the rest are still on {failed})") \
                            from None
                    except pika.exceptions.AMQPError as exc:
                        raise CliError(f"lost the broker ({type(exc).__name__}) while replaying #{failure.position}; "
                                       f"{moved} replayed before it; it and the rest are still on {failed} "
                                       f"(#{failure.position} may also have been replayed)") from None
                    browse.ack(h)  # only now: its replay is confirmed
                moved += 1
                print(f"{verb} #{failure.position}  {failure.stage:<10}  user_id={failure.user_id or '-'}  "
                      f"message_id={failure.message_id or '-'}")
    left = len(held) - (0 if options.dry_run else moved)
    print(f"{verb} {plural(moved, 'failure record')} to {inbound}; {left} left on {failed}"
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
