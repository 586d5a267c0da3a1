"""Unit tests of legacy-sim's pure parts: the registry (with a fake clock), validation and config."""

from __future__ import annotations

import json
import random
import re

import pytest

from legacy_sim.config import Config, ConfigError, apply_patch, format_retry_after, load_config
from legacy_sim.latency import Uniform
from legacy_sim.registry import Registry, new_request_id
from legacy_sim.validation import InvalidRegistration, parse_registration

ID_SHAPE = re.compile(r"[0-9A-F]{6}-[A-Z]")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_registry(seed: int = 7) -> tuple[Registry, FakeClock]:
    clock = FakeClock()
    return Registry(clock=clock, rng=random.Random(seed)), clock


def submit(
    registry: Registry,
    *,
    name: str = "Maria",
    user_id: str | None = "u-1",
    latency: tuple[float, float] = (10.0, 20.0),
    fail_prefix: str | None = "FAIL",
    key: str | None = None,
) -> str:
    return registry.submit(
        user_id=user_id,
        name=name,
        latency=Uniform(*latency),
        latency_age_s=0.0,
        fail_prefix=fail_prefix,
        idempotency_key=key,
    )


def post(registry: Registry, key: str) -> str:
    """What the app does with a POST that carries a key: replay it, or register it under the key."""
    return registry.replay(key) or submit(registry, key=key)


# ---- request ids ----


def test_request_ids_have_the_legacy_shape() -> None:
    rng = random.Random(1)
    for _ in range(1000):
        assert ID_SHAPE.fullmatch(new_request_id(rng))


def test_request_ids_are_unique_even_when_the_rng_repeats() -> None:
    class RepeatingRandom(random.Random):
        """Yields the same id twice in a row, then moves on: forces a collision."""

        def __init__(self) -> None:
            super().__init__(0)
            self.calls = 0

        def getrandbits(self, k: int, /) -> int:
            self.calls += 1
            return 0xABCDEF if self.calls <= 2 else 0x123456

        def randrange(self, *args: object, **kwargs: object) -> int:
            return 0

    registry = Registry(clock=FakeClock(), rng=RepeatingRandom())
    first = submit(registry)
    second = submit(registry)
    assert first == "ABCDEF-A"
    assert second == "123456-A"


def test_many_submissions_get_distinct_ids() -> None:
    registry, _ = make_registry()
    ids = {submit(registry) for _ in range(5000)}
    assert len(ids) == 5000
    assert registry.summary()["submissions_total"] == 5000


# ---- life of a registration ----


def test_processing_until_the_completion_time_then_completed() -> None:
    registry, clock = make_registry()
    rid = submit(registry, latency=(10.0, 10.0))
    assert registry.poll(rid) == "processing"
    clock.now += 9.999
    assert registry.poll(rid) == "processing"
    clock.now += 0.001
    assert registry.poll(rid) == "completed"
    clock.now += 100
    assert registry.poll(rid) == "completed"


def test_completion_time_is_within_the_latency_range() -> None:
    registry, clock = make_registry()
    ids = [submit(registry, latency=(10.0, 20.0)) for _ in range(200)]
    requests = registry.stats()["requests"]
    delays = [requests[rid]["completes_at"] - requests[rid]["submitted_at"] for rid in ids]
    assert all(10.0 <= d <= 20.0 for d in delays)
    # A uniform draw, not a constant: the spread covers most of the range.
    assert max(delays) - min(delays) > 8.0
    clock.now += 20.0
    assert all(registry.poll(rid) == "completed" for rid in ids)


def test_fail_prefix_makes_the_registration_fail() -> None:
    registry, clock = make_registry()
    failing = submit(registry, name="FAIL Maria", latency=(1.0, 1.0))
    fine = submit(registry, name="Maria FAIL", latency=(1.0, 1.0))
    lower = submit(registry, name="fail Maria", latency=(1.0, 1.0))
    assert registry.poll(failing) == "processing"
    clock.now += 1.0
    assert registry.poll(failing) == "failed"
    assert registry.poll(fine) == "completed"
    assert registry.poll(lower) == "completed"


