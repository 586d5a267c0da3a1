"""The operator command's pure parts: reading files with line numbers, judging rows, tables,
durations, failure records and their filters, settings. No broker, no MongoDB."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from harness import fetch_tools
from registrations_cli import completion, rows
from registrations_cli import main as main_module
from registrations_cli.broker import properties_view
from registrations_cli.confirm import Consent
from registrations_cli.cycle import Cycle, Record, exact_copy
from registrations_cli.errors import CliError
from registrations_cli.index import Entry, entry_of
from registrations_cli.listing import Row, find, table
from registrations_cli.main import build_parser, version_text
from registrations_cli.output import Output, safe_json
from registrations_cli.progress import Progress, bar
from registrations_cli.reconcile import Found
from registrations_cli.records import Failure, Filter, encode_original, first_copies, record_id_of
from registrations_cli.sanitize import visible, warn
from registrations_cli.settings import CliSettings, from_env
from registrations_cli.table import one_line, plural, render, truncate
from registrations_cli.timefmt import format_age, parse_duration, parse_since

from regbridge.messages import FailureError, FailureRecord
from regbridge.plans import RECORD_ID_HEADER
from regbridge.poll_schedule import LADDER_S

MAX = 65536
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def person(user_id: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": user_id, "name": "Maria da Silva", "email": "m@example.com", "cpf": "12345678909", **extra}


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# ---- JSONL ------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers_and_their_bytes() -> None:
    first = json.dumps(person("u-1"))
    parsed = rows.parse_jsonl(jsonl(first, "", "   ", json.dumps(person("u-2"))), max_bytes=MAX)
    assert parsed.bad == []
    assert [(r.line, r.user_id) for r in parsed.rows] == [(1, "u-1"), (4, "u-2")]
    assert parsed.rows[0].body == first.encode()  # published as written
    assert parsed.rows[0].message_id is None


def test_jsonl_with_a_bom_and_crlf_line_ends() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(person("u-1")).encode() + b"\r\n" + json.dumps(person("u-2")).encode() + b"\r\n"
    parsed = rows.parse_jsonl(data, max_bytes=MAX)
    assert parsed.bad == [] and [r.user_id for r in parsed.rows] == ["u-1", "u-2"]
    assert not parsed.rows[0].body.endswith(b"\r")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "message body is not JSON"),
        ("[1, 2]", "message body is JSON but not an object (it is list)"),
        ('"text"', "message body is JSON but not an object (it is str)"),
        ('{"name": "x"}', "message has no user_id"),
        ('{"user_id": ""}', "user_id must be a non-empty string"),
        ('{"user_id": 12}', "user_id must be a non-empty string"),
        ('{"user_id": {"$gt": ""}}', "user_id must be a non-empty string"),
        (json.dumps({"user_id": "x" * 129}), "user_id must be a non-empty string of at most 128 characters"),
        ('{"user_id": "u", "n": NaN}', "message body is not JSON"),
    ],
)
def test_jsonl_invalid_rows_say_why_the_submitter_would_refuse_them(line: str, reason: str) -> None:
    parsed = rows.parse_jsonl(jsonl(json.dumps(person("ok")), line), max_bytes=MAX)
    assert [r.user_id for r in parsed.rows] == ["ok"]
    assert len(parsed.bad) == 1 and parsed.bad[0].line == 2
    assert parsed.bad[0].reason.startswith(reason), parsed.bad[0].reason
    assert parsed.total == 2


def test_jsonl_not_utf8_and_oversized_rows() -> None:
    parsed = rows.parse_jsonl(b'{"user_id": "caf\xe9"}\n' + json.dumps(person("big", pad="x" * 200)).encode(),
                              max_bytes=150)
    assert [b.line for b in parsed.bad] == [1, 2]
    assert parsed.bad[0].reason.startswith("message body is not UTF-8")
    assert "over the limit of 150" in parsed.bad[1].reason


def test_message_id_field() -> None:
    data = jsonl(json.dumps(person("u-1", ref="r-1")), json.dumps(person("u-2")),
                 json.dumps(person("u-3", ref=7)), json.dumps(person("u-4", ref="é" * 200)))
    parsed = rows.parse_jsonl(data, max_bytes=MAX, message_id_field="ref")
    assert [(r.line, r.message_id) for r in parsed.rows] == [(1, "r-1")]
    assert [b.line for b in parsed.bad] == [2, 3, 4]
    assert "must be a non-empty string" in parsed.bad[0].reason
    assert "over 255 bytes" in parsed.bad[2].reason


# ---- CSV --------------------------------------------------------------------------------------


def test_csv_rows_are_objects_of_strings() -> None:
    data = b'user_id,name,email,cpf\nu-1,"Souza, Ana",ana@example.com,01234567890\n\nu-2,Bruno,b@example.com,1\n'
    parsed = rows.parse_csv(data, max_bytes=MAX)
    assert parsed.bad == []
    assert [(r.line, r.user_id) for r in parsed.rows] == [(2, "u-1"), (4, "u-2")]
    assert json.loads(parsed.rows[0].body) == {"user_id": "u-1", "name": "Souza, Ana", "email": "ana@example.com",
                                               "cpf": "01234567890"}  # leading zero kept


def test_csv_a_quoted_cell_across_lines_numbers_rows_by_their_first_line() -> None:
    data = b'user_id,name\nu-1,"two\nlines"\nu-2,x\n,y\n'
    parsed = rows.parse_csv(data, max_bytes=MAX)
    assert [(r.line, r.user_id) for r in parsed.rows] == [(2, "u-1"), (4, "u-2")]
    assert json.loads(parsed.rows[0].body)["name"] == "two\nlines"
    assert [(b.line, b.reason[:7]) for b in parsed.bad] == [(5, "user_id")]


def test_csv_bad_rows_and_bad_headers() -> None:
    parsed = rows.parse_csv(b"user_id,name\nu-1,a,extra\nu-2\nu-3,c\n", max_bytes=MAX)
    assert [r.user_id for r in parsed.rows] == ["u-3"]
    assert [(b.line, b.reason) for b in parsed.bad] == [
        (2, "has 3 fields; the header (line 1) has 2"), (3, "has 1 fields; the header (line 1) has 2")]

    for data, reason in [(b"name,email\nx,y\n", "no user_id column"),
                         (b"user_id,name,name\n", "names name more than once"),
                         (b"user_id,,x\n", "empty column name"),
                         (b"", "no header row"),
                         (b"\n\n", "no header row")]:
        parsed = rows.parse_csv(data, max_bytes=MAX)
        assert parsed.rows == [] and len(parsed.bad) == 1 and reason in parsed.bad[0].reason, (data, parsed)
    parsed = rows.parse_csv(b"user_id,name\nu,n\n", max_bytes=MAX, message_id_field="ref")
    assert "no ref column" in parsed.bad[0].reason


def test_csv_not_utf8_names_its_line_and_a_bom_is_fine() -> None:
    parsed = rows.parse_csv(b"user_id,name\nu-1,ok\nu-2,caf\xe9\n", max_bytes=MAX)
    assert parsed.rows == [] and parsed.bad[0].line == 3 and "not UTF-8" in parsed.bad[0].reason
    parsed = rows.parse_csv(b"\xef\xbb\xbfuser_id,name\nu-1,ok\n", max_bytes=MAX)
    assert [r.user_id for r in parsed.rows] == ["u-1"]


def test_csv_unterminated_quote_is_reported() -> None:
    parsed = rows.parse_csv(b'user_id,name\nu-1,"open\n', max_bytes=MAX)
    assert parsed.rows == [] and "not valid CSV" in parsed.bad[-1].reason


def test_format_from_the_extension() -> None:
    assert [rows.guess_format(p) for p in ("a.jsonl", "A.NDJSON", "a.json", "dir/b.csv", "c.txt", "-")] == \
        ["jsonl", "jsonl", "jsonl", "csv", None, None]
    with pytest.raises(ValueError):
        rows.parse(b"", "xml", max_bytes=MAX)


# ---- durations and ages ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
                                               ("1h30m", 5400), ("0.5s", 0.5), ("1w", 604800), (" 2H ", 7200)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "1h 30m", "-5", "nan", "inf", "30m1"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_since_takes_a_duration_or_a_time() -> None:
    assert parse_since("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_since("2026-11-27T10:00:00Z", NOW) == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert parse_since("2026-11-27T10:00:00", NOW) == datetime(2026, 11, 27, 10, tzinfo=UTC)  # UTC when unzoned
    assert parse_since("2026-11-27T07:00:00-03:00", NOW) == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert parse_since("2026-11-27", NOW) == datetime(2026, 11, 27, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since takes"):
        parse_since("yesterday", NOW)


@pytest.mark.parametrize(("seconds", "shown"), [(-3, "0s"), (0, "0s"), (42.9, "42s"), (60, "1m00s"), (307, "5m07s"),
                                                (10920, "3h02m"), (363600, "4d05h")])
def test_ages(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown


# ---- tables --------------------------------------------------------------------------------------


def test_table_pads_columns_and_aligns_numbers_right() -> None:
    text = render(["#", "STAGE", "REASON"], [[1, "legacy", "short"], [10, "validation", "a longer reason"]],
                  right=["#"])
    assert text.splitlines() == [
        " #  STAGE       REASON",
        " 1  legacy      short",
        "10  validation  a longer reason",
    ]
    assert render(["A", "B"], [[None, "x"]], indent="  ").splitlines()[1] == "     x"
    with pytest.raises(ValueError):
        render(["A", "B"], [["only one"]])


def test_cells_are_one_line_and_cut_short() -> None:
    # Blanks collapse; a line feed, a carriage return or a tab is shown, never obeyed nor hidden.
    assert one_line("  a  b \u00a0 c  ") == "a b c"
    assert one_line("a\nb\r\tc") == "a\\u000ab\\u000d\\u0009c"
    assert truncate("abcdefghij", 5) == "abcd…"
    assert truncate("abcde", 5) == "abcde"
    assert truncate("line one\nline two", 100) == "line one\\u000aline two"
    assert truncate("x", 0) == ""
    assert [plural(1, "record"), plural(2, "record"), plural(0, "entry", "entries")] == \
        ["1 record", "2 records", "0 entries"]


def test_progress_bar() -> None:
    assert bar(0, 10, width=10) == "publishing [----------]   0% 0/10"
    assert bar(5, 10, width=10) == "publishing [#####-----]  50% 5/10"
    assert bar(10, 10, width=10) == "publishing [##########] 100% 10/10"
    assert bar(0, 0, width=4) == "publishing [----]   0% 0/0"

    off = io.StringIO()
    progress = Progress(3, off, enabled=False)
    for _ in range(3):
        progress.advance()
    progress.close()
    assert off.getvalue() == "" and progress.done == 3

    on = io.StringIO()
    progress = Progress(2, on, enabled=True, width=4, every_s=0)
    progress.advance()
    progress.advance()
    progress.close()
    assert on.getvalue() == "\rpublishing [##--]  50% 1/2\rpublishing [####] 100% 2/2\n"


# ---- failure records and filters ---------------------------------------------------------------


def failure(position: int, *, user_id: str | None = "u-1", stage: str = "legacy", original: Any = None,
            failed_at: datetime = NOW - timedelta(minutes=5), message_id: str | None = "m-1") -> Failure:
    body = FailureRecord(original=person(user_id or "x") if original is None else original, user_id=user_id,
                         legacy_request_id="AB583C-X", error=FailureError(stage, "rejected by the legacy system", 200),
                         attempts=4, failed_at=failed_at).encode()
    return Failure.parse(position, body, message_id=message_id)


def test_a_failure_record_read_back() -> None:
    f = failure(3)
    assert (f.position, f.stage, f.user_id, f.reason) == (3, "legacy", "u-1", "rejected by the legacy system")
    assert f.failed_at == NOW - timedelta(minutes=5) and f.age_s(NOW) == 300
    assert f.has_original and json.loads(f.replay_body()) == person("u-1")
    view = f.view(NOW)
    assert view["position"] == 3 and view["message_id"] == "m-1" and view["age_s"] == 300
    assert view["record"]["error"]["http_status"] == 200 and "problem" not in view


def test_unreadable_records_are_shown_not_fatal() -> None:
    junk = Failure.parse(1, b"\xff not json")
    assert (junk.stage, junk.user_id, junk.failed_at) == ("?", None, None)
    assert junk.reason.startswith("unreadable failure record") and not junk.has_original
    assert junk.view(NOW)["record"] == "\ufffd not json"
    with pytest.raises(ValueError):
        junk.replay_body()
    # JSON, but not a whole record: what can be read is shown; `original` can still be replayed.
    partial = Failure.parse(2, json.dumps({"original": {"user_id": "p"}, "user_id": "p",
                                           "error": {"stage": "poll"}}).encode())
    assert (partial.stage, partial.user_id, partial.has_original) == ("poll", "p", True)
    assert partial.record is None and partial.problem


def test_what_a_replay_publishes() -> None:
    assert encode_original({"user_id": "u", "name": "João"}) == '{"user_id":"u","name":"João"}'.encode()
    assert encode_original(["an", "array"]) == b'["an","array"]'
    assert encode_original("this is not JSON") == b"this is not JSON"
    assert encode_original(42) == b"42"
    assert failure(1, user_id=None, stage="validation", original="{not json").replay_body() == b"{not json"


def test_filters() -> None:
    old = failure(1, user_id="u-1", stage="legacy", failed_at=NOW - timedelta(hours=3))
    new = failure(2, user_id="u-2", stage="submit", failed_at=NOW - timedelta(minutes=1))
    junk = Failure.parse(3, b"junk")
    everything = [old, new, junk]
    assert [f.position for f in everything if Filter().matches(f)] == [1, 2, 3]
    assert [f.position for f in everything if Filter(stage="submit").matches(f)] == [2]
    assert [f.position for f in everything if Filter(user_id="u-1").matches(f)] == [1]
    assert [f.position for f in everything if Filter(since=NOW - timedelta(hours=1)).matches(f)] == [2]
    assert [f.position for f in everything if Filter(stage="legacy", user_id="u-2").matches(f)] == []
    assert not Filter().active and Filter(stage="poll").active


def test_amqp_properties_as_json() -> None:
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id="m-1",
                                 timestamp=1_800_000_000, headers={"x-delivery-count": 2, "b": b"bytes"})
    assert properties_view(props) == {
        "content_type": "application/json", "delivery_mode": 2, "message_id": "m-1",
        "timestamp": "2027-01-15T08:00:00+00:00", "headers": {"x-delivery-count": 2, "b": "bytes"}}


# ---- settings, arguments, errors -----------------------------------------------------------------


def test_settings_default_to_the_contract() -> None:
    s = from_env({})
    assert s == CliSettings()
    assert (s.rabbitmq_url, s.mongodb_uri, s.mongodb_database, s.mongodb_collection) == (
        "amqp://guest:guest@localhost:5672/%2F", "mongodb://localhost:27017", "registry", "users")
    assert (s.inbound_queue, s.pending_queue, s.failed_queue) == (
        "registrations", "registrations.pending", "registrations.failed")
    assert (s.poll_first_delay_s, s.poll_interval_s, s.max_message_bytes) == (10.0, 2.0, 65536)
    # The adaptive schedule's: the configured delays', then the ladder's.
    assert s.wait_queues[:2] == ["registrations.pending.wait.10000ms", "registrations.pending.wait.2000ms"]
    assert s.wait_queues[2:] == [f"registrations.pending.wait.{round(d * 1000)}ms" for d in LADDER_S if d != 2.0]
    assert from_env({"POLL_SCHEDULE": "fixed"}).wait_queues == [
        "registrations.pending.wait.10000ms", "registrations.pending.wait.2000ms"]
    assert s.broker_shown == "amqp://***@localhost:5672/%2F"


def test_settings_from_the_environment() -> None:
    s = from_env({"RABBITMQ_URL": "amqps://bridge:p@ss@rabbit:5671/regs", "PENDING_QUEUE": "p",
                  "POLL_FIRST_DELAY_S": "0", "POLL_INTERVAL_S": "0.25", "MONGODB_DATABASE": " db ",
                  "POLL_SCHEDULE": "Fixed"})
    assert s.wait_queues == ["p.wait.250ms"]  # no first delay, no first wait queue
    assert s.mongodb_database == "db"
    assert s.broker_shown == "amqps://***@rabbit:5671/regs"
    assert from_env({"POLL_FIRST_DELAY_S": "2", "POLL_INTERVAL_S": "2", "POLL_SCHEDULE": "fixed"}).wait_queues == \
        ["registrations.pending.wait.2000ms"]


def test_every_bad_setting_is_named_and_no_url_is_echoed() -> None:
    with pytest.raises(CliError) as caught:
        from_env({"RABBITMQ_URL": "http://bob:s3cret@x", "MONGODB_URI": "bob:s3cret@mongo", "POLL_INTERVAL_S": "0",
                  "POLL_FIRST_DELAY_S": "-1", "MAX_MESSAGE_BYTES": "lots"})
    message = str(caught.value)
    for name in ("RABBITMQ_URL", "MONGODB_URI", "POLL_INTERVAL_S", "POLL_FIRST_DELAY_S", "MAX_MESSAGE_BYTES"):
        assert name in message
    assert "s3cret" not in message and caught.value.code == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RABBITMQ_URL", "amqp://u:pa/ss-SECRETPART@127.0.0.1:5672/%2F"),  # unescaped '/' in the password
        ("RABBITMQ_URL", "amqp://u:SECRETPART@127.0.0.1:notaport/%2F"),
        ("MONGODB_URI", "mongodb://u:pa?ss-SECRETPART@db:27017/"),
    ],
)
def test_settings_refuse_the_urls_the_services_refuse(name: str, value: str) -> None:
    with pytest.raises(CliError) as caught:
        from_env({name: value})
    assert f"{name}: expected a URL" in str(caught.value)
    assert "SECRETPART" not in str(caught.value) and caught.value.code == 2


def test_a_mongodb_seed_list_is_accepted() -> None:
    uri = "mongodb://u:p@db1:27017,db2:27017/?replicaSet=rs0"
    assert from_env({"MONGODB_URI": uri}).mongodb_uri == uri


def test_errors_never_carry_credentials() -> None:
    assert str(CliError("cannot reach amqp://bob:s3cret@host:5672/v")) == "cannot reach amqp://***@host:5672/v"


def test_arguments() -> None:
    parser = build_parser()
    args = parser.parse_args(["stats", "--watch"])
    assert args.watch == 2.0 and args.count is None
    assert parser.parse_args(["stats", "--watch", "90s"]).watch == 90
    assert parser.parse_args(["stats", "--watch", "0.5", "--count", "3"]).watch == 0.5
    args = parser.parse_args(["failed", "list", "--stage", "legacy", "--since", "2h", "--limit", "5"])
    assert (args.stage, args.limit) == ("legacy", 5)
    assert args.since.tzinfo is not None
    args = parser.parse_args(["failed", "replay", "--user-id", "u-1", "--dry-run"])
    assert (args.user_id, args.dry_run, args.stage) == ("u-1", True, None)
    assert parser.parse_args(["publish", "f.csv", "--skip-invalid", "--message-id-field", "ref"]).message_id_field \
        == "ref"
    for bad in (["failed", "list", "--stage", "nope"], ["failed", "list", "--limit", "0"], ["failed", "show"],
                ["stats", "--watch", "0"], ["failed", "list", "--since", "whenever"], ["publish"], []):
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(bad)
        assert caught.value.code == 2


def test_a_copy_keeps_every_property_and_header_but_the_delivery_count() -> None:
    original = pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", delivery_mode=2, priority=1, correlation_id="c",
        reply_to="r", expiration="60000", message_id="m-1", timestamp=1_800_000_000, type="failure", user_id="guest",
        app_id="poller", cluster_id="x",
        headers={"x-delivery-count": 3, "x-regbridge-seq": 7, "x-death": [{"count": 1, "queue": "q"}], "b": b"\xff"})
    copy = exact_copy(original)
    names = ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
             "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "cluster_id")
    assert {n: getattr(copy, n) for n in names} == {n: getattr(original, n) for n in names}
    assert copy.headers == {"x-regbridge-seq": 7, "x-death": [{"count": 1, "queue": "q"}], "b": b"\xff"}
    assert original.headers["x-delivery-count"] == 3  # the original is left as it was
    # Only the broker's count in the headers: none left.
    assert exact_copy(pika.BasicProperties(headers={"x-delivery-count": 0})).headers is None


def test_a_copy_keeps_a_float_header_as_its_text() -> None:
    """pika reads AMQP floats but cannot write them: a foreign record carrying one must still go round."""
    copy = exact_copy(pika.BasicProperties(headers={"ratio": 0.25, "nested": {"list": [1.5, True, 2]}}))
    assert copy.headers == {"ratio": "0.25", "nested": {"list": ["1.5", True, 2]}}


# ---- output formats, consent, version, completion ----------------------------------------------


def test_json_output_escapes_every_character_a_terminal_acts_on() -> None:
    hostile = "Jos\u00e9 \x1b[2J \x07 \u009b31m \u0085 \u202eevil\u202c \u2066x\u2069 \u200f \u2028"
    text = safe_json({"name": hostile})
    assert json.loads(text) == {"name": hostile}  # the same value, read back
    assert text.isascii() and "Jos\\u00e9" in text  # ensure_ascii: plain ASCII, every other character escaped
    assert "\\u009b" in text and "\\u202e" in text and "\\u001b" in text
    indented = safe_json({"a": ["\u0085"]}, indent=2)
    assert "\\u0085" in indented and json.loads(indented) == {"a": ["\u0085"]}


HOSTILE = {
    "ESC clear screen": "\x1b[2J",
    "OSC 52 clipboard write": "\x1b]52;c;ZWNobyBwd25lZA==\x07",
    "C1 CSI": "\u009b31m",
    "right-to-left override": "\u202eevil",
    "bidi isolate": "\u2066x\u2069",
    "DEL and NEL": "\x7f\u0085",
    "line separator": "\u2028",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_escape_class_is_rendered_visibly_wherever_the_command_prints(name: str) -> None:
    hostile = f"u-{HOSTILE[name]}-1"
    for fmt in ("table", "json", "jsonl"):
        stream = io.StringIO()
        out = Output(fmt, True, stream)
        if out.is_table:
            out.line(out.table(["USER_ID", "REASON"], [[hostile, f"reason {hostile}"]]))
            out.line(f"replayed {hostile}")
            out.summary(f"about {hostile}")
        else:
            out.document({"user_id": hostile}, jsonl_rows=[{"user_id": hostile}])
        printed = stream.getvalue()
        assert not unsafe(printed.replace("\n", "")), (fmt, printed)
        assert "\\u" in printed, (fmt, printed)  # shown as an escape, not dropped
    err = io.StringIO()
    warn(f"no record with id {hostile!s}", err)
    assert not unsafe(err.getvalue().rstrip("\n")) and err.getvalue().startswith("registrations: no record")


def unsafe(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c in "\u202a\u202b\u202c\u202d"
            "\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u2028\u2029\u061c"]


def test_visible_keeps_the_lines_the_command_joined_and_nothing_else() -> None:
    assert visible("a\nb") == "a\\u000ab"
    assert visible("a\nb\tc", keep_newlines=True) == "a\nb\\u0009c"
    assert visible("Jos\u00e9 \u00e7") == "Jos\u00e9 \u00e7"  # letters are not controls


def test_output_formats_and_no_headers() -> None:
    def printed(fmt: str, headers: bool = True) -> str:
        stream = io.StringIO()
        out = Output(fmt, headers, stream)
        if out.is_table:
            out.line(out.table(["A", "B"], [[1, "x"], [2, "y"]]))
        else:
            out.document([{"a": 1}, {"a": 2}], jsonl_rows=[{"a": 1}, {"a": 2}])
        out.summary("2 rows")
        return stream.getvalue()

    assert printed("table") == "A  B\n1  x\n2  y\n2 rows\n"
    assert printed("table", headers=False) == "1  x\n2  y\n"
    assert json.loads(printed("json")) == [{"a": 1}, {"a": 2}]
    assert printed("jsonl") == '{"a":1}\n{"a":2}\n'
    assert Output("table", False).table(["A"], []) == ""


def test_output_arguments_and_the_json_alias() -> None:
    parser = build_parser()
    assert parser.parse_args(["failed", "list"]).output == "table"
    assert parser.parse_args(["failed", "list", "--json"]).output == "json"
    assert parser.parse_args(["failed", "list", "-o", "jsonl", "--no-headers"]).no_headers
    assert parser.parse_args(["failed", "show", "3"]).output == "json"  # show prints the record in full
    assert parser.parse_args(["status", "u", "--json"]).output == "json"
    assert parser.parse_args(["stats", "-o", "json"]).output == "json"
    assert parser.parse_args(["publish", "f.csv", "--output", "jsonl"]).output == "jsonl"
    args = parser.parse_args(["failed", "replay", "-y", "-o", "json"])
    assert args.yes and args.output == "json"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["failed", "list", "-o", "yaml"])
    assert caught.value.code == 2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "yes"), [("y\n", True), ("YES\n", True), ("n\n", False), ("\n", False),
                                             ("", False), ("yep\n", False)])
def test_consent_takes_only_y_or_yes(answer: str, yes: bool) -> None:
    stderr = _Tty()
    consent = Consent(stdin=_Tty(answer), stderr=stderr)
    assert consent.ask("replay 3 failure records?") is yes
    assert stderr.getvalue().startswith("replay 3 failure records? [y/N] ")


def test_consent_refuses_without_a_terminal_unless_told_yes() -> None:
    with pytest.raises(CliError) as caught:
        Consent(stdin=io.StringIO("y\n"), stderr=_Tty()).check("failed replay")
    assert caught.value.code == 2 and "--yes" in str(caught.value)
    Consent(yes=True, stdin=io.StringIO(), stderr=io.StringIO()).check("failed replay")
    Consent(stdin=_Tty(), stderr=_Tty()).check("failed replay")
    quiet = io.StringIO()
    assert Consent(yes=True, stdin=io.StringIO(), stderr=quiet).ask("sure?") and quiet.getvalue() == ""


def test_version_names_both_packages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--version"])
    assert caught.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == version_text()
    assert re.fullmatch(r"registrations \S+ \(regbridge-common \S+\)", printed) and "unknown" not in printed


def _bash_complete(script: str, *words: str) -> list[str]:
    """What the completion function offers for `words` (the last one being typed)."""
    program = (f'source {shlex.quote(script)} && complete -p registrations >/dev/null && '
               f'COMP_WORDS=(registrations {" ".join(shlex.quote(w) for w in words)}) && '
               f'COMP_CWORD={len(words)} && _registrations && printf "%s\\n" "${{COMPREPLY[@]}}"')
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "registrations.bash"
    script.write_text(completion.script(build_parser(), "bash"))
    assert _bash_complete(str(script), "fa") == ["failed"]
    assert _bash_complete(str(script), "") == ["publish", "failed", "status", "stats", "init-indexes", "inspect",
                                               "capacity", "completion", "-h", "--help", "--version"]
    assert _bash_complete(str(script), "capacity", "--sch") == ["--schedule"]
    assert _bash_complete(str(script), "capacity", "--schedule", "") == ["adaptive", "fixed"]
    assert _bash_complete(str(script), "failed", "re") == ["reconcile", "replay"]
    assert _bash_complete(str(script), "failed", "list", "--from") == ["--from-queue"]
    assert _bash_complete(str(script), "failed", "replay", "--st") == ["--stage"]
    assert _bash_complete(str(script), "failed", "replay", "--stage", "l") == ["legacy"]
    assert _bash_complete(str(script), "failed", "list", "-o", "js") == ["json", "jsonl"]
    # An option's value that happens to be a command's name is not taken for the command.
    assert "--limit" in _bash_complete(str(script), "failed", "list", "--user-id", "failed", "--")
    assert _bash_complete(str(script), "completion", "") == ["bash", "zsh", "-h", "--help"]
    (tmp_path / "people.jsonl").write_text("")
    assert f"{tmp_path}/people.jsonl" in _bash_complete(str(script), "publish", f"{tmp_path}/pe")


def test_zsh_completion(tmp_path: Path) -> None:
    text = completion.script(build_parser(), "zsh")
    assert text.startswith("#compdef registrations\n")
    assert "'failed replay:--stage') compadd -- 'validation' 'submit' 'legacy' 'poll' 'timeout'" in text
    # A system zsh, else Debian's, unpacked by scripts/tools.sh (the CI image has none): its
    # modules and functions live under that tree, not where the binary was built to look.
    zsh = shutil.which("zsh")
    setup = ""
    if zsh is None:
        tools = fetch_tools("zsh", "zsh_root")
        zsh, root = str(tools["zsh"]), tools["zsh_root"]
        functions = " ".join(shlex.quote(str(d)) for d in sorted((root / "usr/share/zsh/functions").rglob("*"))
                             if d.is_dir())
        modules = next((root / "usr/lib").glob("*/zsh/*"))
        setup = f"module_path=({shlex.quote(str(modules))}); fpath=({functions} $fpath)\n"
    script = tmp_path / "_registrations"
    script.write_text(text)
    result = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # Completion for real: an interactive zsh with compinit, on a pseudo-terminal, given TAB.
    (tmp_path / ".zshrc").write_text(f"{setup}autoload -U compinit && compinit -u -d {tmp_path}/zcompdump\n"
                                     f"source {shlex.quote(str(script))}\nPS1='> '\n")
    assert _zsh_line_after_tab(zsh, tmp_path, "registrations fa") == "registrations failed "
    assert _zsh_line_after_tab(zsh, tmp_path, "registrations failed replay --stage le") == \
        "registrations failed replay --stage legacy "
    assert _zsh_line_after_tab(zsh, tmp_path, "registrations --ver") == "registrations --version "


def _zsh_line_after_tab(zsh: str, home: Path, typed: str) -> str:
    """The command line once zsh has completed `typed` + TAB (read back with a widget that prints it)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes zsh
        os.execve(zsh, [zsh, "-i"], {**os.environ, "ZDOTDIR": str(home), "TERM": "dumb"})
    shown = b""
    try:
        def read_until(marker: bytes, timeout: float = 20) -> None:
            nonlocal shown
            deadline = time.monotonic() + timeout
            while marker not in shown and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    shown += os.read(fd, 4096)
            assert marker in shown, f"zsh never showed {marker!r}: {shown!r}"

        read_until(b"> ")
        # Bind ^X^P to a widget that prints the buffer between markers, then type, TAB, ^X^P.
        os.write(fd, b"show() { print -rn -- $'\\n[[' \"$BUFFER\" ']]' }; zle -N show; bindkey '^X^P' show\n")
        read_until(b"bindkey '^X^P' show")
        shown = b""
        os.write(fd, typed.encode() + b"\t")
        time.sleep(0.5)
        os.write(fd, b"\x18\x10")
        read_until(b"]]")
        return shown.rsplit(b"[[ ", 1)[1].split(b" ]]", 1)[0].decode()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)


