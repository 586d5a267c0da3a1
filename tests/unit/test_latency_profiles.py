"""Unit tests of legacy-sim's latency profiles: parsing, sampling, drift, and how the settings and
PATCH /admin/config take them."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics

import pytest

from legacy_sim.app import Simulator
from legacy_sim.config import Config, ConfigError, apply_patch, load_config
from legacy_sim.latency import CEILING_S, Drift, LogNormal, ProfileError, Step, Uniform, parse_profile

DRAWS = 20_000


def draws(text: str, *, seed: int = 11, age_s: float = 0.0, n: int = DRAWS) -> list[float]:
    profile, rng = parse_profile(text), random.Random(seed)
    return [profile.sample(rng, age_s) for _ in range(n)]


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


# ---- parsing ----


@pytest.mark.parametrize(
    ("text", "profile"),
    [
        ("uniform:10,20", Uniform(10.0, 20.0)),
        ("uniform:0.2,0.4", Uniform(0.2, 0.4)),
        ("uniform:3,3", Uniform(3.0, 3.0)),
        ("lognormal:15,0.5", LogNormal(15.0, 0.5)),
        ("lognormal:0.3,0,0.3", LogNormal(0.3, 0.0, 0.3)),
        ("lognormal:15,0.5,120", LogNormal(15.0, 0.5, 120.0)),
        ("uniform:10,20 for 300 then uniform:40,80",
         Drift((Step(Uniform(10.0, 20.0), 300.0),), Uniform(40.0, 80.0))),
        ("uniform:2,4 for 60 then lognormal:15,0.5 for 1.5 then uniform:40,80",
         Drift((Step(Uniform(2.0, 4.0), 60.0), Step(LogNormal(15.0, 0.5), 1.5)), Uniform(40.0, 80.0))),
    ],
)
def test_a_profile_parses_and_is_written_back_as_given(text: str, profile: object) -> None:
    assert parse_profile(text) == profile
    assert str(profile) == text
    assert parse_profile(str(profile)) == profile


def test_numbers_are_written_in_their_shortest_form_and_spaces_are_free() -> None:
    assert str(parse_profile("uniform:1e1,20.0")) == "uniform:10,20"
    assert str(parse_profile("  lognormal:15,0.25   for\t30\n then  uniform:1,2 ")) == \
        "lognormal:15,0.25 for 30 then uniform:1,2"
    # Any float comes back exactly.
    assert parse_profile(str(Uniform(0.1 + 0.2, 1 / 3))) == Uniform(0.1 + 0.2, 1 / 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty latency profile"),
        ("   ", "empty latency profile"),
        ("uniform", "'uniform': expected KIND:NUMBERS"),
        ("gamma:1,2", "unknown kind 'gamma'; the kinds are uniform and lognormal"),
        ("Uniform:1,2", "unknown kind 'Uniform'"),
        ("uniform:10", "expected uniform:MIN,MAX, comma-separated with no spaces, got 1 value(s)"),
        ("uniform:1,2,3", "got 3 value(s)"),
        ("uniform: 1,2", "got 1 value(s)"),
        ("lognormal:1", "expected lognormal:MEDIAN,SIGMA or lognormal:MEDIAN,SIGMA,MAX"),
        ("lognormal:1,2,3,4", "got 4 value(s)"),
        ("uniform:10,x", "'uniform:10,x': MAX 'x' is not a number"),
        ("uniform:,20", "MIN '' is not a number"),
        ("lognormal:nan,1", "MEDIAN must be a finite number, not 'nan'"),
        ("uniform:1,inf", "MAX must be a finite number, not 'inf'"),
        ("uniform:-1,2", "'uniform:-1,2': MIN must be >= 0"),
        ("uniform:20,10", "'uniform:20,10': MIN (20) must not exceed MAX (10)"),
        ("lognormal:0,1", "MEDIAN must be > 0"),
        ("lognormal:5,-1", "SIGMA must be >= 0"),
        ("lognormal:5,1,4", "MAX (4) must not be below MEDIAN (5)"),
        ("uniform:1,2 uniform:3,4", "after 'uniform:1,2': expected 'for SECONDS then PROFILE', got 'uniform:3,4'"),
        ("uniform:1,2 then uniform:3,4", "expected 'for SECONDS then PROFILE', got 'then uniform:3,4'"),
        ("uniform:1,2 for", "'for' must be followed by SECONDS then PROFILE"),
        ("uniform:1,2 for 5m then uniform:3,4", "'for 5m': '5m' is not a number of seconds"),
        ("uniform:1,2 for 0 then uniform:3,4", "'for 0': the seconds must be a finite number > 0"),
        ("uniform:1,2 for -3 then uniform:3,4", "'for -3': the seconds must be a finite number > 0"),
        ("uniform:1,2 for 5", "'uniform:1,2 for 5': must be followed by 'then PROFILE'"),
        ("uniform:1,2 for 5 uniform:3,4", "must be followed by 'then PROFILE'"),
        ("uniform:1,2 for 5 then", "'uniform:1,2 for 5 then': a phase must follow 'then'"),
        ("uniform:1,2 for 5 then uniform:4,3", "'uniform:4,3': MIN (4) must not exceed MAX (3)"),
        ("uniform:1,2>uniform:3,4", "'uniform:1,2>uniform:3,4': expected uniform:MIN,MAX"),
    ],
)
def test_a_bad_profile_is_refused_with_where_and_why(text: str, message: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_profile(text)
    assert message in str(caught.value)


# ---- sampling ----


def test_a_uniform_draws_what_legacy_sim_always_drew() -> None:
    # A seeded run is the same as before profiles existed.
    rng = random.Random(3)
    expected = [rng.uniform(10.0, 20.0) for _ in range(100)]
    assert draws("uniform:10,20", seed=3, n=100) == expected


def test_a_uniform_spreads_over_its_bounds() -> None:
    values = draws("uniform:10,20")
    assert min(values) >= 10.0 and max(values) <= 20.0
    assert statistics.median(values) == pytest.approx(15.0, abs=0.3)
    assert quantile(values, 0.1) == pytest.approx(11.0, abs=0.3)
    assert quantile(values, 0.9) == pytest.approx(19.0, abs=0.3)


def test_a_lognormal_has_its_median_and_its_sigma() -> None:
    values = draws("lognormal:15,0.5")
    assert statistics.median(values) == pytest.approx(15.0, rel=0.03)
    # One sigma either side of the median: the 15.9th and 84.1st percentiles.
    assert quantile(values, 0.159) == pytest.approx(15.0 * math.exp(-0.5), rel=0.05)
    assert quantile(values, 0.841) == pytest.approx(15.0 * math.exp(0.5), rel=0.05)
    logs = [math.log(v) for v in values]
    assert statistics.pstdev(logs) == pytest.approx(0.5, rel=0.03)
    assert min(values) > 0


def test_a_lognormal_is_cut_at_its_max() -> None:
    values = draws("lognormal:10,1,20")
    assert max(values) == 20.0
    # P(Z > ln 2) is about 0.244: that share sits at the max.
    assert sum(v == 20.0 for v in values) / len(values) == pytest.approx(0.244, abs=0.02)
    assert statistics.median(values) == pytest.approx(10.0, rel=0.05)


def test_a_lognormal_never_overflows_nor_exceeds_a_day() -> None:
    values = draws("lognormal:1,1000", n=2000)
    assert max(values) == CEILING_S
    assert all(0 <= v <= CEILING_S for v in values)
    assert max(draws("lognormal:10,1,1000000", n=2000)) <= CEILING_S


def test_a_lognormal_without_spread_is_its_median() -> None:
    assert set(draws("lognormal:0.25,0", n=50)) == {0.25}


def test_the_same_seed_draws_the_same_latencies() -> None:
    text = "lognormal:1,0.4 for 5 then uniform:2,3"
    assert draws(text, seed=5, n=500) == draws(text, seed=5, n=500)
    assert draws(text, seed=5, n=500) != draws(text, seed=6, n=500)


def test_a_drift_switches_phase_at_its_time() -> None:
    drift = parse_profile("uniform:1,1 for 10 then uniform:2,2 for 5 then lognormal:3,0")
    assert isinstance(drift, Drift)
    rng = random.Random(1)
    assert [drift.sample(rng, age) for age in (0.0, 9.999, 10.0, 14.999, 15.0, 1e6)] == [1, 1, 2, 2, 3, 3]
    assert drift.phase_at(9.5) == Uniform(1.0, 1.0)
    assert drift.phase_at(10.0) == Uniform(2.0, 2.0)


def test_a_drift_draws_each_phase_from_its_own_distribution() -> None:
    text = "uniform:10,20 for 300 then lognormal:60,0.3"
    before, after = draws(text, age_s=299.0), draws(text, age_s=300.0)
    assert min(before) >= 10 and max(before) <= 20
    assert statistics.median(after) == pytest.approx(60.0, rel=0.03)


# ---- settings ----


def test_the_default_profile_is_uniform_between_the_bounds() -> None:
    config = load_config([], {})
    assert config.profile == Uniform(10.0, 20.0)
    shown = config.to_json()
    assert (shown["latency_min_s"], shown["latency_max_s"], shown["latency_profile"]) == (10.0, 20.0, "uniform:10,20")
    bounded = load_config(["--latency-min-s", "0.2"], {"LEGACY_SIM_LATENCY_MAX_S": "0.4"})
    assert bounded.profile == Uniform(0.2, 0.4)
    assert bounded.to_json()["latency_profile"] == "uniform:0.2,0.4"


def test_a_profile_is_read_from_the_environment_and_the_flag_wins() -> None:
    environ = {"LEGACY_SIM_LATENCY_PROFILE": "lognormal:15,0.5"}
    assert load_config([], environ).profile == LogNormal(15.0, 0.5)
    config = load_config(["--latency-profile", "uniform:1,2 for 30 then uniform:3,4"], environ)
    assert config.profile == Drift((Step(Uniform(1.0, 2.0), 30.0),), Uniform(3.0, 4.0))
    shown = config.to_json()
    # The bounds describe a plain uniform only.
    assert (shown["latency_min_s"], shown["latency_max_s"]) == (None, None)
    assert shown["latency_profile"] == "uniform:1,2 for 30 then uniform:3,4"


def test_a_uniform_profile_is_the_same_as_its_bounds() -> None:
    assert load_config(["--latency-profile", "uniform:1,2"], {}) == \
        load_config([], {"LEGACY_SIM_LATENCY_MIN_S": "1", "LEGACY_SIM_LATENCY_MAX_S": "2"})


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        ([], {"LEGACY_SIM_LATENCY_PROFILE": "lognormal:5,1", "LEGACY_SIM_LATENCY_MIN_S": "1"},
         "LEGACY_SIM_LATENCY_MIN_S='1', LEGACY_SIM_LATENCY_PROFILE='lognormal:5,1': give a latency profile or "
         "the latency bounds, not both"),
        (["--latency-max-s", "3"], {"LEGACY_SIM_LATENCY_PROFILE": "uniform:1,3"},
         "--latency-max-s='3', LEGACY_SIM_LATENCY_PROFILE='uniform:1,3': give a latency profile or"),
        (["--latency-profile", "lognormal:5"], {},
         "--latency-profile='lognormal:5': 'lognormal:5': expected lognormal:MEDIAN,SIGMA"),
        ([], {"LEGACY_SIM_LATENCY_PROFILE": ""}, "LEGACY_SIM_LATENCY_PROFILE='': empty latency profile"),
    ],
)
def test_a_bad_or_conflicting_profile_names_where_it_came_from(argv: list[str], environ: dict[str, str],
                                                               named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(argv, environ)
    assert named in str(caught.value)


def test_a_patch_sets_a_profile_and_the_bounds_set_a_uniform_again() -> None:
    skewed = apply_patch(Config(), {"latency_profile": "lognormal:15,0.5,120"})
    assert skewed.profile == LogNormal(15.0, 0.5, 120.0)
    assert skewed.to_json()["latency_profile"] == "lognormal:15,0.5,120"
    assert apply_patch(skewed, {"latency_min_s": 1, "latency_max_s": 2}).profile == Uniform(1.0, 2.0)
    # A plain uniform is kept as its bounds, so that one bound can then move alone.
    uniform = apply_patch(skewed, {"latency_profile": "uniform:3,4"})
    assert uniform == apply_patch(Config(), {"latency_min_s": 3, "latency_max_s": 4})
    assert apply_patch(uniform, {"latency_max_s": 9}).profile == Uniform(3.0, 9.0)
    # The other fields are untouched.
    assert apply_patch(skewed, {"down": True}).profile == skewed.profile


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"latency_profile": "uniform:3,1"}, "latency_profile: 'uniform:3,1': MIN (3) must not exceed MAX (1)"),
        ({"latency_profile": 5}, "latency_profile must be a string"),
        ({"latency_profile": None}, "latency_profile must be a string"),
        ({"latency_profile": "lognormal:1,1", "latency_min_s": 1},
         "latency_profile and latency_min_s given together: give one"),
        ({"latency_profile": "lognormal:1,1", "latency_min_s": 1, "latency_max_s": 2},
         "latency_profile and latency_min_s/latency_max_s given together"),
    ],
)
def test_a_bad_profile_patch_is_refused_with_a_reason(patch: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_patch(Config(), patch)
    assert message in str(caught.value)


def test_one_bound_alone_cannot_change_a_lognormal() -> None:
    skewed = apply_patch(Config(), {"latency_profile": "lognormal:15,0.5"})
    with pytest.raises(ConfigError) as caught:
        apply_patch(skewed, {"latency_min_s": 1})
    assert "latency_min_s alone cannot change the latency profile lognormal:15,0.5" in str(caught.value)
    with pytest.raises(ConfigError, match="must not exceed"):
        apply_patch(skewed, {"latency_min_s": 3, "latency_max_s": 2})


# ---- the simulator: which registrations a profile applies to ----


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


BODY = json.dumps({"user_id": "u-1", "name": "Maria", "email": "maria@example.com", "cpf": "12345678909"}).encode()


def latency_of_next(sim: Simulator) -> float:
    response = asyncio.run(sim.submit(BODY))
    request_id = json.loads(bytes(response.body))["request_id"]
    entry = sim.registry.stats()["requests"][request_id]
    return float(entry["completes_at"] - entry["submitted_at"])


def test_a_drift_counts_from_the_start_then_from_each_change_and_each_reset() -> None:
    clock = FakeClock()
    config = load_config(["--accept-latency-s", "0", "--latency-profile", "uniform:1,1 for 10 then uniform:5,5"], {})
    sim = Simulator(config, clock=clock)
    assert latency_of_next(sim) == 1.0
    clock.now += 9.9
    assert latency_of_next(sim) == 1.0
    clock.now += 0.1
    assert latency_of_next(sim) == 5.0
    # Setting a profile at run time starts it from its first phase, for registrations from then on.
    sim.reconfigure({"latency_profile": "uniform:2,2 for 3 then uniform:7,7"})
    assert latency_of_next(sim) == 2.0
    clock.now += 3
    assert latency_of_next(sim) == 7.0
    # A change of another setting leaves the drift's clock alone.
    sim.reconfigure({"down": False})
    assert latency_of_next(sim) == 7.0
    sim.reset()
    assert latency_of_next(sim) == 2.0


def test_a_refused_patch_changes_nothing() -> None:
    clock = FakeClock()
    sim = Simulator(load_config(["--accept-latency-s", "0", "--latency-profile", "uniform:1,1 for 10 then uniform:5,5"],
                                {}), clock=clock)
    clock.now += 20
    with pytest.raises(ConfigError):
        sim.reconfigure({"latency_profile": "uniform:2,1"})
    assert latency_of_next(sim) == 5.0
