"""`inspect` and `stats`' pure parts: where the management API is, and what is shown."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from registrations_cli import management
from registrations_cli.inspect_queues import Inspection, Row, render
from registrations_cli.main import build_parser
from registrations_cli.settings import from_env
from registrations_cli.stats import Snapshot, render_line, render_table


def target(**env: str) -> management.Target:
    return management.target(from_env(env))


def test_the_management_api_is_derived_from_the_broker_url() -> None:
    t = target(RABBITMQ_URL="amqp://app:s%40cret@rabbit.example:5672/regs%2Fprod")
    assert (t.base, t.vhost, t.user, t.password, t.configured) == \
        ("http://rabbit.example:15672", "regs/prod", "app", "s@cret", False)
    assert target().vhost == "/" and target().user == "guest"
    assert target(RABBITMQ_URL="amqps://u:p@h/").base == "https://h:15671"
    # Several nodes: the first one listed.
    assert target(RABBITMQ_URL="amqp://u:p@a:5672/v,amqp://u:p@b:5672/v").base == "http://a:15672"


def test_rabbitmq_management_url_as_keda_reads_it() -> None:
    t = target(RABBITMQ_URL="amqp://u:p@h/v", RABBITMQ_MANAGEMENT_URL="https://mon:pw@mgmt.example:443/%2F")
    assert (t.base, t.vhost, t.user, t.password, t.configured) == ("https://mgmt.example:443", "/", "mon", "pw", True)
    # No path: the broker URL's vhost.
    assert target(RABBITMQ_URL="amqp://u:p@h/v", RABBITMQ_MANAGEMENT_URL="http://m:15672/").vhost == "v"
    assert "pw" not in target(RABBITMQ_MANAGEMENT_URL="http://mon:pw@m:15672").shown


def test_inspect_table_and_json() -> None:
    rates = {"publish": 1.5, "deliver_get": 0.25, "ack": 0.0, "redeliver": 0.0}
    view = Inspection("management", "management API http://h:15672 (vhost '/')", [
        Row("inbound", "registrations", management.QueueStats("registrations", 3, 2, 1, rates)),
        Row("failed", "registrations.failed", None),
    ])
    lines = render(view, "table").splitlines()
    assert lines[2].split() == ["STAGE", "QUEUE", "READY", "UNACKED", "CONSUMERS", "IN/S", "DELIVER/S", "ACK/S",
                                "REDELIVER/S"]
    assert lines[3].split() == ["inbound", "registrations", "3", "2", "1", "1.50", "0.25", "0.00", "0.00"]
    assert lines[4].split() == ["failed", "registrations.failed", "not", "declared", "-", "-", "-", "-", "-", "-"]
    shown = json.loads(render(view, "json"))
    assert shown["queues"][0]["rates"] == rates and shown["queues"][1]["exists"] is False

    amqp = Inspection("amqp", "AMQP passive declare on amqp://***@h:5672/%2F", [
        Row("inbound", "registrations", management.QueueStats("registrations", 3, 0, 1, {}))], "it did not answer")
    text = render(amqp, "table").splitlines()
    assert "ready and consumers only" in text[0] and text[3].split() == ["inbound", "registrations", "3", "1"]
    assert json.loads(render(amqp, "json"))["queues"][0]["unacked"] is None


def test_a_queue_that_never_saw_a_message_has_zero_rates() -> None:
    stats = management._stats({"name": "q", "messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0})
    assert stats.rates == dict.fromkeys(management.RATES, 0.0)


def test_stats_without_the_index_shows_the_estimated_total() -> None:
    settings = from_env({})
    snapshot = Snapshot(datetime(2026, 12, 6, tzinfo=UTC), [], None, 1_000_000)
    assert "about 1000000 users in all (estimated" in render_table(snapshot, settings)
    assert "registrations init-indexes" in render_table(snapshot, settings)
    assert render_line(snapshot).endswith("users~1000000 (by status: run registrations init-indexes)")
    assert snapshot.as_json()["users_estimated"] == 1_000_000


def test_new_commands_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["init-indexes", "--dry-run"]).dry_run
    assert parser.parse_args(["inspect", "--json"]).output == "json"  # --json is -o json
    assert parser.parse_args(["init-indexes", "-o", "json"]).output == "json"