def test_a_record_is_found_by_its_id_or_the_one_id_that_starts_so() -> None:

    failures = [Failure.parse(i + 1, b"{}", message_id=mid) for i, mid in
                enumerate(["m-1", "m-10", "u-7|sha256:ab12", "u-7|sha256:cd34", "solo-long-id", "m-1"])]
    assert find(failures, "m-1", "q").position == 1  # exact, and the first of its copies
    assert find(failures, "solo", "q").record_id == "solo-long-id"
    with pytest.raises(CliError, match=r"2 records on q have ids starting with 'u-7\|sha256:'"):
        find(failures, "u-7|sha256:", "q")
    with pytest.raises(CliError, match="no record with id 'nope'"):
        find(failures, "nope", "q")


def test_each_record_is_listed_once_however_many_copies_share_its_id() -> None:
    failures = [Failure.parse(i + 1, b"{}", message_id=mid) for i, mid in enumerate(["a", "b", "a", None, None, "a"])]
    first, copies = first_copies(failures)
    digest = "sha256:" + hashlib.sha256(b"{}").hexdigest()  # no id at all: named by its body
    assert [(f.position, f.record_id) for f in first] == [(1, "a"), (2, "b"), (4, digest)]
    assert copies == {("a", b"{}"): 3, ("b", b"{}"): 1, (digest, None): 2}


