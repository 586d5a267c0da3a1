"""The Helm charts under helm/, linted, rendered and validated offline with real tools.

- PyPI `helm-python-sdk` (import `helm_python`) embeds Helm's own Go library: it lints each chart
  strictly and renders it, which also checks the values against the chart's values.schema.json.
  Its lint returns a report instead of raising; each message has a severity (Helm's
  support.Severity: 0 unknown, 1 info, 2 warning, 3 error), and in strict mode every warning is
  also listed under `errors`. A test fails on any message of severity >= 3 and on any entry of
  `errors`; info messages are printed only.
- PyPI `kubernetes-validate` validates every rendered object with `strict` (no unknown field)
  against the Kubernetes schemas it ships, for the oldest version the charts support and the
  newest it knows. The CRD kinds it has no schema for (ServiceMonitor, PrometheusRule,
  ScaledObject, TriggerAuthentication) are checked structurally here.
- A Helm 3 binary (scripts/tools.sh) lints each chart strictly and must render the same objects.
- What matters to the people who run it is asserted on the rendered objects: credentials only in
  the Secret, the three probes, the restricted securityContext, resources, the standard labels,
  and the contract's environment, which is fed through the services' own settings parsers; the
  scrape job, the alert groups and the dashboard taken from deploy/, the disruption budget, and
  the private CA.

Under CI=true a missing tool fails the tests; on a developer's machine they are skipped.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from harness import fetch_tools, unavailable
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "helm"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "registration-bridge.json"
# What each chart reads through files/, and the file it must be a link to.
POLICY_SCRIPT = ROOT / "deploy" / "rabbitmq" / "failure_queue_limit.py"
LINKED_FILES = {"alerts.yml": ALERTS, "registration-bridge.json": DASHBOARD, "failure_queue_limit.py": POLICY_SCRIPT}
# Which charts read each linked file (the others must not carry it).
LINKED_IN = {"alerts.yml": ("submitter", "poller", "legacy-sim"), "registration-bridge.json": ("submitter", "poller"),
             "failure_queue_limit.py": ("poller",)}
NAMESPACE = "registration-bridge"
KUBE_FLOOR = "1.27"  # kubeVersion ">=1.27.0-0" in every Chart.yaml

STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/component", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
                   "helm.sh/chart")
CONTRACT_ENV = {"RABBITMQ_URL", "MONGODB_URI", "MONGODB_DATABASE", "MONGODB_COLLECTION", "LEGACY_API_URL",
                "INBOUND_QUEUE", "PENDING_QUEUE", "FAILED_QUEUE", "POLL_FIRST_DELAY_S", "POLL_INTERVAL_S",
                "POLL_DEADLINE_S", "HTTP_PORT"}
TUNING_ENV = {"LOG_LEVEL", "WORKERS", "PREFETCH", "SHUTDOWN_TIMEOUT_S"}
# Running against a RabbitMQ cluster (docs/configuration.md), and each chart's default.
CLUSTER_ENV = {"RABBITMQ_URL_ORDER": "shuffled", "QUORUM_INITIAL_GROUP_SIZE": "3"}
SECRET_ENV = ("RABBITMQ_URL", "MONGODB_URI")
RELABEL_ACTIONS = {"replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase", "uppercase",
                   "keepequal", "dropequal"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}

# Dummy credentials: each must be found in the Secret and nowhere else.
RABBITMQ_PASSWORD = "rabbit-s3cret-9f2c"
MONGODB_PASSWORD = "mongo-s3cret-41d7"
RABBITMQ_URL = f"amqp://bridge:{RABBITMQ_PASSWORD}@rabbitmq.messaging.svc:5672/registrations"
MONGODB_URI = f"mongodb://bridge:{MONGODB_PASSWORD}@mongodb.data.svc:27017/?authSource=admin"
MANAGEMENT_URL = f"http://bridge:{RABBITMQ_PASSWORD}@rabbitmq.messaging.svc:15672/registrations"


@dataclass(frozen=True)
class ChartSpec:
    name: str
    port: int
    component: str
    bridge: bool  # a service of the bridge (Secret, autoscaling) rather than the staging simulator
    scale_queue: str | None  # the variable naming the queue KEDA scales on


CHARTS = {
    "submitter": ChartSpec("submitter", 8081, "submitter", True, "INBOUND_QUEUE"),
    "poller": ChartSpec("poller", 8082, "poller", True, "PENDING_QUEUE"),
    "legacy-sim": ChartSpec("legacy-sim", 8080, "legacy-api", False, None),
}


def merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PROMETHEUS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
# The egress of the full scenario: each dependency narrowed to its address or its pods.
NETWORK_EGRESS = {
    "rabbitmq": {"ports": [{"port": 5671}], "to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}]},
    "mongodb": {"ports": [{"port": 27017}], "to": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "data"}}, "podSelector": {"matchLabels": {"app": "mongodb"}}}]},
    "legacyApi": {"ports": [{"port": 8443}], "to": [{"ipBlock": {"cidr": "192.168.7.10/32"}}]},
    "dns": {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]},
}


def full_values(chart: str) -> dict[str, Any]:
    """Every optional feature switched on, and most knobs moved off their defaults."""
    common: dict[str, Any] = {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
        # legacy-sim has no rule group to ship, and refuses the switch.
        "prometheusRule": {"enabled": CHARTS[chart].bridge, "labels": {"release": "kube-prometheus-stack"}},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1} if CHARTS[chart].bridge
        else {"enabled": True},
        "image": {"tag": "1.4.2", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry-credentials"}],
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "podAnnotations": {"example.com/team": "registrations"},
        "podLabels": {"example.com/tier": "backend"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "bridge", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/name": chart}}}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/name": chart}}}],
        "priorityClassName": "registration-bridge",
        "serviceAccount": {"annotations": {"example.com/role": "bridge"}},
        "networkPolicy": {"enabled": True, "metrics": {"from": [PROMETHEUS_PEER]}},
    }
    if not CHARTS[chart].bridge:
        common["networkPolicy"]["clients"] = {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of":
                                                                                     "registration-bridge"}}}]}
        return merged(common, {"config": {"seed": 42, "post503Rate": 0.05, "failPrefix": "", "down": False,
                                          "latencyMinS": 3, "latencyMaxS": 6}})
    if chart == "poller":
        common["failureQueueLimit"] = {"enabled": True, "maxLength": 200000, "maxLengthBytes": 2147483648,
                                       "priority": 20, "extraDefinition": {"delivery-limit": 1000000}}
    if chart == "submitter":
        common["brokerMetrics"] = {"serviceMonitor": {"enabled": True, "namespace": "rabbitmq-system",
                                                      "clusterName": "broker", "vhost": "registrations"}}
    common["networkPolicy"]["egress"] = NETWORK_EGRESS
    return merged(common, {
        "secret": {"create": True, "rabbitmqUrl": RABBITMQ_URL, "mongodbUri": MONGODB_URI,
                   "rabbitmqManagementUrl": MANAGEMENT_URL},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Registration bridge"}},
        "tls": {"caBundle": {"configMapName": "corporate-ca", "key": "ca.pem"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 12},
        "config": {"logLevel": "DEBUG", "prefetch": 100, "pollFirstDelayS": 0.5, "maxMessageBytes": 1000000,
                   "legacyApiUrl": "https://adapter.legacy.svc:8443", "rabbitmqUrlOrder": "listed",
                   "quorumInitialGroupSize": 5, "httpHost": "::", "logLevelThirdParty": "INFO"},
    })


def keda_values(chart: str) -> dict[str, Any]:
    # With KEDA's floor of zero a budget of minAvailable 1 would block the drain of a lone pod.
    return merged(full_values(chart), {"autoscaling": {"minReplicas": 0, "keda": {"enabled": True}},
                                       "podDisruptionBudget": {"minAvailable": None, "maxUnavailable": "50%"},
                                       "tls": {"caBundle": {"configMapName": "", "secretName": "corporate-ca"}}})


# (chart, scenario, release name, values): release names cover both forms of the full name.
SCENARIOS: list[tuple[str, str, str, dict[str, Any]]] = []
for _chart, _spec in CHARTS.items():
    SCENARIOS.append((_chart, "defaults", _chart, {}))
    SCENARIOS.append((_chart, "full", "staging", full_values(_chart)))
    if _spec.bridge:
        SCENARIOS.append((_chart, "keda", "prod", keda_values(_chart)))
SCENARIO_IDS = [f"{chart}-{scenario}" for chart, scenario, _, _ in SCENARIOS]

# Values the schema (or a rule of the templates) must refuse: (charts, id, values, what the error names).
BRIDGE = ("submitter", "poller")
ALL = tuple(CHARTS)
LEAKY_LEGACY_URL = f"https://bridge:{RABBITMQ_PASSWORD}@adapter.legacy.svc"
REJECTED: list[tuple[tuple[str, ...], str, dict[str, Any], str]] = [
    (ALL, "replicaCount-as-string", {"replicaCount": "3"}, "/replicaCount"),
    (ALL, "unknown-top-level-key", {"replicas": 3}, "'replicas' not allowed"),
    (ALL, "typo-in-config", {"config": {"logLevl": "DEBUG"}}, "'logLevl' not allowed"),
    (ALL, "bad-pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    (ALL, "writable-root-filesystem", {"securityContext": {"readOnlyRootFilesystem": False}},
     "/securityContext/readOnlyRootFilesystem"),
    (ALL, "root-allowed", {"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    (ALL, "capability-added", {"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
     "/securityContext/capabilities/add"),
    (ALL, "no-limits", {"resources": {"limits": None}}, "missing property 'limits'"),
    (ALL, "port-out-of-range", {"service": {"port": 70000}}, "/service/port"),
    (ALL, "unknown-probe-key", {"probes": {"liveness": {"path": "/other"}}}, "'path' not allowed"),
    (BRIDGE, "bad-log-level", {"config": {"logLevel": "TRACE"}}, "/config/logLevel"),
    (BRIDGE, "bad-third-party-log-level", {"config": {"logLevelThirdParty": "TRACE"}}, "/config/logLevelThirdParty"),
    (BRIDGE, "http-host-with-a-port", {"config": {"httpHost": "0.0.0.0 :8081"}}, "/config/httpHost"),
    (BRIDGE, "zero-poll-interval", {"config": {"pollIntervalS": 0}}, "/config/pollIntervalS"),
    (BRIDGE, "legacy-url-without-scheme", {"config": {"legacyApiUrl": "legacy-sim:8080"}},
     "config.legacyApiUrl must be an http:// or https:// URL"),
    (BRIDGE, "legacy-url-with-credentials", {"config": {"legacyApiUrl": LEAKY_LEGACY_URL}},
     "config.legacyApiUrl must not carry credentials"),
    (BRIDGE, "workers-as-float", {"config": {"workers": 2.5}}, "/config/workers"),
    (BRIDGE, "unknown-url-order", {"config": {"rabbitmqUrlOrder": "random"}}, "/config/rabbitmqUrlOrder"),
    (BRIDGE, "quorum-group-of-zero", {"config": {"quorumInitialGroupSize": 0}}, "/config/quorumInitialGroupSize"),
    (BRIDGE, "quorum-group-as-float", {"config": {"quorumInitialGroupSize": 2.5}}, "/config/quorumInitialGroupSize"),
    (BRIDGE, "secret-create-without-urls", {"secret": {"create": True}}, "/secret/rabbitmqUrl"),
    (BRIDGE, "secret-create-half", {"secret": {"create": True, "rabbitmqUrl": RABBITMQ_URL, "mongodbUri": ""}},
     "/secret/mongodbUri"),
    (BRIDGE, "no-secret-at-all", {"secret": {"existingSecret": ""}}, "/secret/existingSecret"),
    (BRIDGE, "credential-in-extra-env", {"extraEnv": [{"name": "RABBITMQ_URL", "value": RABBITMQ_URL}]},
     "/extraEnv/0/name"),
    (BRIDGE, "grace-not-beyond-shutdown", {"terminationGracePeriodSeconds": 30},
     "must exceed config.shutdownTimeoutS"),
    (BRIDGE, "hpa-to-zero", {"autoscaling": {"enabled": True, "minReplicas": 0}}, "only KEDA scales to zero"),
    (BRIDGE, "min-above-max", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "must not exceed autoscaling.maxReplicas"),
    (BRIDGE, "unknown-keda-key", {"autoscaling": {"keda": {"queue": "x"}}}, "'queue' not allowed"),
    (ALL, "budget-max-unavailable-zero", {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}},
     "maxUnavailable 0 allows no eviction"),
    (ALL, "budget-max-unavailable-zero-percent", {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "0%"}},
     "maxUnavailable 0% allows no eviction"),
    (ALL, "budget-min-available-one-of-one", {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}},
     "minAvailable 1 allows no eviction"),
    (BRIDGE, "budget-min-available-at-hpa-floor",
     {"replicaCount": 5, "autoscaling": {"enabled": True, "minReplicas": 2},
      "podDisruptionBudget": {"enabled": True, "minAvailable": 2}}, "minAvailable 2 allows no eviction with 2 pod(s)"),
    (BRIDGE, "budget-min-available-under-keda-zero",
     {"autoscaling": {"enabled": True, "minReplicas": 0, "keda": {"enabled": True}},
      "podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "minAvailable 1 allows no eviction with 1 pod(s)"),
    (BRIDGE, "budget-percent-rounds-up", {"replicaCount": 2, "podDisruptionBudget": {"enabled": True,
                                                                                     "minAvailable": "51%"}},
     "minAvailable 51% allows no eviction with 2 pod(s)"),
    (ALL, "unknown-eviction-policy", {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Never"}},
     "/podDisruptionBudget/unhealthyPodEvictionPolicy"),
    (ALL, "unknown-prometheus-rule-key", {"prometheusRule": {"groups": []}}, "'groups' not allowed"),
    (BRIDGE, "ca-from-both", {"tls": {"caBundle": {"secretName": "a", "configMapName": "b"}}},
     "tls.caBundle: set secretName or configMapName, not both"),
    (BRIDGE, "ca-key-as-path", {"tls": {"caBundle": {"secretName": "a", "key": "../ca.crt"}}}, "/tls/caBundle/key"),
    (BRIDGE, "dashboard-label-as-number", {"dashboard": {"labels": {"grafana_dashboard": 1}}},
     "/dashboard/labels/grafana_dashboard"),
    (("legacy-sim",), "no-dashboard", {"dashboard": {"enabled": True}}, "'dashboard' not allowed"),
    (("legacy-sim",), "no-alert-rules", {"prometheusRule": {"enabled": True}},
     'has no rule group whose name ends in "-legacy-sim"'),
    (("poller", "legacy-sim"), "broker-metrics-only-in-the-submitter",
     {"brokerMetrics": {"serviceMonitor": {"enabled": True}}}, "'brokerMetrics' not allowed"),
    (("submitter",), "broker-metrics-without-selector",
     {"brokerMetrics": {"serviceMonitor": {"enabled": True, "selector": {"app.kubernetes.io/component": None}}}},
     "give the broker Service's labels in selector, or clusterName"),
    (("submitter",), "broker-metrics-bad-scheme", {"brokerMetrics": {"serviceMonitor": {"scheme": "tcp"}}},
     "/brokerMetrics/serviceMonitor/scheme"),
    (BRIDGE, "dashboard-namespace-invalid", {"dashboard": {"namespace": "Monitoring"}}, "/dashboard/namespace"),
    (BRIDGE, "keda-unknown-protocol", {"autoscaling": {"keda": {"protocol": "amqps"}}}, "/autoscaling/keda/protocol"),
    (BRIDGE, "keda-http-without-management-url",
     {"secret": {"create": True, "rabbitmqUrl": RABBITMQ_URL, "mongodbUri": MONGODB_URI},
      "autoscaling": {"enabled": True, "keda": {"enabled": True}}}, "secret.rabbitmqManagementUrl is required"),
    (("poller",), "keda-amqp-to-zero", {"autoscaling": {"enabled": True, "minReplicas": 0,
                                                        "keda": {"enabled": True, "protocol": "amqp"}}},
     "autoscaling.keda.acceptScaleToZeroDelay=true"),
    (("submitter",), "no-scale-to-zero-switch", {"autoscaling": {"keda": {"acceptScaleToZeroDelay": True}}},
     "'acceptScaleToZeroDelay' not allowed"),
    (("legacy-sim",), "no-private-ca", {"tls": {"caBundle": {"secretName": "a"}}}, "'tls' not allowed"),
    (("legacy-sim",), "two-replicas", {"replicaCount": 2}, "/replicaCount"),
    (("legacy-sim",), "rate-above-one", {"config": {"post503Rate": 1.5}}, "/config/post503Rate"),
    (("legacy-sim",), "latency-range-inverted", {"config": {"latencyMinS": 30, "latencyMaxS": 20}},
     "must not exceed config.latencyMaxS"),
    (("legacy-sim",), "no-autoscaling", {"autoscaling": {"enabled": True}}, "'autoscaling' not allowed"),
    (("poller",), "failure-queue-limit-without-a-limit",
     {"failureQueueLimit": {"enabled": True, "maxLength": None, "maxLengthBytes": None}},
     "failureQueueLimit: set maxLength or maxLengthBytes (or both)"),
    (("poller",), "failure-queue-limit-drop-head",
     {"failureQueueLimit": {"extraDefinition": {"overflow": "drop-head"}}}, "/failureQueueLimit/extraDefinition"),
    (("poller",), "failure-queue-limit-of-zero", {"failureQueueLimit": {"maxLength": 0}},
     "/failureQueueLimit/maxLength"),
    (("submitter", "legacy-sim"), "failure-queue-limit-only-in-the-poller", {"failureQueueLimit": {"enabled": True}},
     "'failureQueueLimit' not allowed"),
    (("legacy-sim",), "node-port", {"service": {"type": "NodePort"}},
     "service.type NodePort would expose legacy-sim outside the cluster, and its /admin"),
    (("legacy-sim",), "load-balancer", {"service": {"type": "LoadBalancer"}},
     "service.type LoadBalancer would expose legacy-sim outside the cluster, and its /admin"),
    (ALL, "network-policy-bad-cidr", {"networkPolicy": {"metrics": {"from": [{"ipBlock": {"cidr": "10.0.0.0"}}]}}},
     "/networkPolicy/metrics/from/0/ipBlock/cidr"),
    (ALL, "network-policy-nobody-may-scrape", {"networkPolicy": {"metrics": {"from": []}}},
     "/networkPolicy/metrics/from"),
    (ALL, "network-policy-empty-peer", {"networkPolicy": {"metrics": {"from": [{}]}}},
     "/networkPolicy/metrics/from/0"),
    (BRIDGE, "network-policy-unknown-dependency", {"networkPolicy": {"egress": {"redis": {"ports": [{"port": 1}],
                                                                                           "to": []}}}},
     "'redis' not allowed"),
    (BRIDGE, "network-policy-egress-without-ports", {"networkPolicy": {"egress": {"mongodb": {"ports": []}}}},
     "/networkPolicy/egress/mongodb/ports"),
    (BRIDGE, "network-policy-bad-protocol",
     {"networkPolicy": {"egress": {"dns": {"ports": [{"port": 53, "protocol": "ICMP"}]}}}},
     "/networkPolicy/egress/dns/ports/0/protocol"),
]
REJECTED_CASES = [(chart, case, values, expect) for charts, case, values, expect in REJECTED for chart in charts]


# ---- the tools -----------------------------------------------------------------------------------


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or helm_python's HelmLibraryError when its library won't load
        unavailable(f"{package} is not usable ({exc!r}): pip install {package} (requirements-dev.txt)")
        raise  # not reached: _unavailable fails or skips


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    return _module("helm_python", "helm-python-sdk")


@pytest.fixture(scope="module")
def kubeval() -> ModuleType:
    return _module("kubernetes_validate", "kubernetes-validate")


@pytest.fixture(scope="module")
def kube_versions(kubeval: ModuleType) -> list[str]:
    """The oldest Kubernetes the charts support that kubernetes-validate ships, and its newest."""
    shipped = sorted({".".join(v.split(".")[:2]) for v in kubeval.utils.all_versions()}, key=Version)
    supported = [v for v in shipped if Version(v) >= Version(KUBE_FLOOR)]
    assert supported, f"kubernetes-validate ships no schema for Kubernetes >= {KUBE_FLOOR}: {shipped}"
    return sorted({supported[0], supported[-1]}, key=Version)


# ---- rendering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    files: dict[str, str]  # template path -> rendered text (NOTES.txt included)
    docs: list[dict[str, Any]]  # every object, in template order

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]


def render(helm: ModuleType, chart: str | Path, values: dict[str, Any], release: str) -> Rendered:
    """Render a chart of helm/ by name, or the chart in a directory."""
    with helm.Chart.load(str(chart if isinstance(chart, Path) else HELM_DIR / chart)) as loaded:
        files: dict[str, str] = loaded.render(values or None, name=release, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path in sorted(files):
        if path.endswith((".yaml", ".yml")):
            docs.extend(d for d in yaml.safe_load_all(files[path]) if d)
    return Rendered(files, docs)


_cache: dict[tuple[str, str], Rendered] = {}


@pytest.fixture(params=SCENARIOS, ids=SCENARIO_IDS)
def scenario(request: pytest.FixtureRequest, helm: ModuleType) -> tuple[ChartSpec, str, dict[str, Any], Rendered]:
    chart, name, release, values = request.param
    key = (chart, name)
    if key not in _cache:
        _cache[key] = render(helm, chart, values, release)
    return CHARTS[chart], release, values, _cache[key]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def environment(rendered: Rendered) -> dict[str, str | None]:
    """The container's environment: the ConfigMap it loads (envFrom) then its own env (None: from a Secret)."""
    deployment = rendered.one("Deployment")
    main = container(deployment)
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in rendered.of_kind("ConfigMap")}
    env: dict[str, str | None] = {}
    for source in main.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom {source}: only the chart's ConfigMap"
        env.update(maps[source["configMapRef"]["name"]])
    for var in main.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


