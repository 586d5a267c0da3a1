"""The dashboard on live data: a real Prometheus scraping the submitter, the poller, legacy-sim and
the broker's per-queue metrics every second, a load that gives every panel something to show, and
each panel's queries asked the way Grafana asks them. Shared by tests/deploy/test_dashboard_live.py
and scripts/dashboard_preview.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from harness import Broker, LegacySim, await_answer, free_port, port_open, wait_until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "registration-bridge.json"
BROKER_METRICS = ("127.0.0.1", 15692)
# The per-queue families the dashboard reads (rabbitmq_prometheus' /metrics/detailed).
BROKER_FAMILIES = ("queue_coarse_metrics", "queue_consumer_count")
SCRAPE_INTERVAL_S = 1
# What Grafana gives $__rate_interval at a 1 s scrape interval and step: four scrapes, and a
# spare one so that a late scrape never leaves a window with a single sample.
RATE_INTERVAL = "5s"
# The variables at "All"; the vhost is the run's own (the broker is shared with other runs).
ALL = ".*"
# `job` at "All": the jobs its query finds on this run's Prometheus, as Grafana joins them.
JOBS = ("submitter", "poller")


# ---- the dashboard's panels ----------------------------------------------------------------------


METRIC_NAME = re.compile(r"\b(?:submitter|poller|rabbitmq)_[a-z0-9_]+\b")


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str
    instant: bool

    def metrics(self) -> set[str]:
        """The metric names the query reads."""
        return set(METRIC_NAME.findall(self.expr))


@dataclass(frozen=True)
class Panel:
    id: int
    title: str
    type: str
    grid: Mapping[str, int]
    targets: tuple[Target, ...]
    options: Mapping[str, Any]
    field_config: Mapping[str, Any]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: Mapping[str, Any] | None = None) -> list[Panel]:
    """Every panel in the order of the dashboard; rows come with no targets."""
    out = []
    for raw in (board or dashboard())["panels"]:
        targets = tuple(Target(t["refId"], t["expr"], t.get("legendFormat", ""), bool(t.get("instant")))
                        for t in raw.get("targets", []))
        out.append(Panel(raw["id"], raw["title"], raw["type"], raw["gridPos"], targets, raw.get("options", {}),
                         raw.get("fieldConfig", {})))
    return out


def as_query(expr: str, *, vhost: str, range_s: float) -> str:
    """`expr` as Grafana would send it over this run: the variables at "All" but the vhost, which
    is the run's own, and $__range the time since the run began."""
    values = {"$__rate_interval": RATE_INTERVAL, "$__interval": f"{SCRAPE_INTERVAL_S}s",
              "$__range": f"{max(int(range_s) + 1, 10)}s", "$broker_namespace": ALL, "$namespace": ALL,
              "$job": f"({'|'.join(JOBS)})", "$vhost": regex_literal(vhost)}
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable is left in {expr!r}"
    return expr


def variable_values(server: Prometheus, name: str) -> set[str]:
    """What a query variable of the dashboard offers on `server`, its variables at "All": Grafana's
    `label_values(selector, label)` asked as PromQL."""
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == name]
    found = re.fullmatch(r"label_values\((?P<selector>.+), (?P<label>\w+)\)", variable["query"])
    assert found, variable["query"]
    selector = found["selector"].replace("$broker_namespace", ALL).replace("$namespace", ALL)
    return {series["metric"].get(found["label"], "") for series in
            server.query(f"group by ({found['label']}) ({selector})")}


