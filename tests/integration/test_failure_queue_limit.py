"""A failure queue bounded by a policy (`max-length` with `overflow: reject-publish`,
docs/operations.md "Bounding the failure queue"): when it is full the pipeline stops taking
failures, loses none, and resumes once records are taken off it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
import requests
from conftest import Stack
from harness import BIN, REPO, Broker, LegacySim, Service, cli_env, management_api, rabbitmqctl, unavailable, wait_until
from outcomes import FAILED, INBOUND, Outcomes, good

from regbridge.failure_index import QUEUED

pytestmark = pytest.mark.integration

LIMIT = 5


SCRIPT = REPO / "deploy" / "rabbitmq" / "failure_queue_limit.py"
POLICY = "registrations-failed-limit"


def set_limit(url: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """deploy/rabbitmq/failure_queue_limit.py, the setup step that operations.md ships, on the
    test's vhost through the management API."""
    return run_step({"RABBITMQ_MANAGEMENT_URL": f"http://guest:guest@127.0.0.1:15672/{url.rsplit('/', 1)[1]}"},
                    settings)


def run_step(where: dict[str, str], settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if not management_api():
        unavailable("RabbitMQ's management API does not answer on 127.0.0.1:15672")
    env = {"PATH": os.environ.get("PATH", ""), **where, **settings}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def the_step() -> Any:
    """The setup step's module, for its pure parts."""
    spec = importlib.util.spec_from_file_location("failure_queue_limit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def failure_queue_limit(url: str, limit: int) -> Iterator[None]:
    done = set_limit(url, FAILED_QUEUE_MAX_LENGTH=str(limit))
    assert done.returncode == 0, done.stderr
    print(done.stdout.strip())
    try:
        yield
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", "-p", url.rsplit("/", 1)[1], POLICY],
                       capture_output=True, timeout=60)


def metric(service: Service, name: str) -> float:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def refused(submitter: Service, poller: Service) -> int:
    return int(metric(submitter, "submitter_failure_records_refused_total")
               + metric(poller, "poller_failure_records_refused_total"))


def index_holds(outcomes: Outcomes, *, discarded: set[str]) -> None:
    """The failure index against the records: each record on the queue has its entry (under
    its record id), holding
    it; no entry says `queued` of a record that never went out. Entries of discarded records
    may stay or go (the index is the CLI's to maintain), so they are left out."""
    entries = {doc["_id"]: doc for doc in outcomes.users.database[f"{outcomes.users.name}.failures"].find(
        {}, {"state": 1, "body": 1})}
    for record_id, record in zip(outcomes.record_ids, outcomes.failures, strict=True):
        assert record_id in entries, f"a record without an index entry: {record_id}"
        assert json.loads(entries[record_id]["body"]) == record
    published = discarded | set(outcomes.record_ids)
    phantom = [i for i, e in entries.items() if i not in published and e["state"] == QUEUED]
    assert not phantom, f"entries queued without a record: {phantom[:5]}"


def discard_all(env: dict[str, str], export: Path) -> list[dict[str, Any]]:
    """`registrations failed discard --export FILE --yes`: every record off the failure queue,
    written to FILE first. Returns the lines this run added."""
    before = export.read_text().splitlines() if export.exists() else []
    done = subprocess.run([str(BIN / "registrations"), "failed", "discard", "--export", str(export), "--yes"],
                          env=cli_env(env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"discard failed ({done.returncode}): {done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in export.read_text().splitlines()[len(before):]]


@pytest.mark.long
def test_a_full_failure_queue_stops_the_pipeline_and_it_resumes_after_a_discard_with_nothing_lost(
        stack: Stack, broker: Broker, users: Any, legacy: LegacySim, amqp_url: str, tmp_path: Path) -> None:
    # 12 registrations that fail (6 invalid: the submitter's records; 6 the legacy system refuses:
    # the poller's) and 6 good ones, against a failure queue that holds 5.
    expected: dict[str, str] = {}
    with failure_queue_limit(amqp_url, LIMIT):
        submitter, poller = stack.start("submitter"), stack.start("poller")
        for i in range(6):
            expected[f"bad-{i}"] = "validation"
            broker.publish(INBOUND, b"{not json", message_id=f"bad-{i}")
            expected[f"refused-{i}"] = "legacy"
            broker.publish(INBOUND, good(f"refused-{i}", name="FAIL x"), message_id=f"refused-{i}")
            expected[f"good-{i}"] = "registered"
            broker.publish(INBOUND, good(f"good-{i}"), message_id=f"good-{i}")
        failing = sum(1 for v in expected.values() if v != "registered")

        # The pipeline stops: the failure queue is full, the broker refuses records, and every
        # failing message not on it waits in the inbound or the pending queue.
        outcomes = Outcomes(broker, users)
        wait_until(lambda: refused(submitter, poller) >= 2, timeout=60, what="failure records refused")
        stopped_at = time.monotonic()
        wait_until(lambda: len(outcomes.registered()) == 6, timeout=60, what="the good registrations")

        def accounted() -> tuple[int, int] | None:
            held, on_queue = broker.in_pipeline(exclude=FAILED), broker.depth(FAILED)
            return (held, on_queue) if held + on_queue == failing else None

        held, on_queue = wait_until(accounted, timeout=30, what="every failing message in a queue", every=0.3)
        assert on_queue < failing and held > 0
        # Still refusing, after a pause rather than in a tight loop: a window of the stop.
        first = refused(submitter, poller)
        polls = legacy.stats(summary=True)["polls_total"]
        window = 5.0
        time.sleep(window)
        in_window = refused(submitter, poller) - first
        polls = legacy.stats(summary=True)["polls_total"] - polls
        assert in_window <= failing, f"{in_window} refusals in {window:.0f} s: a loop"
        assert broker.in_pipeline(exclude=FAILED) + broker.depth(FAILED) == failing, "a message went missing"
        print(f"stopped: {on_queue} records on the failure queue (limit {LIMIT}), {held} failing messages held "
              f"in inbound/pending, {refused(submitter, poller)} refusals so far; in a {window:.0f} s window "
              f"{in_window} refusals and {polls} polls")

        # Room made by discarding every record (exported first), as often as the queue fills again.
        export = tmp_path / "discarded.jsonl"
        exported: list[dict[str, Any]] = []
        discards = 0
        freed_at = time.monotonic()
        while True:
            exported += discard_all(stack.env, export)
            discards += 1
            if discards == 1:
                freed_at = time.monotonic()

            def settled(gone: int = len(exported)) -> bool:
                # Every failing message has its record (exported or on the queue), or the
                # queue is full again with some still held.
                on = broker.depth(FAILED)
                held_now = broker.in_pipeline(exclude=FAILED)
                return bool(held_now == 0 or (on >= LIMIT and held_now + on + gone == failing))

            wait_until(settled, timeout=90, what="the held failures to go out after the discard", every=0.5)
            if broker.in_pipeline(exclude=FAILED) == 0:
                break
            assert discards < 10, "the queue keeps filling: more failures than were published"
        resumed_s = time.monotonic() - freed_at
        stopped_s = time.monotonic() - stopped_at

        # Every message has its exact outcome, across the export and the queue: one record each,
        # of the right stage, nothing lost and nothing twice.
        outcomes.wait(registered=6, failed=failing - len(exported), timeout=60, distinct=True)
        index_holds(outcomes, discarded={line["id"] for line in exported})
        # By message (the inbound message_id each record keeps), as `expected` names them.
        ids = [line["properties"]["message_id"] for line in exported] + list(outcomes.failure_ids)
        assert len(ids) == len(set(ids)) == failing, f"records: {sorted(ids)}"
        stages = {line["properties"]["message_id"]: json.loads(line["body"])["error"]["stage"] for line in exported}
        stages.update({i: r["error"]["stage"] for i, r in zip(outcomes.failure_ids, outcomes.failures, strict=True)})
        assert stages == {m: s for m, s in expected.items() if s != "registered"}
        assert outcomes.registered() == {m for m, s in expected.items() if s == "registered"}
        for user in (m for m, s in expected.items() if s == "legacy"):
            assert users.find_one({"_id": user})["registration_status"] == "failed"
        total_refused = refused(submitter, poller)
        print(f"{total_refused} failure records refused in all; stopped {stopped_s:.1f} s from the first "
              f"refusals to the last outcome; {discards} discard(s) ({len(exported)} records exported); the held "
              f"failures all out {resumed_s:.1f} s after the first discard")


def publishes_taken(broker: Broker, n: int) -> int:
    taken = 0
    for i in range(n):
        try:
            broker.publish(FAILED, {"n": i})
            taken += 1
        except pika.exceptions.NackError:
            pass
    return taken


def the_one_policy(amqp_url: str) -> dict[str, Any]:
    """The vhost's only policy, as the broker lists it."""
    vhost = amqp_url.rsplit("/", 1)[1]
    listed = subprocess.run(["rabbitmqctl", "-q", "list_policies", "-p", vhost, "--formatter", "json"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    (policy,) = json.loads(listed)
    assert isinstance(policy, dict)
    return policy


def test_the_setup_step_bounds_the_failure_queue_with_reject_publish(broker: Broker, amqp_url: str) -> None:
    done = set_limit(amqp_url, FAILED_QUEUE_MAX_LENGTH="3", FAILED_QUEUE_MAX_LENGTH_BYTES="1048576",
                     FAILED_QUEUE_POLICY_EXTRA='{"delivery-limit": 1000000}')
    assert done.returncode == 0, done.stderr
    assert "guest" not in done.stdout + done.stderr
    policy = the_one_policy(amqp_url)
    assert policy["name"] == POLICY and policy["apply-to"] == "queues"
    assert json.loads(policy["definition"]) == {"max-length": 3, "max-length-bytes": 1048576,
                                                 "overflow": "reject-publish", "delivery-limit": 1000000}
    # Full, the queue refuses rather than drops: what it took is still there, from the first.
    taken = publishes_taken(broker, 8)
    assert 3 <= taken < 8
    assert broker.depth(FAILED) == taken
    assert [json.loads(body)["n"] for _, body in broker.drain(FAILED)] == list(range(taken))
    # Run again with another limit: the same policy, changed in place.
    assert set_limit(amqp_url, FAILED_QUEUE_MAX_LENGTH="50").returncode == 0
    assert publishes_taken(broker, 20) == 20


def test_the_setup_step_derives_the_management_api_from_the_broker_url(broker: Broker, amqp_url: str) -> None:
    # Only RABBITMQ_URL: the step finds the management API from it.
    done = run_step({"RABBITMQ_URL": amqp_url}, {"FAILED_QUEUE_MAX_LENGTH": "4"})
    assert done.returncode == 0, done.stderr
    assert "guest" not in done.stdout + done.stderr
    policy = the_one_policy(amqp_url)
    assert json.loads(policy["definition"]) == {"max-length": 4, "overflow": "reject-publish"}


@pytest.mark.parametrize(("environ", "expect"), [
    ({"RABBITMQ_URL": "amqp://app:s%40cret@rabbit.example:5672/reg%2Fvh"},
     "http://app:s%40cret@rabbit.example:15672/reg%2Fvh"),
    ({"RABBITMQ_URL": "amqps://app:p@ss@node-0:5671/v?heartbeat=30, amqps://app:p@ss@node-1:5671/v"},
     "https://app:p@ss@node-0:15671/v"),
    ({"RABBITMQ_URL": "amqp://u:p@[fd00::1]:5672/"}, "http://u:p@[fd00::1]:15672/%2F"),
    ({"RABBITMQ_URL": "amqp://u:p@ignored/", "RABBITMQ_MANAGEMENT_URL": "https://m:n@mgmt:443/v"},
     "https://m:n@mgmt:443/v"),
])
def test_the_management_api_is_derived_as_the_operators_command_derives_it(environ: dict[str, str],
                                                                          expect: str) -> None:
    assert the_step().management_url(environ) == expect


def test_a_broker_url_without_credentials_is_refused_rather_than_given_defaults() -> None:
    step = the_step()
    with pytest.raises(step.Refused, match="no user"):
        step.management_url({"RABBITMQ_URL": "amqp://rabbitmq"})


def test_the_setup_step_says_when_another_policy_governs_the_queue(broker: Broker, amqp_url: str) -> None:
    vhost = amqp_url.rsplit("/", 1)[1]
    rabbitmqctl("set_policy", "-p", vhost, "broad", ".*", '{"delivery-limit": 20}', "--priority", "50",
                "--apply-to", "queues")
    done = set_limit(amqp_url, FAILED_QUEUE_MAX_LENGTH="10")
    assert done.returncode == 1
    assert "governed by policy 'broad'" in done.stderr and "FAILED_QUEUE_POLICY_PRIORITY" in done.stderr
    assert set_limit(amqp_url, FAILED_QUEUE_MAX_LENGTH="10", FAILED_QUEUE_POLICY_PRIORITY="60",
                     FAILED_QUEUE_POLICY_EXTRA='{"delivery-limit": 20}').returncode == 0


@pytest.mark.parametrize(("settings", "expect"), [
    ({}, "set FAILED_QUEUE_MAX_LENGTH or FAILED_QUEUE_MAX_LENGTH_BYTES"),
    ({"FAILED_QUEUE_MAX_LENGTH": "0"}, "FAILED_QUEUE_MAX_LENGTH must be a positive integer"),
    ({"FAILED_QUEUE_MAX_LENGTH_BYTES": "1e9"}, "FAILED_QUEUE_MAX_LENGTH_BYTES must be a positive integer"),
    ({"FAILED_QUEUE_MAX_LENGTH": "5", "FAILED_QUEUE_POLICY_EXTRA": '{"overflow": "drop-head"}'},
     "must not set overflow"),
    ({"FAILED_QUEUE_MAX_LENGTH": "5", "FAILED_QUEUE_POLICY_EXTRA": "[1]"}, "must be a JSON object"),
])
def test_the_setup_step_refuses_wrong_settings(amqp_url: str, settings: dict[str, str], expect: str) -> None:
    done = set_limit(amqp_url, **settings)
    assert done.returncode == 2 and expect in done.stderr, done.stderr
    listed = subprocess.run(["rabbitmqctl", "-q", "list_policies", "-p", amqp_url.rsplit("/", 1)[1]],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    assert POLICY not in listed