# ---- lint ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("chart", "values"), [(c, v) for c, s, _, v in SCENARIOS if s in ("defaults", "full")],
                         ids=[i for i, (_, s, _, _) in zip(SCENARIO_IDS, SCENARIOS, strict=True)
                              if s in ("defaults", "full")])
def test_helm_lint_strict(helm: ModuleType, kube_versions: list[str], chart: str, values: dict[str, Any]) -> None:
    for kube in kube_versions:
        report = helm.lint(str(HELM_DIR / chart), values or None, strict=True, namespace=NAMESPACE,
                           kube_version=f"v{kube}.0")
        messages = report.get("messages", [])
        for message in messages:
            print(f"helm lint {chart} (Kubernetes {kube}) severity {message['severity']}: "
                  f"{message['path']}: {message['error']}")
        serious = [m for m in messages if int(m["severity"]) >= 3]
        assert report.get("total_charts_linted") == 1, report
        assert not serious, f"helm lint {chart}: {json.dumps(serious, indent=2)}"
        # Strict mode lists warnings (severity 2) here too.
        assert not report.get("errors"), f"helm lint --strict {chart}: {report['errors']}"


def test_lint_catches_a_broken_chart(helm: ModuleType, tmp_path: Path) -> None:
    """The lint above means something: a template error is reported with severity 3."""
    chart = tmp_path / "broken"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: broken\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("a: {}\n")
    (chart / "templates" / "cm.yaml").write_text("x: {{ .Values.a.b.c }}\n")
    report = helm.lint(str(chart), strict=True)
    assert any(int(m["severity"]) >= 3 for m in report["messages"]), report


