"""Fixtures for both tiers. Integration fixtures need the real broker: under CI=true a missing
broker fails the run; on a developer's machine those tests are skipped with the reason."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from _pytest.nodes import Node as Node_
from pymongo import MongoClient

sys.path.insert(0, str(Path(__file__).parent))

import harness
from failure_records import FailureRecords
from rabbit_cluster import ClusterUnavailable, Node, ctl, rabbit_cluster


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `-n` with `--dist loadgroup`: the deployment checks share one worker (they fetch
    their tools into one directory), and so do the cluster test, the explorer (its last test
    reports the runs of them all), and the tests on a broker of their own (one node boots for
    them all). Tests marked `long` go first."""
    for item in items:
        part = Path(str(item.path)).relative_to(Path(__file__).parent).parts[0]
        if item.get_closest_marker("own_broker"):
            item.add_marker(pytest.mark.xdist_group("own_broker"))
        elif part in ("deploy", "cluster", "model"):
            item.add_marker(pytest.mark.xdist_group(part))
    # The longest tests first (after the groups, which xdist hands out first): one that started
    # last would run on alone at the end while the other workers idle.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_configure(config: pytest.Config) -> None:
    """`--dist loadgroup` works by rewriting `item._nodeid`; a pytest whose node ids live
    elsewhere scatters the groups without a word, so refuse to start instead."""
    if config.getoption("dist", "no") == "loadgroup" \
            and "_nodeid" not in inspect.getsource(Node_.nodeid.fget):  # type: ignore[attr-defined]
        raise pytest.UsageError("this pytest keeps node ids where pytest-xdist's loadgroup cannot "
                                "rewrite them; install the pytest that requirements-dev.txt pins")


def _need_broker() -> None:
    if not harness.port_open("127.0.0.1", 5672):
        message = "RabbitMQ is not answering on 127.0.0.1:5672 (start it: rabbitmq-server -detached)"
        if harness.in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def mongo() -> Iterator[harness.Mongo]:
    with harness.mongodb() as server:
        yield server


@pytest.fixture(scope="session")
def legacy_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.LegacySim]:
    sim = harness.start_legacy_sim(log=tmp_path_factory.mktemp("legacy") / "legacy-sim.log")
    yield sim
    sim.stop()


@pytest.fixture
def legacy(legacy_session: harness.LegacySim) -> harness.LegacySim:
    legacy_session.reset()
    return legacy_session


@pytest.fixture(scope="session")
def own_node() -> Iterator[Node]:
    """A RabbitMQ node of the tests' own, for tests that restart a broker or raise its alarms:
    the machine's broker, which the other tests share, is never touched."""
    if os.geteuid() != 0 or shutil.which("rabbitmq-server") is None:
        harness.unavailable("a broker of the tests' own runs as the rabbitmq user: it needs root and the "
                            "rabbitmq-server package")
    with ExitStack() as stack:
        try:
            # A node name of its own per pytest-xdist worker, should the group ever be split.
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            cluster = stack.enter_context(rabbit_cluster(1, prefix=f"solo-{worker}-"))
        except ClusterUnavailable as exc:
            harness.unavailable(f"cannot start a RabbitMQ node of the tests' own: {exc}")
            raise
        node = cluster.nodes[0]
        harness.NODE_BY_PORT[node.port] = node.name
        yield node


@pytest.fixture
def amqp_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh vhost: on the machine's broker, or on the tests' own node for a test marked
    `own_broker`."""
    if request.node.get_closest_marker("own_broker"):
        node: Node = request.getfixturevalue("own_node")
        name = f"test-{uuid.uuid4().hex[:10]}"
        ctl(node.name, "add_vhost", name)
        ctl(node.name, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:{node.port}/{name}"
        ctl(node.name, "delete_vhost", name)
        return
    _need_broker()
    with harness.vhost() as url:
        yield url


@pytest.fixture
def database() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def users(mongo: harness.Mongo, database: str) -> Iterator[Any]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri, tz_aware=True)
    yield client[database]["users"]
    client.drop_database(database)
    client.close()


@pytest.fixture
def broker(amqp_url: str) -> Iterator[harness.Broker]:
    client = harness.Broker(amqp_url)
    # Same arguments the services declare, so that order of start never matters.
    client.declare("registrations", "registrations.pending", "registrations.failed")
    yield client
    client.close()


@pytest.fixture
def failure_records(broker: harness.Broker, users: Any) -> FailureRecords:
    """Failure records put on the queue as the services put them: with their index entries."""
    return FailureRecords(broker, users.database)


class Stack:
    """The services under test, started from their console scripts."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.services: list[harness.Service] = []

    def start(self, name: str, **extra: str) -> harness.Service:
        index = sum(1 for s in self.services if s.name == name)
        service = harness.Service(name, {**self.env, **extra}, self.logs / f"{name}-{index}.log").start()
        self.services.append(service)
        service.wait_ready()
        return service

    def stop_all(self) -> None:
        for service in self.services:
            if service.process is not None:
                try:
                    service.terminate(timeout=20)
                except Exception:
                    service.kill()


@pytest.fixture
def stack(amqp_url: str, mongo: harness.Mongo, database: str, legacy: harness.LegacySim,
          tmp_path: Path) -> Iterator[Stack]:
    env = harness.service_env(rabbitmq_url=amqp_url, mongodb_uri=mongo.uri, database=database,
                              legacy_url=legacy.url)
    s = Stack(env, tmp_path)
    yield s
    s.stop_all()