def _record(user: str, at: datetime) -> bytes:
    return FailureRecord(original=person(user), user_id=user, legacy_request_id=None,
                         error=FailureError("legacy", f"refused {user}"), attempts=1, failed_at=at).encode()


def test_the_id_is_read_from_the_header_then_the_message_id_then_the_body() -> None:
    body = _record("u-A", NOW)
    assert record_id_of("dup", {RECORD_ID_HEADER: "u-A|mid:dup|m1"}, body) == ("u-A|mid:dup|m1", "header")
    assert record_id_of("dup", {RECORD_ID_HEADER: b"u-A|mid:dup|m1"}, body)[0] == "u-A|mid:dup|m1"
    assert record_id_of("dup", {"x-other": 1}, body) == ("dup", "message_id")  # an earlier release's record
    assert record_id_of(None, None, body) == ("sha256:" + hashlib.sha256(body).hexdigest(), "body")


def test_records_that_share_only_an_inbound_message_id_are_distinct() -> None:
    """An earlier release named a record by the inbound message_id, which two users' messages
    may share: such records are copies only when their bodies are byte-identical."""
    a, b = _record("u-A", NOW), _record("u-B", NOW)
    failures = [Failure.parse(1, a, message_id="dup"), Failure.parse(2, b, message_id="dup"),
                Failure.parse(3, a, message_id="dup")]
    first, copies = first_copies(failures)
    assert [(f.position, f.user_id) for f in first] == [(1, "u-A"), (2, "u-B")]
    assert copies == {("dup", a): 2, ("dup", b): 1}