# ---- the charts render, and everything they render is valid ---------------------------------------


def _check_crd(doc: dict[str, Any]) -> list[str]:
    """Structure of the CRD kinds kubernetes-validate has no schema for, as their CRDs define them."""
    problems: list[str] = []
    kind = doc["kind"]

    def need(condition: bool, what: str) -> None:
        if not condition:
            problems.append(f"{kind}/{doc.get('metadata', {}).get('name')}: {what}")

    expected_api = {"ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
                    "ScaledObject": "keda.sh/v1alpha1", "TriggerAuthentication": "keda.sh/v1alpha1"}[kind]
    need(doc.get("apiVersion") == expected_api, f"apiVersion {doc.get('apiVersion')} != {expected_api}")
    need(set(doc) == {"apiVersion", "kind", "metadata", "spec"}, f"top-level keys {sorted(doc)}")
    meta = doc.get("metadata", {})
    need(isinstance(meta.get("name"), str) and 0 < len(meta["name"]) <= 253, "metadata.name")
    need(meta.get("namespace") == NAMESPACE, "metadata.namespace")
    need(all(isinstance(v, str) for v in meta.get("labels", {}).values()), "label values must be strings")
    spec = doc.get("spec", {})
    if kind == "ServiceMonitor":
        need(set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}, f"spec keys {sorted(spec)}")
        need(bool(spec.get("selector", {}).get("matchLabels")), "spec.selector.matchLabels")
        endpoints = spec.get("endpoints")
        need(isinstance(endpoints, list) and len(endpoints) > 0, "spec.endpoints")
        for endpoint in endpoints or []:
            need(set(endpoint) <= {"port", "path", "params", "interval", "scrapeTimeout", "scheme", "tlsConfig",
                                   "relabelings"}, f"endpoint {endpoint}")
            need(all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                     for v in endpoint.get("params", {}).values()), "params are lists of strings")
            need(endpoint.get("scheme", "http") in ("http", "https"), "scheme")
            need(isinstance(endpoint.get("port"), str) and isinstance(endpoint.get("path"), str), "port and path")
            for field in ("interval", "scrapeTimeout"):
                need(isinstance(endpoint.get(field, "1s"), str), f"{field} is a duration string")
            for relabel in endpoint.get("relabelings", []):
                # The Operator's RelabelConfig; targetLabel is required by the replace action.
                need(set(relabel) <= {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
                                      "action"}, f"relabeling {relabel}")
                need(relabel.get("action", "replace") in RELABEL_ACTIONS, f"relabeling action {relabel}")
                need(isinstance(relabel.get("targetLabel"), str), f"relabeling targetLabel {relabel}")
                need(all(isinstance(v, str) for k, v in relabel.items() if k not in ("sourceLabels", "modulus")),
                     f"relabeling values are strings {relabel}")
    elif kind == "PrometheusRule":
        need(set(spec) == {"groups"} and isinstance(spec.get("groups"), list) and spec["groups"], "spec.groups")
        for group in spec.get("groups") or []:
            need(set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset",
                                "labels"}, f"group keys {sorted(group)}")
            need(isinstance(group.get("name"), str) and bool(group["name"]), "group name")
            for rule in group.get("rules") or []:
                need(set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"},
                     f"rule keys {sorted(rule)}")
                need(("alert" in rule) != ("record" in rule), f"a rule is an alert or a record: {rule}")
                need(isinstance(rule.get("expr"), str | int), f"rule expr {rule.get('alert')}")
                for field in ("for", "keep_firing_for"):
                    need(isinstance(rule.get(field, "1s"), str), f"{field} is a duration string")
                for field in ("labels", "annotations"):
                    need(all(isinstance(v, str) for v in rule.get(field, {}).values()),
                         f"{field} values must be strings: {rule.get('alert')}")
    elif kind == "ScaledObject":
        need(set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                           "cooldownPeriod", "triggers", "advanced", "fallback"}, f"spec keys {sorted(spec)}")
        need(isinstance(spec.get("scaleTargetRef", {}).get("name"), str), "spec.scaleTargetRef.name")
        for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
            need(isinstance(spec.get(field, 0), int), f"spec.{field} is an integer")
        need(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), "minReplicaCount <= maxReplicaCount")
        triggers = spec.get("triggers")
        need(isinstance(triggers, list) and len(triggers) > 0, "spec.triggers")
        for trigger in triggers or []:
            need(set(trigger) <= {"type", "metadata", "authenticationRef", "name", "metricType"}, f"trigger {trigger}")
            need(isinstance(trigger.get("type"), str), "trigger.type")
            # KEDA's metadata is map[string]string: a number there is refused by the API server.
            need(all(isinstance(v, str) for v in trigger.get("metadata", {}).values()),
                 f"trigger metadata values must be strings: {trigger.get('metadata')}")
            need(isinstance(trigger.get("authenticationRef", {}).get("name", ""), str), "authenticationRef.name")
    else:
        need(set(spec) <= {"secretTargetRef", "configMapTargetRef", "env", "podIdentity"}, f"spec keys {sorted(spec)}")
        need(isinstance(spec.get("secretTargetRef"), list) and len(spec["secretTargetRef"]) > 0,
             "spec.secretTargetRef")
        for field in ("secretTargetRef", "configMapTargetRef"):
            for ref in spec.get(field) or []:
                need(set(ref) == {"parameter", "name", "key"} and all(isinstance(v, str) for v in ref.values()),
                     f"{field} {ref}")
    return problems