@pytest.mark.parametrize("prefix", [None, ""])
def test_an_empty_fail_prefix_disables_failures(prefix: str | None) -> None:
    registry, clock = make_registry()
    rid = submit(registry, name="FAIL Maria", latency=(1.0, 1.0), fail_prefix=prefix)
    clock.now += 1.0
    assert registry.poll(rid) == "completed"


def test_unknown_id_is_none_and_counted_apart() -> None:
    registry, _ = make_registry()
    assert registry.poll("000000-A") is None
    summary = registry.summary()
    assert summary["unknown_polls_total"] == 1
    assert summary["polls_total"] == 0


# ---- counters and statistics ----


def test_counters_per_user_per_request_and_faults() -> None:
    registry, _ = make_registry()
    a1 = submit(registry, user_id="a", latency=(5.0, 5.0))
    submit(registry, user_id="a", latency=(5.0, 5.0))
    b1 = submit(registry, user_id="b", latency=(5.0, 5.0))
    submit(registry, user_id=None, latency=(5.0, 5.0))
    registry.count_rejection()
    registry.count_post_503()
    registry.count_post_503()
    registry.count_get_503()
    for _ in range(3):
        registry.poll(a1)
    registry.poll(b1)

    stats = registry.stats()
    assert stats["submissions_total"] == 4
    assert stats["submissions_by_user"] == {"a": 2, "b": 1}
    assert stats["rejected_total"] == 1
    assert stats["post_503_total"] == 2
    assert stats["get_503_total"] == 1
    assert stats["polls_total"] == 4
    assert stats["polls_by_request"][a1] == 3
    assert stats["polls_by_request"][b1] == 1
    assert stats["polls_per_registration"] == pytest.approx(4 / 4)
    assert stats["requests"][a1] == {
        "user_id": "a",
        "submitted_at": 1000.0,
        "completes_at": 1005.0,
        "outcome": "completed",
        "detected_at": None,
    }
    # The whole thing is what /admin/stats sends: it must be JSON-encodable.
    json.dumps(stats)


def test_detection_delay_is_measured_from_the_first_terminal_poll() -> None:
    registry, clock = make_registry()
    early = submit(registry, latency=(10.0, 10.0))
    late = submit(registry, latency=(10.0, 10.0))
    never = submit(registry, latency=(10.0, 10.0))
    assert registry.summary()["detection_delay_mean_s"] is None

    clock.now += 11.0
    registry.poll(early)
    clock.now += 2.0
    registry.poll(late)
    registry.poll(early)  # a later poll does not move the detection time

    stats = registry.stats()
    assert stats["requests"][early]["detected_at"] == 1011.0
    assert stats["requests"][late]["detected_at"] == 1013.0
    assert stats["requests"][never]["detected_at"] is None
    assert stats["detection_delay_mean_s"] == pytest.approx((1.0 + 3.0) / 2)
    assert stats["detected_total"] == 2


def test_summary_has_only_scalars_and_empty_ratios_are_null() -> None:
    registry, _ = make_registry()
    summary = registry.summary()
    assert summary["polls_per_registration"] is None
    assert all(not isinstance(v, dict | list) for v in summary.values())
    assert "requests" not in summary


def test_reset_clears_everything() -> None:
    registry, _ = make_registry()
    rid = submit(registry)
    registry.poll(rid)
    registry.count_rejection()
    registry.count_get_503()
    registry.reset()
    stats = registry.stats()
    assert stats["submissions_total"] == 0
    assert stats["polls_total"] == 0
    assert stats["rejected_total"] == 0
    assert stats["get_503_total"] == 0
    assert stats["requests"] == {}
    assert stats["submissions_by_user"] == {}
    assert registry.poll(rid) is None


# ---- idempotency keys ----


def test_a_known_key_gets_its_request_id_again_and_registers_nothing() -> None:
    registry, _ = make_registry()
    first = post(registry, "u-1|mid:m-1")
    assert post(registry, "u-1|mid:m-1") == first
    assert post(registry, "u-1|mid:m-1") == first
    other = post(registry, "u-1|mid:m-2")  # another attempt of the same user registers
    assert other != first
    summary = registry.summary()
    assert summary["submissions_total"] == 2
    assert summary["idempotent_replays_total"] == 2
    assert summary["idempotency_keys"] == 2
    assert registry.stats()["submissions_by_user"] == {"u-1": 2}


