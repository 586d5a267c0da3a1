"""Integration tests of legacy-sim: the real console script, over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import pytest
import requests
from harness import wait_until

from regbridge.legacy_http import LegacyClient
from regbridge.lifecycle import Accepted, Transient

pytestmark = pytest.mark.integration

LEGACY_SIM = Path(sys.executable).parent / "legacy-sim"
ID_SHAPE = re.compile(r"[0-9A-F]{6}-[A-Z]")
VALID = {"user_id": "u-1", "name": "Maria da Silva", "email": "maria@example.com", "cpf": "12345678909"}
# What every test starts from; tests change it through PATCH and the fixture puts it back.
TEST_CONFIG = {
    "latency_min_s": 0.2,
    "latency_max_s": 0.4,
    "accept_latency_s": 0.0,
    "post_503_rate": 0.0,
    "get_503_rate": 0.0,
    "retry_after_s": 1,
    "fail_prefix": "FAIL",
    "down": False,
    "response_delay_s": 0.0,
}
TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Sim:
    process: subprocess.Popen[str]
    base_url: str
    http: requests.Session

    def url(self, path: str) -> str:
        return self.base_url + path

    def post(self, body: Any = None, *, data: bytes | None = None) -> requests.Response:
        if data is None:
            return self.http.post(self.url("/v1/registrations"), json=body, timeout=TIMEOUT_S)
        return self.http.post(self.url("/v1/registrations"), data=data, timeout=TIMEOUT_S)

    def get(self, request_id: str) -> requests.Response:
        return self.http.get(self.url(f"/v1/registrations/{request_id}"), timeout=TIMEOUT_S)

    def patch_config(self, **fields: Any) -> dict[str, Any]:
        response = self.http.patch(self.url("/admin/config"), json=fields, timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        config: dict[str, Any] = response.json()
        return config

    def stats(self, *, summary: bool = False) -> dict[str, Any]:
        params = {"summary": "1"} if summary else None
        response = self.http.get(self.url("/admin/stats"), params=params, timeout=TIMEOUT_S)
        assert response.status_code == 200
        stats: dict[str, Any] = response.json()
        return stats

    def submit(self, **overrides: Any) -> str:
        response = self.post({**VALID, **overrides})
        assert response.status_code == 201, response.text
        request_id: str = response.json()["request_id"]
        return request_id

    def wait_terminal(self, request_id: str, *, deadline_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + deadline_s
        while True:
            response = self.get(request_id)
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            if body["status"] != "processing":
                return body
            assert time.monotonic() < deadline, f"{request_id} still processing after {deadline_s} s"
            time.sleep(0.05)


def start_sim(extra_env: dict[str, str] | None = None) -> Sim:
    port = free_port()
    env = {
        **os.environ,
        "HTTP_PORT": str(port),
        "LEGACY_SIM_LATENCY_MIN_S": "0.2",
        "LEGACY_SIM_LATENCY_MAX_S": "0.4",
        "LEGACY_SIM_ACCEPT_LATENCY_S": "0",
        **(extra_env or {}),
    }
    if "LEGACY_SIM_LATENCY_PROFILE" in env:
        # The profile replaces the bounds; legacy-sim refuses to be given both.
        del env["LEGACY_SIM_LATENCY_MIN_S"], env["LEGACY_SIM_LATENCY_MAX_S"]
    process = subprocess.Popen([str(LEGACY_SIM)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sim = Sim(process=process, base_url=f"http://127.0.0.1:{port}", http=requests.Session())

    def healthy() -> bool:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"legacy-sim exited with {process.returncode}: {output}")
        try:
            return sim.http.get(sim.url("/healthz"), timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(healthy, timeout=15.0, what="legacy-sim /healthz", every=0.02)
    return sim


def stop_sim(sim: Sim) -> int:
    sim.http.close()
    if sim.process.poll() is None:
        sim.process.send_signal(signal.SIGTERM)
    try:
        return sim.process.wait(timeout=10)
    finally:
        if sim.process.poll() is None:
            sim.process.kill()
        if sim.process.stdout:
            sim.process.stdout.close()


@pytest.fixture(scope="module")
def running_sim() -> Iterator[Sim]:
    sim = start_sim()
    yield sim
    stop_sim(sim)


@pytest.fixture
def sim(running_sim: Sim) -> Iterator[Sim]:
    running_sim.patch_config(**TEST_CONFIG)
    assert running_sim.http.post(running_sim.url("/admin/reset"), timeout=TIMEOUT_S).status_code == 200
    yield running_sim
    running_sim.patch_config(**TEST_CONFIG)


# ---- the legacy API ----


def test_submit_answers_201_with_location_and_an_id(sim: Sim) -> None:
    response = sim.post(VALID)
    assert response.status_code == 201
    request_id = response.json()["request_id"]
    assert ID_SHAPE.fullmatch(request_id)
    assert response.headers["Location"] == f"/v1/registrations/{request_id}"
    assert response.headers["Content-Type"] == "application/json"


def test_ids_are_unique(sim: Sim) -> None:
    ids = {sim.submit() for _ in range(50)}
    assert len(ids) == 50


def test_submit_without_user_id_is_accepted(sim: Sim) -> None:
    body = {k: v for k, v in VALID.items() if k != "user_id"}
    assert sim.post(body).status_code == 201


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'["a list"]', "JSON object"),
        (b'{"email": "a@b.c", "cpf": "12345678909"}', "name"),
        (b'{"name": "", "email": "a@b.c", "cpf": "12345678909"}', "name"),
        (b'{"name": "M", "email": "no-at", "cpf": "12345678909"}', "email"),
        (b'{"name": "M", "cpf": "12345678909"}', "email"),
        (b'{"name": "M", "email": "a@b.c", "cpf": "123"}', "cpf"),
        (b'{"name": "M", "email": "a@b.c", "cpf": 12345678909}', "cpf"),
        (b'{"name": "M", "email": "a@b.c"}', "cpf"),
        (b'{"name": "M", "email": "a@b.c", "cpf": "12345678909", "user_id": 3}', "user_id"),
    ],
)
def test_invalid_bodies_answer_400_with_a_reason(sim: Sim, data: bytes, reason: str) -> None:
    response = sim.post(data=data)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert sim.stats(summary=True)["rejected_total"] == 1
    assert sim.stats(summary=True)["submissions_total"] == 0


def test_unknown_id_answers_404(sim: Sim) -> None:
    response = sim.get("ABCDEF-Z")
    assert response.status_code == 404
    assert response.json() == {"error": "unknown request id"}


def test_processing_then_completed(sim: Sim) -> None:
    # A wider latency than the default test one so that the first poll surely sees "processing".
    sim.patch_config(latency_min_s=1.0, latency_max_s=1.0)
    request_id = sim.submit()
    started = time.monotonic()
    first = sim.get(request_id)
    assert first.status_code == 200
    assert first.json() == {"request_id": request_id, "status": "processing"}
    assert sim.wait_terminal(request_id) == {"request_id": request_id, "status": "completed"}
    assert time.monotonic() - started >= 0.9


def test_fail_prefix_ends_failed_with_a_reason(sim: Sim) -> None:
    request_id = sim.submit(name="FAIL Maria")
    assert sim.wait_terminal(request_id) == {
        "request_id": request_id,
        "status": "failed",
        "reason": "rejected by the legacy system",
    }
    assert sim.wait_terminal(sim.submit(name="Maria FAIL"))["status"] == "completed"


def test_fail_prefix_can_be_disabled(sim: Sim) -> None:
    sim.patch_config(fail_prefix="")
    assert sim.wait_terminal(sim.submit(name="FAIL Maria"))["status"] == "completed"


# ---- faults ----


def test_post_503_injection_with_retry_after(sim: Sim) -> None:
    config = sim.patch_config(post_503_rate=1.0)
    assert config["post_503_rate"] == 1.0
    for _ in range(3):
        response = sim.post(VALID)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
    sim.patch_config(retry_after_s=0.5)
    assert sim.post(VALID).headers["Retry-After"] == "0.5"
    summary = sim.stats(summary=True)
    assert summary["post_503_total"] == 4
    assert summary["submissions_total"] == 0


def test_get_503_injection_with_retry_after(sim: Sim) -> None:
    request_id = sim.submit()
    sim.patch_config(get_503_rate=1.0, retry_after_s=2)
    response = sim.get(request_id)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    # POSTs are not affected by the GET rate.
    assert sim.post(VALID).status_code == 201
    summary = sim.stats(summary=True)
    assert summary["get_503_total"] == 1
    assert summary["polls_total"] == 0


def test_partial_503_rate_mixes_answers(sim: Sim) -> None:
    sim.patch_config(post_503_rate=0.5)
    codes = [sim.post(VALID).status_code for _ in range(100)]
    # With p=0.5 over 100 tries, fewer than 10 of either is a ~1e-17 event.
    assert codes.count(503) > 10
    assert codes.count(201) > 10
    assert set(codes) == {201, 503}


def test_down_mode_refuses_every_v1_request(sim: Sim) -> None:
    request_id = sim.submit()
    sim.patch_config(down=True)
    post = sim.post(VALID)
    get = sim.get(request_id)
    assert (post.status_code, get.status_code) == (503, 503)
    assert post.headers["Retry-After"] == "1"
    assert get.headers["Retry-After"] == "1"
    assert sim.http.get(sim.url("/healthz"), timeout=TIMEOUT_S).status_code == 200
    sim.patch_config(down=False)
    assert sim.get(request_id).status_code == 200


def test_slow_mode_delays_every_v1_answer(sim: Sim) -> None:
    request_id = sim.submit()
    sim.patch_config(response_delay_s=0.3)
    calls: list[Callable[[], requests.Response]] = [lambda: sim.post(VALID), lambda: sim.get(request_id)]
    for call in calls:
        started = time.monotonic()
        assert call().status_code in (200, 201)
        assert time.monotonic() - started >= 0.3


def test_accept_latency_delays_the_201(sim: Sim) -> None:
    sim.patch_config(accept_latency_s=0.2)
    started = time.monotonic()
    assert sim.post(VALID).status_code == 201
    assert time.monotonic() - started >= 0.2


# ---- Idempotency-Key ----


def keyed(sim: Sim, key: str, body: dict[str, Any] = VALID) -> requests.Response:
    return sim.http.post(sim.url("/v1/registrations"), json=body, headers={"Idempotency-Key": key},
                         timeout=TIMEOUT_S)


def test_the_same_key_gets_the_same_201_and_registers_nothing(sim: Sim) -> None:
    first = keyed(sim, "u-1|mid:m-1")
    again = keyed(sim, "u-1|mid:m-1")
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Location"] == first.headers["Location"]
    other = keyed(sim, "u-1|mid:m-2")  # another attempt of the same user
    unkeyed = [sim.submit(), sim.submit()]  # no key: each POST registers
    assert len({first.json()["request_id"], other.json()["request_id"], *unkeyed}) == 4
    stats = sim.stats()
    assert stats["submissions_total"] == 4
    assert stats["submissions_by_user"] == {"u-1": 4}
    assert stats["idempotent_replays_total"] == 1
    assert stats["idempotency_keys"] == 2
    metrics = sim.http.get(sim.url("/metrics"), timeout=TIMEOUT_S).text
    assert "\nlegacy_sim_idempotent_replays_total 1\n" in metrics


def test_posts_with_one_key_at_the_same_time_register_once(sim: Sim) -> None:
    sim.patch_config(accept_latency_s=0.3)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: keyed(sim, "u-1|mid:at-once"), range(8)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.json()["request_id"] for a in answers}) == 1
    summary = sim.stats(summary=True)
    assert (summary["submissions_total"], summary["idempotent_replays_total"]) == (1, 7)


def test_a_post_that_timed_out_is_registered_once_through_its_retry(sim: Sim) -> None:
    # The bridge's own client: the first POST outlasts its read timeout, yet the sim registers it.
    client = LegacyClient(sim.base_url, timeout_s=0.2, max_response_bytes=65536, pool_size=2)
    body = json.dumps({**VALID, "user_id": "usuário-ç"}).encode()  # a key sent as its digest
    key = "usuário-ç|mid:m-1"
    try:
        sim.patch_config(accept_latency_s=0.5)
        lost = client.submit(body, key)
        assert isinstance(lost, Transient) and "deadline" in lost.reason
        wait_until(lambda: sim.stats(summary=True)["submissions_total"] == 1, timeout=5,
                   what="the timed-out POST to be registered")
        sim.patch_config(accept_latency_s=0.0)
        retried = client.submit(body, key)
    finally:
        client.close()
    [request_id] = sim.stats()["requests"]
    assert retried == Accepted(request_id)
    summary = sim.stats(summary=True)
    assert (summary["submissions_total"], summary["idempotent_replays_total"]) == (1, 1)


def test_a_key_over_255_characters_is_refused(sim: Sim) -> None:
    response = keyed(sim, "k" * 256)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert keyed(sim, "k" * 255).status_code == 201


# ---- admin ----


def test_stats_count_submissions_polls_and_detection(sim: Sim) -> None:
    a1 = sim.submit(user_id="a")
    sim.submit(user_id="a")
    b1 = sim.submit(user_id="b")
    assert sim.post(data=b"{}").status_code == 400
    sim.wait_terminal(a1)
    sim.wait_terminal(b1)

    stats = sim.stats()
    assert stats["submissions_total"] == 3
    assert stats["submissions_by_user"] == {"a": 2, "b": 1}
    assert stats["rejected_total"] == 1
    assert stats["polls_total"] == stats["polls_by_request"][a1] + stats["polls_by_request"][b1]
    assert stats["polls_by_request"][a1] >= 1
    assert stats["polls_per_registration"] == pytest.approx(stats["polls_total"] / 3)
    entry = stats["requests"][a1]
    assert entry["user_id"] == "a"
    assert entry["outcome"] == "completed"
    assert 0.2 <= entry["completes_at"] - entry["submitted_at"] <= 0.4
    assert entry["detected_at"] >= entry["completes_at"]
    assert stats["detection_delay_mean_s"] is not None
    assert 0 <= stats["detection_delay_mean_s"] < 5

    summary = sim.stats(summary=True)
    assert "requests" not in summary
    assert "polls_by_request" not in summary
    assert summary["submissions_total"] == 3
    assert summary["polls_total"] == stats["polls_total"]


def test_config_can_be_read_and_bad_patches_are_refused(sim: Sim) -> None:
    config = sim.http.get(sim.url("/admin/config"), timeout=TIMEOUT_S).json()
    assert config["latency_min_s"] == 0.2
    assert config["latency_max_s"] == 0.4
    for bad in ({"post_503_rate": 2}, {"nope": 1}, {"latency_min_s": 1.0}, {"down": "yes"}):
        response = sim.http.patch(sim.url("/admin/config"), json=bad, timeout=TIMEOUT_S)
        assert response.status_code == 400, bad
        assert response.json()["error"]
    assert sim.http.get(sim.url("/admin/config"), timeout=TIMEOUT_S).json() == config


def test_reset_clears_state_and_counters(sim: Sim) -> None:
    request_id = sim.submit()
    sim.get(request_id)
    sim.post(data=b"[]")
    assert sim.http.post(sim.url("/admin/reset"), timeout=TIMEOUT_S).status_code == 200
    stats = sim.stats()
    assert stats["submissions_total"] == 0
    assert stats["rejected_total"] == 0
    assert stats["polls_total"] == 0
    assert stats["requests"] == {}
    assert sim.get(request_id).status_code == 404


# ---- latency profiles ----


def latencies(sim: Sim, request_ids: list[str]) -> list[float]:
    """The completion latency legacy-sim drew for each registration, in the order given."""
    requests_ = sim.stats()["requests"]
    return [requests_[rid]["completes_at"] - requests_[rid]["submitted_at"] for rid in request_ids]


def config_of(sim: Sim) -> dict[str, Any]:
    config: dict[str, Any] = sim.http.get(sim.url("/admin/config"), timeout=TIMEOUT_S).json()
    return config


def test_a_latency_profile_set_at_run_time_is_shown_and_drawn_from(sim: Sim) -> None:
    # A lognormal without spread draws its median: the registrations' latencies say which
    # profile they were drawn from.
    shown = sim.patch_config(latency_profile="lognormal:0.25,0")
    assert shown["latency_profile"] == "lognormal:0.25,0"
    assert (shown["latency_min_s"], shown["latency_max_s"]) == (None, None)
    assert config_of(sim) == shown
    request_ids = [sim.submit() for _ in range(5)]
    for request_id in request_ids:
        assert sim.wait_terminal(request_id) == {"request_id": request_id, "status": "completed"}
    assert latencies(sim, request_ids) == pytest.approx([0.25] * 5)
    # The bounds make it a uniform again.
    assert sim.patch_config(latency_min_s=0.1, latency_max_s=0.1)["latency_profile"] == "uniform:0.1,0.1"
    assert latencies(sim, [sim.submit()]) == pytest.approx([0.1])


def test_a_drift_switches_during_the_run_and_starts_again_when_reset(sim: Sim) -> None:
    phase_s = 3.0
    began = time.time()
    shown = sim.patch_config(latency_profile=f"uniform:0.1,0.1 for {phase_s:g} then lognormal:0.3,0")
    assert shown["latency_profile"] == "uniform:0.1,0.1 for 3 then lognormal:0.3,0"
    request_ids = [sim.submit()]
    # The profile's clock started after `began`, so a registration made before began + phase_s
    # falls in the first phase whatever the machine's load.
    first_surely_early = time.time() - began < phase_s

    def switched() -> bool:
        request_ids.append(sim.submit())
        return latencies(sim, request_ids[-1:]) == pytest.approx([0.3])

    wait_until(switched, timeout=phase_s + 10, what="a registration drawn from the drift's second phase", every=0.1)
    drawn = latencies(sim, request_ids)
    assert all(d == pytest.approx(0.1) or d == pytest.approx(0.3) for d in drawn), drawn
    # Once switched, it stays switched.
    switch = next(i for i, d in enumerate(drawn) if d == pytest.approx(0.3))
    assert all(d == pytest.approx(0.3) for d in drawn[switch:]), drawn
    if first_surely_early:
        assert drawn[0] == pytest.approx(0.1)
    for request_id in (request_ids[0], request_ids[-1]):
        assert sim.wait_terminal(request_id)["status"] == "completed"

    began = time.time()
    assert sim.http.post(sim.url("/admin/reset"), timeout=TIMEOUT_S).status_code == 200
    after_reset = latencies(sim, [sim.submit()])
    if time.time() - began < phase_s:
        assert after_reset == pytest.approx([0.1])
    assert config_of(sim)["latency_profile"] == shown["latency_profile"]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"latency_profile": "uniform:0.5"}, "latency_profile: 'uniform:0.5': expected uniform:MIN,MAX"),
        ({"latency_profile": "gamma:1,2"}, "unknown kind 'gamma'"),
        ({"latency_profile": "uniform:1,2 for 10"}, "must be followed by 'then PROFILE'"),
        ({"latency_profile": ""}, "empty latency profile"),
        ({"latency_profile": 3}, "latency_profile must be a string"),
        ({"latency_profile": "lognormal:1,0.5", "latency_max_s": 2},
         "latency_profile and latency_max_s given together"),
    ],
)
def test_a_bad_latency_profile_is_refused_with_a_reason(sim: Sim, patch: dict[str, Any], message: str) -> None:
    before = config_of(sim)
    response = sim.http.patch(sim.url("/admin/config"), json=patch, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert config_of(sim) == before


def test_one_bound_cannot_reshape_a_lognormal(sim: Sim) -> None:
    sim.patch_config(latency_profile="lognormal:0.3,0.5")
    response = sim.http.patch(sim.url("/admin/config"), json={"latency_max_s": 1}, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert "latency_max_s alone cannot change the latency profile lognormal:0.3,0.5" in response.json()["error"]


def test_a_latency_profile_is_taken_from_the_environment() -> None:
    sim = start_sim({"LEGACY_SIM_LATENCY_PROFILE": "lognormal:0.2,0 for 600 then uniform:1,2"})
    try:
        assert sim.process.stdout is not None
        assert "latency profile lognormal:0.2,0 for 600 then uniform:1,2" in sim.process.stdout.readline()
        assert config_of(sim)["latency_profile"] == "lognormal:0.2,0 for 600 then uniform:1,2"
        request_id = sim.submit()
        assert latencies(sim, [request_id]) == pytest.approx([0.2])
        assert sim.wait_terminal(request_id)["status"] == "completed"
    finally:
        stop_sim(sim)


def test_a_profile_with_bounds_at_start_exits_naming_both() -> None:
    result = subprocess.run(
        [str(LEGACY_SIM), "--latency-profile", "lognormal:15,0.5"],
        env={**os.environ, "LEGACY_SIM_LATENCY_MIN_S": "5"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "LEGACY_SIM_LATENCY_MIN_S='5', --latency-profile='lognormal:15,0.5': give a latency profile" in result.stderr


@pytest.mark.parametrize(
    ("kwargs", "profile"),
    [
        ({}, "uniform:0.3,0.6"),
        ({"latency_profile": "lognormal:0.2,0.5,0.4"}, "lognormal:0.2,0.5,0.4"),
        ({"env": {"LEGACY_SIM_LATENCY_PROFILE": "uniform:0.1,0.2 for 60 then uniform:0.3,0.4"}},
         "uniform:0.1,0.2 for 60 then uniform:0.3,0.4"),
    ],
)
def test_the_harness_starts_legacy_sim_with_a_profile_that_a_reset_puts_back(kwargs: dict[str, Any],
                                                                             profile: str) -> None:
    legacy = harness.start_legacy_sim(**kwargs)
    try:
        assert legacy.configure()["latency_profile"] == profile
        legacy.configure(latency_profile="lognormal:5,1")
        legacy.reset()
        assert legacy.configure()["latency_profile"] == profile
    finally:
        legacy.stop()


# ---- process life ----


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(signum: signal.Signals) -> None:
    sim = start_sim()
    try:
        assert sim.process.stdout is not None
        banner = sim.process.stdout.readline()
        assert "listening on http://127.0.0.1:" in banner
        sim.process.send_signal(signum)
        assert sim.process.wait(timeout=10) == 0
    finally:
        stop_sim(sim)


def test_bad_environment_value_exits_naming_the_variable() -> None:
    result = subprocess.run(
        [str(LEGACY_SIM)],
        env={**os.environ, "LEGACY_SIM_POST_503_RATE": "often"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "LEGACY_SIM_POST_503_RATE" in result.stderr


def test_same_seed_gives_the_same_ids() -> None:
    first_ids = []
    for _ in range(2):
        sim = start_sim({"LEGACY_SIM_SEED": "1234"})
        try:
            first_ids.append(sim.submit())
        finally:
            stop_sim(sim)
    assert first_ids[0] == first_ids[1]
