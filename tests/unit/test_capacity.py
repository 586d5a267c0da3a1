"""The capacity model (`registrations_cli.capacity`) and the `registrations capacity` command:
distributions against seeded draws, both schedules against a seeded simulation of their polls,
the counting of hops, writes and replicas, and a command that touches no broker or MongoDB."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pika
import pymongo
import pytest
from registrations_cli import capacity
from registrations_cli.capacity import Adaptive, Figures, Fixed, LatencyError, LogNormal, Uniform, parse_latency
from registrations_cli.main import main

from legacy_sim.latency import ProfileError, parse_profile

DRAWS = 40_000


def simulate(dist: capacity.Latency, ages: list[float], *, seed: int = 7, n: int = DRAWS) -> tuple[float, float]:
    """Polls and mean detection delay of polls at `ages`, by seeded draws: the model's check."""
    rng = random.Random(seed)
    polls = delay = 0.0
    for _ in range(n):
        latency = dist.sample(rng)
        for k, age in enumerate(ages):
            if age >= latency or k == len(ages) - 1:
                polls += k + 1
                delay += max(0.0, age - latency)
                break
    return polls / n, delay / n


def fixed_ages(schedule: Fixed, deadline_s: float) -> list[float]:
    count = math.ceil((deadline_s - schedule.first_delay_s) / schedule.interval_s) + 1
    return [schedule.first_delay_s + k * schedule.interval_s for k in range(count)]


# ---- latency distributions ----


@pytest.mark.parametrize("text", ["uniform:10,20", "uniform:2,4", "lognormal:15,0.5", "lognormal:15,1,60"])
def test_capacity_cdf_and_partial_mean_agree_with_seeded_draws(text: str) -> None:
    dist, rng = parse_latency(text), random.Random(3)
    draws = [dist.sample(rng) for _ in range(DRAWS)]
    assert sum(draws) / DRAWS == pytest.approx(dist.mean, rel=0.02)
    for q in (0.1, 0.5, 0.9):
        t = dist.quantile(q)
        assert sum(1 for x in draws if x <= t) / DRAWS == pytest.approx(dist.cdf(t), abs=0.01)
        assert sum(x for x in draws if x <= t) / DRAWS == pytest.approx(dist.partial_mean(t), rel=0.03)


def test_capacity_a_capped_lognormal_puts_its_tail_at_the_cap() -> None:
    dist = LogNormal(15.0, 1.0, 30.0)
    assert dist.cdf(29.999) < 0.8 and dist.cdf(30.0) == 1.0
    assert dist.partial_mean(30.0) == pytest.approx(dist.mean)
    assert dist.mean < 30.0 and dist.quantile(0.99) == 30.0


def test_capacity_point_masses() -> None:
    for dist in (Uniform(3.0, 3.0), LogNormal(3.0, 0.0)):
        assert dist.cdf(2.99) == 0.0 and dist.cdf(3.0) == 1.0
        assert dist.mean == pytest.approx(3.0)
        assert capacity.fixed_polling(dist, Fixed(1.0, 1.0), 300.0).polls == pytest.approx(3.0)


@pytest.mark.parametrize("text", ["uniform:10,20", "uniform:0.2,0.4", "uniform:3,3", "lognormal:15,0.5",
                                  "lognormal:0.3,0,0.3", "lognormal:15,1.5,120", "uniform:1e1,2e1"])
def test_capacity_reads_latency_profiles_as_legacy_sim_does(text: str) -> None:
    assert str(parse_latency(text)) == str(parse_profile(text))


@pytest.mark.parametrize("text", ["", "uniform", "uniform:10", "uniform:20,10", "uniform:-1,2", "uniform:1,2,3",
                                  "lognormal:0,1", "lognormal:15,-1", "lognormal:15,1,10", "normal:1,2",
                                  "uniform:nan,2", "uniform:1,inf", "uniform:a,b", "lognormal:15,0.5,1,2"])
def test_capacity_refuses_what_legacy_sim_refuses(text: str) -> None:
    with pytest.raises(ProfileError):
        parse_profile(text)
    with pytest.raises(LatencyError):
        parse_latency(text)


def test_capacity_refuses_a_drift() -> None:
    with pytest.raises(LatencyError, match="drift"):
        parse_latency("uniform:10,20 for 300 then uniform:40,80")


# ---- the fixed schedule ----


@pytest.mark.parametrize(("text", "polls", "delay"), [
    ("uniform:10,20", 4.0, 1.0),   # the bench measures 3.9 polls and 1.0 s (bench/README.md)
    ("uniform:40,80", 26.5, 1.0),  # the "about 26 polls per registration"
    ("uniform:2,4", 1.0, 7.0),     # every registration waits for the first poll at 10 s
])
def test_capacity_fixed_schedule_exactly(text: str, polls: float, delay: float) -> None:
    p = capacity.fixed_polling(parse_latency(text), Fixed(10.0, 2.0), 300.0)
    assert p.polls == pytest.approx(polls)
    assert p.delay_s == pytest.approx(delay)
    assert p.timed_out == 0.0
    assert p.time_in_system_s == pytest.approx(parse_latency(text).mean + delay)


