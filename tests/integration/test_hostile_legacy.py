"""Hostile legacy answers: a call is bounded by one deadline and its answer by a byte cap.

Against the project's hostile fake adapter (`hostile_adapter.py`), on real sockets: first the
bridge's own client in this process, then the real submitter and poller on the real broker. A
dripped answer would complete, well-formed, long after the deadline, and a 400 MB one would be
read whole: each test fails unless the client gives up on it.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Stack
from harness import Broker, Mongo, Service, service_env, wait_until
from hostile_adapter import MB, Answer, HostileAdapter
from outcomes import INBOUND, good

from regbridge.legacy_http import LegacyClient
from regbridge.lifecycle import Accepted, Completed, Transient

pytestmark = pytest.mark.integration

DEADLINE_S = 2.0
# How far past the deadline a call may end on a busy machine: far less than a deadline missed by
# a multiple of itself, or the 20 s and more a dripped answer takes to complete.
MARGIN_S = 1.0
CAP = 64 * 1024
DEADLINE_REASON = f"legacy API answer took longer than the {DEADLINE_S:g} s deadline"
CAP_REASON = f"legacy API answer exceeded the {CAP}-byte cap"
# The issue's bound on a service's memory while it is sent 400 MB; the charts' limit is 512Mi.
RSS_BOUND_MB = 150
# This process's growth while its client is sent 400 MB: a few buffers of the cap, with room for the
# allocator's whims.
RSS_GROWTH_BOUND_MB = 16


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


@contextmanager
def rss_peak(pid: int | str = "self", every_s: float = 0.01) -> Iterator[list[float]]:
    """Sample a process's RSS while the block runs; the list holds the samples."""
    samples = [rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            try:
                samples.append(rss_mb(pid))
            except (OSError, AssertionError):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()
        samples.append(rss_mb(pid))


@pytest.fixture
def adapter() -> Iterator[HostileAdapter]:
    with HostileAdapter() as hostile:
        yield hostile


@pytest.fixture
def client(adapter: HostileAdapter) -> Iterator[LegacyClient]:
    legacy = LegacyClient(adapter.url, timeout_s=DEADLINE_S, max_response_bytes=CAP, pool_size=1)
    yield legacy
    legacy.close()


def call(client: LegacyClient, method: str, user_id: str) -> Any:
    if method == "POST":
        return client.submit(json.dumps({"user_id": user_id}).encode(), f"{user_id}|mid:m")
    return client.status(f"R-{user_id}")


def answer_on(adapter: HostileAdapter, method: str, user_id: str, answer: Answer) -> None:
    (adapter.on_post if method == "POST" else adapter.on_status)(user_id, answer)


# ---- the client ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [False, True], ids=["body", "head"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_dripped_answer_ends_at_the_deadline(adapter: HostileAdapter, client: LegacyClient, method: str,
                                               head: bool) -> None:
    # About 30 bytes of body at 0.75 s each: a well-formed answer, complete after 20 s or more.
    answer_on(adapter, method, "drip", Answer.drip(0.75, head=head))
    started = time.monotonic()
    outcome = call(client, method, "drip")
    elapsed = time.monotonic() - started
    [seen] = adapter.calls("drip")
    wait_until(lambda: seen.ended is not None, timeout=5, what="the adapter to see the hang-up")
    print(f"{method} dripped ({'head and body' if head else 'body'}): {outcome!r} after {elapsed:.2f} s "
          f"(deadline {DEADLINE_S:g} s), {seen.sent} bytes dripped by then; the adapter held {seen.held_s:.2f} s")
    assert outcome == Transient(DEADLINE_REASON)
    # The whole call, head and body, ends at the deadline: not before it, and not long after.
    assert DEADLINE_S - 0.1 <= elapsed < DEADLINE_S + MARGIN_S
    # The client hung up then: the adapter was not left writing to it.
    assert seen.hung_up and seen.held_s is not None and seen.held_s < DEADLINE_S + MARGIN_S


