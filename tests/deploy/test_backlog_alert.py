"""Live: the alert rules on the broker's own queue metrics. A real Prometheus scrapes the shared
broker's rabbitmq_prometheus endpoint (per-queue depths and consumers of this test's vhost only)
and evaluates the rules of deploy/prometheus/alerts.yml: the expressions as they are, only `for:`
shortened so that an alert fires within seconds. No service runs: this is a deployment scaled to
zero, as KEDA leaves it.
"""

from __future__ import annotations

import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import requests
import test_prometheus
import yaml
from harness import Broker, port_open, unavailable, wait_until

from regbridge.topology import wait_queue

# The Prometheus fixtures of the other live test: a real `prometheus` from scripts/tools.sh.
tools = test_prometheus.tools
prometheus = test_prometheus.prometheus

METRICS_PORT = 15692  # the rabbitmq_prometheus plugin
FAMILIES = ["queue_coarse_metrics", "queue_consumer_count"]  # what the rules read, and no more
FOR = "3s"
FIRST_DELAY_S = 10  # the services' default POLL_FIRST_DELAY_S: the submitter's first wait queue


def _metrics_answer() -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def broker_metrics() -> str:
    """The shared broker's metrics endpoint; the plugin is enabled if it is not (idempotent)."""
    if not port_open("127.0.0.1", 5672):
        unavailable("RabbitMQ is not answering on 127.0.0.1:5672 (start it: rabbitmq-server -detached)")
    if not _metrics_answer():
        with suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["rabbitmq-plugins", "-q", "enable", "rabbitmq_prometheus"], capture_output=True,
                           timeout=120)
        with suppress(AssertionError):
            wait_until(_metrics_answer, timeout=30, what="the rabbitmq_prometheus endpoint", every=0.5)
    if not _metrics_answer():
        unavailable(f"the broker serves no metrics on {METRICS_PORT}: `rabbitmq-plugins enable rabbitmq_prometheus` "
                    "failed or is not allowed here")
    return f"127.0.0.1:{METRICS_PORT}"


def real_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((test_prometheus.PROMETHEUS_DIR / "alerts.yml").read_text())
    return loaded


def quick_copy(path: Path) -> Path:
    """alerts.yml with every `for:` shortened and evaluated each second; expressions untouched."""
    rules = real_rules()
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def rule_expr(group: str, alert: str) -> str:
    (found,) = [rule["expr"] for g in real_rules()["groups"] if g["name"] == group
                for rule in g["rules"] if rule.get("alert") == alert]
    expr: str = found
    return expr


def alerts(base: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = requests.get(f"{base}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return found


def alert(base: str, name: str, component: str, state: str = "firing") -> dict[str, Any] | None:
    for candidate in alerts(base):
        labels = candidate["labels"]
        if labels["alertname"] == name and labels["component"] == component and candidate["state"] == state:
            return candidate
    return None


def fired(base: str, name: str, component: str, summary: str | None = None) -> dict[str, Any]:
    """The alert once it fires, and (given `summary`) once its summary says so: the broker refreshes
    its queue statistics every 5 s, so an alert may fire on a count that is still rising, and its
    annotations follow the count at each evaluation."""
    def ready() -> dict[str, Any] | None:
        found = alert(base, name, component)
        return found if found is not None and summary in (None, found["annotations"]["summary"]) else None

    found = wait_until(ready, timeout=60, what=f"{name} ({component}) to fire" + (f": {summary!r}" if summary else ""),
                       every=0.5)
    assert found is not None
    return found


@pytest.mark.integration
def test_a_backlog_at_zero_replicas_alerts_and_empty_queues_do_not(
        broker_metrics: str, broker: Broker, prometheus: tuple[Path, str, Any], tmp_path: Path) -> None:
    vhost = broker.url.rsplit("/", 1)[1]
    # The rest of the topology as the submitter declares it: its first wait queue (the broker
    # fixture declared the inbound, pending and failure queues with the services' arguments).
    first_wait = wait_queue("registrations.pending", FIRST_DELAY_S)
    broker.channel.queue_declare(first_wait.name, durable=True, arguments=dict(first_wait.arguments))
    for i in range(5):
        broker.publish("registrations", {"user_id": f"backlog-{i}", "name": "Maria da Silva",
                                         "email": f"backlog-{i}@example.com", "cpf": "12345678909"})

    config, base, start = prometheus
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(quick_copy(tmp_path / "alerts.yml"))],
        "scrape_configs": [{
            # As deploy/prometheus/prometheus.yml scrapes it, limited to this test's vhost: the
            # broker is shared, and other tests' queues are none of this test's business.
            "job_name": "rabbitmq-queues",
            "metrics_path": "/metrics/detailed",
            "params": {"family": FAMILIES, "vhost": [vhost]},
            "static_configs": [{"targets": [broker_metrics]}],
        }],
    }))
    start()

    # The backlog rule's own expression returns the inbound queue with its five messages.
    backlog = rule_expr("registration-bridge-submitter", "RegistrationBacklogWithoutConsumers")

    def backlog_seen() -> bool:
        result = test_prometheus._query(base, backlog)
        return [(r["metric"].get("vhost"), r["metric"].get("queue"), r["value"][1]) for r in result] == [
            (vhost, "registrations", "5")]

    wait_until(backlog_seen, timeout=60, what="the backlog expression to return the inbound queue", every=0.5)

    # Nothing consumes the inbound queue and no submitter target exists: both alerts fire, for
    # this vhost.
    firing = fired(base, "RegistrationBacklogWithoutConsumers", "submitter")
    assert firing["labels"]["vhost"] == vhost and firing["labels"]["severity"] == "critical"
    absent = fired(base, "RegistrationServiceAbsent", "submitter")
    assert absent["labels"]["vhost"] == vhost
    assert absent["annotations"]["summary"] == "5 registrations wait on the inbound queue and no submitter is running"
    assert absent["annotations"]["runbook_url"].endswith("/docs/runbooks.md#registrationserviceabsent")

    # No poller target either, but the pending and wait queues are empty: the same rules of the
    # poller's group, evaluated on the same scrapes for as long, say nothing. Zero replicas with
    # nothing to do is not an alert.
    poller_absent = rule_expr("registration-bridge-poller", "RegistrationServiceAbsent")
    assert test_prometheus._query(base, poller_absent) == []
    assert [a["labels"] for a in alerts(base) if a["labels"]["component"] == "poller"] == []

    # Registrations handed on to the poller's first wait queue, still no poller: its absence and
    # backlog alerts fire too (the wait queue dead-letters into pending, which nothing consumes).
    for i in range(3):
        broker.publish(first_wait.name, {"registration_id": f"r-{i}"})
    absent = fired(base, "RegistrationServiceAbsent", "poller",
                   "3 submitted registrations wait to be polled and no poller is running")
    assert absent["labels"]["vhost"] == vhost
    fired(base, "RegistrationBacklogWithoutConsumers", "poller")

    # A consumer on the inbound queue (a submitter scaled back up) ends the submitter's backlog
    # alert.
    consumer = broker.connection.channel()
    consumer.basic_qos(prefetch_count=1)
    consumer.basic_consume("registrations", lambda *_: None)
    wait_until(lambda: alert(base, "RegistrationBacklogWithoutConsumers", "submitter") is None
               and not test_prometheus._query(base, backlog), timeout=60,
               what="the backlog alert to end once the inbound queue has a consumer", every=0.5)
    consumer.close()
