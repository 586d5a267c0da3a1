"""`registrations status USER_ID`: where one registration stands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import mongo
from .errors import CliError
from .index import FailureIndex
from .listing import Row, entry_view, table
from .output import Output
from .settings import CliSettings
from .table import one_line, plural
from .timefmt import format_age


def run(user_id: str, settings: CliSettings, out: Output) -> int:
    """The user's document, and the user's failure records as the failure index holds them."""
    with mongo.database(settings) as db:
        document = mongo.registration(db[settings.mongodb_collection], user_id)
        failures = FailureIndex(db, settings).of_user(user_id)
    now = datetime.now(UTC)
    if not out.is_table:
        out.document({"user_id": user_id, "document": _plain(document),
                      "failures": [entry_view(e, e.body or "", now) for e in failures]})
        return 0 if document is not None or failures else 1
    where = f"{settings.mongodb_database}.{settings.mongodb_collection}"
    if document is None and not failures:
        raise CliError(f"nothing known about user {user_id!r}: no document in {where} and no failure record "
                       f"on {settings.failed_queue}")
    out.summary(f"user {one_line(user_id)}")
    indent = "  " if out.headers else ""  # under a title; the rows alone stand at the margin
    if document is None:
        out.summary(f"  no document in {where}")
    else:
        for line in describe(document, now):
            out.line(f"{indent}{line}")
    queue = settings.failed_queue
    if failures:
        out.summary(f"\n{plural(len(failures), 'failure record')} on {queue}:")
        out.line(table([Row.of_entry(e) for e in failures], now, indent=indent, out=out))
    else:
        out.summary(f"\nno failure record on {queue}")
    return 0


def describe(document: dict[str, Any], now: datetime) -> list[str]:
    """The registration fields, one `name  value` line each (a missing field shows `-`)."""
    lines = []
    for name in mongo.FIELDS:
        value = document.get(name)
        if value is None:
            shown = "-"
        elif isinstance(value, datetime):
            moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
            shown = f"{moment.isoformat()} ({format_age((now - moment).total_seconds())} ago)"
        elif isinstance(value, dict) and {"stage", "reason"} <= set(value):
            shown = f"{value['stage']}: {value['reason']}"
        else:
            shown = str(value)
        # A document's fields may have been written by anything: one line each, whatever they hold.
        lines.append(f"{name:<24} {one_line(shown)}")
    return lines


def _plain(document: dict[str, Any] | None) -> dict[str, Any] | None:
    if document is None:
        return None
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in document.items()}