@pytest.mark.parametrize("text", ["lognormal:15,0.5", "lognormal:8,1,100", "uniform:5,25"])
def test_capacity_fixed_schedule_agrees_with_a_seeded_simulation(text: str) -> None:
    dist, schedule = parse_latency(text), Fixed(6.0, 3.0)
    model = capacity.fixed_polling(dist, schedule, 300.0)
    polls, delay = simulate(dist, fixed_ages(schedule, 300.0))
    assert model.polls == pytest.approx(polls, rel=0.02)
    assert model.delay_s == pytest.approx(delay, rel=0.03)


def test_capacity_fixed_schedule_stops_at_the_deadline() -> None:
    dist = LogNormal(60.0, 1.5)
    p = capacity.fixed_polling(dist, Fixed(10.0, 2.0), 120.0)
    assert p.polls <= 56.0  # polls at 10, 12, ..., 120
    assert p.timed_out == pytest.approx(1.0 - dist.cdf(120.0))
    assert p.time_in_system_s <= 120.0


# ---- the adaptive model ----


def test_capacity_adaptive_meets_its_target_with_fewer_polls_than_the_fixed_schedule() -> None:
    dist = parse_latency("uniform:10,20")
    adaptive = capacity.adaptive_polling(dist, Adaptive(1.5), 300.0)
    assert adaptive.delay_s <= 1.5
    assert adaptive.polls < capacity.fixed_polling(dist, Fixed(10.0, 2.0), 300.0).polls
    assert adaptive.poll_ages_s[0] >= dist.quantile(0.001)  # never before a completion is seen


def test_capacity_adaptive_polls_do_not_depend_on_the_scale_of_the_latency() -> None:
    short = capacity.adaptive_polling(parse_latency("uniform:10,20"), Adaptive(1.5), 300.0)
    long = capacity.adaptive_polling(parse_latency("uniform:40,80"), Adaptive(6.0), 300.0)
    assert long.polls == pytest.approx(short.polls, rel=0.02)
    assert long.delay_s == pytest.approx(4 * short.delay_s, rel=0.05)


def test_capacity_adaptive_caps_the_polls_and_then_misses_the_target() -> None:
    p = capacity.plan(rate=10.0, latency=parse_latency("lognormal:15,1"), schedule=Adaptive(1.5, max_polls=3.0))
    assert p.polling.polls <= 3.0
    assert p.polling.delay_s > 1.5 and p.target_met is False


def test_capacity_adaptive_plan_agrees_with_a_seeded_simulation_of_its_ages() -> None:
    dist = parse_latency("lognormal:15,0.5")
    model = capacity.adaptive_polling(dist, Adaptive(2.5, max_polls=6.0), 300.0)
    assert model.delay_s <= 2.5
    polls, delay = simulate(dist, list(model.poll_ages_s))
    assert model.polls == pytest.approx(polls, rel=0.03)
    assert model.delay_s == pytest.approx(delay, rel=0.05)


def test_capacity_adaptive_on_a_point_mass_polls_once_when_it_is_done() -> None:
    p = capacity.adaptive_polling(Uniform(3.0, 3.0), Adaptive(0.3), 300.0)
    assert p.poll_ages_s == (3.0,) and p.polls == 1.0 and p.delay_s == 0.0


def test_capacity_adaptive_polls_end_at_the_deadline() -> None:
    dist = LogNormal(15.0, 2.0)
    p = capacity.adaptive_polling(dist, Adaptive(1.5), 120.0)
    assert max(p.poll_ages_s) == 120.0
    assert p.timed_out == pytest.approx(1.0 - dist.cdf(120.0))
    everything_late = capacity.adaptive_polling(parse_latency("uniform:10,20"), Adaptive(1.5), 5.0)
    assert everything_late.poll_ages_s == (5.0,) and everything_late.timed_out == 1.0


# ---- the flows ----


def test_capacity_broker_messages_count_three_per_hop() -> None:
    latency = parse_latency("uniform:10,20")
    fixed = capacity.plan(rate=100.0, latency=latency, schedule=Fixed(10.0, 2.0))
    polls = fixed.polling.polls
    # Inbound: a publish and a delivery. Each poll: a publish into a wait queue, its dead-lettering
    # into pending, its delivery to the poller.
    assert fixed.broker_messages_per_s == pytest.approx(100.0 * (2 + 3 * polls))
    assert fixed.broker_dead_lettered_per_s == pytest.approx(100.0 * polls)
    no_first_delay = capacity.plan(rate=100.0, latency=latency, schedule=Fixed(0.0, 2.0))
    p0 = no_first_delay.polling.polls
    # Straight into pending (a publish and a delivery); the first poll needs no hop.
    assert no_first_delay.broker_messages_per_s == pytest.approx(100.0 * (2 + 2 + 3 * (p0 - 1)))
    adaptive = capacity.plan(rate=100.0, latency=latency, schedule=Adaptive(1.5))
    pa = adaptive.polling.polls
    # Handed to pending, then up to two hops to the first poll, one hop to each later one.
    assert adaptive.broker_messages_per_s == pytest.approx(100.0 * (2 + 2 + 3 * (pa + 1)))
    assert adaptive.pending_enqueued_per_s == pytest.approx(100.0 * (pa + 2))


