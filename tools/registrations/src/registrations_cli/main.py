"""`registrations`: the operator's command. Argument parsing, and errors as one line each."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pika.exceptions
from pymongo.errors import PyMongoError

from regbridge.redact import Secrets
from regbridge.settings import SECRET_SUFFIX, variable_name

from . import (
    capacity,
    capacity_report,
    completion,
    cycle,
    failed,
    indexes,
    inspect_queues,
    listing,
    output,
    publish,
    reconcile,
    rows,
    stats,
    status,
)
from .confirm import Consent
from .errors import FAILED, INTERRUPTED, CliError
from .output import Output
from .records import STAGES, Filter
from .sanitize import warn
from .settings import CliSettings, from_env
from .timefmt import parse_duration, parse_since

DESCRIPTION = """\
Operate the registration bridge: publish registrations, inspect and replay the failure queue,
follow one registration, watch the queues. Configured by the services' environment variables
(RABBITMQ_URL, MONGODB_URI, MONGODB_DATABASE, MONGODB_COLLECTION, INBOUND_QUEUE, PENDING_QUEUE,
FAILED_QUEUE, POLL_FIRST_DELAY_S, POLL_INTERVAL_S, POLL_SCHEDULE, MAX_MESSAGE_BYTES), with the same
defaults; `inspect` also reads RABBITMQ_MANAGEMENT_URL; `capacity` reads nothing and connects nowhere.

Every command that prints results takes -o table|json|jsonl and --no-headers."""

EPILOG = """exit codes:
  0    done
  1    failed: nothing, or not everything, could be done (broker or MongoDB unreachable, invalid
       rows, no such record or user, a confirmation answered no)
  2    wrong arguments or configuration, or a destructive command with no terminal to confirm on
       and no --yes
  3    partial success: stopped midway, some of the work done and the rest not (the message says
       which; a replay stopped by Ctrl-C or SIGTERM after sending some exits so)
  130  interrupted (Ctrl-C) with nothing done yet, or stopped at once by a second Ctrl-C

