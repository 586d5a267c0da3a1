"""RabbitMQ nodes of the tests' own on this machine, from the installed Debian package: a
cluster of three, or one node that a test may restart or put under an alarm without touching
the machine's broker.

Each node runs as the `rabbitmq` user with its own node name (`rN@localhost`), AMQP and
distribution ports, data and log directories, configuration file and an empty enabled-plugins
file, all under one temporary directory; the nodes share the system's Erlang cookie (the
`rabbitmq` user's home), so `rabbitmqctl -n rN@localhost` reaches each of them. The nodes form
their own cluster: the machine's own broker on 5672 is never part of it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from harness import port_open

STARTUP_S = 90.0
# Below the kernel's ephemeral range (32768 and up): no outgoing connection takes one of these
# as its local port in the seconds between choosing it and the node binding it.
QUIET_PORTS = range(21000, 29000)


def quiet_port() -> int:
    """A port below the ephemeral range that nothing listens on now."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(QUIET_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterUnavailable("no free port below the ephemeral range")


class ClusterUnavailable(RuntimeError):
    """A node could not be started or joined; the message holds what RabbitMQ said."""


def ctl(node: str, *args: str, timeout: float = 120, tool: str = "rabbitmqctl") -> str:
    done = subprocess.run([tool, "-n", node, "-q", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise ClusterUnavailable(f"{tool} -n {node} {' '.join(args)} failed ({done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


@dataclass
class Node:
    index: int
    base: Path
    port: int
    dist_port: int
    prefix: str = "r"

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.index}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def address(self) -> str:
        """How the services' /readyz names this node."""
        return f"127.0.0.1:{self.port}"

    @property
    def dir(self) -> Path:
        return self.base / f"{self.prefix}{self.index}"

    def env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            # Its own files, not /etc/rabbitmq's, which bind the machine's broker to 5672.
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def prepare(self) -> None:
        d = self.dir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("")
        (d / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (d / "rabbitmq-env.conf").write_text('ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')

    def start(self) -> None:
        (self.dir / "pid").unlink(missing_ok=True)
        done = subprocess.run(["rabbitmq-server", "-detached"], env=self.env(), capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise ClusterUnavailable(f"rabbitmq-server -detached for {self.name} failed ({done.returncode}): "
                                     f"{(done.stderr or done.stdout).strip()[-1500:]}")

    def await_startup(self, timeout: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                ctl(self.name, "await_startup", "--timeout", "10", timeout=30)
                if port_open("127.0.0.1", self.port):
                    return
                last = f"started, but nothing listens on its AMQP port {self.port}"
            except (ClusterUnavailable, subprocess.TimeoutExpired) as exc:
                last = str(exc)
                time.sleep(0.5)
        raise ClusterUnavailable(f"{self.name} did not start within {timeout:.0f} s: {last}\n{self.log_tail()}")

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL, as a machine or a container that dies: no goodbye to peers or clients."""
        pid = self.pid()
        if pid is None:
            raise ClusterUnavailable(f"no pid file for {self.name}")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise ClusterUnavailable(f"{self.name} (pid {pid}) still runs after SIGKILL")

    def stop(self) -> None:
        """A graceful stop, as `kubectl delete pod` or a rolling restart does; waits for the exit."""
        ctl(self.name, "stop", str(self.dir / "pid"), timeout=120)

    def log_tail(self) -> str:
        logs = sorted((self.dir / "log").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs[:1])


class Cluster:
    def __init__(self, base: Path, size: int = 3, prefix: str = "r") -> None:
        self.nodes = [Node(i, base, quiet_port(), quiet_port(), prefix) for i in range(1, size + 1)]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def running(self) -> Node:
        """A node that answers, for commands about the whole cluster."""
        for node in self.nodes:
            with suppress(ClusterUnavailable, subprocess.TimeoutExpired):
                ctl(node.name, "ping", timeout=15, tool="rabbitmq-diagnostics")
                return node
        raise ClusterUnavailable("no node of the cluster answers")

    def form(self) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.await_startup()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            ctl(node.name, "stop_app")
            ctl(node.name, "join_cluster", first.name)
            ctl(node.name, "start_app")
        for node in self.nodes:
            node.await_startup()
        status = ctl(first.name, "cluster_status", "--formatter", "json")
        for node in self.nodes:
            if f'"{node.name}"' not in status:
                raise ClusterUnavailable(f"{node.name} is not in the cluster: {status[:1000]}")

    def leader(self, queue: str, vhost: str = "/") -> str:
        out = ctl(self.running().name, "list_queues", "-p", vhost, "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return leader.strip()
        raise ClusterUnavailable(f"queue {queue!r} not found: {out[:500]}")

    def messages(self, vhost: str = "/") -> dict[str, int]:
        """Each queue's messages, ready or unacknowledged."""
        out = ctl(self.running().name, "list_queues", "-p", vhost, "--no-table-headers", "name", "messages")
        counts = {}
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name:
                counts[name] = int(count)
        return counts

    def await_quorum_plus_one(self, node: Node) -> None:
        """Until stopping `node` leaves every quorum queue a majority (rabbitmq-upgrade's check
        before a rolling restart takes a node down)."""
        ctl(node.name, "await_online_quorum_plus_one", "-t", "120", timeout=150, tool="rabbitmq-upgrade")

    def kill_all(self) -> None:
        """The end of a throwaway cluster: nothing on it is kept, so nothing is waited for."""
        for node in self.nodes:
            with suppress(ClusterUnavailable, OSError):
                node.kill()


@contextmanager
def rabbit_cluster(size: int = 3, prefix: str = "r") -> Iterator[Cluster]:
    """A fresh cluster (of one node, with `size` 1), killed and removed afterwards. Node names
    start with `prefix`: two clusters at once need two prefixes."""
    base = Path(tempfile.mkdtemp(prefix=f"rabbit-{prefix}-"))
    shutil.chown(base, "rabbitmq", "rabbitmq")
    os.chmod(base, 0o755)
    cluster = Cluster(base, size, prefix)
    try:
        for node in cluster.nodes:
            node.prepare()
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
        cluster.form()
        yield cluster
    finally:
        cluster.kill_all()
        shutil.rmtree(base, ignore_errors=True)
