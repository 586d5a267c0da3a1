"""What the services' logs never hold, on the real broker, MongoDB wire and legacy-sim: a broker
password with a space (valid, percent-encoded) in any form, and, at LOG_LEVEL=DEBUG, any user
field (name, email, cpf) of registrations of every outcome."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, quote_plus

import harness
import pytest
import requests
from conftest import Stack
from harness import Broker
from outcomes import INBOUND, Outcomes, good

pytestmark = pytest.mark.integration


def token() -> str:
    return uuid.uuid4().hex[:10]


@contextmanager
def rabbit_user(vhost: str, password: str) -> Iterator[str]:
    """A broker user with `password`, allowed on `vhost`; removed afterwards."""
    name = f"bridge-{token()}"
    harness.rabbitmqctl("add_user", name, password)
    try:
        harness.rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)


def forms(secret: str) -> set[str]:
    """The ways a secret could show: as is, URL-encoded both ways, and each part around a space."""
    return {secret, quote(secret, safe=""), quote_plus(secret), *(part for part in secret.split() if len(part) > 3)}


def test_a_password_with_a_space_never_shows(stack: Stack, broker: Broker, users: Any, amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    # Valid once percent-encoded: a space, and '#', '%', '/', '@' that a URL must encode too.
    password = f"Sp ace-{token()} #%/@-Tail{token()}"
    with rabbit_user(vhost, password) as user:
        live = f"amqp://{user}:{quote(password, safe='')}@127.0.0.1:5672/{vhost}"
        # The first node down: its refusal is logged with the URL too.
        stack.env["RABBITMQ_URL"] = f"{live.replace(':5672/', ':1/')},{live}"
        stack.env["RABBITMQ_URL_ORDER"] = "listed"
        stack.env["LOG_LEVEL"] = "DEBUG"
        submitter, poller = stack.start("submitter"), stack.start("poller")
        broker.publish(INBOUND, good(f"space-{token()}"))
        Outcomes(broker, users).wait(registered=1, failed=0)
        assert submitter.terminate() == 0 and poller.terminate() == 0
    for service in (submitter, poller):
        log = service.log()
        # It logged the URLs it connected to, redacted whole: the place a leak would be.
        assert f'"msg": "connecting to amqp://***@127.0.0.1:5672/{vhost}"' in log, log[:3000]
        assert '"event": "connect_failed"' in log
        leaks = sorted(form for form in forms(password) if form in log)
        assert not leaks, f"{service.name} logged {leaks}"


@pytest.mark.parametrize(("command", "variable"), [(["submitter"], "RABBITMQ_URL"), (["poller"], "MONGODB_URI"),
                                                   (["registrations", "status", "u-1"], "RABBITMQ_URL"),
                                                   (["registrations", "inspect"], "RABBITMQ_MANAGEMENT_URL")])
def test_a_raw_space_in_a_url_is_refused_by_name(command: list[str], variable: str) -> None:
    secret = f"Sp ace-{token()}"
    env = harness.cli_env(harness.service_env(
        rabbitmq_url=f"amqp://127.0.0.1:{harness.free_port()}/%2F", mongodb_uri=f"mongodb://127.0.0.1:{harness.free_port()}/",
        database="hygiene", legacy_url="http://127.0.0.1:9", extra={"HTTP_PORT": str(harness.free_port())}))
    scheme = {"RABBITMQ_URL": "amqp", "MONGODB_URI": "mongodb", "RABBITMQ_MANAGEMENT_URL": "http"}[variable]
    env[variable] = f"{scheme}://bridge:{secret}@127.0.0.1:{harness.free_port()}/"
    result = subprocess.run([str(harness.BIN / command[0]), *command[1:]], env=env, capture_output=True, timeout=60)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 2, output
    assert f"{variable}: expected a URL" in output and "whitespace or a control character" in output, output
    assert not {form for form in forms(secret) if form in output}, output


# ---- LOG_LEVEL=DEBUG: no user field in any log line ------------------------------------------


class People:
    """Registrations whose user fields are distinctive values, and the list of those values."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.fields: list[str] = []

    def person(self, i: int, **overrides: Any) -> dict[str, Any]:
        tag = self.tag
        name, email = f"Zq{tag}Name{i}", f"zq{tag}mail{i}@example.com"
        cpf = f"{int(tag[:6], 16) % 10**6:06d}{i:05d}"
        self.fields.extend([name, email, f"zq{tag}mail{i}", cpf])
        self.fields.extend(str(v) for k, v in overrides.items() if k != "user_id")
        return {**good(f"debug-{tag}-{i}"), "name": name, "email": email, "cpf": cpf, **overrides}

    def first_batch(self) -> list[tuple[str, bytes | dict[str, Any]]]:
        """Registered ones, and the failures of stages submit, legacy and validation (twice)."""
        no_id = self.person(6)
        del no_id["user_id"]
        raw = f'{{"user_id": "debug-{self.tag}-7", "name": "Zq{self.tag}Raw", "cpf": '.encode()
        self.fields.append(f"Zq{self.tag}Raw")
        return [
            *((f"ok-{i}", self.person(i)) for i in range(4)),  # registered, some after 503s
            ("submit", self.person(4, cpf=f"Cpf{self.tag}Bad")),  # legacy 400
            ("legacy", self.person(5, name=f"FAIL Zq{self.tag}Refused")),  # legacy answers failed
            ("validation", no_id),  # no user_id: the original is kept in the record
            ("not-json", raw),  # the raw text is kept in the record
        ]