def test_a_key_is_kept_24_hours_then_forgotten() -> None:
    registry, clock = make_registry()
    first = post(registry, "k")
    clock.now += 24 * 3600 - 1
    assert registry.replay("k") == first
    clock.now += 1
    assert registry.replay("k") is None
    assert registry.summary()["idempotency_keys"] == 0
    again = post(registry, "k")  # registered anew, and kept under the key from now on
    assert again != first and registry.replay("k") == again


def test_the_key_store_holds_one_day_of_keys_however_long_it_runs() -> None:
    registry, clock = make_registry()
    for hour in range(72):
        for n in range(10):
            post(registry, f"k-{hour}-{n}")
        clock.now += 3600
    # The last 24 hours' keys, the older ones dropped as new POSTs came.
    assert registry.summary()["idempotency_keys"] == 24 * 10
    assert registry.summary()["submissions_total"] == 72 * 10


def test_an_expired_key_behind_a_live_one_is_not_replayed() -> None:
    registry, clock = make_registry()
    clock.now = 2000.0
    post(registry, "later")
    clock.now = 1000.0  # the wall clock was set back
    post(registry, "earlier")
    clock.now = 1000.0 + 24 * 3600
    assert registry.replay("earlier") is None
    assert registry.replay("later") is not None


def test_reset_forgets_the_keys() -> None:
    registry, _ = make_registry()
    post(registry, "k")
    post(registry, "k")
    registry.reset()
    assert registry.replay("k") is None
    assert registry.summary()["idempotent_replays_total"] == 0
    assert registry.summary()["idempotency_keys"] == 0


# ---- validation ----

VALID = {"user_id": "u-1", "name": "Maria da Silva", "email": "maria@example.com", "cpf": "12345678909"}


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_valid_registration_is_returned_whole() -> None:
    body = {**VALID, "extra": [1, 2]}
    assert parse_registration(encode(body)) == body


def test_user_id_is_optional() -> None:
    body = {k: v for k, v in VALID.items() if k != "user_id"}
    assert parse_registration(encode(body)) == body


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        (b"", "body is not valid JSON"),
        (encode([VALID]), "body must be a JSON object"),
        (encode("text"), "body must be a JSON object"),
        (encode({**VALID, "name": ""}), "name"),
        (encode({**VALID, "name": 5}), "name"),
        (encode({k: v for k, v in VALID.items() if k != "name"}), "name"),
        (encode({**VALID, "email": "no-at-sign"}), "email"),
        (encode({**VALID, "email": ["a@b"]}), "email"),
        (encode({k: v for k, v in VALID.items() if k != "email"}), "email"),
        (encode({**VALID, "cpf": "1234567890"}), "cpf"),
        (encode({**VALID, "cpf": "123456789012"}), "cpf"),
        (encode({**VALID, "cpf": "1234567890a"}), "cpf"),
        (encode({**VALID, "cpf": "12345678909\n"}), "cpf"),
        (encode({**VALID, "cpf": "١٢٣٤٥٦٧٨٩٠٩"}), "cpf"),  # Arabic-Indic digits are not [0-9]
        (encode({**VALID, "cpf": 12345678909}), "cpf"),
        (encode({k: v for k, v in VALID.items() if k != "cpf"}), "cpf"),
        (encode({**VALID, "user_id": 7}), "user_id"),
        (encode({**VALID, "user_id": None}), "user_id"),
    ],
)
def test_invalid_registrations_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRegistration) as excinfo:
        parse_registration(raw)
    assert reason in str(excinfo.value)


# ---- configuration ----


def test_defaults_without_environment() -> None:
    config = load_config([], {})
    assert config == Config()
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert (config.latency_min_s, config.latency_max_s) == (10.0, 20.0)
    assert config.accept_latency_s == 0.03
    assert config.fail_prefix == "FAIL"
    assert config.seed is None


