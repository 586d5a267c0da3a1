"""HTTP_HOST: /healthz, /readyz and /metrics listen on the address asked for, and only there;
loopback unless set (the images, charts and compose set 0.0.0.0)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import harness
import pytest
import requests
from conftest import Stack
from harness import Service, wait_until

pytestmark = pytest.mark.integration

# Another loopback address: on Linux the whole of 127.0.0.0/8 reaches this machine, so a server
# bound to 127.0.0.1 alone refuses a connection to 127.0.0.2, and the other way round.
OTHER = "127.0.0.2"


def answers(host: str, port: str) -> bool:
    try:
        return requests.get(f"http://{host}:{port}/readyz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def refused(host: str, port: str) -> bool:
    try:
        requests.get(f"http://{host}:{port}/readyz", timeout=2)
    except requests.ConnectionError:
        return True
    return False


@pytest.mark.parametrize("name", ["submitter", "poller"])
@pytest.mark.parametrize(("http_host", "there", "not_there"),
                         [(None, "127.0.0.1", OTHER), (OTHER, OTHER, "127.0.0.1"), ("0.0.0.0", OTHER, None)])
def test_the_server_listens_where_asked(stack: Stack, tmp_path: Path, name: str, http_host: str | None, there: str,
                                        not_there: str | None) -> None:
    env = dict(stack.env)
    env.pop("HTTP_HOST", None)
    if http_host is not None:
        env["HTTP_HOST"] = http_host
    service = Service(name, env, tmp_path / f"{name}.log").start()
    port = service.env["HTTP_PORT"]
    try:
        wait_until(lambda: answers(there, port), timeout=30, what=f"{name} ready on {there}:{port}")
        if not_there is not None:
            assert refused(not_there, port), f"{name} answered on {not_there} with HTTP_HOST={http_host}"
        else:  # every interface: loopback too
            assert answers("127.0.0.1", port)
        assert f'"msg": "health and metrics on {http_host or "127.0.0.1"} port {port}"' in service.log()
        assert service.terminate() == 0
    finally:
        service.kill()


def test_a_bad_http_host_is_a_settings_error() -> None:
    env = harness.service_env(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F",
                              mongodb_uri="mongodb://127.0.0.1:1/", database="x", legacy_url="http://127.0.0.1:9",
                              extra={"HTTP_HOST": "0.0.0.0:8081", "HTTP_PORT": str(harness.free_port())})
    result = subprocess.run([str(harness.BIN / "submitter")], env=env, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"HTTP_HOST: expected an IP address or a host name" in result.stderr
