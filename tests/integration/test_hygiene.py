"""Credentials inside RABBITMQ_URL and MONGODB_URI never appear in logs, error messages, failure
records or metrics: in a live run with real credentials, and on every start-up error path."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import harness
import pytest
import requests
from conftest import Stack
from harness import Broker, Mongo, Service, wait_until
from outcomes import INBOUND, Outcomes, good
from pymongo import MongoClient

pytestmark = pytest.mark.integration


def token() -> str:
    return uuid.uuid4().hex[:10]


def assert_hidden(secrets: list[str], places: dict[str, str]) -> None:
    """No secret (nor its URL-encoded form) appears in any of `places` (name -> text)."""
    forms = {form for secret in secrets for form in (secret, quote(secret, safe=""))}
    leaks = [(where, form) for where, text in places.items() for form in forms if form in text]
    assert not leaks, f"credentials leaked: {leaks}"


def need_broker() -> None:
    if not harness.port_open("127.0.0.1", 5672):
        message = "RabbitMQ is not answering on 127.0.0.1:5672"
        if harness.in_ci():
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def rabbit_user(vhost: str) -> Iterator[tuple[str, str, list[str]]]:
    """A broker user with a password holding an '@', allowed on `vhost`; removed afterwards.
    Yields the name, the password, and the fragments of the password that must never show."""
    head, tail = f"S3cr3t{token()}", f"Pw-{token()}"
    name, password = f"bridge-{token()}", f"{head}@{tail}"
    harness.rabbitmqctl("add_user", name, password)
    try:
        harness.rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield name, password, [password, head, tail]
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)


@contextmanager
def mongo_user(mongo: Mongo, database: str) -> Iterator[tuple[str | None, list[str]]]:
    """A MongoDB URI with credentials that work against the test's server, and the password's
    fragments; (None, []) where the server cannot take such a user.

    SecantusDB (the default test server) accepts `createUser`, runs SCRAM and refuses a wrong
    password, so there the live run carries credentials in MONGODB_URI too. A server given by
    MONGODB_URI, or a container that already requires its own credentials, is left alone: then
    MONGODB_URI's credentials are covered by the start-up error tests below only."""
    parts = urlsplit(mongo.uri)
    if parts.username or not parts.hostname:
        yield None, []
        return
    head, tail = f"M0ngo{token()}", f"Pw-{token()}"
    name, password = f"mongo-{token()}", f"{head}@{tail}"
    admin: MongoClient[dict[str, Any]] = MongoClient(mongo.uri, serverSelectionTimeoutMS=5000)
    try:
        try:
            admin.admin.command("createUser", name, pwd=password, roles=[{"role": "readWrite", "db": database}])
        except Exception:
            yield None, []
            return
        uri = f"mongodb://{quote(name, safe='')}:{quote(password, safe='')}@{parts.netloc}/?authSource=admin"
        probe: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=5000)
        try:
            probe[database]["users"].find_one({})
            works = True
        except Exception:
            works = False
        finally:
            probe.close()
        try:
            yield (uri, [password, head, tail]) if works else (None, [])
        finally:
            with suppress(Exception):
                admin.admin.command("dropUser", name)
    finally:
        admin.close()