def test_records_under_one_service_id_are_copies_even_when_written_again_later() -> None:
    """An id the service wrote names one attempt of one user's message: a redelivery that wrote
    the record again (a later `failed_at`) made a copy of it, not another record."""
    header = {RECORD_ID_HEADER: "u-A|mid:dup|m1"}
    first_write, again = _record("u-A", NOW), _record("u-A", NOW + timedelta(seconds=3))
    other = {RECORD_ID_HEADER: "u-B|mid:dup|m2"}
    failures = [Failure.parse(1, first_write, message_id="dup", headers=header),
                Failure.parse(2, _record("u-B", NOW), message_id="dup", headers=other),
                Failure.parse(3, again, message_id="dup", headers=header)]
    first, copies = first_copies(failures)
    assert [(f.position, f.record_id) for f in first] == [(1, "u-A|mid:dup|m1"), (2, "u-B|mid:dup|m2")]
    assert copies[("u-A|mid:dup|m1", None)] == 2


def test_filters_by_id_reason_and_age() -> None:
    now = datetime.now(UTC)
    old = Failure.parse(1, json.dumps(record_body("legacy", "rejected by the legacy system",
                                                  now - timedelta(days=40))).encode(), message_id="m-old")
    new = Failure.parse(2, json.dumps(record_body("submit", "timed out", now)).encode(), message_id="m-new")
    assert [f.record_id for f in (old, new) if Filter(older_than=now - timedelta(days=30)).matches(f)] == ["m-old"]
    assert [f.record_id for f in (old, new) if Filter(ids=frozenset({"m-new"})).matches(f)] == ["m-new"]
    assert [f.record_id for f in (old, new) if Filter(reason=re.compile("legacy")).matches(f)] == ["m-old"]
    assert Filter(reason=re.compile("x")).active and not Filter().active


