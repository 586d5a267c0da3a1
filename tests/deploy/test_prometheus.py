"""Prometheus config, alert rules and their unit tests, and the Grafana dashboard's queries,
validated with the real promtool and prometheus from Debian's `prometheus` package (fetched by
scripts/tools.sh); and one live run: a real Prometheus scraping both services while they carry
a few registrations, with the real alert rules loaded.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import Stack
from dashboard_live import run_prometheus
from harness import Broker, LegacySim, fetch_tools, free_port, wait_until
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "registration-bridge.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
# The placeholder a user replaces (alerts.yml's header and docs/runbooks.md say how).
RUNBOOK_BASE = "https://github.com/your-org/registration-bridge/blob/main/docs/runbooks.md#"
# Each Helm chart ships the group named after it as a PrometheusRule.
GROUPS = {"registration-bridge-submitter": "submitter", "registration-bridge-poller": "poller"}
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
# Grafana's macros, given values of the kind Grafana gives them, and the dashboard's variables at
# "All", so that promtool sees PromQL: their allValue `.*`, but for `job`, which has none, so that
# All is the jobs its query finds, joined as Grafana joins several values (here the plain names).
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
DASHBOARD_VARIABLES = {"namespace": ".*", "job": "(submitter|poller)", "broker_namespace": ".*", "vhost": ".*"}
# The jobs the `job` variable looks for: the plain names, or the Service's name where the scrape
# job is not relabelled (the Prometheus Operator's default, `<release>-submitter`).
BRIDGE_JOBS = "submitter|poller|.+-submitter|.+-poller"
METRIC = re.compile(r"\b(?:submitter|poller)_[a-z0-9_]+\b")
# Where every selector must be scoped, by the family it reads: the bridge's series by its
# namespace and job, the broker's (often deployed apart from the bridge) by its own namespace and
# the vhost.
SERVICE_SCOPE = ('namespace=~"$namespace"', 'job=~"$job"')
BROKER_SCOPE = ('namespace=~"$broker_namespace"', 'vhost=~"$vhost"')
# A vhost may hold other applications' queues: the broker's series are read by the bridge's queue
# names (the defaults), and, as the alert rules read them, once per queue, whichever nodes report it.
BRIDGE_QUEUES = re.compile(r'\bqueue(?:="registrations\.failed"|=~"registrations[^"]*")')
ONCE_PER_QUEUE = "max by (namespace, vhost, queue) ("
SELECTOR = re.compile(r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)?(?P<matchers>\{[^{}]*\})')
AGGREGATION = re.compile(r"\b(?P<op>sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)"
                         r"\s*(?:(?P<how>by|without)\s*\((?P<labels>[^()]*)\))?\s*\(")
GROUPING_AFTER = re.compile(r"\s*(?P<how>by|without)\s*\((?P<labels>[^()]*)\)")
BINARY = re.compile(r"\b(?:and|or|unless)\b|==|!=|>=|<=|[<>+\-*/%^]")
MODIFIERS = re.compile(r"^\s*(?:bool\b)?\s*(?:(?:on|ignoring)\s*\([^()]*\))?\s*"
                       r"(?:(?:group_left|group_right)\b\s*(?:\([^()]*\))?)?")
NUMBER = re.compile(r"^[0-9.]+(?:e[+-]?[0-9]+)?$")
ABSENT = re.compile(r"\babsent(?:_over_time)?\s*\(")


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return fetch_tools("promtool", "prometheus")


def promtool(tools: dict[str, Path], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools["promtool"]), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions(node: Any, where: str = "dashboard") -> Iterator[tuple[str, str]]:
    """Every `expr` in the dashboard (panel targets and annotations), with where it is."""
    if isinstance(node, dict):
        here = f"{where} / {node['title']}" if isinstance(node.get("title"), str) else where
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield here, value
            else:
                yield from expressions(value, here)
    elif isinstance(node, list):
        for value in node:
            yield from expressions(value, where)


def as_promql(expr: str, macros: dict[str, str] | None = None, variables: dict[str, str] | None = None) -> str:
    """`expr` as Prometheus gets it from Grafana: the macros, then the variables (`$name` or `${name}`)."""
    for macro, value in (macros or GRAFANA_MACROS).items():
        expr = expr.replace(macro, value)
    values = {**DASHBOARD_VARIABLES, **(variables or {})}
    for name in sorted(values, key=len, reverse=True):  # $broker_namespace before a $namespace in it
        expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    assert "$" not in expr, f"an unknown Grafana variable is left in {expr!r}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def service_metric_names() -> set[str]:
    """Every sample name the services export, from their own metric definitions."""
    from poller import metrics as poller_metrics
    from submitter import metrics as submitter_metrics

    names: set[str] = set()
    for module in (submitter_metrics, poller_metrics):
        found: list[MetricWrapperBase] = list(module.EDGE.all())
        found += [value for value in vars(module).values() if isinstance(value, MetricWrapperBase)]
        for value in found:
            for family in value.describe():
                names.add(family.name)
                names.update(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


# ---- PromQL grouping: what keeps two deployments (namespaces) apart ---------------------------------


def _closing(expr: str, start: int) -> int:
    """The index of the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(expr)):
        depth += expr[i] in "([{"
        depth -= expr[i] in ")]}"
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced: {expr!r}")


