"""`registrations`: the operator's command. Argument parsing, and errors as one line each."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import pika.exceptions
from pymongo.errors import PyMongoError

from regbridge.redact import redact_url

from . import failed, indexes, inspect_queues, publish, rows, stats, status
from .errors import FAILED, CliError
from .records import STAGES, Filter
from .settings import from_env
from .timefmt import parse_duration, parse_since

DESCRIPTION = """\
Operate the registration bridge: publish registrations, inspect and replay the failure queue,
follow one registration, watch the queues. Configured by the services' environment variables
(RABBITMQ_URL, MONGODB_URI, MONGODB_DATABASE, MONGODB_COLLECTION, INBOUND_QUEUE, PENDING_QUEUE,
FAILED_QUEUE, POLL_FIRST_DELAY_S, POLL_INTERVAL_S, MAX_MESSAGE_BYTES), with the same defaults;
`inspect` also reads RABBITMQ_MANAGEMENT_URL."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a time > 0, got {text!r}")
    return value


def _since(text: str) -> datetime:
    try:
        return parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, help="only records of this failure stage")
    parser.add_argument("--user-id", metavar="USER_ID", help="only records of this user")
    parser.add_argument("--since", type=_since, metavar="DURATION|ISO",
                        help="only records that failed since then: 90s, 15m, 2h, 1d, or 2026-11-27T12:00:00Z")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="at most N records")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registrations", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("publish", help="publish the registrations of a JSONL or CSV file",
                            description="Check every row of FILE (JSONL, or CSV with a header row), then publish "
                                        "each as a persistent inbound registration, with publisher confirms. "
                                        "Nothing is published while any row is invalid, unless --skip-invalid.")
    p.add_argument("file", metavar="FILE", help="the file ('-' for stdin, with --format)")
    p.add_argument("--format", choices=rows.FORMATS, help="jsonl or csv (default: from the file's extension)")
    p.add_argument("--skip-invalid", action="store_true", help="publish the valid rows, report the others")
    p.add_argument("--message-id-field", metavar="FIELD",
                   help="take each message's AMQP message_id from this field (default: a new UUID each)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    f = commands.add_parser("failed", help="the failure queue: list, show, replay")
    sub = f.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    fl = sub.add_parser("list", help="a table of the failure records (the queue is left as it was)")
    _filters(fl)
    fl.add_argument("--json", action="store_true", help="JSON instead of a table")
    fs = sub.add_parser("show", help="one record in full, with its AMQP properties")
    fs.add_argument("position", type=_positive_int, metavar="N", help="the record's # in `failed list`")
    fr = sub.add_parser("replay", help="republish records' originals to the inbound queue, then remove them",
                        description="For each matching record: republish its original to the inbound queue "
                                    "(same message_id), and remove the record once the broker confirmed it. "
                                    "Records that do not match stay, in order.")
    _filters(fr)
    fr.add_argument("--dry-run", action="store_true", help="move nothing; print what would be moved")

    s = commands.add_parser("status", help="one user's registration fields and failure records")
    s.add_argument("user_id", metavar="USER_ID")
    s.add_argument("--json", action="store_true", help="JSON instead of text")

    st = commands.add_parser("stats", help="queue depths per stage, and outcomes in MongoDB")
    st.add_argument("--watch", nargs="?", const=2.0, type=_seconds, metavar="SECONDS",
                    help="refresh every SECONDS (default 2), one line each, until Ctrl-C")
    st.add_argument("--count", type=_positive_int, metavar="N", help="stop after N refreshes")
    st.add_argument("--json", action="store_true", help="JSON (one object per line with --watch)")

    ix = commands.add_parser("init-indexes", help="create the index `stats` counts users with (run once, on purpose)",
                             description="Create the index on registration_status that `stats` counts users by, "
                                         "unless an index leading with that field exists. Building it reads the "
                                         "whole users collection: choose the moment. Needs createIndex on it.")
    ix.add_argument("--dry-run", action="store_true", help="create nothing; say whether it would")

    qi = commands.add_parser("inspect", help="per queue: ready, unacked, consumers, rates (management API)",
                             description="Per queue of the bridge: ready and unacknowledged messages, consumers, "
                                         "and the rates in and out, from RabbitMQ's management API "
                                         "(RABBITMQ_MANAGEMENT_URL, or RABBITMQ_URL's host on port 15672).")
    qi.add_argument("--json", action="store_true", help="JSON instead of a table")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    settings = from_env(os.environ)
    if args.command == "publish":
        return publish.run(publish.Options(args.file, args.format, args.skip_invalid, args.message_id_field,
                                           args.quiet), settings)
    if args.command == "status":
        return status.run(args.user_id, settings, as_json=args.json)
    if args.command == "stats":
        return stats.run(settings, watch_s=args.watch, count=args.count, as_json=args.json)
    if args.command == "init-indexes":
        return indexes.run(settings, dry_run=args.dry_run)
    if args.command == "inspect":
        return inspect_queues.run(settings, as_json=args.json)
    if args.failed_command == "show":
        return failed.show(args.position, settings)
    flt = Filter(stage=args.stage, user_id=args.user_id, since=args.since)
    if args.failed_command == "list":
        return failed.list_records(failed.ListOptions(flt, args.limit, args.json), settings)
    return failed.replay(failed.ReplayOptions(flt, args.limit, args.dry_run), settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except pika.exceptions.AMQPError as exc:
        return _fail(f"broker error: {type(exc).__name__}: {str(exc).strip()[:200]}")
    except PyMongoError as exc:
        return _fail(f"MongoDB error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours; stop writing.
        sys.stderr.close()
        return 0


def _fail(message: str, code: int = FAILED) -> int:
    print(f"registrations: {redact_url(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