def record_body(stage: str, reason: str, at: datetime) -> dict[str, Any]:
    return {"original": {"user_id": "u"}, "user_id": "u", "legacy_request_id": None,
            "error": {"stage": stage, "reason": reason, "http_status": None}, "attempts": 1,
            "failed_at": at.isoformat()}


# ---- the failure index, from the command's side ------------------------------------------------


def test_an_entry_is_made_from_whatever_record_the_queue_holds() -> None:
    body = FailureRecord(original=person("u-1"), user_id="u-1", legacy_request_id="AB583C-X",
                         error=FailureError("legacy", "rejected by the legacy system", 200), attempts=4,
                         failed_at=NOW - timedelta(minutes=5)).encode()
    entry = entry_of("m-1", body, fallback_time=NOW)
    assert (entry.record_id, entry.stage, entry.reason, entry.user_id, entry.legacy_request_id) == \
        ("m-1", "legacy", "rejected by the legacy system", "u-1", "AB583C-X")
    assert entry.failed_at == NOW - timedelta(minutes=5) and entry.body.encode() == body
    # Unreadable: indexed all the same, under stage `?`, with why as its reason.
    junk = entry_of("m-junk", b"\xff not json", fallback_time=NOW)
    assert (junk.stage, junk.user_id, junk.failed_at) == ("?", None, NOW) and "malformed" in junk.reason
    partial = entry_of("m-p", json.dumps({"original": {}, "user_id": "p", "error": {"stage": "poll"}}).encode(),
                       fallback_time=NOW)
    assert (partial.stage, partial.user_id) == ("?", "p")