def test_every_rendered_object_is_valid(kubeval: ModuleType, kube_versions: list[str],
                                        scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, _, _, rendered = scenario
    assert rendered.docs, f"{spec.name} rendered nothing"
    problems: list[str] = []
    for doc in rendered.docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in CRD_KINDS:
            problems += _check_crd(doc)
            continue
        for kube in kube_versions:
            try:
                kubeval.validate(doc, kube, strict=True)
            except kubeval.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{name} (Kubernetes {kube}, strict): {path}: {exc.message}")
            except kubeval.SchemaNotFoundError as exc:
                problems.append(f"{name}: no schema: {exc.message}")
    assert not problems, "\n".join(problems)


def test_the_kubernetes_validator_is_strict(kubeval: ModuleType, kube_versions: list[str]) -> None:
    """The check above means something: an unknown field, or a wrong type, is refused."""
    probe = {"httpGet": {"path": "/readyz", "port": 1}}
    deployment: dict[str, Any] = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
            "containers": [{"name": "x", "image": "x", "readinessProbe": probe}]}}}}
    kubeval.validate(deployment, kube_versions[-1], strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubeval.ValidationError):
        kubeval.validate(typo, kube_versions[-1], strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubeval.ValidationError):
        kubeval.validate(wrong, kube_versions[-1], strict=True)


@pytest.mark.parametrize(("chart", "values", "expect"), [(c, v, e) for c, _, v, e in REJECTED_CASES],
                         ids=[f"{c}-{case}" for c, case, _, _ in REJECTED_CASES])
def test_bad_values_are_refused(helm: ModuleType, chart: str, values: dict[str, Any], expect: str) -> None:
    with pytest.raises(helm.HelmError) as refused:
        render(helm, chart, values, chart)
    message = str(refused.value)
    print(f"{chart} refused {values}: {message}")
    assert isinstance(refused.value, helm.HelmValuesError | helm.HelmRenderError), repr(refused.value)
    assert expect in message, f"refused for another reason than {expect!r}: {message}"
    for secret in (RABBITMQ_PASSWORD, MONGODB_PASSWORD):
        assert secret not in message, "an error message shows a credential"


# ---- what matters to the people who run it --------------------------------------------------------


def test_standard_labels_on_every_object(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, release, values, rendered = scenario
    expected = {
        "app.kubernetes.io/name": spec.name,
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/version": values.get("image", {}).get("tag") or "0.1.0",
        "app.kubernetes.io/component": spec.component,
        "app.kubernetes.io/part-of": "registration-bridge",
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": f"{spec.name}-0.1.0",
    }
    assert set(expected) == set(STANDARD_LABELS)
    for doc in rendered.docs:
        labels = doc["metadata"].get("labels", {})
        for key, value in expected.items():
            assert labels.get(key) == value, f"{doc['kind']}/{doc['metadata']['name']}: {key}={labels.get(key)!r}"
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} has no namespace"
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert {k: pod_labels.get(k) for k in expected} == expected