def test_environment_is_read_and_flags_override_it() -> None:
    environ = {
        "HTTP_PORT": "9000",
        "LEGACY_SIM_LATENCY_MIN_S": "0.2",
        "LEGACY_SIM_LATENCY_MAX_S": "0.4",
        "LEGACY_SIM_POST_503_RATE": "0.25",
        "LEGACY_SIM_RETRY_AFTER_S": "0.5",
        "LEGACY_SIM_FAIL_PREFIX": "",
        "LEGACY_SIM_SEED": "42",
    }
    config = load_config(["--port", "9001", "--get-503-rate", "1"], environ)
    assert config.port == 9001
    assert (config.latency_min_s, config.latency_max_s) == (0.2, 0.4)
    assert config.post_503_rate == 0.25
    assert config.get_503_rate == 1.0
    assert config.retry_after_s == 0.5
    assert config.fail_prefix is None
    assert config.seed == 42


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"HTTP_PORT": "eighty"}, "HTTP_PORT"),
        ({"HTTP_PORT": "70000"}, "HTTP_PORT"),
        ({"LEGACY_SIM_LATENCY_MIN_S": "-1"}, "LEGACY_SIM_LATENCY_MIN_S"),
        ({"LEGACY_SIM_ACCEPT_LATENCY_S": "nan"}, "LEGACY_SIM_ACCEPT_LATENCY_S"),
        ({"LEGACY_SIM_POST_503_RATE": "1.5"}, "LEGACY_SIM_POST_503_RATE"),
        ({"LEGACY_SIM_GET_503_RATE": "x"}, "LEGACY_SIM_GET_503_RATE"),
        ({"LEGACY_SIM_SEED": "1.5"}, "LEGACY_SIM_SEED"),
        ({"LEGACY_SIM_LATENCY_MIN_S": "30"}, "LEGACY_SIM_LATENCY_MIN_S"),
    ],
)
def test_a_bad_value_names_its_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config([], environ)


def test_every_bad_value_is_named_at_once_by_where_it_came_from() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(["--seed", "x"], {"HTTP_PORT": "eighty", "LEGACY_SIM_POST_503_RATE": "often",
                                      "LEGACY_SIM_LATENCY_MAX_S": "1"})
    message = str(caught.value)
    for named in ("--seed='x'", "HTTP_PORT='eighty'", "LEGACY_SIM_POST_503_RATE='often'"):
        assert named in message
    assert "LATENCY" not in message


def test_only_the_mapping_given_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEGACY_SIM_SEED", "7")
    assert load_config([], {}).seed is None
    assert Config().seed is None


def test_patch_changes_only_the_given_fields() -> None:
    config = apply_patch(Config(), {"post_503_rate": 1, "down": True, "fail_prefix": None})
    assert config.post_503_rate == 1.0
    assert config.down is True
    assert config.fail_prefix is None
    assert config.latency_min_s == Config().latency_min_s


@pytest.mark.parametrize(
    "patch",
    [
        [],
        {"port": 1},
        {"post_503_rate": 2},
        {"latency_min_s": -1},
        {"latency_min_s": "1"},
        {"latency_min_s": True},
        {"down": 1},
        {"fail_prefix": 3},
        {"latency_min_s": 30},
    ],
)
def test_bad_patches_are_refused(patch: object) -> None:
    with pytest.raises(ConfigError):
        apply_patch(Config(), patch)


@pytest.mark.parametrize(("seconds", "header"), [(1.0, "1"), (0, "0"), (0.5, "0.5"), (2.25, "2.25")])
def test_retry_after_is_written_as_given(seconds: float, header: str) -> None:
    assert format_retry_after(seconds) == header


def test_each_post_arrival_is_stamped_and_a_reset_forgets_them() -> None:
    registry, clock = make_registry()
    registry.note_post()
    clock.now += 2.5
    registry.note_post()
    assert registry.stats()["post_arrivals"] == [1000.0, 1002.5]
    registry.reset()
    assert registry.stats()["post_arrivals"] == []