def test_capacity_in_flight_is_littles_law() -> None:
    p = capacity.plan(rate=1000.0, latency=parse_latency("uniform:10,20"), schedule=Fixed(10.0, 2.0))
    assert p.in_flight == pytest.approx(1000.0 * 16.0)
    assert p.legacy_requests_per_s == pytest.approx(1000.0 * 5.0)


def test_capacity_mongodb_operations_per_outcome() -> None:
    latency, schedule = parse_latency("uniform:10,20"), Fixed(10.0, 2.0)
    registered = capacity.plan(rate=10.0, latency=latency, schedule=schedule)
    assert registered.mongodb_writes_per_s == pytest.approx(30.0)
    assert registered.mongodb_reads_per_s == pytest.approx(20.0)
    failed = capacity.plan(rate=10.0, latency=latency, schedule=schedule, failed_share=1.0)
    assert failed.mongodb_writes_per_s == pytest.approx(10.0 * (6 + 1 / 32))
    assert failed.broker_published_per_s == pytest.approx(registered.broker_published_per_s + 10.0)


def test_capacity_replicas_from_cores_and_from_workers() -> None:
    figures = Figures(submitter_ms_per_registration=1.0, poller_ms_per_message=1.0, utilization=0.5,
                      poller_workers=10, legacy_call_s=0.1)
    p = capacity.plan(rate=1000.0, latency=parse_latency("uniform:10,20"), schedule=Fixed(10.0, 2.0),
                      figures=figures)
    assert p.submitter.cores == pytest.approx(1.0) and p.submitter.by_cpu == 2
    assert p.poller.cores == pytest.approx(4.0) and p.poller.by_cpu == 8
    # 4,000 polls/s held 0.1 s each: 400 workers busy, 5 per replica.
    assert p.poller.by_workers == 80 and p.poller.needed == 80
    assert capacity.plan(rate=0.01, latency=parse_latency("uniform:10,20"), schedule=Fixed()).poller.needed == 1


# ---- the command ----


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach RabbitMQ or MongoDB fails the test; the environment is unusable too."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the capacity command connected to something")

    monkeypatch.setattr(pika, "BlockingConnection", refuse)
    monkeypatch.setattr(pika, "SelectConnection", refuse)
    monkeypatch.setattr(pymongo, "MongoClient", refuse)
    monkeypatch.setenv("RABBITMQ_URL", "not a url")
    monkeypatch.setenv("MONGODB_URI", "not a url either")


@pytest.mark.usefixtures("no_connections")
def test_capacity_command_prints_a_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--rate", "1000", "--latency", "uniform:10,20", "--target-delay", "1.5"]) == 0
    text = capsys.readouterr().out
    assert "1,000 registrations/s, latency uniform:10,20" in text and "adaptive schedule" in text
    assert "registrations in flight" in text and "poller replicas" in text


@pytest.mark.usefixtures("no_connections")
def test_capacity_command_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--rate", "100", "--schedule", "fixed", "--first-delay", "10", "--interval", "2",
                 "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["polling"]["polls_per_registration"] == 4.0
    assert doc["in_flight"] == 1600
    assert doc["legacy"]["requests_per_s"] == 500.0
    assert doc["broker"]["messages_per_s"] == 1400.0
    assert doc["inputs"]["schedule"] == {"kind": "fixed", "first_delay_s": 10.0, "interval_s": 2.0}


@pytest.mark.usefixtures("no_connections")
def test_capacity_command_without_headers_prints_rows_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--rate", "10", "--no-headers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("polls per registration") and len(lines) == 22


@pytest.mark.usefixtures("no_connections")
@pytest.mark.parametrize("argv", [
    ["capacity"],
    ["capacity", "--rate", "0"],
    ["capacity", "--rate", "10", "--latency", "uniform:20,10"],
    ["capacity", "--rate", "10", "--latency", "uniform:10,20 for 60 then uniform:40,80"],
    ["capacity", "--rate", "10", "--first-delay", "5"],
    ["capacity", "--rate", "10", "--schedule", "fixed", "--target-delay", "1"],
    ["capacity", "--rate", "10", "--failed-share", "1.5"],
    ["capacity", "--rate", "10", "--utilization", "0"],
    ["capacity", "--rate", "10", "--max-polls", "0.5"],
])
def test_capacity_command_wrong_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip()