def regex_literal(value: str) -> str:
    """`value` as a regex that matches only it, inside a PromQL string, as Grafana escapes a
    selected value (PromQL strings accept no escape such as Python's `\\-`)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\\\1", value)


def legend(template: str, labels: Mapping[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or \
        ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


# ---- Prometheus ----------------------------------------------------------------------------------


def enable_broker_metrics() -> bool:
    """Whether the broker serves rabbitmq_prometheus on 15692, after enabling it if it did not.
    Enabling an enabled plugin changes nothing, so this never disturbs others using the broker."""
    if not port_open(*BROKER_METRICS):
        subprocess.run(["rabbitmq-plugins", "-q", "enable", "rabbitmq_prometheus"], capture_output=True, timeout=120)
        try:
            wait_until(lambda: port_open(*BROKER_METRICS), timeout=30, what="rabbitmq_prometheus", every=0.5)
        except AssertionError:
            return False
    return True


def scrape_config(*, submitter: str, poller: str, legacy: str, vhost: str) -> dict[str, Any]:
    """Prometheus' configuration for the run; each address is host:port."""
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": "submitter", "static_configs": [{"targets": [submitter]}]},
            {"job_name": "poller", "static_configs": [{"targets": [poller]}]},
            {"job_name": "legacy-sim", "static_configs": [{"targets": [legacy]}]},
            # Only the run's vhost: the broker carries every other test's queues too.
            {"job_name": "rabbitmq", "metrics_path": "/metrics/detailed",
             "params": {"family": list(BROKER_FAMILIES), "vhost": [vhost]},
             "static_configs": [{"targets": [":".join(map(str, BROKER_METRICS))]}]},
        ],
    }


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base

    def _get(self, path: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        body = requests.get(f"{self.base}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", f"{params.get('query')}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        return self._get("query", {"query": expr} if at is None else {"query": expr, "time": at})

    def query_range(self, expr: str, start: float, end: float, step: float = 1) -> list[dict[str, Any]]:
        return self._get("query_range", {"query": expr, "start": start, "end": end, "step": step})

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def targets_up(self) -> dict[str, float]:
        return {r["metric"]["job"]: float(r["value"][1]) for r in self.query("up")}


@contextmanager
def prometheus(binary: Path, config: Mapping[str, Any], workdir: Path) -> Iterator[Prometheus]:
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    with run_prometheus(binary, path, workdir, free_port()) as server:
        yield server


@contextmanager
def run_prometheus(binary: Path, config: Path, workdir: Path, port: int) -> Iterator[Prometheus]:
    """The real `prometheus` on `config`, its data and log in `workdir`, until the block ends."""
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(binary), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        await_answer(process, f"{server.base}/-/ready", what="prometheus", log=log)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- the load ------------------------------------------------------------------------------------


# Transient 503s on both legacy calls: submit retries and transient polls. Now and then a
# submission meets six in a row and ends a `submit` failure, so waits count every ending alike.
LEGACY_FAULTS = {"post_503_rate": 0.2, "get_503_rate": 0.2, "retry_after_s": 0.1}


@dataclass(frozen=True)
class Wave:
    good: int = 12
    refused: int = 2  # the legacy system finishes them `failed` (legacy-sim's fail prefix on the name)
    bad_cpf: int = 1  # refused at submission: a `submit` failure
    invalid: int = 1  # not a registration: a `validation` failure

    @property
    def total(self) -> int:
        return self.good + self.refused + self.bad_cpf + self.invalid


def publish(broker: Broker, wave: Wave, tag: str) -> None:
    def person(i: int, **overrides: str) -> dict[str, str]:
        return {"user_id": f"{tag}-{i}", "name": "Maria da Silva", "email": f"{tag}-{i}@example.com",
                "cpf": "12345678909", **overrides}

    n = 0
    for _ in range(wave.good):
        broker.publish("registrations", person(n))
        n += 1
    for _ in range(wave.refused):
        broker.publish("registrations", person(n, name="FAIL Maria"))
        n += 1
    for _ in range(wave.bad_cpf):
        broker.publish("registrations", person(n, cpf="123"))
        n += 1
    for _ in range(wave.invalid):
        broker.publish("registrations", b"not a registration")


# Every message ends once: finalised by the poller, or a failure record from the submitter.
ENDED = "sum(poller_finalised_total) + sum(submitter_failures_total)"


def run_waves(broker: Broker, legacy: LegacySim, server: Prometheus, waves: int, wave: Wave = Wave(),
              timeout: float = 90, quiet: bool = False) -> None:
    """Publish `waves` waves, each once Prometheus has seen the one before finished (and, with
    `quiet`, seen a few seconds with nothing finalised), so that the time series show the load
    rise and fall more than once."""
    legacy.configure(**LEGACY_FAULTS)
    for n in range(1, waves + 1):
        if quiet and n > 1:
            wait_until(lambda: server.value("sum(rate(poller_finalised_total[3s]))") == 0, timeout=timeout,
                       what="a quiet spell between waves", every=0.3)
        publish(broker, wave, f"dash-{n}-{int(time.time())}")

        def finished(n: int = n) -> bool:
            return server.value(ENDED) == n * wave.total

        wait_until(finished, timeout=timeout, what=f"Prometheus to see wave {n} of {waves} finished", every=0.3)


def has_data(result: list[dict[str, Any]]) -> bool:
    """Whether a query's answer gives Grafana something to draw: a number that is not NaN."""
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(value[1] not in ("NaN", "+Inf", "-Inf") for value in points):
            return True
    return False


def ask(server: Prometheus, target: Target, *, vhost: str, start: float, end: float) -> list[dict[str, Any]]:
    """One target over the run, as Grafana asks it: an instant query at the end, or a range."""
    expr = as_query(target.expr, vhost=vhost, range_s=end - start)
    if target.instant:
        return server.query(expr, at=end)
    return server.query_range(expr, start, end, SCRAPE_INTERVAL_S)
