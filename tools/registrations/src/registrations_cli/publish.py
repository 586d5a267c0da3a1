"""`registrations publish FILE`: check every row, then publish them all with publisher confirms."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions

from . import broker, rows
from .errors import FAILED, PARTIAL, USAGE, CliError
from .output import Output
from .progress import Progress
from .sanitize import visible
from .settings import CliSettings
from .table import plural

SHOW_BAD_ROWS = 50


@dataclass(frozen=True)
class Options:
    path: str
    format: str | None = None
    skip_invalid: bool = False
    message_id_field: str | None = None
    quiet: bool = False


def load(options: Options, settings: CliSettings) -> rows.Parsed:
    fmt = options.format or rows.guess_format(options.path)
    if fmt is None:
        raise CliError(f"cannot tell the format of {options.path} from its name; pass --format jsonl or --format csv",
                       USAGE)
    try:
        data = sys.stdin.buffer.read() if options.path == "-" else Path(options.path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {options.path}: {exc.strerror or exc}") from None
    return rows.parse(data, fmt, max_bytes=settings.max_message_bytes, message_id_field=options.message_id_field)


def report_bad(parsed: rows.Parsed, path: str) -> None:
    for bad in parsed.bad[:SHOW_BAD_ROWS]:
        print(visible(f"{path}:{bad.line}: {bad.reason}"), file=sys.stderr)
    if len(parsed.bad) > SHOW_BAD_ROWS:
        print(visible(f"{path}: ... and {len(parsed.bad) - SHOW_BAD_ROWS} more invalid rows"), file=sys.stderr)


def run(options: Options, settings: CliSettings, out: Output) -> int:
    parsed = load(options, settings)
    if parsed.bad:
        report_bad(parsed, options.path)
        if not options.skip_invalid:
            raise CliError(f"{options.path}: invalid rows: {len(parsed.bad)} of {parsed.total}; nothing was "
                           "published (fix them, or pass --skip-invalid to publish the valid ones)")
    if not parsed.rows:
        raise CliError(f"{options.path}: no valid rows to publish")

    queue = settings.inbound_queue
    with broker.connect(settings) as connection:
        broker.require_queue(connection, queue, settings)
        channel = connection.channel()
        channel.confirm_delivery()
        progress = Progress(len(parsed.rows), sys.stderr, enabled=not options.quiet and sys.stderr.isatty())
        published = 0
        sent: list[dict[str, object]] = []
        try:
            for row in parsed.rows:
                properties = pika.BasicProperties(
                    delivery_mode=2, content_type="application/json",
                    message_id=row.message_id or str(uuid.uuid4()), timestamp=int(time.time()))
                # With confirms on, this returns once the broker has the message (persistent,
                # on the queue): it raises if the broker returns it (mandatory) or refuses it.
                channel.basic_publish("", queue, row.body, properties, mandatory=True)
                published += 1
                progress.advance()
                sent.append({"line": row.line, "user_id": row.user_id, "message_id": properties.message_id})
                if out.format == "jsonl":
                    out.row(sent[-1])
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            progress.close()
            what = "returned it: no such queue" if isinstance(exc, pika.exceptions.UnroutableError) else "refused it"
            raise CliError(_stopped(options.path, parsed, published, f"the broker {what}"), _code(published)) from None
        except pika.exceptions.AMQPError as exc:
            progress.close()
            raise CliError(_stopped(options.path, parsed, published, f"lost the broker ({type(exc).__name__})",
                                    maybe_sent=True), _code(published)) from None
        progress.close()

    if out.format == "json":
        out.document({"file": options.path, "queue": queue, "broker": settings.broker_shown, "published": published,
                      "rows": sent, "invalid": [{"line": b.line, "reason": b.reason} for b in parsed.bad]})
        return 0
    if out.format == "jsonl":
        return 0
    skipped = f"; {plural(len(parsed.bad), 'invalid row')} skipped" if parsed.bad else ""
    out.line(f"published {plural(published, 'registration')} from {options.path} to {queue} on {settings.broker_shown}"
             f"{skipped}")
    return 0


def _code(published: int) -> int:
    """Rows before the one that stopped it are on the queue: a partial success, unless there were none."""
    return PARTIAL if published else FAILED


def _stopped(path: str, parsed: rows.Parsed, published: int, why: str, *, maybe_sent: bool = False) -> str:
    line = parsed.rows[published].line
    through = f" (through line {parsed.rows[published - 1].line})" if published else ""
    maybe = f"; the row on line {line} may have reached the queue unconfirmed" if maybe_sent else ""
    return (f"{path}:{line}: {why}; {published} of {len(parsed.rows)} rows were published{through}, "
            f"the rest were not{maybe}")