shell completion: eval "$(registrations completion bash)"  (or zsh)"""


def version_text() -> str:
    """`registrations <cli version> (regbridge-common <version>)`: the two packages that decide what it does."""
    def of(distribution: str) -> str:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return "unknown"

    return f"registrations {of('regbridge-registrations-cli')} (regbridge-common {of('regbridge-common')})"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a time > 0, got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _seconds_or_zero(text: str) -> float:
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _latency(text: str) -> capacity.Latency:
    try:
        return capacity.parse_latency(text)
    except capacity.LatencyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    parser.add_argument("--older-than", type=_since, metavar="DURATION|ISO",
                        help="only records that failed before then: 30d is thirty days ago")
    parser.add_argument("--id", action="append", dest="ids", metavar="ID",
                        help="only the record with this id (repeat for several); `failed list` shows ids")
    parser.add_argument("--reason", type=_pattern, metavar="REGEX", help="only records whose reason matches")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="at most N records")


def _from_queue(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument("--from-queue", action="store_true",
                        help=f"read the queue itself, by a cycle{extra} (slow on a long queue; needs no MongoDB)")


def _pattern(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression ({exc})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registrations", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
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
    output.add_arguments(p)

    f = commands.add_parser("failed", help="the failure queue: list, show, replay, discard, reconcile")
    sub = f.add_subparsers(dest="failed_command", required=True, metavar="ACTION")
    fl = sub.add_parser("list", help="a table of the failure records, from the failure index",
                        description="The failure records in the order they failed, read from the failure index "
                                    "in MongoDB (the queue is not touched). Warns on stderr when the index and the "
                                    "queue hold different numbers of records: `failed reconcile` then compares "
                                    "them record by record.")
    _filters(fl)
    _from_queue(fl)
    output.add_arguments(fl, json_alias=True)
    fs = sub.add_parser("show", help="one record in full, from the failure index")
    fs.add_argument("id", metavar="ID", help="the record's id in `failed list` (or the start of it, if only "
                                             "one id starts so)")
    _from_queue(fs, extra=", with its AMQP properties")
    output.add_arguments(fs, default="json")
    fc = sub.add_parser("reconcile", help="compare the failure index with the queue, record by record, and fix it",
                        description="One whole cycle of the failure queue (every record put back, in order), then "
                                    "the failure index brought in line with what it found: an entry added for each "
                                    "record that has none, marked queued where it said otherwise, deleted where its "
                                    "record is gone (unless written in the last minutes: a publish or a replay may "
                                    "be under way).")
    fc.add_argument("--dry-run", action="store_true", help="change nothing; print what would change")
    output.add_arguments(fc)
    fr = sub.add_parser("replay", help="republish records' originals to the inbound queue, then remove them",
                        description="For each matching record: republish its original to the inbound queue "
                                    "(same message_id), and remove the record once the broker confirmed it. "
                                    "Records that do not match stay, in order. Without --dry-run it asks first "
                                    "(counting the matching records with a dry run, then replaying at most that "
                                    "many), on a terminal; with no terminal it needs --yes. Ctrl-C or SIGTERM "
                                    "stops the sends after the record in hand and puts the records not sent back, "
                                    "behind the others (exit 3): the same command run again replays them.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _filters(fr)
    fr.add_argument("--dry-run", action="store_true", help="move nothing; print what would be moved")
    fr.add_argument("--rate", type=_positive_float, metavar="N",
                    help="replay N records a second at most (the legacy API takes the load)")
    fr.add_argument("--max-hold", type=_seconds, default=cycle.MAX_HOLD_S, metavar="DURATION",
                    help="hold no record unacked longer than this (default 10m), well under RabbitMQ's "
                         "consumer_timeout (30m by default): a replay whose sends would take longer runs in "
                         "passes, a whole cycle of the queue each")
    fr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fr.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    output.add_arguments(fr)
    fd = sub.add_parser("discard", help="remove records for good, each written to --export FILE first",
                        description="Remove the matching records for good. Each is first appended to the JSONL "
                                    "file --export (one line per record id: its properties and exact body) and "
                                    "the file synced to disk; only then are they removed. Records that do not "
                                    "match stay, in order. Without --dry-run it asks first on a terminal; with "
                                    "no terminal it needs --yes.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _filters(fd)
    fd.add_argument("--export", type=Path, metavar="FILE", help="the JSONL file the records are appended to")
    fd.add_argument("--dry-run", action="store_true", help="remove nothing; print what would be removed")
    fd.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    output.add_arguments(fd)

    s = commands.add_parser("status", help="one user's registration fields and failure records")
    s.add_argument("user_id", metavar="USER_ID")
    output.add_arguments(s, json_alias=True)

    st = commands.add_parser("stats", help="queue depths per stage, and outcomes in MongoDB")
    st.add_argument("--watch", nargs="?", const=2.0, type=_seconds, metavar="SECONDS",
                    help="refresh every SECONDS (default 2), one line each, until Ctrl-C")
    st.add_argument("--count", type=_positive_int, metavar="N", help="stop after N refreshes")
    output.add_arguments(st, json_alias=True)

    ix = commands.add_parser("init-indexes", help="create the index `stats` counts users with (run once, on purpose)",
                             description="Create the index on registration_status that `stats` counts users by, "
                                         "unless an index leading with that field exists. Building it reads the "
                                         "whole users collection: choose the moment. Needs createIndex on it.")
    ix.add_argument("--dry-run", action="store_true", help="create nothing; say whether it would")
    output.add_arguments(ix)

    qi = commands.add_parser("inspect", help="per queue: ready, unacked, consumers, rates (management API)",
                             description="Per queue of the bridge: ready and unacknowledged messages, consumers, "
                                         "and the rates in and out, from RabbitMQ's management API "
                                         "(RABBITMQ_MANAGEMENT_URL, or RABBITMQ_URL's host on port 15672).")
    output.add_arguments(qi, json_alias=True)

    _capacity_parser(commands)

    c = commands.add_parser("completion", help="print a shell completion script (bash or zsh)",
                            description="Print a completion script for bash or zsh, made from this command's own "
                                        "arguments. bash: eval \"$(registrations completion bash)\" in ~/.bashrc; "
                                        "zsh: eval \"$(registrations completion zsh)\" in ~/.zshrc after compinit, "
                                        "or save it as _registrations in a directory of $fpath.")
    c.add_argument("shell", choices=completion.SHELLS)
    return parser


def _capacity_parser(commands: Any) -> None:
    cp = commands.add_parser(
        "capacity", help="a capacity plan: in flight, legacy requests, broker messages, replicas",
        description="A steady-state plan for RATE registrations a second whose legacy latency follows PROFILE: "
                    "the registrations in flight (Little's law), polls and detection delay of the schedule, "
                    "the legacy API's requests, the broker's messages, MongoDB's writes, the CPU of the "
                    "services and the broker, and the replicas needed, from the per-unit figures measured by "
                    "`make bench` (docs/capacity.md says what each assumes). Pure arithmetic: it reads no "
                    "environment and connects to nothing.")
    cp.add_argument("--rate", type=_positive_float, required=True, metavar="N", help="registrations a second")
    cp.add_argument("--latency", type=_latency, default=capacity.parse_latency("uniform:10,20"), metavar="PROFILE",
                    help="the legacy system's completion time, as legacy-sim's profiles are written: "
                         "uniform:MIN,MAX or lognormal:MEDIAN,SIGMA[,MAX] (default uniform:10,20)")
    cp.add_argument("--schedule", choices=("adaptive", "fixed"), default="adaptive",
                    help="the poll schedule (POLL_SCHEDULE; default adaptive)")
    cp.add_argument("--target-delay", type=_seconds, metavar="SECONDS",
                    help="adaptive: the mean detection delay aimed at (default a tenth of the median latency)")
    cp.add_argument("--max-polls", type=_at_least_one, metavar="N",
                    help="adaptive: the most polls a registration may take on average (default 4)")
    cp.add_argument("--first-delay", type=_seconds_or_zero, metavar="SECONDS",
                    help="fixed: the first poll's age (POLL_FIRST_DELAY_S; default 10)")
    cp.add_argument("--interval", type=_seconds, metavar="SECONDS",
                    help="fixed: the time between polls (POLL_INTERVAL_S; default 2)")
    cp.add_argument("--deadline", type=_seconds, default=300.0, metavar="SECONDS",
                    help="POLL_DEADLINE_S: still processing at this age fails as a timeout (default 300)")
    cp.add_argument("--failed-share", type=_share, default=0.0, metavar="SHARE",
                    help="the share of registrations the legacy system fails, 0 to 1 (default 0)")
    figures = capacity.Figures()
    cp.add_argument("--utilization", type=_share, default=figures.utilization, metavar="SHARE",
                    help="the share of one core and of its worker threads a replica is planned to use "
                         f"(default {figures.utilization}: the rest is headroom)")
    cp.add_argument("--submitter-ms", type=_positive_float, default=figures.submitter_ms_per_registration,
                    metavar="MS", help="submitter CPU per registration "
                                       f"(default {figures.submitter_ms_per_registration}, measured)")
    cp.add_argument("--poller-ms", type=_positive_float, default=figures.poller_ms_per_message, metavar="MS",
                    help=f"poller CPU per message it handles (default {figures.poller_ms_per_message}, measured)")
    cp.add_argument("--broker-ms", type=_positive_float, default=figures.broker_ms_per_message, metavar="MS",
                    help="broker CPU per publish, dead-lettering or delivery "
                         f"(default {figures.broker_ms_per_message}, measured)")
    cp.add_argument("--legacy-call-ms", type=_positive_float, default=1000 * figures.legacy_call_s, metavar="MS",
                    help="how long a legacy call holds a worker thread (default 30)")
    cp.add_argument("--submitter-workers", type=_positive_int, default=figures.submitter_workers, metavar="N",
                    help=f"the submitter's WORKERS (default {figures.submitter_workers})")
    cp.add_argument("--poller-workers", type=_positive_int, default=figures.poller_workers, metavar="N",
                    help=f"the poller's WORKERS (default {figures.poller_workers})")
    output.add_arguments(cp, json_alias=True)


def _at_least_one(text: str) -> float:
    value = _positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def capacity_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> capacity.Plan:
    """The plan the arguments describe; a contradiction among them is a usage error (exit 2)."""
    schedule: capacity.Schedule
    if args.schedule == "fixed":
        if args.target_delay is not None or args.max_polls is not None:
            parser.error("capacity: --target-delay and --max-polls describe the adaptive schedule")
        schedule = capacity.Fixed(10.0 if args.first_delay is None else args.first_delay,
                                  2.0 if args.interval is None else args.interval)
    else:
        if args.first_delay is not None or args.interval is not None:
            parser.error("capacity: --first-delay and --interval describe the fixed schedule (--schedule fixed)")
        target = args.target_delay if args.target_delay is not None else 0.1 * args.latency.quantile(0.5)
        schedule = capacity.Adaptive(target, 4.0 if args.max_polls is None else args.max_polls)
    if args.utilization <= 0:
        parser.error("capacity: --utilization must be > 0")
    figures = capacity.Figures(
        submitter_ms_per_registration=args.submitter_ms, poller_ms_per_message=args.poller_ms,
        broker_ms_per_message=args.broker_ms, utilization=args.utilization,
        submitter_workers=args.submitter_workers, poller_workers=args.poller_workers,
        legacy_call_s=args.legacy_call_ms / 1000.0)
    return capacity.plan(rate=args.rate, latency=args.latency, schedule=schedule, deadline_s=args.deadline,
                         failed_share=args.failed_share, figures=figures)


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "completion":
        print(completion.script(parser, args.shell), end="")
        return 0
    if args.command == "capacity":
        # Before the settings: a plan needs no broker, no MongoDB and no configuration.
        return capacity_report.run(capacity_plan(args, parser), Output.of(args))
    consent = Consent(yes=getattr(args, "yes", False))
    if args.command == "failed" and args.failed_command in ("replay", "discard") and not args.dry_run:
        # Before the settings or the broker: a refusal touches nothing.
        consent.check(f"failed {args.failed_command}")
    settings = from_env(os.environ)
    out = Output.of(args)
    if args.command == "publish":
        return publish.run(publish.Options(args.file, args.format, args.skip_invalid, args.message_id_field,
                                           args.quiet), settings, out)
    if args.command == "status":
        return status.run(args.user_id, settings, out)
    if args.command == "stats":
        return stats.run(settings, out, watch_s=args.watch, count=args.count)
    if args.command == "init-indexes":
        return indexes.run(settings, out, dry_run=args.dry_run)
    if args.command == "inspect":
        return inspect_queues.run(settings, out)
    if args.failed_command == "show":
        return listing.show(args.id, settings, out, from_queue=args.from_queue)
    if args.failed_command == "reconcile":
        return reconcile.run(settings, out, dry_run=args.dry_run)
    flt = Filter(stage=args.stage, user_id=args.user_id, since=args.since, older_than=args.older_than,
                 ids=frozenset(args.ids) if args.ids else None, reason=args.reason)
    if args.failed_command == "list":
        return listing.list_records(listing.ListOptions(flt, args.limit, args.from_queue), settings, out)
    if args.failed_command == "discard":
        return failed.discard(failed.DiscardOptions(flt, args.export, args.limit, args.dry_run, sys.stderr.isatty()),
                              settings, out, consent)
    progress = not args.quiet and sys.stderr.isatty()
    return failed.replay(failed.ReplayOptions(flt, args.limit, args.dry_run, args.rate, progress,
                                              args.max_hold), settings, out, consent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(args, parser)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except pika.exceptions.AMQPError as exc:
        return _fail(f"broker error: {type(exc).__name__}: {str(exc).strip()[:200]}")
    except PyMongoError as exc:
        return _fail(f"MongoDB error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
    except KeyboardInterrupt:
        return _fail("interrupted", INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours; stop writing.
        sys.stderr.close()
        return 0


def _fail(message: str, code: int = FAILED) -> int:
    warn(secrets_of(os.environ).mask(message))
    return code


def secrets_of(env: Mapping[str, str]) -> Secrets:
    """The passwords of every URL setting the command reads, masked in an error wherever they
    appear: `redact_url` alone finds a URL's user-info in free text only up to a blank, so a
    password holding one, or quoted by a library without its URL, would pass it. Read from the
    environment itself, since the error may be that the settings could not be built."""
    names = [variable_name(f) for f in CliSettings.model_fields if f.endswith(SECRET_SUFFIX)]
    return Secrets.of_urls(env.get(name, "") for name in names)


if __name__ == "__main__":
    sys.exit(main())