def test_credentials_never_show_in_a_live_run(stack: Stack, broker: Broker, users: Any, amqp_url: str,
                                              mongo: Mongo, database: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    with (
        rabbit_user(vhost) as (user, password, rabbit_secrets),
        mongo_user(mongo, database) as (mongo_uri, mongo_secrets),
    ):
        # Two brokers, the first one down: its refusal is logged too, and the setting shown.
        live = f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:5672/{vhost}"
        stack.env["RABBITMQ_URL"] = f"{live.replace(':5672/', ':1/')},{live}"
        stack.env["RABBITMQ_URL_ORDER"] = "listed"
        if mongo.process is not None:  # our own SecantusDB: credentials must work there
            assert mongo_uri is not None, "SecantusDB must take a user with a password"
        if mongo_uri is not None:
            stack.env["MONGODB_URI"] = mongo_uri
        secrets = rabbit_secrets + mongo_secrets
        submitter = stack.start("submitter")
        poller = stack.start("poller")

        for i in range(3):
            broker.publish(INBOUND, good(f"ok-{i}"), message_id=f"ok-{i}")
        broker.publish(INBOUND, good("bad-cpf", cpf="123"), message_id="bad-cpf")
        broker.publish(INBOUND, b"{not json", message_id="bad-json")
        broker.publish(INBOUND, good("refused", name="FAIL Maria"), message_id="refused")
        outcomes = Outcomes(broker, users)
        outcomes.wait(registered=3, failed=3)
        assert sorted(r["error"]["stage"] for r in outcomes.failures) == ["legacy", "submit", "validation"]

        places: dict[str, str] = {}
        for service in (submitter, poller):
            for path in ("/metrics", "/readyz", "/healthz"):
                response = requests.get(service.http + path, timeout=5)
                assert response.status_code == 200, (service.name, path, response.status_code)
                places[f"{service.name} {path}"] = response.text
        assert "submitter_failures_total" in places["submitter /metrics"]
        for i, record in enumerate(outcomes.failures):
            places[f"failure record {i}"] = json.dumps(record, ensure_ascii=False)
        places["user documents"] = json.dumps(list(users.find({})), default=str)
        attempts = users.database[users.name + ".attempts"]
        places["attempt documents"] = json.dumps(list(attempts.find({})), default=str)

        assert submitter.terminate() == 0
        assert poller.terminate() == 0
        for service in (submitter, poller):
            log = service.log()
            # The URLs were logged, redacted: the check below looks where a leak would be.
            assert f"amqp://***@127.0.0.1:5672/{vhost}" in log, log[:2000]
            if mongo_uri is not None:
                assert "mongodb://***@" in log
            places[f"{service.name} log"] = log
        assert_hidden(secrets, places)


# ---- start-up error paths ---------------------------------------------------------------------


def error_env(rabbitmq_url: str, mongodb_uri: str, **extra: str) -> dict[str, str]:
    return harness.service_env(rabbitmq_url=rabbitmq_url, mongodb_uri=mongodb_uri, database="hygiene",
                               legacy_url="http://127.0.0.1:9", extra={"HTTP_PORT": str(harness.free_port()),
                                                                       **extra})


def run_to_exit(name: str, env: dict[str, str], timeout: float = 30) -> tuple[int | None, str]:
    """Run a service that should refuse to start; (exit code or None if it kept running, output)."""
    process = subprocess.Popen([str(harness.BIN / name)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output.decode(errors="replace")
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return None, output.decode(errors="replace")


@pytest.mark.parametrize("name", ["submitter", "poller"])
def test_a_settings_error_names_the_variable_and_shows_no_credentials(name: str) -> None:
    secret, mongo_secret = f"Rb{token()}@x", f"Mg{token()}@y"
    env = error_env(f"amqp://bridge:{quote(secret, safe='')}@127.0.0.1:5672/%2F",
                    f"mongodb://bridge:{quote(mongo_secret, safe='')}@127.0.0.1:27017/?authSource=admin",
                    POLL_INTERVAL_S="abc")
    code, output = run_to_exit(name, env)
    assert code is not None and code != 0, f"{name} did not refuse to start (exit {code}):\n{output[-2000:]}"
    assert "POLL_INTERVAL_S" in output, output[-2000:]
    assert_hidden([secret, mongo_secret], {f"{name} output": output})


@pytest.mark.parametrize("name", ["submitter", "poller"])
@pytest.mark.parametrize("broker_kind", ["closed port", "login refused"])
def test_unreachable_services_with_credentials_show_none(name: str, broker_kind: str, tmp_path: Path) -> None:
    secret, mongo_secret = f"Rb{token()}@x", f"Mg{token()}@y"
    if broker_kind == "closed port":
        broker_at = f"127.0.0.1:{harness.free_port()}"
    else:
        need_broker()  # a real broker refuses an unknown user: its error path, not a socket's
        broker_at = "127.0.0.1:5672"
    env = error_env(f"amqp://bridge-nobody:{quote(secret, safe='')}@{broker_at}/%2F",
                    f"mongodb://bridge:{quote(mongo_secret, safe='')}@127.0.0.1:{harness.free_port()}/"
                    "?authSource=admin")
    service = Service(name, env, tmp_path / f"{name}.log").start()
    try:
        wait_until(lambda: '"event": "connect_failed"' in service.log(), timeout=30,
                   what=f"{name} to log a broker connect failure")
        assert service.process is not None and service.process.poll() is None, service.log()[-2000:]
        assert service.terminate(timeout=20) == 0
    finally:
        service.kill()
    log = service.log()
    if broker_kind == "login refused":
        assert "ACCESS_REFUSED" in log, log[-2000:]
    assert_hidden([secret, mongo_secret], {f"{name} log": log})


# Each case: the variable, its value with {pw} where the password goes, and whether the start
# must fail as a settings error naming the variable. The ones with an unescaped '/' or '?' in
# the password are malformed URLs a hurried operator writes; their password must not show either.
MALFORMED = {
    "amqpx scheme": ("RABBITMQ_URL", "amqpx://u:{pw}@127.0.0.1:5672/", True),
    "mongo scheme": ("MONGODB_URI", "mongo://u:{pw}@127.0.0.1:27017/", True),
    "amqp bad port": ("RABBITMQ_URL", "amqp://u:{pw}@127.0.0.1:notaport/%2F", False),
    "amqp slash in password": ("RABBITMQ_URL", "amqp://u:{pw}/rest@127.0.0.1:5672/%2F", False),
    "amqp question mark in password": ("RABBITMQ_URL", "amqp://u:{pw}?rest@127.0.0.1:5672/%2F", False),
    "mongodb slash in password": ("MONGODB_URI", "mongodb://u:{pw}/rest@127.0.0.1:27017/", False),
    "mongodb unescaped colon": ("MONGODB_URI", "mongodb://u:{pw}:rest@127.0.0.1:27017/", False),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_url_shows_no_credentials(case: str) -> None:
    variable, template, settings_error = MALFORMED[case]
    secret = f"S3cr3t{token()}"
    value = template.format(pw=secret)
    # The other URL is well-formed, at a closed port: only `variable` can be the problem.
    env = error_env(f"amqp://guest:guest@127.0.0.1:{harness.free_port()}/%2F",
                    f"mongodb://127.0.0.1:{harness.free_port()}/")
    env[variable] = value
    code, output = run_to_exit("submitter", env)
    assert_hidden([secret], {f"submitter output ({case})": output})
    assert code is not None and code != 0, f"started with {variable} malformed (exit {code}):\n{output[-2000:]}"
    if settings_error:
        assert variable in output and code == 2, (code, output[-2000:])