def _keeps(how: str | None, labels: str | None) -> bool:
    names = {name.strip() for name in (labels or "").split(",")}
    return (how == "by" and "namespace" in names) or (how == "without" and "namespace" not in names)


def _operands(expr: str) -> tuple[list[str], list[str]]:
    """`expr` split at its outermost binary operators: the operands (their matching modifiers
    stripped) and the operators between them."""
    operands: list[str] = []
    operators: list[str] = []
    depth, start, i = 0, 0, 0
    while i < len(expr):
        char = expr[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            found = BINARY.match(expr, i)
            # An operator follows an operand; a leading one is a sign.
            if found and expr[start:i].strip():
                operands.append(expr[start:i])
                operators.append(found[0])
                i = start = found.end()
                continue
        i += 1
    operands.append(expr[start:])
    return [MODIFIERS.sub("", o, count=1).strip() for o in operands], operators


def grouping_problems(expr: str) -> list[str]:
    """Where a rule's expression could merge two namespaces: an aggregation whose grouping drops
    `namespace`, or an outermost result (each side of an `or`; the left side of other operators,
    or the vector side of a number) without it. Expressions under absent() carry no labels by design."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings can hold neither operators nor brackets
    problems = []
    for found in AGGREGATION.finditer(expr):
        how, labels = found["how"], found["labels"]
        if not how:
            after = GROUPING_AFTER.match(expr, _closing(expr, found.end() - 1) + 1)
            how, labels = (after["how"], after["labels"]) if after else (None, None)
        if not _keeps(how, labels):
            problems.append(f"{found['op']} {how or 'without by'} ({labels or ''}) drops namespace")

    def outermost(part: str) -> None:
        part = part.strip()
        while part.startswith("(") and _closing(part, 0) == len(part) - 1:
            part = part[1:-1].strip()
        operands, operators = _operands(part)
        if len(operands) > 1:
            # `or` keeps both sides' series; every other operator the left side's (or the vector's,
            # against a number).
            sides: list[list[str]] = [[operands[0]]]
            for operand, operator in zip(operands[1:], operators, strict=True):
                if operator == "or":
                    sides.append([operand])
                else:
                    sides[-1].append(operand)
            for side in sides:
                if any(ABSENT.search(operand) for operand in side):
                    continue
                vectors = [operand for operand in side if not NUMBER.match(operand)]
                if not vectors:
                    problems.append(f"a number has no namespace: {' '.join(side)}")
                else:
                    outermost(vectors[0])
            return
        if ABSENT.match(part):
            return
        aggregation = AGGREGATION.match(part)
        if aggregation:
            return  # checked above
        call = re.match(r"(?P<name>[a-z_]+)\s*\(", part)
        if call and _closing(part, call.end() - 1) == len(part) - 1:
            if call["name"] in ("vector", "scalar", "time"):
                problems.append(f"{call['name']}() has no namespace")
            else:
                outermost(_operands(part[call.end():-1].split(",")[0])[0][0])
        elif NUMBER.match(part):
            problems.append(f"a number has no namespace: {part}")
        # Otherwise a selector, which keeps every label it has.

    outermost(expr)
    return problems


@pytest.mark.parametrize("expr", [
    'sum(rate(x{job="submitter"}[5m])) > 0',
    'sum(rate(x{job="submitter"}[5m])) > 0 and on (namespace) up{job="submitter"}',
    'sum by (job) (rate(x{job="submitter"}[5m])) > 0',
    'max(x{job="submitter"}) by (job) > 0',
    'count without (namespace) (up{job="submitter"} == 0)',
    'x{job="submitter"} > 0 or on () vector(1)',
    '(sum by (namespace) (x) > 0) or (count(up{job="submitter"}) == 0)',
])
def test_grouping_check_catches_a_rule_that_merges_namespaces(expr: str) -> None:
    assert grouping_problems(expr), expr


@pytest.mark.parametrize("expr", [
    'sum by (namespace) (rate(x{job="submitter"}[5m])) > 0',
    'sum(rate(x{job="submitter"}[5m])) by (namespace, job) > 0',
    'count without (instance) (up{job="submitter"} == 0)',
    'up{job="submitter", result="sum"} == 0',
    'x > 0 or on () (absent(x) and on () absent(up{job="submitter"}))',
    '0 * group by (namespace) (up{job="poller"})',
    'max by (namespace, vhost, queue) (delta(x{queue="registrations.failed"}[15m])) > 10',
])
def test_grouping_check_passes_a_rule_that_keeps_them(expr: str) -> None:
    assert not grouping_problems(expr), grouping_problems(expr)


# ---- promtool on the files ------------------------------------------------------------------------


def test_prometheus_config_is_valid(tools: dict[str, Path]) -> None:
    done = promtool(tools, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_are_valid(tools: dict[str, Path]) -> None:
    done = promtool(tools, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_alert_rule_unit_tests_pass(tools: dict[str, Path]) -> None:
    done = promtool(tools, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_must_not() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        name = rule["alert"]
        assert any(c["alertname"] == name and c.get("exp_alerts") for c in cases), f"{name}: no case fires it"
        assert any(c["alertname"] == name and not c.get("exp_alerts") for c in cases), f"{name}: no quiet case"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
        assert rule.get("annotations", {}).get("summary"), name


def test_rule_groups_are_one_per_chart_and_scoped_to_its_service() -> None:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    assert {group["name"] for group in groups} == set(GROUPS)
    for group in groups:
        service = GROUPS[group["name"]]
        other = ({"submitter", "poller"} - {service}).pop()
        for rule in group["rules"]:
            expr = rule["expr"]
            assert rule["labels"]["component"] == service, rule["alert"]
            assert other not in expr, f"{rule['alert']} in {group['name']} reads the {other}'s series"
            # A shared Prometheus holds other systems' targets and queues: select ours only, and
            # keep two deployments (namespaces) apart.
            assert not grouping_problems(expr), f"{rule['alert']}: {grouping_problems(expr)}"
            for selector in re.findall(r"\bup\{[^}]*\}", expr):
                assert f'job="{service}"' in selector, f"{rule['alert']}: {selector}"
            for selector in re.findall(r"\brabbitmq_[a-z_]+\{[^}]*\}", expr):
                assert 'queue=' in selector and "registrations" in selector, f"{rule['alert']}: {selector}"
            assert not re.search(r"\b(?:submitter|poller)_queue_messages\b", expr), rule["alert"]


def test_every_alert_links_to_its_runbook_section() -> None:
    text = RUNBOOKS.read_text()
    sections = {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}
    names = {rule["alert"] for rule in alert_rules()}
    for rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), f"{rule['alert']}: {url!r}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: {url}"
        assert any(section.lower() == anchor for section in sections), f"no section {anchor} in docs/runbooks.md"
    assert sections == names, f"sections without an alert: {sorted(sections - names)}"
    assert RUNBOOK_BASE.split("#")[0] in text  # runbooks.md tells how to replace the placeholder


def test_every_dashboard_expression_parses(tools: dict[str, Path], tmp_path: Path) -> None:
    # promtool 2.42 has no bare "parse this expression" command: each expression becomes a
    # recording rule, which `check rules` parses with Prometheus' own PromQL parser.
    found = list(expressions(dashboard()))
    assert len(found) >= 20
    rules = [{"record": f"dashboard:expr_{i}", "expr": as_promql(expr)} for i, (_, expr) in enumerate(found)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    done = promtool(tools, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_promtool_rejects_a_broken_expression(tools: dict[str, Path], tmp_path: Path) -> None:
    """So the test above means something."""
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (le) (rate(poller_end_to_end_seconds_bucket[1m])"}]}]}))
    assert promtool(tools, "check", "rules", str(path)).returncode != 0


def test_queries_name_only_metrics_the_services_export() -> None:
    exported = service_metric_names()
    assert "poller_finalised_total" in exported and "submitter_legacy_request_seconds_bucket" in exported
    queries = [expr for _, expr in expressions(dashboard())] + [rule["expr"] for rule in alert_rules()]
    unknown = {name for expr in queries for name in METRIC.findall(expr)} - exported
    assert not unknown, f"not exported by the services: {sorted(unknown)}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    chosen = variables["datasource"]
    assert chosen["type"] == "datasource" and chosen["query"] == "prometheus"
    assert chosen["current"]["value"] == source["uid"], "the variable must default to the provisioned datasource"
    assert board["uid"] and board["schemaVersion"] >= 39
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, annotation["name"]
    titles = " | ".join(panel["title"].lower() for panel in panels)
    for subject in ("throughput", "queue depth", "consumers", "failure queue", "failures by stage", "outcomes",
                    "latency", "end to end", "reconnects", "deliveries in hand", "retries waiting", "versions"):
        assert subject in titles, f"no panel about {subject}"


def test_dashboard_variables_scope_it_in_a_shared_prometheus() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    assert set(variables) == {"datasource", *DASHBOARD_VARIABLES}
    for name in DASHBOARD_VARIABLES:
        variable = variables[name]
        assert variable["includeAll"] and variable["multi"], name
        if name == "job":
            # `job=~".*"` would read every system's `up` in a shared Prometheus.
            assert not variable.get("allValue"), "All must be the jobs found"
        else:
            # `namespace=~".*"` also matches a series with no namespace label, as compose's are.
            assert variable["allValue"] == ".*", name
        assert variable["current"]["value"] == ["$__all"], name
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
    assert variables["job"]["query"] == f'label_values(up{{job=~"{BRIDGE_JOBS}", namespace=~"$namespace"}}, job)'
    assert variables["namespace"]["query"] == f'label_values(up{{job=~"{BRIDGE_JOBS}"}}, namespace)'
    # Prometheus anchors a regex at both ends, as fullmatch does.
    found = [job for job in ("submitter", "poller", "rb-submitter", "rb-poller", "legacy-sim", "rabbitmq",
                             "orders", "submitter-exporter") if re.fullmatch(BRIDGE_JOBS, job)]
    assert found == ["submitter", "poller", "rb-submitter", "rb-poller"]


def test_every_dashboard_selector_is_scoped_to_the_bridge() -> None:
    found = list(expressions(dashboard()))
    for where, expr in found:
        # Every metric name is written with its matchers, so that the check below sees them all.
        unquoted = re.sub(r'"[^"]*"', '""', expr)
        bare = re.findall(r"\b(?:submitter_|poller_|rabbitmq_)\w+\b(?!\{)|\b(?:up|ALERTS)\b(?![{\w])", unquoted)
        assert not bare, f"{where}: a selector without matchers: {bare} in {expr}"
        selectors = list(SELECTOR.finditer(expr))
        assert selectors, f"{where}: no selector in {expr}"
        for selector in selectors:
            name, matchers = selector["name"] or "", selector["matchers"]
            if name.startswith("rabbitmq_"):
                assert all(scope in matchers for scope in BROKER_SCOPE), f"{where}: {selector[0]}"
                assert BRIDGE_QUEUES.search(matchers), f"{where}: {selector[0]} reads every queue of the vhost"
                assert expr[:selector.start()].endswith(ONCE_PER_QUEUE), f"{where}: {selector[0]} not by queue"
            elif name == "ALERTS":
                # The queue alerts carry no job label: their rule names and namespace scope them.
                assert 'namespace=~"$namespace"' in matchers and "alertname=" in matchers, f"{where}: {selector[0]}"
            else:
                # The metric name says which service a series is from; the job picks this system's.
                assert all(scope in matchers for scope in SERVICE_SCOPE), f"{where}: {selector[0]} lacks a scope"
                assert "job=" not in matchers.replace('job=~"$job"', ""), f"{where}: {selector[0]} fixes a job"


def test_namespace_at_all_matches_series_without_the_label(tools: dict[str, Path], tmp_path: Path) -> None:
    """What lets compose, whose series have no namespace label, use the dashboard at "All"."""
    path = tmp_path / "namespace_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": 'poller_polls_total{job="poller"}', "values": "0+1x5"},
                         {"series": 'poller_polls_total{job="poller", namespace="other"}', "values": "0+1x5"}],
        "promql_expr_test": [
            {"expr": as_promql('sum(poller_polls_total{job="poller", namespace=~"$namespace"})'),
             "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 10}]},
            {"expr": as_promql('sum(poller_polls_total{job="poller", namespace=~"$namespace"})',
                               variables={"namespace": "other"}),
             "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 5}]},
        ]}]}))
    done = promtool(tools, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_broker_panels_count_the_bridges_queues_once_each(tools: dict[str, Path], tmp_path: Path) -> None:
    """In a vhost shared with another application, during a leader change that has two nodes
    report the inbound queue."""
    exprs = {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard()["panels"]
             if panel["type"] != "row"}

    def series(metric: str, queue: str, value: int, node: str = "rabbit@0") -> dict[str, str]:
        return {"series": f'{metric}{{vhost="shared", queue="{queue}", instance="{node}"}}', "values": f"{value}x5"}

    ready, unacked = "rabbitmq_detailed_queue_messages_ready", "rabbitmq_detailed_queue_messages_unacked"
    consumers = "rabbitmq_detailed_queue_consumers"
    inputs = [series(ready, "registrations", 3), series(ready, "registrations", 3, "rabbit@1"),
              series(ready, "registrations.pending", 1), series(ready, "registrations.pending.wait.5000ms", 2),
              series(ready, "registrations.failed", 7), series(ready, "orders", 100),
              series(ready, "registrations-archive", 50),
              series(unacked, "registrations", 1), series(unacked, "registrations", 1, "rabbit@1"),
              series(unacked, "registrations.failed", 4), series(unacked, "orders", 10),
              series(consumers, "registrations", 2), series(consumers, "registrations", 2, "rabbit@1"),
              series(consumers, "registrations.pending", 2), series(consumers, "registrations.failed", 0),
              series(consumers, "orders", 5)]

    def per_queue(**values: int) -> list[dict[str, Any]]:
        return [{"labels": f'{{vhost="shared", queue="{queue}"}}', "value": value} for queue, value in values.items()]

    cases = [(exprs["Waiting in queues"][0], [{"labels": "{}", "value": 3 + 1 + 2 + 1}]),
             (exprs["Failure queue"][0], [{"labels": "{}", "value": 7}]),
             (exprs["Queue depth (ready, unacked)"][0], per_queue(**{
                 "registrations": 3, "registrations.pending": 1, "registrations.pending.wait.5000ms": 2})),
             (exprs["Queue depth (ready, unacked)"][1], per_queue(registrations=1)),
             (exprs["Consumers"][0], per_queue(**{
                 "registrations": 2, "registrations.pending": 2, "registrations.failed": 0})),
             (exprs["Failure queue depth"][0], per_queue(**{"registrations.failed": 7}))]
    path = tmp_path / "queues_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": inputs,
        "promql_expr_test": [{"expr": as_promql(expr), "eval_time": "2m", "exp_samples": samples}
                             for expr, samples in cases]}]}))
    done = promtool(tools, "test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# ---- live: a real Prometheus scraping both services during a small run ----------------------------


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _value(base: str, expr: str) -> float:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
def prometheus(tools: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Path, str, Any]]:
    """Yields (config path, base URL, start function); the config is written by the test."""
    config = tmp_path / "prometheus.yml"
    port = free_port()
    with ExitStack() as running:
        yield config, f"http://127.0.0.1:{port}", \
            lambda: running.enter_context(run_prometheus(tools["prometheus"], config, tmp_path, port))


@pytest.mark.integration
def test_live_prometheus_scrapes_both_services(stack: Stack, broker: Broker, legacy: LegacySim,
                                               prometheus: tuple[Path, str, Any], tools: dict[str, Path]) -> None:
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    config, base, start = prometheus
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],  # the real rules, evaluated on real series
        "scrape_configs": [
            {"job_name": "submitter", "static_configs": [{"targets": [submitter.http.removeprefix("http://")]}]},
            {"job_name": "poller", "static_configs": [{"targets": [poller.http.removeprefix("http://")]}]},
        ],
    }))
    start()

    good = 5
    for i in range(good):
        broker.publish("registrations", {"user_id": f"live-{i}", "name": "Maria da Silva",
                                         "email": f"live-{i}@example.com", "cpf": "12345678909"})
    broker.publish("registrations", {"user_id": "live-refused", "name": "FAIL Maria", "email": "f@example.com",
                                     "cpf": "12345678909"})  # the legacy system finishes it `failed`
    broker.publish("registrations", b"not a registration")  # a validation failure at the submitter

    wait_until(lambda: _value(base, "sum(poller_finalised_total)") == good + 1, timeout=60,
               what="Prometheus to see every registration finalised", every=0.3)
    assert _value(base, 'sum(poller_finalised_total{outcome="registered"})') == good
    assert _value(base, 'sum(poller_finalised_total{outcome="failed", stage="legacy"})') == 1
    wait_until(lambda: _value(base, 'sum(submitter_failures_total{stage="validation"})') == 1, timeout=30,
               what="the validation failure scraped", every=0.3)
    assert _value(base, "sum(submitter_messages_consumed_total)") == good + 2

    up = {r["metric"]["job"]: float(r["value"][1]) for r in _query(base, "up")}
    assert up == {"submitter": 1.0, "poller": 1.0}

    # Every dashboard expression runs on the live data without an error, and the core panels have
    # something to show (a rate needs two scrapes after the series appeared).
    core = ('sum(increase(poller_finalised_total{job=~"$job", namespace=~"$namespace", outcome="registered"}'
            '[$__range]))',
            'histogram_quantile(0.95, sum by (le) (rate(poller_end_to_end_seconds_bucket{job=~"$job", '
            'namespace=~"$namespace"}[$__rate_interval])))',
            'sum by (result) (rate(submitter_submissions_total{job=~"$job", namespace=~"$namespace"}'
            '[$__rate_interval]))')
    dashboard_exprs = [expr for _, expr in expressions(dashboard())]
    assert set(core) <= set(dashboard_exprs)
    wait_until(lambda: all(_query(base, as_promql(expr)) for expr in core), timeout=30,
               what="data for the dashboard's core panels", every=0.5)
    for expr in dashboard_exprs:
        _query(base, as_promql(expr))  # fails on any evaluation error
    # The services' own reading of the failure queue: the two failure records (read every 10 s).
    # The dashboard reads the broker's instead (tests/deploy/test_dashboard_live.py).
    wait_until(lambda: _value(base, 'max({__name__=~"submitter_queue_messages|poller_queue_messages", '
                                    'queue="registrations.failed"})') == 2,
               timeout=30, what="the failure queue depth", every=0.5)

    # The real alert rules load and evaluate on these series; none fires on a healthy run.
    def evaluated() -> list[dict[str, Any]] | None:
        groups = requests.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("health") == "ok" for rule in rules) else None

    rules = wait_until(evaluated, timeout=30, what="every alert rule evaluated without error", every=0.5)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    assert [rule["name"] for rule in rules if rule["state"] == "firing"] == []

    # Each service answers its probes and exposes its own families, which pass promtool's metric
    # lint (naming, units, _total counters).
    for service, other in ((submitter, poller), (poller, submitter)):
        assert requests.get(f"{service.http}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{service.http}/readyz", timeout=5).status_code == 200
        text = requests.get(f"{service.http}/metrics", timeout=5).text
        families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        assert {f"{service.name}_messages_consumed_total", f"{service.name}_legacy_request_seconds"} <= families
        assert not any(family.startswith(f"{other.name}_") for family in families)
        lint = subprocess.run([str(tools["promtool"]), "check", "metrics"], input=text, capture_output=True,
                              text=True, timeout=60)
        assert lint.returncode == 0, f"{service.name}: {lint.stdout}{lint.stderr}"
