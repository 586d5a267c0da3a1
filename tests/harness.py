"""Test harness: the real broker (a vhost per test), a real Mongo-wire server, the real legacy-sim,
and the real console scripts as subprocesses. Shared by the integration tests, the demo and the bench.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika
import requests

from regbridge.topology import work_queue

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# The operator command's sources in this checkout. A venv's editable install may point at another
# checkout (a git worktree shares the venv of the main one), so the tests put these first on the
# command's PYTHONPATH: the command they run is the code beside them.
CLI_SOURCES = (REPO / "tools" / "registrations" / "src", REPO / "libs" / "common" / "src")
T = TypeVar("T")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cli_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for running `registrations` from this checkout (see CLI_SOURCES)."""
    paths = [str(p) for p in CLI_SOURCES] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def run_cli(env: Mapping[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`registrations ARGS` from this checkout, with no terminal on stdin."""
    return subprocess.run([str(BIN / "registrations"), *args], env=cli_env(env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def cli_ok(env: Mapping[str, str], *args: str, timeout: float = 60) -> str:
    """Its stdout, once it has exited 0 without a traceback."""
    result = run_cli(env, *args, timeout=timeout)
    assert result.returncode == 0, f"registrations {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---- RabbitMQ ---------------------------------------------------------------------------------


# Brokers of the tests' own (`rabbit_cluster`), by AMQP port: `rabbitmqctl` must name their node.
NODE_BY_PORT: dict[int, str] = {}


def node_args(url: str) -> list[str]:
    """`-n <node>` for a broker of the tests' own, nothing for the machine's broker."""
    port = urlsplit(url).port or 5672
    return ["-n", NODE_BY_PORT[port]] if port in NODE_BY_PORT else []


def rabbitmqctl(*args: str, url: str = "") -> None:
    subprocess.run(["rabbitmqctl", *node_args(url), "-q", *args], check=True, capture_output=True, timeout=60)


MANAGEMENT = "http://127.0.0.1:15672/api"
_management: list[bool] = []  # learnt once per process: whether the HTTP API answers


def management_api() -> bool:
    """Whether RabbitMQ's management API answers on 15672 (enabled once if it does not).

    Each `rabbitmqctl` call boots an Erlang VM: about a second of CPU. A vhost per test made
    and removed that way costs three of them; over HTTP, milliseconds. `list_queues` stays on
    `rabbitmqctl`: the API's message counts are statistics, refreshed every few seconds."""
    if not _management:
        def answers() -> bool:
            try:
                return requests.get(f"{MANAGEMENT}/overview", auth=("guest", "guest"), timeout=5).ok
            except requests.RequestException:
                return False

        if not answers():
            subprocess.run(["rabbitmq-plugins", "-q", "enable", "rabbitmq_management"], capture_output=True,
                           timeout=120)
            with suppress(AssertionError):
                wait_until(answers, timeout=30, what="the management API", every=0.5)
        _management.append(answers())
    return _management[0]


def _api(method: str, path: str, body: Mapping[str, Any] | None = None) -> None:
    response = requests.request(method, f"{MANAGEMENT}/{path}", json=body, auth=("guest", "guest"), timeout=30)
    if method != "DELETE" or response.status_code != 404:
        response.raise_for_status()


@contextmanager
def vhost(prefix: str = "test") -> Iterator[str]:
    """A fresh vhost, removed afterwards, so that runs never see each other's queues."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    if management_api():
        _api("PUT", f"vhosts/{name}")
        _api("PUT", f"permissions/{name}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    else:
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        if management_api():
            with suppress(requests.RequestException):
                _api("DELETE", f"vhosts/{name}")
        else:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


class Broker:
    """A blocking client for the test's side of the broker: publish inbound, read queues."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connect()

    def connect(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def reconnect(self, timeout: float = 60) -> None:
        """After the broker dropped us (a test cut every connection, or restarted it)."""
        self.close()

        def connected() -> bool:
            try:
                self.connect()
            except pika.exceptions.AMQPError:
                return False
            return True

        wait_until(connected, timeout=timeout, what="the broker to take connections again", every=0.3)

    def declare(self, *queues: str) -> None:
        for name in queues:
            spec = work_queue(name)
            self.channel.queue_declare(name, durable=True, arguments=dict(spec.arguments))

    def publish(self, queue: str, body: bytes | Mapping[str, Any], *, message_id: str | None = None,
                timestamp: int | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties = pika.BasicProperties(delivery_mode=2, message_id=message_id, timestamp=timestamp)
        self.channel.basic_publish("", queue, data, properties, mandatory=True)

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take (and ack) everything on `queue` now."""
        taken = []
        while True:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((props, body))

    def in_pipeline(self, exclude: str) -> int:
        """Messages, ready or unacknowledged, in every queue of this vhost but `exclude`."""
        vhost = self.url.rsplit("/", 1)[1]
        out = subprocess.run(["rabbitmqctl", *node_args(self.url), "-q", "list_queues", "-p", vhost,
                              "--no-table-headers", "name", "messages"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        total = 0
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name and name != exclude:
                total += int(count)
        return total

    def depth(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def ready_elsewhere(self, exclude: str) -> int | None:
        """Ready messages in every queue of this vhost but `exclude`, read live over AMQP (the
        declare-ok counts), or None where the management API that names the queues is not there
        (a broker of the tests' own). Unacknowledged messages are not counted: `in_pipeline`
        is the reading that holds them, at a second of CPU for the `rabbitmqctl` it boots."""
        port = urlsplit(self.url).port or 5672
        if port in NODE_BY_PORT or not management_api():
            return None
        vhost = self.url.rsplit("/", 1)[1]
        response = requests.get(f"{MANAGEMENT}/queues/{vhost}", params={"columns": "name", "disable_stats": "true"},
                                auth=("guest", "guest"), timeout=30)
        response.raise_for_status()
        total = 0
        for name in (q["name"] for q in response.json() if q["name"] != exclude):
            try:
                total += self.depth(name)
            except pika.exceptions.ChannelClosedByBroker:  # deleted since it was listed
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
        return total

    def wait_drained(self, exclude: str, *, timeout: float = 60) -> None:
        """Until no queue but `exclude` holds a message, ready or unacknowledged. Three empty
        readings in a row, 0.3 s apart: a message being dead-lettered from a wait queue to
        pending is counted in neither for a moment. The readings are the live ready counts, and
        the last also counts what consumers hold (`in_pipeline`), once rather than at every
        reading: each is an Erlang VM booted."""
        empty = [0]

        def drained() -> bool:
            ready = self.ready_elsewhere(exclude)
            if ready is None:
                ready = self.in_pipeline(exclude)
                empty[0] = empty[0] + 1 if ready == 0 else 0
                return empty[0] >= 3
            empty[0] = empty[0] + 1 if ready == 0 else 0
            if empty[0] < 3:
                return False
            if self.in_pipeline(exclude) == 0:
                return True
            empty[0] = 0
            return False

        wait_until(drained, timeout=timeout, what=f"every queue but {exclude} to drain", every=0.3)

    def queue_report(self) -> str:
        """Every queue of this vhost with its counts, and the broker's alarms: what a failed wait shows."""
        vhost = self.url.rsplit("/", 1)[1]
        queues = subprocess.run(["rabbitmqctl", *node_args(self.url), "-q", "list_queues", "-p", vhost, "name",
                                 "messages", "messages_ready", "messages_unacknowledged", "leader", "online"],
                                capture_output=True, text=True, timeout=60)
        alarms = subprocess.run(["rabbitmqctl", *node_args(self.url), "-q", "list_alarms"], capture_output=True,
                                text=True, timeout=60)
        return f"{queues.stdout}{queues.stderr}alarms: {alarms.stdout.strip() or 'none'} {alarms.stderr.strip()}"

    def publish_in_order(self, queue: str, messages: list[tuple[str, bytes]], *, timeout: float = 60) -> None:
        """Put `messages` (message id, body) on `queue`, empty before, in this order, fast: one
        channel publishes them without waiting on each, then one last publish it waits for.

        The broker confirms a message once its queue has taken it, and a queue takes one channel's
        messages in the order they were published, so the last one's confirm covers them all. The
        channel stays open until then: an unconfirmed publish is the broker's to lose, and a
        channel closed with publishes in flight is when it can. The depth is then checked too."""
        if not messages:
            return
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            for message_id, body in messages[:-1]:
                channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, message_id=message_id))
            channel.confirm_delivery()
            last_id, last_body = messages[-1]
            channel.basic_publish("", queue, last_body, pika.BasicProperties(delivery_mode=2, message_id=last_id),
                                  mandatory=True)
        finally:
            with suppress(pika.exceptions.AMQPError):
                connection.close()
        seen: list[int] = []

        def all_there() -> bool:
            seen.append(self.depth(queue))
            return seen[-1] == len(messages)

        try:
            wait_until(all_there, timeout=timeout, what=f"{len(messages):,} messages on {queue}", every=0.1)
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; the depth read {seen[-1]:,} last (first {seen[0]:,});\n"
                                 f"{self.queue_report()}") from None

    def close(self) -> None:
        with suppress(Exception):
            self.connection.close()


# ---- MongoDB ----------------------------------------------------------------------------------


@dataclass
class Mongo:
    uri: str
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    storage: str = ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def start(self) -> None:
        """(Re)start the SecantusDB server on the same port and storage."""
        assert self.process is None and self.storage
        self.process = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--port", str(self.port), "--storage-path", self.storage,
             "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout=30, what="SecantusDB to listen")


def start_secantus(storage: str | None = None) -> Mongo:
    mongo = Mongo(uri="", port=free_port(), storage=storage or tempfile.mkdtemp(prefix="secantus-"))
    mongo.uri = f"mongodb://127.0.0.1:{mongo.port}/"
    mongo.start()
    return mongo


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def mongodb() -> Iterator[Mongo]:
    """MONGODB_URI if set; else testcontainers when a Docker engine answers; else SecantusDB."""
    if os.environ.get("MONGODB_URI"):
        yield Mongo(uri=os.environ["MONGODB_URI"])
        return
    if docker_answers():
        from testcontainers.mongodb import MongoDbContainer

        with MongoDbContainer("mongo:7") as container:
            yield Mongo(uri=container.get_connection_url())
        return
    mongo = start_secantus()
    try:
        yield mongo
    finally:
        mongo.stop()
        shutil.rmtree(mongo.storage, ignore_errors=True)


# ---- legacy-sim -------------------------------------------------------------------------------

FAST_LEGACY = {
    "LEGACY_SIM_LATENCY_MIN_S": "0.3",
    "LEGACY_SIM_LATENCY_MAX_S": "0.6",
    "LEGACY_SIM_ACCEPT_LATENCY_S": "0.005",
    "LEGACY_SIM_RETRY_AFTER_S": "0.1",
}


@dataclass
class LegacySim:
    url: str
    process: subprocess.Popen[bytes]
    defaults: dict[str, Any] = field(default_factory=dict)

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = requests.patch(f"{self.url}/admin/config", json=changes, timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        requests.post(f"{self.url}/admin/reset", timeout=5).raise_for_status()
        self.configure(**self.defaults)

    def stats(self, summary: bool = False) -> dict[str, Any]:
        response = requests.get(f"{self.url}/admin/stats", params={"summary": "1"} if summary else None, timeout=30)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def await_answer(process: subprocess.Popen[bytes], url: str, *, what: str, log: Path | None = None,
                 timeout: float = 30) -> None:
    """Until `url` answers 200; at once an error, with the end of `log`, if `process` exits first."""
    def answers() -> bool:
        if process.poll() is not None:
            tail = f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""
            raise AssertionError(f"{what} exited with {process.returncode}{tail}")
        try:
            return requests.get(url, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, timeout=timeout, what=f"{what} to answer {url}")


_BOUNDS = ("LEGACY_SIM_LATENCY_MIN_S", "LEGACY_SIM_LATENCY_MAX_S")
_PROFILE = "LEGACY_SIM_LATENCY_PROFILE"


def latency_env(min_s: float, max_s: float, profile: str | None = None) -> dict[str, str]:
    """legacy-sim's latency settings: the profile when one is given (such as `lognormal:15,0.5`
    or `uniform:10,20 for 300 then uniform:40,80`), else the bounds of the uniform one. Never
    both: legacy-sim refuses that."""
    if profile is not None:
        return {_PROFILE: profile}
    return {_BOUNDS[0]: str(min_s), _BOUNDS[1]: str(max_s)}


def start_legacy_sim(env: Mapping[str, str] | None = None, log: Path | None = None, *,
                     latency_profile: str | None = None) -> LegacySim:
    """Starts legacy-sim with FAST_LEGACY's settings, overridden by `env`. A `latency_profile`
    (or LEGACY_SIM_LATENCY_PROFILE in `env`) replaces FAST_LEGACY's latency bounds."""
    port = free_port()
    given = {**(env or {}), **({_PROFILE: latency_profile} if latency_profile is not None else {})}
    fast = {k: v for k, v in FAST_LEGACY.items() if not (_PROFILE in given and k in _BOUNDS)}
    # As FAST_LEGACY's bounds override the caller's environment, so does leaving the profile out.
    inherited = {k: v for k, v in os.environ.items() if k != _PROFILE}
    full = {**inherited, **fast, **given, "HTTP_PORT": str(port), "LEGACY_SIM_HOST": "127.0.0.1"}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    process = subprocess.Popen([str(BIN / "legacy-sim")], env=full, stdout=out, stderr=subprocess.STDOUT)
    sim = LegacySim(url=f"http://127.0.0.1:{port}", process=process)
    await_answer(process, f"{sim.url}/healthz", what="legacy-sim", log=log)
    sim.defaults = {k: v for k, v in requests.get(f"{sim.url}/admin/config", timeout=5).json().items()
                    # The profile stands for the bounds too, whatever its kind.
                    if k in ("latency_profile", "accept_latency_s", "post_503_rate",
                             "get_503_rate", "retry_after_s", "fail_prefix", "down", "response_delay_s")}
    return sim


# ---- the services -----------------------------------------------------------------------------


@dataclass
class Service:
    """One running copy of `submitter` or `poller`, as a user would start it."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.env["HTTP_PORT"] = str(free_port())
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen([str(BIN / self.name)], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.env['HTTP_PORT']}"

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.http}/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        def ok() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            return self.ready()

        wait_until(ok, timeout=timeout, what=f"{self.name} to be ready")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def terminate(self, timeout: float = 40) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# What the services' image sets (services/pipeline.Dockerfile): no per-thread cache of freed
# blocks in glibc's malloc, which otherwise lets each worker thread's memory grow for hours
# (docs/design.md, Memory). The services run here as they run in production.
ALLOCATOR_ENV = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}


def service_env(*, rabbitmq_url: str, mongodb_uri: str, database: str, legacy_url: str,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        **ALLOCATOR_ENV,
        **{k: v for k, v in os.environ.items() if not k.startswith(("POLL_", "LEGACY_SIM_"))},
        "RABBITMQ_URL": rabbitmq_url,
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DATABASE": database,
        "MONGODB_COLLECTION": "users",
        "LEGACY_API_URL": legacy_url,
        "POLL_FIRST_DELAY_S": "0.3",
        "POLL_INTERVAL_S": "0.2",
        "POLL_DEADLINE_S": "20",
        "SUBMIT_BACKOFF_BASE_S": "0.05",
        "SUBMIT_BACKOFF_MAX_S": "0.5",
        "RECONNECT_MAX_S": "1",
        "SHUTDOWN_TIMEOUT_S": "10",
        "LOG_LEVEL": "INFO",
        **(extra or {}),
    }


# ---- deployment tools -------------------------------------------------------------------------


def unavailable(message: str) -> None:
    """A real tool or service the test needs is missing: fail under CI, skip on a developer's machine."""
    import pytest

    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def fetch_tools(*needed: str) -> dict[str, Path]:
    """scripts/tools.sh fetches the tools into .tools/ (once) and prints `name=path` lines."""
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["bash", str(root / "scripts" / "tools.sh")], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "VENV": sys.prefix})
    except (OSError, subprocess.TimeoutExpired) as exc:
        unavailable(f"scripts/tools.sh could not run: {exc}")
        raise
    if done.returncode != 0:
        unavailable(f"scripts/tools.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    paths = {name: Path(path) for name, path in found.items()}
    for name in needed:
        if name not in paths or not os.access(paths[name], os.X_OK):
            unavailable(f"scripts/tools.sh did not provide {name}")
    return paths