def test_the_list_shows_a_state_column_only_when_some_entry_is_not_queued() -> None:
    def row(record_id: str, state: str | None) -> Row:
        return Row(record_id, "legacy", "u-1", NOW - timedelta(seconds=42), "rejected", state)

    plain = table([row("m-1", "queued"), row("m-2", None)], NOW).splitlines()
    assert plain[0].split() == ["ID", "STAGE", "USER_ID", "AGE", "REASON"]
    marked = table([row("m-1", "queued"), row("m-2", "leaving")], NOW).splitlines()
    assert marked[0].split() == ["ID", "STATE", "STAGE", "USER_ID", "AGE", "REASON"]
    assert marked[2].split()[:3] == ["m-2", "leaving", "legacy"]
    unreadable = Row.of_entry(Entry("m-3", 7, "queued", "?", "failure record is malformed", None, NOW))
    assert unreadable.failed_at is None  # the time it was indexed is no time it failed
    assert table([unreadable], NOW).splitlines()[1].split()[3] == "?"


def test_a_whole_cycle_found_each_id_once_with_its_copies() -> None:
    def taken(position: int, message_id: str | None, body: bytes = b"{}") -> Record:
        return Record(position, pika.BasicProperties(message_id=message_id), body)

    digest = "sha256:" + hashlib.sha256(b"{}").hexdigest()
    found = Found.of([taken(1, "a"), taken(2, "b"), taken(3, "a"), taken(4, None), taken(5, "b", b"[]")])
    first = found.first["a"]
    assert list(found.first) == ["a", "b", digest] and first is not None and first.position == 1
    assert found.copies == {"a": 2, "b": 2, digest: 1}
    assert found.shared_by_distinct == {"b"}  # two bodies under one earlier release's message_id