@pytest.mark.parametrize("kind", ["huge", "declared", "bomb"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_400_mb_answer_is_refused_at_the_cap(adapter: HostileAdapter, client: LegacyClient, method: str,
                                               kind: str) -> None:
    # huge: chunked, no length; declared: behind its Content-Length; bomb: gzip, 400 MB once inflated.
    answer_on(adapter, method, "big", {"huge": Answer.huge(), "declared": Answer.declared(),
                                       "bomb": Answer.bomb()}[kind])
    with rss_peak() as samples:
        started = time.monotonic()
        outcome = call(client, method, "big")
        elapsed = time.monotonic() - started
    wait_until(lambda: adapter.calls("big")[0].ended is not None, timeout=10, what="the adapter to see the hang-up")
    [seen] = adapter.calls("big")
    print(f"{method} {kind} 400 MB: {outcome!r} after {elapsed:.3f} s; this process's RSS "
          f"{samples[0]:.1f} MB before, {max(samples):.1f} MB at most, {samples[-1]:.1f} MB after; "
          f"{seen.sent / MB:.2f} MB written before the client hung up")
    status = 201 if method == "POST" else 200
    if kind == "declared":
        assert outcome == Transient(f"{CAP_REASON} (Content-Length {400 * MB})", status)
    else:
        assert outcome == Transient(CAP_REASON, status)
    # The client stopped reading: the adapter could not write the whole answer.
    assert seen.hung_up
    # And it kept no more than the cap in memory: reading even a tenth of the answer whole (40 MB)
    # would grow this process past the bound.
    assert max(samples) - samples[0] < RSS_GROWTH_BOUND_MB


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_an_answer_of_exactly_the_cap_is_read_and_one_byte_more_is_not(adapter: HostileAdapter,
                                                                       client: LegacyClient, method: str,
                                                                       chunked: bool) -> None:
    answer_on(adapter, method, "at-cap", Answer.ok(pad_to=CAP, chunked=chunked))
    answer_on(adapter, method, "past-cap", Answer.ok(pad_to=CAP + 1, chunked=chunked))
    at_cap, past_cap = call(client, method, "at-cap"), call(client, method, "past-cap")
    assert at_cap == (Accepted("R-at-cap") if method == "POST" else Completed())
    status = 201 if method == "POST" else 200
    expected = CAP_REASON if chunked else f"{CAP_REASON} (Content-Length {CAP + 1})"
    assert past_cap == Transient(expected, status)


def test_a_breached_connection_is_closed_and_a_read_one_is_reused(adapter: HostileAdapter,
                                                                 client: LegacyClient) -> None:
    adapter.on_post("huge", Answer.huge())
    adapter.on_post("drip", Answer.drip(0.75))
    users = ["a", "b", "huge", "c", "drip", "d"]
    outcomes = [call(client, "POST", user) for user in users]
    assert [type(o) for o in outcomes] == [Accepted, Accepted, Transient, Accepted, Transient, Accepted]
    # One pooled connection (pool_size=1): kept across answers read to their end, closed after a
    # breach, so the call after each breach comes on a new one.
    assert [c.connection for c in adapter.calls()] == [1, 1, 1, 2, 2, 3]


@pytest.fixture
def tls_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileAdapter]:
    """The hostile adapter over TLS, with a certificate for 127.0.0.1 that the client trusts
    through SSL_CERT_FILE, as a service would be told to trust a private CA."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with HostileAdapter(tls=context) as hostile:
        yield hostile


def test_over_tls_the_deadline_and_the_cap_hold_too(tls_adapter: HostileAdapter) -> None:
    tls_adapter.on_post("drip", Answer.drip(0.75))
    tls_adapter.on_post("huge", Answer.huge())
    tls_adapter.on_post("bomb", Answer.bomb())
    client = LegacyClient(tls_adapter.url, timeout_s=DEADLINE_S, max_response_bytes=CAP, pool_size=1)
    outcomes: dict[str, Any] = {}
    took: dict[str, float] = {}
    try:
        for user in ("plain", "drip", "huge", "bomb", "plain-2"):
            started = time.monotonic()
            outcomes[user] = call(client, "POST", user)
            took[user] = time.monotonic() - started
    finally:
        client.close()
    print("over TLS: " + ", ".join(f"{user} {seconds:.2f} s" for user, seconds in took.items()))
    assert tls_adapter.url.startswith("https://")
    assert outcomes == {"plain": Accepted("R-plain"), "drip": Transient(DEADLINE_REASON),
                        "huge": Transient(CAP_REASON, 201), "bomb": Transient(CAP_REASON, 201),
                        "plain-2": Accepted("R-plain-2")}
    # Every call within the deadline: the dripped one ends at it, over TLS as over plain TCP.
    assert DEADLINE_S - 0.1 <= took["drip"] < DEADLINE_S + MARGIN_S
    assert all(seconds < DEADLINE_S + MARGIN_S for seconds in took.values()), took


# ---- the services -------------------------------------------------------------------------------


def metric(service: Service, name: str) -> float:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def durations(service: Service, histogram: str) -> str:
    count = metric(service, f"{histogram}_count")
    total = metric(service, f"{histogram}_sum")
    within = metric(service, f'{histogram}_bucket{{le="2.5"}}')
    return f"{count:.0f} calls, {total:.1f} s in all, {within:.0f} of them within 2.5 s"


def failure_records(broker: Broker) -> dict[str, dict[str, Any]]:
    return {json.loads(body)["user_id"]: json.loads(body) for _, body in broker.drain("registrations.failed")}


@pytest.fixture
def hostile_stack(amqp_url: str, mongo: Mongo, database: str, adapter: HostileAdapter,
                  tmp_path: Path) -> Iterator[Stack]:
    env = service_env(rabbitmq_url=amqp_url, mongodb_uri=mongo.uri, database=database, legacy_url=adapter.url,
                      extra={"LEGACY_TIMEOUT_S": f"{DEADLINE_S:g}", "LEGACY_MAX_RESPONSE_BYTES": str(CAP),
                             # Each hostile answer is a transient failure: the breaker would soon hold
                             # back the normal registrations as well, which is not what is shown here.
                             "LEGACY_BREAKER_FAILURES": "1000"})
    stack = Stack(env, tmp_path)
    yield stack
    stack.stop_all()


def test_hostile_post_answers_free_the_submitter_and_end_in_submit_failures(
        hostile_stack: Stack, broker: Broker, users: Any, adapter: HostileAdapter) -> None:
    adapter.on_post("post-drip", Answer.drip(0.75))
    adapter.on_post("post-huge", Answer.huge())
    adapter.on_post("post-declared", Answer.declared())
    adapter.on_post("post-bomb", Answer.bomb())
    submitter = hostile_stack.start("submitter", WORKERS="1", SUBMIT_MAX_ATTEMPTS="3")
    hostile_stack.start("poller")
    assert submitter.process is not None
    pid = submitter.process.pid
    hostile = ["post-drip", "post-huge", "post-declared", "post-bomb"]
    with rss_peak(pid, every_s=0.05) as samples:
        for user_id in [*hostile, "plain-1"]:
            broker.publish(INBOUND, good(user_id), message_id=user_id)
        wait_until(lambda: (users.find_one({"_id": "plain-1"}) or {}).get("registration_status") == "registered",
                   timeout=60, what="the normal registration behind the hostile ones to be registered")
        plain_done = time.monotonic()
        records: dict[str, dict[str, Any]] = {}
        wait_until(lambda: records.update(failure_records(broker)) or set(hostile) <= set(records),
                   timeout=60, what="a failure record for each hostile answer")
    peak = rss_mb(pid, "VmHWM")
    drips = adapter.calls("post-drip")
    [plain_post] = [c for c in adapter.calls("plain-1") if c.method == "POST"]
    print(f"submitter (1 worker): plain-1 POSTed {plain_post.started - drips[0].started:.2f} s after post-drip's "
          f"first POST, registered while post-drip was still retrying: "
          f"{len([c for c in drips if c.started < plain_done])} of its {len(drips)} POSTs begun by then; "
          f"POST durations: {durations(submitter, 'submitter_legacy_request_seconds')}; "
          f"RSS {samples[0]:.1f} MB at start, {max(samples):.1f} MB sampled peak, {peak:.1f} MB VmHWM "
          f"(bound {RSS_BOUND_MB} MB); bytes written per huge POST: "
          f"{[round(c.sent / MB, 1) for c in adapter.calls('post-huge')]} MB")
    assert peak < RSS_BOUND_MB
    # The one worker was free at the deadline: the normal POST came between the dripped one's
    # attempts, and each dripped POST let go of the worker within the deadline (the adapter saw
    # the client hang up that soon after the request).
    assert plain_post.started < drips[-1].started
    wait_until(lambda: all(c.ended is not None for c in drips), timeout=10, what="the dripped POSTs to end")
    held = [c.held_s or 0.0 for c in drips]
    print(f"dripped POSTs held the worker {[round(h, 2) for h in held]} s (deadline {DEADLINE_S:g} s)")
    assert all(DEADLINE_S - 0.5 < h < DEADLINE_S + MARGIN_S for h in held), held
    assert records["post-drip"]["error"] == {"stage": "submit", "http_status": None,
                                             "reason": f"gave up after 3 attempts: {DEADLINE_REASON}"}
    assert records["post-huge"]["error"] == {"stage": "submit", "http_status": 201,
                                             "reason": f"gave up after 3 attempts: {CAP_REASON}"}
    assert records["post-declared"]["error"]["reason"].startswith(f"gave up after 3 attempts: {CAP_REASON}")
    assert records["post-bomb"]["error"]["reason"] == f"gave up after 3 attempts: {CAP_REASON}"
    assert len(records) == 4 and all(r["attempts"] == 3 for r in records.values())
    assert len(drips) == 3 and all(c.hung_up for c in adapter.calls("post-huge"))
    for user_id in hostile:
        assert users.find_one({"_id": user_id})["registration_status"] == "failed"
    # Each hostile message acked once its record was confirmed: nothing left looping.
    wait_until(lambda: broker.in_pipeline(exclude="registrations.failed") == 0, timeout=30,
               what="every message acked")


def test_hostile_status_answers_free_the_poller_and_end_in_timeouts(
        hostile_stack: Stack, broker: Broker, users: Any, adapter: HostileAdapter) -> None:
    adapter.on_status("get-drip", Answer.drip(0.75))
    adapter.on_status("get-huge", Answer.huge())
    adapter.on_status("get-declared", Answer.declared())
    adapter.on_status("get-bomb", Answer.bomb())
    hostile_stack.env["POLL_DEADLINE_S"] = "6"
    hostile_stack.start("submitter")
    poller = hostile_stack.start("poller", WORKERS="1")
    assert poller.process is not None
    pid = poller.process.pid
    hostile = ["get-drip", "get-huge", "get-declared", "get-bomb"]
    with rss_peak(pid, every_s=0.05) as samples:
        for user_id in [*hostile, "plain-2"]:
            broker.publish(INBOUND, good(user_id), message_id=user_id)
        wait_until(lambda: (users.find_one({"_id": "plain-2"}) or {}).get("registration_status") == "registered",
                   timeout=60, what="the normal registration beside the hostile ones to be registered")
        plain_done = time.monotonic()
        records: dict[str, dict[str, Any]] = {}
        wait_until(lambda: records.update(failure_records(broker)) or set(hostile) <= set(records),
                   timeout=60, what="a failure record for each hostile status answer")
    peak = rss_mb(pid, "VmHWM")
    drips = [c for c in adapter.calls("get-drip") if c.method == "GET"]
    [plain_get] = [c for c in adapter.calls("plain-2") if c.method == "GET"]
    print(f"poller (1 worker): plain-2 polled {plain_get.started - drips[0].started:.2f} s after get-drip's first "
          f"GET, registered while get-drip was still polled: "
          f"{len([c for c in drips if c.started < plain_done])} of its {len(drips)} GETs begun by then; "
          f"GET durations: {durations(poller, 'poller_legacy_request_seconds')}; "
          f"RSS {samples[0]:.1f} MB at start, {max(samples):.1f} MB sampled peak, {peak:.1f} MB VmHWM "
          f"(bound {RSS_BOUND_MB} MB); huge GETs: {len(adapter.calls('get-huge')) - 1}")
    assert peak < RSS_BOUND_MB
    # The one worker was free at the deadline: the normal poll came between the dripped one's
    # polls, and each dripped poll let go of the worker within the deadline.
    assert plain_get.started < drips[-1].started
    wait_until(lambda: all(c.ended is not None for c in drips), timeout=10, what="the dripped GETs to end")
    held = [c.held_s or 0.0 for c in drips]
    print(f"dripped GETs held the worker {[round(h, 2) for h in held]} s (deadline {DEADLINE_S:g} s)")
    assert all(DEADLINE_S - 0.5 < h < DEADLINE_S + MARGIN_S for h in held), held
    for user_id, reason in [("get-drip", DEADLINE_REASON), ("get-huge", CAP_REASON),
                            ("get-declared", f"{CAP_REASON} (Content-Length {400 * MB})"), ("get-bomb", CAP_REASON)]:
        error = records[user_id]["error"]
        assert error["stage"] == "timeout"
        assert error["reason"] == f"no final status 6 s after submission (last poll: {reason})"
        assert users.find_one({"_id": user_id})["registration_status"] == "failed"
    assert len(records) == 4
    # Each hostile message acked once its record was confirmed: nothing left looping.
    wait_until(lambda: broker.in_pipeline(exclude="registrations.failed") == 0, timeout=30,
               what="every message acked")