def run_at_debug(stack: Stack, broker: Broker, users: Any, legacy: harness.LegacySim,
                 third_party: str, *, every_stage: bool = True) -> tuple[dict[str, str], list[str]]:
    """The real pipeline at LOG_LEVEL=DEBUG on a few registrations: registered, and failed at
    every stage but `store`, with 503s and their retries on both calls. The services' logs, and
    the user fields they must not hold."""
    tag = token()
    # Every POST is refused until one has been, so a retry is certain; then three in ten are.
    legacy.configure(post_503_rate=1.0, get_503_rate=0.3)
    # Long enough for the others under load; the slow one below outlives it.
    stack.env.update(LOG_LEVEL="DEBUG", LOG_LEVEL_THIRD_PARTY=third_party, POLL_DEADLINE_S="8")
    submitter, poller = stack.start("submitter"), stack.start("poller")
    people = People(tag)
    for message_id, body in people.first_batch():
        broker.publish(INBOUND, body, message_id=message_id)
    harness.wait_until(lambda: legacy.stats(summary=True)["post_503_total"] >= 1, timeout=30, what="a POST refused")
    legacy.configure(post_503_rate=0.3)
    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=4, failed=4)
    if not every_stage:
        assert submitter.terminate() == 0 and poller.terminate() == 0
        return {"submitter": submitter.log(), "poller": poller.log()}, people.fields
    # The two other stages: an id the legacy API forgets (404: poll), one it never finishes (timeout).
    legacy.configure(post_503_rate=0, get_503_rate=0, latency_min_s=60, latency_max_s=60)
    for i, stage in ((8, "poll"), (9, "timeout")):
        user_id = f"debug-{tag}-{i}"
        broker.publish(INBOUND, people.person(i), message_id=stage)
        if stage == "poll":
            harness.wait_until(lambda u=user_id: (users.find_one({"_id": u}) or {}).get("registration_status")
                               == "submitted", timeout=30, what=f"{user_id} submitted")
            requests.post(f"{legacy.url}/admin/reset", timeout=5).raise_for_status()  # forgets it, keeps the config
        outcomes.wait(registered=4, failed=5 if stage == "poll" else 6)
    stages = sorted(r["error"]["stage"] for r in outcomes.failures)
    assert stages == ["legacy", "poll", "submit", "timeout", "validation", "validation"], stages
    # The records keep the user's data (the contract's `original`): the logs are what must not.
    assert any(f"Cpf{tag}Bad" in str(r["original"]) for r in outcomes.failures)
    assert submitter.terminate() == 0 and poller.terminate() == 0
    return {"submitter": submitter.log(), "poller": poller.log()}, people.fields


@pytest.mark.long
def test_debug_logs_hold_no_user_field(stack: Stack, broker: Broker, users: Any,
                                       legacy: harness.LegacySim) -> None:
    logs, fields = run_at_debug(stack, broker, users, legacy, third_party="WARNING")
    for name, log in logs.items():
        lines = log.splitlines()
        # DEBUG was on, and the run is there to be looked at: submissions, retries, outcomes.
        assert '"log_level": "DEBUG"' in log or "'log_level': 'DEBUG'" in log, lines[:3]
        events = set(re.findall(r'"event": "([a-z_]+)"', log))
        expected = {"submitted", "submit_retry", "invalid"} if name == "submitter" else {"registered", "failed"}
        assert expected <= events, (name, sorted(events))
        leaks = [(field, line[:300]) for line in lines for field in fields if field in line]
        assert not leaks, f"{name} logged user fields: {leaks[:5]}"
        print(f"{name}: {len(lines)} log lines at DEBUG, none with a user field")


def test_the_libraries_debug_logs_would_hold_them(stack: Stack, broker: Broker, users: Any,
                                                  legacy: harness.LegacySim) -> None:
    """The control: with the cap lifted, the same run's logs do hold user fields. So the search
    above looks where they would be, and the cap is what keeps them out. (The first part of the
    run is enough to show it, without waiting for a poll deadline.)"""
    logs, fields = run_at_debug(stack, broker, users, legacy, third_party="DEBUG", every_stage=False)
    lines = [line for log in logs.values() for line in log.splitlines()]
    leaked = {field for line in lines for field in fields if field in line}
    loggers = {m.group(1) for line in lines if any(f in line for f in fields)
               for m in [re.search(r'"logger": "([^"]+)"', line)] if m}
    print(f"with LOG_LEVEL_THIRD_PARTY=DEBUG, {len(leaked)} of {len(fields)} user fields reach the logs, "
          f"through {sorted(loggers)}")
    assert leaked
    # Only libraries: the bridge's own lines are the same at either setting.
    assert not {name for name in loggers if name.split(".")[0] in ("regbridge", "submitter", "poller")}