def test_an_error_never_shows_a_url_settings_password(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # A password with a blank: `redact_url` stops at the blank, so only the known secrets catch
    # its tail; and a library's error may quote the password without its URL at all.
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:Sp ace-Secret@broker:5672/%2F")
    monkeypatch.setenv("MONGODB_URI", "mongodb://admin:m0ngo-pass@db:27017")
    monkeypatch.setenv("RABBITMQ_MANAGEMENT_URL", "http://mon:mgmt%20pw@broker:15672/")

    def fail(*_: Any) -> int:
        raise CliError("cannot reach amqp://user:Sp ace-Secret@broker:5672/ (Sp ace-Secret refused); "
                       "mongodb auth m0ngo-pass failed; management said 'mgmt pw' is wrong")

    monkeypatch.setattr(main_module, "dispatch", fail)
    assert main_module.main(["stats"]) == 1
    err = capsys.readouterr().err
    for secret in ("Sp ace", "ace-Secret", "m0ngo-pass", "mgmt pw", "mgmt%20pw"):
        assert secret not in err, err
    assert err.count("***") >= 4 and "amqp://***@broker:5672/" in err


def test_an_error_is_masked_even_when_a_url_setting_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RABBITMQ_URL": "not a url, amqp://", "MONGODB_URI": "mongodb://:@", "RABBITMQ_MANAGEMENT_URL": ""}
    assert main_module.secrets_of(env).mask("nothing secret here") == "nothing secret here"


# ---- the bound on how long a cycle holds a record (cycle.Cycle.has_room) -------------------------


def holding(monkeypatch: pytest.MonkeyPatch, *, rate: float, max_hold_s: float) -> tuple[Cycle, list[float]]:
    """A cycle not run (no broker), its clock in the test's hands."""
    clock = [100.0]
    monkeypatch.setattr("registrations_cli.cycle.time.monotonic", lambda: clock[0])
    cycle = Cycle(None, "q", rate=rate, max_hold_s=max_hold_s)
    cycle._take_began = clock[0]
    return cycle, clock


def take(cycle: Cycle, clock: list[float], *, left: int, chosen: bool) -> bool:
    """One record taken 1 ms after the last, `left` behind it; held if `chosen` and there is room."""
    clock[0] += 0.001
    cycle.taken += 1
    cycle._left = left
    room = cycle.has_room() if chosen else False
    if room:
        cycle._to_send += 1
        if cycle._first_held_at is None:
            cycle._first_held_at = clock[0]
    return room


def test_a_cycle_holds_as_many_as_its_sends_can_make_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 s a send, 10 s at most: 10 records with a take that costs nothing more.
    cycle, clock = holding(monkeypatch, rate=1.0, max_hold_s=10.0)
    held = [take(cycle, clock, left=50 - i, chosen=True) for i in range(50)]
    assert held == [True] * 9 + [False] * 41  # 50 ms of take, then 9 sends of a second each
    assert cycle.left_out == 41
    # Once closed, it stays closed for the cycle, so that a pass sends a run in queue order.
    clock[0] -= 100
    assert not cycle.has_room()


def test_a_cycle_waits_until_the_rest_of_a_long_take_fits_before_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 ms a record: the rest of a take of 10,000 is 10 s, more than the bound of 5 s. It holds
    # once the rest needs half the bound (2.5 s), and then as many as the other half sends.
    cycle, clock = holding(monkeypatch, rate=100.0, max_hold_s=5.0)
    held = [take(cycle, clock, left=10_000 - i - 1, chosen=True) for i in range(10_000)]
    first = held.index(True)
    assert 7_400 < first < 7_600
    assert 200 < held.count(True) < 260 and all(held[first:first + held.count(True)])
    assert cycle.left_out == held.count(False)


def test_without_a_bound_a_cycle_always_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    cycle = Cycle(None, "q", rate=0.001)
    assert all(cycle.has_room() for _ in range(100)) and cycle.left_out == 0


def test_rows_as_json_are_the_text_of_the_whole_list() -> None:
    for values in ([], [{"a": 1, "b": [1, 2]}], [{"a": "\u202e\x1b"}, {"b": {"c": None}}]):
        one, other = io.StringIO(), io.StringIO()
        Output("json", stream=one).rows(iter(values))
        Output("json", stream=other).document(values)
        assert one.getvalue() == other.getvalue()
        assert json.loads(one.getvalue()) == values


def test_found_keeps_no_body_of_an_id_the_index_holds() -> None:
    def rec(mid: str | None) -> Record:
        return Record(1, pika.BasicProperties(message_id=mid), b'{"x": 1}')

    found = Found(frozenset({"known"}))
    for mid in ("known", "new", "known", None):
        found.add(rec(mid))
    assert found.first["known"] is None and found.first["new"] is not None
    digest = "sha256:" + hashlib.sha256(b'{"x": 1}').hexdigest()
    assert (found.copies, found.records) == ({"known": 2, "new": 1, digest: 1}, 4)
    assert set(found.entries(("known", "new"), datetime.now(UTC))) == {"new"}
