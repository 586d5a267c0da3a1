"""`registrations inspect`: per queue of the bridge, ready and unacknowledged messages,
consumers, and the rates in and out, from the management API as rabbitmqadmin shows them.

When the API does not answer, the command says so and shows what AMQP alone can tell (a
passive declare: ready messages and consumers), labelled as such, and exits 1."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from regbridge.redact import redact_url

from . import broker, management
from .errors import FAILED
from .output import Output
from .sanitize import warn
from .settings import CliSettings
from .table import render as render_table

HEADERS = ["STAGE", "QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/S", "DELIVER/S", "ACK/S", "REDELIVER/S"]
AMQP_HEADERS = ["STAGE", "QUEUE", "READY", "CONSUMERS"]


@dataclass(frozen=True)
class Row:
    stage: str
    name: str
    stats: management.QueueStats | None  # None when the queue does not exist


@dataclass(frozen=True)
class Inspection:
    source: str  # "management" or "amqp"
    where: str  # credentials never included
    rows: list[Row]
    problem: str | None = None  # why the management API was not used


def from_management(settings: CliSettings, where: management.Target,
                    listed: dict[str, management.QueueStats]) -> Inspection:
    # Wait queues of delays configured before this one still hold ids until they drain: every
    # one the vhost has is shown.
    waiting = re.compile(re.escape(settings.pending_queue) + r"\.wait\.[0-9]+ms")
    wait_names = list(dict.fromkeys([*settings.wait_queues,
                                     *sorted(n for n in listed if waiting.fullmatch(n))]))
    names = [("inbound", settings.inbound_queue), ("pending", settings.pending_queue),
             *(("waiting", n) for n in wait_names), ("failed", settings.failed_queue)]
    rows = [Row(stage, name, listed.get(name)) for stage, name in names
            if stage != "waiting" or name in listed]  # a wait queue not declared yet holds nothing
    return Inspection("management", f"management API {where.shown}", rows)


def from_amqp(settings: CliSettings, problem: str) -> Inspection:
    with broker.connect(settings) as connection:
        names = [("inbound", settings.inbound_queue), ("pending", settings.pending_queue),
                 *(("waiting", n) for n in settings.wait_queues), ("failed", settings.failed_queue)]
        rows = []
        for stage, name in names:
            info = broker.queue_info(connection, name)
            if info is None and stage == "waiting":
                continue
            stats = None if info is None else management.QueueStats(name, info.ready, 0, info.consumers, {})
            rows.append(Row(stage, name, stats))
    return Inspection("amqp", f"AMQP passive declare on {settings.broker_shown}", rows, problem)


def show(view: Inspection, out: Output) -> None:
    """The inspection in the format asked for: a table (with its title unless --no-headers), one
    JSON document, or one JSON line per queue."""
    if out.is_table:
        if out.headers:
            out.line(render(view, "table"))
        else:
            out.line(_rows_table(view, out))
        return
    document = _json(view)
    out.document(document, jsonl_rows=document["queues"])


def _rows_table(view: Inspection, out: Output) -> str:
    headers, rows = _table(view)
    return out.table(headers, rows, right=headers[2:])


def render(view: Inspection, fmt: str) -> str:
    """The inspection as `table` or `json`. From AMQP only ready and consumers are known: the
    other columns are left out of the table and null in JSON."""
    if fmt == "json":
        return json.dumps(_json(view), indent=2)
    headers, rows = _table(view)
    amqp = view.source == "amqp"
    title = view.where + (" (ready and consumers only: no unacknowledged counts, no rates)" if amqp else "")
    return f"{title}\n\n{render_table(headers, rows, right=headers[2:])}"


def _table(view: Inspection) -> tuple[list[str], list[list[object]]]:
    amqp = view.source == "amqp"
    rows: list[list[object]] = []
    for row in view.rows:
        q = row.stats
        if q is None:
            rows.append([row.stage, row.name, "not declared", *["-"] * (1 if amqp else 6)])
        elif amqp:
            rows.append([row.stage, row.name, q.ready, q.consumers])
        else:
            rows.append([row.stage, row.name, q.ready, q.unacked, q.consumers,
                         *(f"{q.rates[r]:.2f}" for r in management.RATES)])
    return list(AMQP_HEADERS if amqp else HEADERS), rows


def _json(view: Inspection) -> dict[str, Any]:
    amqp = view.source == "amqp"
    return {
        "source": view.source,
        "where": view.where,
        **({"problem": view.problem} if view.problem else {}),
        "queues": [{
            "stage": row.stage, "name": row.name, "exists": row.stats is not None,
            "ready": row.stats.ready if row.stats else None,
            "unacked": row.stats.unacked if row.stats and not amqp else None,
            "consumers": row.stats.consumers if row.stats else None,
            "rates": dict(row.stats.rates) if row.stats and not amqp else None,
        } for row in view.rows],
    }


def run(settings: CliSettings, out: Output) -> int:
    where = management.target(settings)
    try:
        view = from_management(settings, where, management.queues(where))
    except management.Unavailable as exc:
        problem = f"management API at {where.base} not usable ({exc})"
        view = from_amqp(settings, problem)
        show(view, out)
        warn(f"{redact_url(problem)}; showed AMQP passive-declare depths instead "
             "(set RABBITMQ_MANAGEMENT_URL if the API is elsewhere)")
        return FAILED
    show(view, out)
    return 0
