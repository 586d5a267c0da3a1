"""Settings from a plain mapping: the contract's defaults, fractions, and every bad value named at once."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from regbridge.breaker import Limits
from regbridge.settings import (
    CommonSettings,
    PollerSettings,
    Schedule,
    SettingsError,
    SubmitterSettings,
    poller_settings,
    submitter_settings,
)

Build = Callable[[Mapping[str, str]], CommonSettings]

# CONTRACT.md §2, exactly as the table gives them.
CONTRACT_DEFAULTS = {
    "rabbitmq_url": "amqp://guest:guest@localhost:5672/%2F",
    "mongodb_uri": "mongodb://localhost:27017",
    "mongodb_database": "registry",
    "mongodb_collection": "users",
    "legacy_api_url": "http://localhost:8080",
    "inbound_queue": "registrations",
    "pending_queue": "registrations.pending",
    "failed_queue": "registrations.failed",
    "poll_first_delay_s": 10.0,
    "poll_interval_s": 2.0,
    "poll_deadline_s": 300.0,
}

BUILDERS = [pytest.param(submitter_settings, id="submitter"), pytest.param(poller_settings, id="poller")]


def _error(build: Build, env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        build(env)
    return str(info.value)


@pytest.mark.parametrize("build", BUILDERS)
def test_contract_defaults(build: Build) -> None:
    settings = build({})
    assert isinstance(settings, CommonSettings)
    for field, expected in CONTRACT_DEFAULTS.items():
        assert getattr(settings, field) == expected, field


def test_each_service_has_its_own_http_port_by_default() -> None:
    submitter, poller = submitter_settings({}), poller_settings({})
    assert isinstance(submitter, SubmitterSettings)
    assert isinstance(poller, PollerSettings)
    assert submitter.http_port == 8081
    assert poller.http_port == 8082


def test_tuning_knob_defaults_work() -> None:
    s = submitter_settings({})
    assert s.workers >= 1
    assert s.prefetch >= s.workers
    assert s.legacy_timeout_s > 0
    assert s.legacy_max_response_bytes == 64 * 1024
    assert s.max_message_bytes >= 1024
    assert s.submit_max_attempts >= 2
    assert 0 < s.submit_backoff_base_s <= s.submit_backoff_max_s
    assert s.log_level == "INFO"
    assert s.attempts_collection == "users.attempts"


@pytest.mark.parametrize("build", BUILDERS)
def test_every_variable_is_read(build: Build) -> None:
    env = {
        "RABBITMQ_URL": "amqps://bob:pw@rabbit:5671/prod",
        "MONGODB_URI": "mongodb+srv://cluster.example.net",
        "MONGODB_DATABASE": "db1",
        "MONGODB_COLLECTION": "people",
        "LEGACY_API_URL": "https://legacy.example.net/base/",
        "INBOUND_QUEUE": "in",
        "PENDING_QUEUE": "pend",
        "FAILED_QUEUE": "dlq",
        "HTTP_PORT": "9100",
        "WORKERS": "3",
        "LOG_LEVEL": "debug",
    }
    s = build(env)
    assert s.rabbitmq_url == "amqps://bob:pw@rabbit:5671/prod"
    assert s.mongodb_uri == "mongodb+srv://cluster.example.net"
    assert (s.mongodb_database, s.mongodb_collection) == ("db1", "people")
    assert s.legacy_api_url == "https://legacy.example.net/base"  # trailing slash dropped
    assert (s.inbound_queue, s.pending_queue, s.failed_queue) == ("in", "pend", "dlq")
    assert s.http_port == 9100
    assert s.workers == 3
    assert s.prefetch == 24  # PREFETCH unset: eight times WORKERS
    assert s.log_level == "DEBUG"
    assert s.attempts_collection == "people.attempts"


@pytest.mark.parametrize("build", BUILDERS)
def test_breaker_limits_are_read(build: Build) -> None:
    assert build({}).breaker_limits() == Limits(max_rps=1000.0, failures=10, probe_rps=5.0, open_s=5.0, ramp_s=10.0)
    s = build({"LEGACY_MAX_RPS": "50", "LEGACY_BREAKER_FAILURES": "3", "LEGACY_BREAKER_PROBE_RPS": "0.5",
               "LEGACY_BREAKER_OPEN_S": "2.5", "LEGACY_BREAKER_RAMP_S": "30"})
    assert s.breaker_limits() == Limits(max_rps=50.0, failures=3, probe_rps=0.5, open_s=2.5, ramp_s=30.0)


def test_blank_values_fall_back_to_defaults() -> None:
    s = poller_settings({"POLL_INTERVAL_S": "  ", "INBOUND_QUEUE": ""})
    assert s.poll_interval_s == 2.0
    assert s.inbound_queue == "registrations"


@pytest.mark.parametrize("build", BUILDERS)
def test_fractional_poll_values(build: Build) -> None:
    s = build({"POLL_FIRST_DELAY_S": "0.25", "POLL_INTERVAL_S": "0.1", "POLL_DEADLINE_S": "2.5"})
    assert s.poll_first_delay_s == 0.25
    assert s.poll_interval_s == 0.1
    assert s.poll_deadline_s == 2.5


def test_first_delay_may_be_zero_but_interval_and_deadline_may_not() -> None:
    assert poller_settings({"POLL_FIRST_DELAY_S": "0"}).poll_first_delay_s == 0.0
    message = _error(poller_settings, {"POLL_INTERVAL_S": "0", "POLL_DEADLINE_S": "0"})
    assert "POLL_INTERVAL_S" in message
    assert "POLL_DEADLINE_S" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POLL_FIRST_DELAY_S", "-1"),
        ("POLL_FIRST_DELAY_S", "soon"),
        ("POLL_INTERVAL_S", "nan"),
        ("POLL_INTERVAL_S", "inf"),
        ("POLL_DEADLINE_S", "-0.5"),
        ("POLL_DEADLINE_S", "5m"),
        ("HTTP_PORT", "70000"),
        ("HTTP_PORT", "-1"),
        ("HTTP_PORT", "http"),
        ("WORKERS", "0"),
        ("WORKERS", "2.5"),
        ("PREFETCH", "0"),
        ("MAX_MESSAGE_BYTES", "lots"),
        ("LEGACY_TIMEOUT_S", "0"),
        ("LEGACY_MAX_RESPONSE_BYTES", "0"),
        ("LEGACY_MAX_RESPONSE_BYTES", "64k"),
        ("SHUTDOWN_TIMEOUT_S", "x"),
        ("RECONNECT_MAX_S", "-3"),
        ("LOG_LEVEL", "LOUD"),
        ("RABBITMQ_URL", "http://localhost:5672"),
        ("RABBITMQ_URL", "localhost"),
        ("MONGODB_URI", "postgres://localhost"),
        ("MONGODB_URI", "mongodb://"),
        ("LEGACY_API_URL", "ftp://legacy"),
        ("LEGACY_API_URL", "localhost:8080"),
        ("LEGACY_MAX_RPS", "0"),
        ("LEGACY_BREAKER_FAILURES", "0"),
        ("LEGACY_BREAKER_PROBE_RPS", "fast"),
        ("LEGACY_BREAKER_OPEN_S", "-1"),
        ("LEGACY_BREAKER_RAMP_S", "inf"),
    ],
)
def test_bad_value_is_reported_by_name(name: str, value: str) -> None:
    for build in (submitter_settings, poller_settings):
        message = _error(build, {name: value})
        assert message.startswith("invalid configuration: ")
        assert f"{name}: expected" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [("SUBMIT_MAX_ATTEMPTS", "0"), ("SUBMIT_BACKOFF_BASE_S", "0"), ("SUBMIT_BACKOFF_MAX_S", "never")],
)
def test_bad_submitter_knob_is_reported_by_name(name: str, value: str) -> None:
    assert f"{name}: expected" in _error(submitter_settings, {name: value})
    # The poller has no such knob, so it does not care.
    assert isinstance(poller_settings({name: value}), PollerSettings)


def test_several_bad_values_are_reported_at_once() -> None:
    env = {
        "POLL_INTERVAL_S": "abc",
        "WORKERS": "0",
        "HTTP_PORT": "99999",
        "LEGACY_API_URL": "ftp://legacy",
        "SUBMIT_MAX_ATTEMPTS": "-2",
        "MONGODB_DATABASE": "fine",
    }
    message = _error(submitter_settings, env)
    for name in ("POLL_INTERVAL_S", "WORKERS", "HTTP_PORT", "LEGACY_API_URL", "SUBMIT_MAX_ATTEMPTS"):
        assert f"{name}: expected" in message, name
    assert "MONGODB_DATABASE" not in message
    assert message.count("expected") == 5


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        ("RABBITMQ_URL", "http://admin:s3cr3t-pw@rabbit:5672/", "s3cr3t-pw"),
        ("RABBITMQ_URL", "amqpx://admin:s3cr3t-pw@rabbit:5672/", "s3cr3t-pw"),
        ("MONGODB_URI", "postgres://root:hunter2hunter2@db:5432", "hunter2hunter2"),
        ("MONGODB_URI", "mysql://root:hunter2hunter2@db", "hunter2hunter2"),
    ],
)
def test_credentials_of_a_bad_url_never_appear_in_the_error(name: str, value: str, secret: str) -> None:
    message = _error(submitter_settings, {name: value})
    assert f"{name}: expected" in message
    assert secret not in message
    assert "value not shown" in message


@pytest.mark.parametrize(
    ("name", "value", "secret"),
    [
        # Forgotten or mistyped scheme: the value still carries a password.
        ("MONGODB_URI", "root:hunter2hunter2@db:27017", "hunter2hunter2"),
        ("RABBITMQ_URL", "amqp:/admin:s3cr3t-pw@rabbit:5672/", "s3cr3t-pw"),
    ],
)
def test_credentials_of_a_url_without_a_proper_scheme_never_appear_in_the_error(
    name: str, value: str, secret: str
) -> None:
    message = _error(poller_settings, {name: value})
    assert f"{name}: expected" in message
    assert secret not in message


def test_safe_view_hides_credentials() -> None:
    s = submitter_settings({
        "RABBITMQ_URL": "amqp://bob:pa55word-rmq@rabbit:5672/%2F",
        "MONGODB_URI": "mongodb://alice:pa55word-mongo@mongo:27017/?authSource=admin",
        "LEGACY_API_URL": "https://svc:pa55word-http@legacy:8443",
    })
    view = s.safe_view()
    assert view["rabbitmq_url"] == "amqp://***@rabbit:5672/%2F"
    assert view["mongodb_uri"] == "mongodb://***@mongo:27017/?authSource=admin"
    assert view["legacy_api_url"] == "https://***@legacy:8443"
    assert "pa55word" not in repr(view)
    # The settings themselves keep what the clients need.
    assert s.rabbitmq_url == "amqp://bob:pa55word-rmq@rabbit:5672/%2F"
    # Everything else is there, unchanged.
    assert view["submit_max_attempts"] == s.submit_max_attempts
    assert view["poll_first_delay_s"] == 10.0
    assert set(view) == set(SubmitterSettings.setting_names())


def test_safe_view_of_the_defaults_hides_the_guest_password() -> None:
    view = poller_settings({}).safe_view()
    assert view["rabbitmq_url"] == "amqp://***@localhost:5672/%2F"
    assert "guest" not in view["rabbitmq_url"]
    assert view["mongodb_uri"] == "mongodb://localhost:27017"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RABBITMQ_URL", "amqp://u:pa/ss-SECRETPART@127.0.0.1:5672/%2F"),  # unescaped '/' in the password
        ("RABBITMQ_URL", "amqp://u:pa?ss-SECRETPART@127.0.0.1:5672/%2F"),  # unescaped '?'
        ("RABBITMQ_URL", "amqp://u:SECRETPART@127.0.0.1:notaport/%2F"),
        ("MONGODB_URI", "mongodb://u:pa/ss-SECRETPART@db:27017/"),
        ("MONGODB_URI", "mongodb://"),
    ],
)
def test_a_url_a_client_would_misread_is_refused_without_echoing_it(name: str, value: str) -> None:
    message = _error(submitter_settings, {name: value})
    assert f"{name}: expected a URL" in message
    assert "SECRETPART" not in message


def test_a_mongodb_seed_list_is_a_valid_url() -> None:
    uri = "mongodb://u:p@db1:27017,db2:27017/?replicaSet=rs0"
    assert submitter_settings({"MONGODB_URI": uri}).mongodb_uri == uri


def test_safe_view_hides_a_password_holding_slashes_and_ats() -> None:
    settings = submitter_settings({"RABBITMQ_URL": "amqp://u:p%2Fa@ss%40SECRETPART@rabbit:5672/%2F"})
    view = settings.safe_view()
    assert "SECRETPART" not in str(view)
    assert view["rabbitmq_url"] == "amqp://***@rabbit:5672/%2F"


def test_repr_and_str_never_show_a_url() -> None:
    settings = submitter_settings({
        "RABBITMQ_URL": "amqp://bob:pa55word-rmq@broker-host:5672/%2F",
        "MONGODB_URI": "mongodb://alice:pa55word-mongo@mongo-host:27017/",
        "LEGACY_API_URL": "https://svc:pa55word-http@legacy-host:8443",
    })
    for text in (repr(settings), str(settings)):
        assert "pa55word" not in text
        assert "-host" not in text
    assert isinstance(settings.legacy_api_url, str)
    assert settings.legacy_api_url == "https://svc:pa55word-http@legacy-host:8443"


def test_settings_are_frozen() -> None:
    settings = poller_settings({})
    with pytest.raises(ValueError):
        settings.workers = 1


def test_only_the_mapping_given_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://from-the-process:5672/%2F")
    settings = submitter_settings({})
    assert settings.workers == 64
    assert settings.rabbitmq_url == CONTRACT_DEFAULTS["rabbitmq_url"]


def test_prefetch_follows_workers_unless_set() -> None:
    assert poller_settings({}).prefetch == 16 * 8
    assert poller_settings({"WORKERS": "2", "PREFETCH": "5"}).prefetch == 5
    # A bad WORKERS is named once; the prefetch it would have given is not a second error.
    assert _error(poller_settings, {"WORKERS": "none"}).count("expected") == 1


# ---- URL settings with whitespace or control characters: refused, never echoed --------------

UNSAFE_CHARS = [" ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\u00a0", "\u2028", "\u202e",
                "\u200b"]
URL_SETTINGS = {
    "RABBITMQ_URL": "amqp://user:Sp{c}ace-SECRETPART@rabbit:5672/%2F",
    "MONGODB_URI": "mongodb://user:Sp{c}ace-SECRETPART@mongo:27017/",
    "LEGACY_API_URL": "https://user:Sp{c}ace-SECRETPART@legacy:8443",
}


@pytest.mark.parametrize("char", UNSAFE_CHARS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("name", list(URL_SETTINGS))
def test_a_url_with_whitespace_or_a_control_character_is_refused_by_name(name: str, char: str) -> None:
    message = _error(submitter_settings, {name: URL_SETTINGS[name].format(c=char)})
    assert message.startswith(f"invalid configuration: {name}: expected a URL"), message
    assert "whitespace or a control character" in message and "%20" in message
    assert "SECRETPART" not in message and "ace-" not in message


def test_the_operator_commands_management_url_is_refused_likewise() -> None:
    from registrations_cli.errors import CliError
    from registrations_cli.settings import from_env
    with pytest.raises(CliError) as info:
        from_env({"RABBITMQ_MANAGEMENT_URL": "http://user:Sp ace-SECRETPART@rabbit:15672/%2F"})
    assert "RABBITMQ_MANAGEMENT_URL" in str(info.value) and "SECRETPART" not in str(info.value)
    assert info.value.code == 2


def test_a_percent_encoded_space_is_a_valid_password() -> None:
    url = "amqp://user:Sp%20ace-SECRETPART@rabbit:5672/%2F"
    settings = submitter_settings({"RABBITMQ_URL": url})
    assert settings.rabbitmq_url == url
    assert settings.safe_view()["rabbitmq_url"] == "amqp://***@rabbit:5672/%2F"


def test_surrounding_whitespace_is_trimmed_as_for_every_setting() -> None:
    # A trailing newline from a Secret file or a heredoc is not part of the URL.
    url = "amqp://user:pw@rabbit:5672/%2F"
    assert submitter_settings({"RABBITMQ_URL": f" {url}\n"}).rabbitmq_url == url


def test_a_list_where_only_some_urls_carry_user_info_is_refused() -> None:
    # What an unencoded ",amqp://" inside a password looks like.
    message = _error(submitter_settings, {"RABBITMQ_URL": "amqp://user:1234,amqp://SECRETPART@rabbit:5672/%2F"})
    assert "RABBITMQ_URL: expected a URL" in message and "SECRETPART" not in message and "1234" not in message


# ---- HTTP_HOST and LOG_LEVEL_THIRD_PARTY --------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS)
def test_http_host_is_loopback_unless_set(build: Build) -> None:
    assert build({}).http_host == "127.0.0.1"
    assert build({"HTTP_HOST": "0.0.0.0"}).http_host == "0.0.0.0"
    assert build({"HTTP_HOST": "::"}).http_host == "::"
    assert build({"HTTP_HOST": "metrics.local"}).http_host == "metrics.local"


@pytest.mark.parametrize("value", ["0.0.0.0:8081", "http://0.0.0.0", "a b", "-host", "host_name"])
def test_a_bad_http_host_is_named(value: str) -> None:
    message = _error(poller_settings, {"HTTP_HOST": value})
    assert "HTTP_HOST: expected an IP address or a host name" in message


def test_third_party_loggers_are_capped_at_warning_unless_set() -> None:
    assert submitter_settings({}).log_level_third_party == "WARNING"
    assert submitter_settings({"LOG_LEVEL_THIRD_PARTY": "debug"}).log_level_third_party == "DEBUG"
    assert "LOG_LEVEL_THIRD_PARTY: expected" in _error(submitter_settings, {"LOG_LEVEL_THIRD_PARTY": "loud"})


def test_spaces_around_a_lists_commas_separate_urls() -> None:
    settings = submitter_settings({"RABBITMQ_URL": "amqp://u:pw@rabbit-0/%2F , amqp://u:pw@rabbit-1/%2F"})
    assert settings.rabbitmq_urls == ["amqp://u:pw@rabbit-0/%2F", "amqp://u:pw@rabbit-1/%2F"]


@pytest.mark.parametrize("build", BUILDERS)
def test_the_poll_schedule_is_adaptive_unless_set_fixed(build: Build) -> None:
    assert build({}).poll_schedule is Schedule.ADAPTIVE
    assert build({"POLL_SCHEDULE": " Fixed "}).poll_schedule is Schedule.FIXED
    assert "POLL_SCHEDULE: expected adaptive or fixed, got 'learned'" in _error(build, {"POLL_SCHEDULE": "learned"})


def test_the_adaptive_schedules_knobs_are_read_and_checked() -> None:
    s = poller_settings({})
    assert (s.poll_adaptive_window, s.poll_adaptive_min_observations, s.poll_adaptive_delay_ratio,
            s.poll_adaptive_max_polls) == (500, 20, 0.05, 4.0)
    s = poller_settings({"POLL_ADAPTIVE_WINDOW": "200", "POLL_ADAPTIVE_MIN_OBSERVATIONS": "5",
                         "POLL_ADAPTIVE_DELAY_RATIO": "0.1", "POLL_ADAPTIVE_MAX_POLLS": "2.5"})
    assert (s.poll_adaptive_window, s.poll_adaptive_min_observations, s.poll_adaptive_delay_ratio,
            s.poll_adaptive_max_polls) == (200, 5, 0.1, 2.5)
    message = _error(poller_settings, {"POLL_ADAPTIVE_WINDOW": "0", "POLL_ADAPTIVE_DELAY_RATIO": "1.5",
                                       "POLL_ADAPTIVE_MAX_POLLS": "0.5", "POLL_ADAPTIVE_MIN_OBSERVATIONS": "x"})
    for name in ("POLL_ADAPTIVE_WINDOW", "POLL_ADAPTIVE_DELAY_RATIO", "POLL_ADAPTIVE_MAX_POLLS",
                 "POLL_ADAPTIVE_MIN_OBSERVATIONS"):
        assert name in message
    assert "POLL_ADAPTIVE_MAX_POLLS: expected a number >= 1" in message