def test_deployment_probes_port_and_shutdown(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, _, values, rendered = scenario
    deployment = rendered.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    env = environment(rendered)
    port = values.get("config", {}).get("httpPort", spec.port)
    assert env["HTTP_PORT"] == str(port) == str(spec.port)
    assert main["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert main[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = main["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 60, "the startup probe is not generous"
    if spec.bridge:
        assert pod["terminationGracePeriodSeconds"] > float(str(env["SHUTDOWN_TIMEOUT_S"]))
    assert pod["automountServiceAccountToken"] is False


def test_restricted_security_context_and_resources(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    _, _, _, rendered = scenario
    deployment = rendered.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001  # the images' numeric user
    assert security["fsGroup"] == 10001
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    own = main["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert "ALL" in own["capabilities"]["drop"] and not own["capabilities"].get("add")
    assert not own.get("privileged")
    # The root filesystem is read-only: /tmp is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = main["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_service_and_selectors_fit_together(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, _, _, rendered = scenario
    deployment = rendered.one("Deployment")
    name = deployment["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    service = rendered.one("Service")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}]
    accounts = rendered.of_kind("ServiceAccount")
    assert [a["metadata"]["name"] for a in accounts] == [deployment["spec"]["template"]["spec"]["serviceAccountName"]]
    for monitor in rendered.of_kind("ServiceMonitor"):
        if monitor["metadata"]["name"].endswith("-broker-queues"):
            continue  # the broker's, checked in test_broker_queue_metrics_get_the_bridges_namespace
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    for budget in rendered.of_kind("PodDisruptionBudget"):
        assert budget["spec"]["selector"]["matchLabels"] == selector
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    for scaled in rendered.of_kind("ScaledObject"):
        assert scaled["spec"]["scaleTargetRef"]["name"] == name


def test_optional_objects_follow_their_switches(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, _, values, rendered = scenario
    kinds = sorted(d["kind"] for d in rendered.docs)
    always = ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    autoscaling = values.get("autoscaling", {})
    keda = autoscaling.get("keda", {}).get("enabled", False)
    expected = always + (["Secret"] if values.get("secret", {}).get("create") else [])
    expected += ["ServiceMonitor"] if values.get("serviceMonitor", {}).get("enabled") else []
    expected += ["ServiceMonitor"] if values.get("brokerMetrics", {}).get("serviceMonitor", {}).get("enabled") else []
    if values.get("prometheusRule", {}).get("enabled") and shipped_groups(spec.name, ALERTS.read_text()):
        expected += ["PrometheusRule"]
    expected += ["ConfigMap"] if values.get("dashboard", {}).get("enabled") else []
    ca = values.get("tls", {}).get("caBundle", {})
    expected += ["ConfigMap"] if keda and autoscaling.get("enabled") and (ca.get("secretName") or
                                                                           ca.get("configMapName")) else []
    expected += ["PodDisruptionBudget"] if values.get("podDisruptionBudget", {}).get("enabled") else []
    expected += ["NetworkPolicy"] if values.get("networkPolicy", {}).get("enabled") else []
    expected += ["ConfigMap", "Job"] if values.get("failureQueueLimit", {}).get("enabled") else []
    if autoscaling.get("enabled"):
        expected += ["ScaledObject", "TriggerAuthentication"] if keda else ["HorizontalPodAutoscaler"]
    assert kinds == sorted(expected)
    deployment = rendered.one("Deployment")
    # Whoever scales owns the replica count: the Deployment must not fight the autoscaler.
    assert ("replicas" in deployment["spec"]) == (not autoscaling.get("enabled"))
    if not spec.bridge:
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("protocol", ["http", "amqp"])
@pytest.mark.parametrize("chart", BRIDGE)
def test_keda_scales_on_the_service_queue_with_the_secret(helm: ModuleType, chart: str, protocol: str) -> None:
    """http (the default) counts every message still to be handled, from the management URL in the
    Secret; amqp, kept as a choice, only the ready ones of one queue, from RABBITMQ_URL."""
    spec = CHARTS[chart]
    values = merged(keda_values(chart), {"secret": {"create": False, "existingSecret": "registration-bridge"},
                                         "autoscaling": {"minReplicas": 1}})
    if protocol == "amqp":
        values["autoscaling"]["keda"]["protocol"] = "amqp"
    rendered = render(helm, chart, values, "prod")
    env = environment(rendered)
    scaled = rendered.one("ScaledObject")
    auth = rendered.one("TriggerAuthentication")
    assert not rendered.of_kind("HorizontalPodAutoscaler"), "KEDA makes its own HPA"
    [trigger] = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "rabbitmq" and metadata["protocol"] == protocol
    assert spec.scale_queue is not None
    queue = str(env[spec.scale_queue])
    assert metadata["mode"] == "QueueLength" and int(metadata["value"]) > 0
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert "host" not in metadata, "the broker URL must come from the Secret"
    broker = next(v for v in container(rendered.one("Deployment"))["env"] if v["name"] == "RABBITMQ_URL")
    ref = broker["valueFrom"]["secretKeyRef"]
    hosts = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    if protocol == "amqp":
        assert metadata["queueName"] == queue and "useRegex" not in metadata
        assert hosts == [{"parameter": "host", "name": ref["name"], "key": ref["key"]}]
        return
    assert hosts == [{"parameter": "host", "name": ref["name"], "key": "RABBITMQ_MANAGEMENT_URL"}]
    # KEDA's http mode counts messages ready plus unacknowledged unless told otherwise.
    assert metadata.get("excludeUnacknowledged", "false") == "false"
    if chart == "submitter":
        assert metadata["queueName"] == queue and "useRegex" not in metadata
        return
    # The poller: the pending queue and its wait queues, summed, and nothing else.
    assert (metadata["useRegex"], metadata["operation"]) == ("true", "sum")
    pattern = re.compile(metadata["queueName"])
    for name in (queue, f"{queue}.wait.2000ms", f"{queue}.wait.16000ms"):
        assert pattern.search(name), name
    for name in ("registrations", "registrations.failed", f"{queue}.wait.2000ms.x", f"x{queue}", f"{queue}Xwait"):
        assert not pattern.search(name), name


@pytest.mark.parametrize("chart", BRIDGE)
def test_keda_scale_to_zero_is_safe_or_explicit(helm: ModuleType, chart: str) -> None:
    """KEDA's floor of zero: fine with http; with amqp the poller needs the explicit acceptance."""
    assert render(helm, chart, keda_values(chart), "prod").one("ScaledObject")["spec"]["minReplicaCount"] == 0
    amqp = merged(keda_values(chart), {"autoscaling": {"keda": {"protocol": "amqp"}}})
    if chart == "poller":
        with pytest.raises(helm.HelmError, match="acceptScaleToZeroDelay"):
            render(helm, chart, amqp, "prod")
        amqp["autoscaling"]["keda"]["acceptScaleToZeroDelay"] = True
    assert render(helm, chart, amqp, "prod").one("ScaledObject")["spec"]["minReplicaCount"] == 0
    # Secret created by the chart: the management URL is stored under the key KEDA reads.
    rendered = render(helm, chart, keda_values(chart), "prod")
    [secret] = rendered.of_kind("Secret")
    assert base64.b64decode(secret["data"]["RABBITMQ_MANAGEMENT_URL"]).decode() == MANAGEMENT_URL
    hosts = [r for r in rendered.one("TriggerAuthentication")["spec"]["secretTargetRef"] if r["parameter"] == "host"]
    assert hosts == [{"parameter": "host", "name": secret["metadata"]["name"], "key": "RABBITMQ_MANAGEMENT_URL"}]


def test_credentials_only_in_the_secret(scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    spec, _, values, rendered = scenario
    main = container(rendered.one("Deployment"))
    for configmap in rendered.of_kind("ConfigMap"):
        assert not set(SECRET_ENV) & set(configmap.get("data", {})), "a credential URL in a ConfigMap"
    assert not any("secretRef" in source for source in main.get("envFrom", []))
    if not spec.bridge:
        assert not rendered.of_kind("Secret")
        assert not set(SECRET_ENV) & {v["name"] for v in main.get("env", [])}
        return
    refs = {}
    for var in main["env"]:
        if var["name"] in SECRET_ENV:
            assert set(var) == {"name", "valueFrom"} and set(var["valueFrom"]) == {"secretKeyRef"}, var
            refs[var["name"]] = var["valueFrom"]["secretKeyRef"]
    assert set(refs) == set(SECRET_ENV)
    # Not the contract's development default either: no guest:guest anywhere.
    for path, text in rendered.files.items():
        assert "guest" not in text, path
    secrets = rendered.of_kind("Secret")
    if not values.get("secret", {}).get("create"):
        assert not secrets
        assert {r["name"] for r in refs.values()} == {"registration-bridge"}
        return
    [secret] = secrets
    assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert {refs[name]["key"]: data[refs[name]["key"]] for name in SECRET_ENV} == {
        "RABBITMQ_URL": RABBITMQ_URL, "MONGODB_URI": MONGODB_URI}
    forbidden = [RABBITMQ_PASSWORD, MONGODB_PASSWORD, RABBITMQ_URL, MONGODB_URI, MANAGEMENT_URL,
                 base64.b64encode(RABBITMQ_URL.encode()).decode(), base64.b64encode(MONGODB_URI.encode()).decode()]
    # Every other object, its text as rendered (comments included) and every string in it.
    for path, text in rendered.files.items():
        if path.endswith("/secret.yaml"):
            continue
        leaked = [f for f in forbidden if f in text]
        assert not leaked, f"{path} shows a credential"
    for doc in rendered.docs:
        if doc["kind"] != "Secret":
            assert not [s for s in strings(doc) for f in forbidden if f in s], doc["kind"]


class Recording(Mapping[str, str]):
    """An environment that remembers every variable the parser asked for."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.env[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return key in self.env

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def test_environment_is_the_contract_and_the_service_accepts_it(
        scenario: tuple[ChartSpec, str, dict[str, Any], Rendered]) -> None:
    """The rendered environment, through the service's own settings parser: every variable it reads
    is set by the chart, every value parses, and the defaults are the service's own."""
    spec, _, values, rendered = scenario
    env = environment(rendered)
    real = {k: v for k, v in env.items() if v is not None}
    if spec.bridge:
        from regbridge import settings as bridge_settings

        assert set(env) >= CONTRACT_ENV | TUNING_ENV | set(CLUSTER_ENV), \
            sorted(CONTRACT_ENV | TUNING_ENV | set(CLUSTER_ENV) - set(env))
        parse = getattr(bridge_settings, f"{spec.name}_settings")
        recording = Recording({**real, "RABBITMQ_URL": RABBITMQ_URL, "MONGODB_URI": MONGODB_URI})
        loaded = parse(recording)
        defaults = parse({})
        assert recording.asked <= set(env), f"the chart does not set {sorted(recording.asked - set(env))}"
        differ = {k for k in defaults.setting_names() if getattr(loaded, k) != getattr(defaults, k)}
        if not values:
            assert differ == {"rabbitmq_url", "mongodb_uri", "legacy_api_url", "http_host"}, differ
            assert loaded.legacy_api_url == "http://legacy-sim:8080"
            # In a pod the probes and Prometheus come from outside: every interface.
            assert loaded.http_host == "0.0.0.0"
        else:
            assert loaded.log_level == "DEBUG" and loaded.prefetch == 100 and loaded.poll_first_delay_s == 0.5
            assert loaded.max_message_bytes == 1000000
            assert (loaded.http_host, loaded.log_level_third_party) == ("::", "INFO")
            assert loaded.legacy_api_url == "https://adapter.legacy.svc:8443"
        return
    from legacy_sim.config import load_config

    recording = Recording(real)
    loaded = load_config([], recording)
    defaults = load_config([], {})
    every = {"HTTP_PORT"} | {f"LEGACY_SIM_{n}" for n in ("HOST", "LATENCY_MIN_S", "LATENCY_MAX_S",
                                                          "ACCEPT_LATENCY_S", "POST_503_RATE", "GET_503_RATE",
                                                          "RETRY_AFTER_S", "FAIL_PREFIX", "DOWN", "RESPONSE_DELAY_S")}
    assert every <= set(env), sorted(every - set(env))
    assert loaded.host == "0.0.0.0" and loaded.port == spec.port
    if not values:
        assert {k: v for k, v in loaded.to_json().items() if k != "host"} == \
            {k: v for k, v in defaults.to_json().items() if k != "host"}
    else:
        # Every setting legacy-sim reads is one the chart can set (the seed only when given; the
        # latency profile instead of the bounds these values give, see the next test).
        asked = recording.asked - {"LEGACY_SIM_LATENCY_PROFILE"}
        assert asked <= set(env), sorted(asked - set(env))
        assert (loaded.seed, loaded.post_503_rate, loaded.fail_prefix, loaded.latency_max_s) == (42, 0.05, None, 6.0)


def test_a_latency_profile_replaces_the_bounds_in_legacy_sims_environment(helm: ModuleType) -> None:
    """legacy-sim refuses a profile given with the bounds: the chart renders one or the other."""
    from legacy_sim.config import load_config
    from legacy_sim.latency import parse_profile

    profile = "uniform:10,20 for 300 then lognormal:60,0.5"
    rendered = render(helm, "legacy-sim", {"config": {"latencyProfile": profile}}, "legacy-sim")
    env = {k: v for k, v in environment(rendered).items() if v is not None}
    assert env["LEGACY_SIM_LATENCY_PROFILE"] == profile
    assert not {"LEGACY_SIM_LATENCY_MIN_S", "LEGACY_SIM_LATENCY_MAX_S"} & set(env)
    assert load_config([], env).profile == parse_profile(profile)
    assert f"the latency profile {profile}" in rendered.files["legacy-sim/templates/NOTES.txt"]
    bounds = environment(render(helm, "legacy-sim", {}, "legacy-sim"))
    assert "LEGACY_SIM_LATENCY_PROFILE" not in bounds
    assert (bounds["LEGACY_SIM_LATENCY_MIN_S"], bounds["LEGACY_SIM_LATENCY_MAX_S"]) == ("10", "20")


@pytest.mark.parametrize("chart", BRIDGE)
def test_cluster_settings_reach_the_environment(helm: ModuleType, chart: str) -> None:
    """RABBITMQ_URL_ORDER and QUORUM_INITIAL_GROUP_SIZE: the services' defaults unless set."""
    assert {k: environment(render(helm, chart, {}, chart))[k] for k in CLUSTER_ENV} == CLUSTER_ENV
    env = environment(render(helm, chart, full_values(chart), "staging"))
    assert (env["RABBITMQ_URL_ORDER"], env["QUORUM_INITIAL_GROUP_SIZE"]) == ("listed", "5")


def test_the_charts_are_consistent() -> None:
    """Self-contained, yet alike: same chart metadata, same value names where they mean the same."""
    metas = {name: yaml.safe_load((HELM_DIR / name / "Chart.yaml").read_text()) for name in CHARTS}
    for name, meta in metas.items():
        assert meta["apiVersion"] == "v2" and meta["name"] == name
        assert str(meta["appVersion"]) == "0.1.0" and meta["kubeVersion"] == f">={KUBE_FLOOR}.0-0"
        assert not meta.get("dependencies"), f"{name} must install on its own"
        schema = json.loads((HELM_DIR / name / "values.schema.json").read_text())
        assert schema["additionalProperties"] is False
        defaults = yaml.safe_load((HELM_DIR / name / "values.yaml").read_text())
        assert set(defaults) <= set(schema["properties"]), f"{name}: values without a schema"
        assert defaults["image"]["repository"] == f"registration-bridge/{name}"
        assert defaults["service"]["port"] == defaults["config"]["httpPort"] == CHARTS[name].port
    submitter, poller = (yaml.safe_load((HELM_DIR / n / "values.yaml").read_text()) for n in ("submitter", "poller"))
    # The broker's queue metrics are scraped once, by the submitter's release.
    # The failure queue's bound is set once, by the poller's release (whose alerts watch that queue).
    assert set(submitter) - {"brokerMetrics"} == set(poller) - {"failureQueueLimit"}
    # The adaptive schedule's knobs are the poller's alone (the submitter reads POLL_SCHEDULE only).
    poller_only = {"pollAdaptiveWindow", "pollAdaptiveMinObservations", "pollAdaptiveDelayRatio",
                   "pollAdaptiveMaxPolls"}
    assert poller_only <= set(poller["config"]) and not poller_only & set(submitter["config"])
    shared = set(poller["config"]) - {"httpPort", "workers"} - poller_only
    assert {k: submitter["config"][k] for k in shared} == {k: poller["config"][k] for k in shared}, \
        "the two bridge charts must agree on queues, POLL_* and the rest they share"


# ---- issue 12: job names, alert rules, dashboard, disruption budget, private CA, Helm 3 -----------


def relabelled_job(monitor: dict[str, Any], service: dict[str, Any]) -> str:
    return relabelled(monitor, service)["job"]


def relabelled(monitor: dict[str, Any], service: dict[str, Any]) -> dict[str, str]:
    """The `job` label Prometheus Operator gives the targets of a ServiceMonitor's one endpoint: the
    value of the Service label named by jobLabel, else the Service's name; then the endpoint's
    relabelings (the replace action, the only one these charts use) in order; and `namespace`, the
    Service's."""
    labels: dict[str, str] = {"job": str(service["metadata"]["labels"].get(monitor["spec"].get("jobLabel", ""))
                                         or service["metadata"]["name"]),
                              "namespace": service["metadata"]["namespace"]}
    [endpoint] = monitor["spec"]["endpoints"]
    for relabel in endpoint.get("relabelings", []):
        assert relabel.get("action", "replace") == "replace", relabel
        source = relabel.get("separator", ";").join(labels.get(name, "") for name in relabel.get("sourceLabels", []))
        match = re.fullmatch(relabel.get("regex", "(.*)"), source)
        if match:
            labels[relabel["targetLabel"]] = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>",
                                                                 relabel.get("replacement", "$1")))
    return labels


@pytest.mark.parametrize("chart", ALL)
@pytest.mark.parametrize("extra", [{}, {"nameOverride": "renamed"}, {"fullnameOverride": "bridge-svc"}],
                         ids=["plain", "nameOverride", "fullnameOverride"])
def test_servicemonitor_job_is_the_service_name(helm: ModuleType, chart: str, extra: dict[str, Any]) -> None:
    """The alert rules and the dashboard select job="submitter" / "poller": so must the scrape,
    whatever the release (here `bridge`) or the overrides call the Service."""
    rendered = render(helm, chart, {"serviceMonitor": {"enabled": True}, **extra}, "bridge")
    service = rendered.one("Service")
    assert service["metadata"]["name"] != chart, "the Operator's default would already be right"
    assert relabelled_job(rendered.one("ServiceMonitor"), service) == chart


def shipped_groups(chart: str, alerts_text: str) -> list[dict[str, Any]]:
    """The rule groups of an alerts file that a chart ships: those whose name ends in -<chart>."""
    return [g for g in yaml.safe_load(alerts_text).get("groups") or [] if g["name"].endswith(f"-{chart}")]


def rendered_groups(helm: ModuleType, charts: Mapping[str, str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Each chart's PrometheusRule groups, with prometheusRule on (none: no PrometheusRule at all)."""
    values = {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    out: dict[str, list[dict[str, Any]]] = {}
    for name, chart in charts.items():
        files = (chart if isinstance(chart, Path) else HELM_DIR / chart) / "files" / "alerts.yml"
        if not shipped_groups(name, files.read_text()):
            with pytest.raises(helm.HelmError, match=f'no rule group whose name ends in "-{name}"'):
                render(helm, chart, values, "bridge")
            out[name] = []
            continue
        rules = render(helm, chart, values, "bridge").of_kind("PrometheusRule")
        assert len(rules) <= 1
        for rule in rules:
            assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
            assert not _check_crd(rule), _check_crd(rule)
        out[name] = rules[0]["spec"]["groups"] if rules else []
    return out


def test_prometheus_rules_are_the_groups_of_the_alerts_file(helm: ModuleType) -> None:
    """Together the charts ship every group of deploy/prometheus/alerts.yml, each exactly once and as
    written: a group whose name ends in no chart's name would reach no Prometheus."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    shipped = rendered_groups(helm, {c: c for c in CHARTS})
    orphans = [g["name"] for g in groups if not any(g["name"].endswith(f"-{c}") for c in CHARTS)]
    assert not orphans, f"groups no chart ships (name them <...>-{'/-'.join(CHARTS)}): {orphans}"
    union = [g for chart in CHARTS for g in shipped[chart]]
    assert sorted(union, key=lambda g: g["name"]) == sorted(groups, key=lambda g: g["name"])


def test_prometheus_rules_select_their_groups_from_any_file(helm: ModuleType, tmp_path: Path) -> None:
    """The selection by name, on a file of other groups than today's: the rules of
    deploy/prometheus/alerts.yml spread over groups for every chart, and one no chart claims.
    Their $labels / $value templates come through as text, untouched by Helm."""
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert any("{{ $labels." in s for r in rules for s in strings(r)), "the file no longer has templated text"
    groups = [{"name": f"registration-bridge-{chart}", "rules": rules[i::len(CHARTS)] or rules[:1]}
              for i, chart in enumerate(CHARTS)]
    groups.append({"name": "registration-bridge-mongodb", "rules": rules[:1]})
    text = yaml.safe_dump({"groups": groups}, sort_keys=False)
    copies: dict[str, str | Path] = {}
    for chart in CHARTS:
        copies[chart] = shutil.copytree(HELM_DIR / chart, tmp_path / chart)  # the links' contents, copied
        (tmp_path / chart / "files" / "alerts.yml").write_text(text)
    shipped = rendered_groups(helm, copies)
    for chart in CHARTS:
        assert shipped[chart] == shipped_groups(chart, text) == [groups[list(CHARTS).index(chart)]]


def test_charts_read_the_deploy_files_through_links(helm: ModuleType, tmp_path: Path) -> None:
    """files/ holds links, so the charts cannot drift from deploy/; Helm's loader and `helm package`
    follow them, so a packaged chart holds the files themselves."""
    for chart in CHARTS:
        for name, target in LINKED_FILES.items():
            link = HELM_DIR / chart / "files" / name
            if chart not in LINKED_IN[name]:
                assert not link.exists()
                continue
            assert link.is_symlink() and link.resolve() == target.resolve(), link
        archive = helm.package(str(HELM_DIR / chart), destination=str(tmp_path))
        with tarfile.open(archive) as packaged:
            for name, target in LINKED_FILES.items():
                member = f"{chart}/files/{name}"
                if member in packaged.getnames():
                    info = packaged.getmember(member)
                    extracted = packaged.extractfile(info)
                    assert info.isfile() and extracted is not None and extracted.read() == target.read_bytes()
                else:
                    assert chart not in LINKED_IN[name], member


@pytest.mark.parametrize("chart", BRIDGE)
def test_dashboard_configmap_holds_the_dashboard(helm: ModuleType, chart: str) -> None:
    assert not [m for m in render(helm, chart, {}, "bridge").of_kind("ConfigMap")
                if "grafana_dashboard" in m["metadata"]["labels"]], "the dashboard is off by default"
    values = {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Registration bridge"}}}
    maps = {m["metadata"]["name"]: m for m in render(helm, chart, values, "bridge").of_kind("ConfigMap")}
    board = maps[f"bridge-{chart}-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["annotations"] == {"grafana_folder": "Registration bridge"}
    assert board["data"] == {"registration-bridge.json": DASHBOARD.read_text()}
    assert json.loads(board["data"]["registration-bridge.json"]) == json.loads(DASHBOARD.read_text())
    relabelled = render(helm, chart, merged(values, {"dashboard": {"labels": {"grafana_dashboard": "bridge"}}}), "b")
    assert {m["metadata"]["labels"].get("grafana_dashboard") for m in relabelled.of_kind("ConfigMap")} >= {"bridge"}


@pytest.mark.parametrize("chart", ALL)
def test_disruption_budget_renders_as_given(helm: ModuleType, chart: str) -> None:
    """0 is not "unset": with the explicit opt-in it renders as 0. Unready pods may always be evicted."""
    def budget(values: dict[str, Any]) -> dict[str, Any]:
        spec = render(helm, chart, {"podDisruptionBudget": {"enabled": True, **values}}, "bridge")
        return dict(spec.one("PodDisruptionBudget")["spec"])

    default = budget({})
    assert (default["maxUnavailable"], default["unhealthyPodEvictionPolicy"]) == (1, "AlwaysAllow")
    assert "minAvailable" not in default
    blocked = budget({"maxUnavailable": 0, "blockAllEvictions": True})
    assert blocked["maxUnavailable"] == 0
    assert budget({"minAvailable": 1, "blockAllEvictions": True})["minAvailable"] == 1
    assert budget({"maxUnavailable": "25%"})["maxUnavailable"] == "25%"
    assert budget({"unhealthyPodEvictionPolicy": "IfHealthyBudget"})["unhealthyPodEvictionPolicy"] == "IfHealthyBudget"
    if CHARTS[chart].bridge:
        assert render(helm, chart, {"replicaCount": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": 2}},
                      "bridge").one("PodDisruptionBudget")["spec"]["minAvailable"] == 2


@pytest.mark.parametrize("source", ["secret", "configMap"])
@pytest.mark.parametrize("chart", BRIDGE)
def test_private_ca_reaches_the_pods_and_keda(helm: ModuleType, chart: str, source: str) -> None:
    plain = render(helm, chart, keda_values(chart) | {"tls": {"caBundle": {"key": "ca.crt"}}}, "prod")
    assert "initContainers" not in plain.one("Deployment")["spec"]["template"]["spec"]
    assert "SSL_CERT_FILE" not in environment(plain)
    assert "configMapTargetRef" not in plain.one("TriggerAuthentication")["spec"]

    ca = {f"{source}Name": "corporate-ca", "key": "ca.pem"}
    rendered = render(helm, chart, merged(keda_values(chart), {"tls": {"caBundle": {
        "secretName": "", "configMapName": "", **ca}}}), "prod")
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    main = container(rendered.one("Deployment"))
    [init] = pod["initContainers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    items = [{"key": "ca.pem", "path": "ca.crt"}]
    if source == "secret":
        assert volumes["ca-source"]["secret"] == {"secretName": "corporate-ca", "items": items}
    else:
        assert volumes["ca-source"]["configMap"] == {"name": "corporate-ca", "items": items}
    assert "emptyDir" in volumes["ca-bundle"]
    # The init container runs as the service does, and writes only into the emptyDir.
    assert (init["image"], init["securityContext"]) == (main["image"], main["securityContext"])
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert init_mounts["ca-source"]["readOnly"] is True and not init_mounts["ca-bundle"].get("readOnly")
    assert init["command"][-2:] == [f"{init_mounts['ca-source']['mountPath']}/ca.crt",
                                    f"{init_mounts['ca-bundle']['mountPath']}/ca-certificates.crt"]
    # The service reads the combined bundle, read-only.
    bundle = environment(rendered)["SSL_CERT_FILE"]
    main_mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert main_mounts["ca-bundle"]["readOnly"] is True
    assert bundle == init["command"][-1] and str(Path(str(bundle)).parent) == main_mounts["ca-bundle"]["mountPath"]
    assert "ca-source" not in main_mounts
    # KEDA: TLS on, with the same CA, which KEDA adds to its system pool.
    auth = rendered.one("TriggerAuthentication")["spec"]
    refs = {r["parameter"]: (kind, r["name"], r["key"])
            for kind in ("secretTargetRef", "configMapTargetRef") for r in auth.get(kind, [])}
    assert refs["ca"] == (f"{source}TargetRef", "corporate-ca", "ca.pem")
    _, tls_map, tls_key = refs["tls"]
    maps = {m["metadata"]["name"]: m for m in rendered.of_kind("ConfigMap")}
    assert refs["tls"][0] == "configMapTargetRef" and maps[tls_map]["data"] == {tls_key: "enable"}
    assert not [m for m in main.get("envFrom", []) if m["configMapRef"]["name"] == tls_map]


def _openssl(*args: str) -> None:
    if not shutil.which("openssl"):
        unavailable("openssl is needed to make a private CA")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("chart", BRIDGE)
def test_the_init_container_joins_the_system_and_private_cas(helm: ModuleType, chart: str, tmp_path: Path) -> None:
    """The init container's own command, run here: the combined file holds the system CAs and the
    private one, and Python's ssl loads it; a file with no certificate stops the pod with the reason."""
    values = {"tls": {"caBundle": {"secretName": "corporate-ca"}}}
    [init] = render(helm, chart, values, "bridge").one("Deployment")["spec"]["template"]["spec"]["initContainers"]
    command = init["command"]
    assert command[:2] == ["python", "-c"] and command[3] == "/etc/ssl/certs/ca-certificates.crt"
    system, private, bundle = tmp_path / "system.crt", tmp_path / "private.crt", tmp_path / "bundle.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=system test CA",
             "-keyout", str(tmp_path / "s.key"), "-out", str(system))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=private test CA",
             "-keyout", str(tmp_path / "p.key"), "-out", str(private))
    system.write_text(system.read_text().rstrip("\n"))  # a bundle without a final newline still joins
    subprocess.run([sys.executable, "-c", command[2], str(system), str(private), str(bundle)], check=True,
                   timeout=60)
    context = ssl.create_default_context(cafile=str(bundle))
    assert context.cert_store_stats()["x509_ca"] == 2
    names = {name[0][1] for c in context.get_ca_certs() for name in c["subject"] if name[0][0] == "commonName"}
    assert names == {"system test CA", "private test CA"}
    private.write_text("not a certificate\n")
    failed = subprocess.run([sys.executable, "-c", command[2], str(system), str(private), str(bundle)],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and "SSLError" in failed.stderr, failed.stderr


@pytest.mark.parametrize("chart", BRIDGE)
def test_dashboard_configmap_goes_where_grafana_looks(helm: ModuleType, chart: str) -> None:
    def namespace(values: dict[str, Any]) -> str:
        rendered = render(helm, chart, merged({"dashboard": {"enabled": True}}, values), "bridge")
        [board] = [m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].endswith("-dashboard")]
        return str(board["metadata"]["namespace"])

    assert namespace({}) == NAMESPACE
    assert namespace({"dashboard": {"namespace": "monitoring"}}) == "monitoring"


BROKER_SERVICE = {"metadata": {"name": "broker", "namespace": "rabbitmq-system", "labels": {
    "app.kubernetes.io/component": "rabbitmq", "app.kubernetes.io/name": "broker",
    "app.kubernetes.io/part-of": "rabbitmq"}}}


def test_broker_queue_metrics_get_the_bridges_namespace(helm: ModuleType) -> None:
    """The submitter's ServiceMonitor for the broker's per-queue metrics: off by default; on, it
    selects the Cluster Operator's Service in the broker's namespace, asks for the two families of
    the bridge's vhost only, and the series come out with the bridge's namespace and the job the
    compose scrape has, which is what the alert rules join on."""
    assert not [m for m in render(helm, "submitter", {}, "bridge").of_kind("ServiceMonitor")]
    values = {"brokerMetrics": {"serviceMonitor": {"enabled": True, "namespace": "rabbitmq-system",
                                                   "clusterName": "broker", "vhost": "registrations-prod"}},
              "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}}
    [monitor] = render(helm, "submitter", values, "bridge").of_kind("ServiceMonitor")
    assert not _check_crd(monitor), _check_crd(monitor)
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["rabbitmq-system"]}
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/component": "rabbitmq",
                                               "app.kubernetes.io/name": "broker"}
    assert spec["selector"]["matchLabels"].items() <= BROKER_SERVICE["metadata"]["labels"].items()
    [endpoint] = spec["endpoints"]
    assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == ("prometheus", "http", "/metrics/detailed")
    assert endpoint["params"] == {"family": ["queue_coarse_metrics", "queue_consumer_count"],
                                  "vhost": ["registrations-prod"]}
    compose = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [queues] = [job for job in compose["scrape_configs"] if job.get("metrics_path") == "/metrics/detailed"]
    assert relabelled(monitor, BROKER_SERVICE) == {"namespace": NAMESPACE, "job": queues["job_name"]}
    # A broker beside the bridge, over TLS (15691).
    tls = {"brokerMetrics": {"serviceMonitor": {"enabled": True, "port": "prometheus-tls", "scheme": "https",
                                                "tlsConfig": {"serverName": "broker.rabbitmq-system.svc"}}}}
    [monitor] = render(helm, "submitter", tls, "bridge").of_kind("ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/component": "rabbitmq"}
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["scheme"]) == ("prometheus-tls", "https")
    assert endpoint["tlsConfig"] == {"serverName": "broker.rabbitmq-system.svc"}
    assert endpoint["params"]["vhost"] == ["/"]


# ---- Helm 3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm3() -> Path:
    return Path(fetch_tools("helm3")["helm3"])


@pytest.mark.parametrize(("chart", "release", "values"), [(c, r, v) for c, _, r, v in SCENARIOS], ids=SCENARIO_IDS)
def test_helm3_lints_and_renders_like_helm4(helm: ModuleType, helm3: Path, kube_versions: list[str], tmp_path: Path,
                                            chart: str, release: str, values: dict[str, Any]) -> None:
    """The charts are also installed with Helm 3: its strict lint passes and it renders the same
    objects as Helm 4's library."""
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    for kube in kube_versions:
        lint = subprocess.run([str(helm3), "lint", "--strict", str(HELM_DIR / chart), "-f", str(values_file),
                               "--namespace", NAMESPACE, "--kube-version", f"v{kube}.0"],
                              capture_output=True, text=True, timeout=120)
        assert lint.returncode == 0, f"helm3 lint --strict {chart} (Kubernetes {kube}):\n{lint.stdout}{lint.stderr}"
    template = subprocess.run([str(helm3), "template", release, str(HELM_DIR / chart), "-f", str(values_file),
                               "--namespace", NAMESPACE, "--kube-version", f"v{kube_versions[-1]}.0"],
                              capture_output=True, text=True, timeout=120)
    assert template.returncode == 0, template.stderr
    by_helm3 = [d for d in yaml.safe_load_all(template.stdout) if d]
    by_helm4 = render(helm, chart, values, release).docs
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(by_helm3, key=key) == sorted(by_helm4, key=key)


# ---- issue 14: exposure --------------------------------------------------------------------------


def rule_ports(rule: dict[str, Any]) -> list[tuple[Any, str]]:
    return [(p["port"], p["protocol"]) for p in rule["ports"]]


@pytest.mark.parametrize("chart", ALL)
def test_no_network_policy_unless_asked(helm: ModuleType, chart: str) -> None:
    assert not render(helm, chart, {}, chart).of_kind("NetworkPolicy")


@pytest.mark.parametrize("chart", BRIDGE)
def test_the_network_policy_lets_in_only_prometheus_and_out_only_to_the_dependencies(
        helm: ModuleType, chart: str) -> None:
    rendered = render(helm, chart, full_values(chart), "staging")
    policy = rendered.one("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    # Ingress: one rule, Prometheus's pods, the port that serves /metrics.
    assert spec["ingress"] == [{"from": [PROMETHEUS_PEER], "ports": [{"port": "http", "protocol": "TCP"}]}]
    ports = {p["name"]: p["containerPort"] for p in container(rendered.one("Deployment"))["ports"]}
    assert ports == {"http": CHARTS[chart].port}
    # Egress: the broker, MongoDB, the legacy API and DNS, each only to its peers and ports.
    assert [(rule_ports(r), r.get("to")) for r in spec["egress"]] == [
        ([(p["port"], p.get("protocol", "TCP")) for p in NETWORK_EGRESS[name]["ports"]], NETWORK_EGRESS[name]["to"])
        for name in ("rabbitmq", "mongodb", "legacyApi", "dns")]
    # The defaults: the dependencies' usual ports, to any address, and DNS only to kube-dns.
    defaults = render(helm, chart, {"networkPolicy": {"enabled": True}}, chart).one("NetworkPolicy")["spec"]
    assert [rule_ports(r) for r in defaults["egress"]] == [[(5672, "TCP"), (5671, "TCP")], [(27017, "TCP")],
                                                            [(8080, "TCP"), (443, "TCP")], [(53, "UDP"), (53, "TCP")]]
    assert [("to" in r) for r in defaults["egress"]] == [False, False, False, True]
    assert defaults["ingress"][0]["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "prometheus"}}}]
    extra = {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}], "ports": [{"port": 3128, "protocol": "TCP"}]}
    more = render(helm, chart, {"networkPolicy": {"enabled": True, "extraEgress": [extra]}}, chart)
    assert more.one("NetworkPolicy")["spec"]["egress"][-1] == extra


def test_legacy_sims_network_policy_lets_in_its_clients_and_prometheus_and_nothing_out(helm: ModuleType) -> None:
    rendered = render(helm, "legacy-sim", full_values("legacy-sim"), "staging")
    spec = rendered.one("NetworkPolicy")["spec"]
    http = [{"port": "http", "protocol": "TCP"}]
    assert spec["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "registration-bridge"}}}],
         "ports": http},
        {"from": [PROMETHEUS_PEER], "ports": http}]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"] and spec["egress"] == []
    # The bridge's pods carry the label the default clients rule selects.
    for chart in BRIDGE:
        labels = render(helm, chart, {}, chart).one("Deployment")["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "registration-bridge"


def test_legacy_sim_stays_inside_the_cluster(helm: ModuleType) -> None:
    service = render(helm, "legacy-sim", {}, "legacy-sim").one("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert yaml.safe_load((HELM_DIR / "legacy-sim" / "values.yaml").read_text())["service"]["type"] == "ClusterIP"


def test_the_failure_queue_limit_job_runs_the_deploy_script_with_the_limits(helm: ModuleType) -> None:
    rendered = render(helm, "poller", full_values("poller"), "staging")
    (job,) = rendered.of_kind("Job")
    script = [c for c in rendered.of_kind("ConfigMap") if "failure_queue_limit.py" in c.get("data", {})]
    assert len(script) == 1 and script[0]["data"]["failure_queue_limit.py"] == POLICY_SCRIPT.read_text().rstrip("\n")
    assert job["metadata"]["annotations"] == {"helm.sh/hook": "post-install,post-upgrade",
                                              "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded"}
    pod = job["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["command"] == ["python", "/etc/regbridge/failure-queue-limit/failure_queue_limit.py"]
    assert main["image"] == container(rendered.one("Deployment"))["image"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in main["env"]}
    assert env == {
        "RABBITMQ_URL": {"secretKeyRef": {"name": "staging-poller", "key": "RABBITMQ_URL"}},
        "RABBITMQ_MANAGEMENT_URL": {"secretKeyRef": {"name": "staging-poller", "key": "RABBITMQ_MANAGEMENT_URL"}},
        "FAILED_QUEUE": "registrations.failed", "FAILED_QUEUE_MAX_LENGTH": "200000",
        "FAILED_QUEUE_MAX_LENGTH_BYTES": "2147483648", "FAILED_QUEUE_POLICY": "registrations-failed-limit",
        "FAILED_QUEUE_POLICY_PRIORITY": "20", "FAILED_QUEUE_POLICY_EXTRA": '{"delivery-limit":1000000}'}
    # Restricted like the service's pods, and selected by none of the poller's selectors.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"] and "memory" in main["resources"]["limits"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    for selector in (rendered.one("Deployment")["spec"]["selector"]["matchLabels"],
                     rendered.one("Service")["spec"]["selector"],
                     rendered.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]):
        assert not selector.items() <= labels.items()
    # An existing Secret: its management key; one limit only; off by default.
    alone = render(helm, "poller", {"failureQueueLimit": {"enabled": True, "maxLengthBytes": None},
                                    "secret": {"rabbitmqManagementUrlKey": "mgmt"}}, "poller")
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in alone.one("Job")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    # The Secret may hold no management URL (optional): the script then derives it from RABBITMQ_URL.
    assert env["RABBITMQ_MANAGEMENT_URL"] == {"secretKeyRef": {"name": "registration-bridge", "key": "mgmt",
                                                               "optional": True}}
    assert env["RABBITMQ_URL"] == {"secretKeyRef": {"name": "registration-bridge", "key": "RABBITMQ_URL"}}
    assert env["FAILED_QUEUE_MAX_LENGTH"] == "100000" and "FAILED_QUEUE_MAX_LENGTH_BYTES" not in env
    # A Secret the chart creates without a management URL: RABBITMQ_URL alone, nothing to fail on.
    created = {"create": True, "rabbitmqUrl": RABBITMQ_URL, "mongodbUri": MONGODB_URI}
    derived = render(helm, "poller", {"failureQueueLimit": {"enabled": True}, "secret": created}, "poller")
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in derived.one("Job")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["RABBITMQ_URL"] == {"secretKeyRef": {"name": "poller", "key": "RABBITMQ_URL"}}
    assert "RABBITMQ_MANAGEMENT_URL" not in env
    # Off by default in the chart (docs/operations.md says why), where compose runs it always.
    assert not render(helm, "poller", {}, "poller").of_kind("Job")
