"""Typed settings, one class per program, each object built once in `main()` from the environment.

One mechanism serves every program of the bridge: a pydantic-settings model fed only the mapping
that `from_env` is given (main() passes os.environ, tests pass a dict); nothing reads the
environment at import time. A field's type says how its variable's text is parsed and what the
error says was expected; every bad variable is named at once, in one `SettingsError`. Empty or
blank values mean "use the default". A URL may hold credentials: it is kept as a secret, never
echoed in an error or a repr, and logged only through `safe_view()`. A URL with whitespace or a
control character inside is refused: valid URLs percent-encode them, and a client may split such
a value where the redactor would not.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from regbridge.breaker import Limits
from regbridge.brokers import Order, split_urls
from regbridge.redact import redact_url_value

# A field that holds a secret is named `<setting>_secret`; its plain value is the property
# `<setting>`, and its variable is `<SETTING>` like any other's.
SECRET_SUFFIX = "_secret"


class SettingsError(ValueError):
    """One or more environment variables are invalid; the message names each of them."""


@dataclass(frozen=True)
class Expect:
    """What a variable must hold, as its error says it; a secret one's value is never shown."""

    what: str
    secret: bool = False


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError
    return value


class UnsafeUrl(ValueError):
    """A URL setting holds whitespace or a control character. Its message is shown: it names the
    problem, never the value."""

    def __init__(self) -> None:
        super().__init__("it holds whitespace or a control character; a password that has them must be "
                         "percent-encoded (a space is %20)")


def _unsafe(char: str) -> bool:
    # Whitespace (Unicode's too), C0, DEL, C1, and format characters such as a right-to-left
    # override: none is valid raw in a URL, and each could hide or garble what a log shows.
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


def _url(value: str, schemes: tuple[str, ...]) -> str:
    # Before any parsing: a client may split such a URL where this check would not, and then
    # print part of a password as a host or a path.
    if any(_unsafe(char) for char in value):
        raise UnsafeUrl
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in schemes or not rest:
        raise ValueError
    parts = urlsplit(value)
    # An '@' past the host means user-info with an unescaped '/', '?' or '#': the client would
    # read part of the password as a host, a port or a path (and print it in its error).
    if not parts.hostname or "@" in parts.path + parts.query + parts.fragment:
        raise ValueError
    if "," not in parts.netloc:  # a MongoDB seed list names several host:port pairs
        _ = parts.port  # raises ValueError on a port that is not a number
    return value


def _amqp_urls(value: str) -> str:
    """One broker URL, or several of one cluster separated by commas (`regbridge.brokers`)."""
    urls = split_urls(value)
    for url in urls:
        _url(url, ("amqp", "amqps"))
    if len({"@" in url.partition("://")[2] for url in urls}) > 1:
        # The nodes of one cluster share their users: a list where only some URLs carry user-info
        # is one URL whose password holds ",amqp://" unencoded.
        raise ValueError
    return ",".join(urls)


def _order(value: str) -> Order:
    return Order(value.lower())


class Schedule(StrEnum):
    """How the poller spaces its polls (`POLL_SCHEDULE`): learned from the completions it sees
    (regbridge.poll_schedule), or the configured first delay and interval."""

    ADAPTIVE = "adaptive"
    FIXED = "fixed"


def _schedule(value: str) -> Schedule:
    return Schedule(value.lower())


def _fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError
    return number


def _at_least_one(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 1:
        raise ValueError
    return number


def _base_url(value: str) -> str:
    # Paths are appended to it.
    return _url(value, ("http", "https")).rstrip("/")


def _seconds(value: str, *, allow_zero: bool) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError
    return number


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def _host(value: str) -> str:
    """An IP address to bind (0.0.0.0 or :: for every interface), or a host name."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise
        return value


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError
    return level


# The kinds of value a variable holds: each parses the variable's text and says what it expects.
Text = Annotated[str, BeforeValidator(_non_empty), Expect("a non-empty string")]
Seconds = Annotated[float, BeforeValidator(partial(_seconds, allow_zero=False)), Expect("a number of seconds > 0")]
SecondsOrZero = Annotated[
    float, BeforeValidator(partial(_seconds, allow_zero=True)), Expect("a number of seconds >= 0")
]
Count = Annotated[int, BeforeValidator(_count), Expect("a whole number >= 1")]
# A rate parses as a duration does: a finite number above zero.
PerSecond = Annotated[float, BeforeValidator(partial(_seconds, allow_zero=False)), Expect("a number per second > 0")]
Port = Annotated[int, BeforeValidator(_port), Expect("a TCP port (0-65535)")]
Host = Annotated[str, BeforeValidator(_host), Expect("an IP address or a host name to listen on")]
LogLevel = Annotated[str, BeforeValidator(_log_level), Expect("DEBUG, INFO, WARNING or ERROR")]
AmqpUrls = Annotated[
    SecretStr, BeforeValidator(_amqp_urls), Expect("a URL (amqp/amqps), or several separated by commas", secret=True)
]
UrlOrder = Annotated[Order, BeforeValidator(_order), Expect("shuffled or listed")]
PollSchedule = Annotated[Schedule, BeforeValidator(_schedule), Expect("adaptive or fixed")]
Fraction = Annotated[float, BeforeValidator(_fraction), Expect("a number > 0 and <= 1")]
AtLeastOne = Annotated[float, BeforeValidator(_at_least_one), Expect("a number >= 1")]
MongoUrl = Annotated[
    SecretStr,
    BeforeValidator(partial(_url, schemes=("mongodb", "mongodb+srv"))),
    Expect("a URL (mongodb/mongodb+srv)", secret=True),
]
HttpUrl = Annotated[SecretStr, BeforeValidator(_base_url), Expect("a URL (http/https)", secret=True)]


def variable_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return field.removesuffix(SECRET_SUFFIX).upper()


class EnvSettings(BaseSettings):
    """The one way a program of the bridge reads its environment. A subclass declares fields
    with the types above; `from_env` builds it or raises one SettingsError naming every bad
    variable."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        alias_generator=variable_name,
        # The validators parse a variable's text; a default is a value already.
        validate_default=False,
        # Defence in depth: a ValidationError never leaves from_env, but if one did it would
        # not carry a value that may hold credentials.
        hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the mapping from_env is given: never os.environ or a file behind the caller's back.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Self:
        expected = cls._expectations()
        given: dict[str, Any] = {}
        # Only the variables this program reads are looked up (deployment tests record them).
        for name in expected:
            raw = env.get(name)
            if raw is not None and raw.strip():
                given[name] = raw.strip()
        try:
            return cls(**given)
        except ValidationError as exc:
            # A default computed from a bad variable fails too: that variable is already named.
            errors = [error for error in exc.errors() if error["type"] != "default_factory_not_called"]
            problems = [_problem(error, expected, env) for error in errors]
            raise SettingsError("invalid configuration: " + "; ".join(problems)) from None

    @classmethod
    def _expectations(cls) -> dict[str, Expect]:
        """Each variable read, with what it must hold."""
        return {
            variable_name(name): next(m for m in field.metadata if isinstance(m, Expect))
            for name, field in cls.model_fields.items()
        }

    @classmethod
    def setting_names(cls) -> list[str]:
        """The settings as callers read them: secret fields under their plain names."""
        return [name.removesuffix(SECRET_SUFFIX) for name in cls.model_fields]

    def safe_view(self) -> dict[str, Any]:
        """The settings as they may be logged: credentials removed from every URL."""
        return {
            name.removesuffix(SECRET_SUFFIX): redact_url_value(value.get_secret_value())
            if isinstance(value, SecretStr)
            else value
            for name, value in self
        }


def _problem(error: ErrorDetails, expected: Mapping[str, Expect], env: Mapping[str, str]) -> str:
    name = str(error["loc"][0])
    expect = expected[name]
    if error["type"] == "missing":
        shown = " (not set)"
    elif isinstance(error.get("ctx", {}).get("error"), UnsafeUrl):
        shown = f" ({error['ctx']['error']}; value not shown: it may hold credentials)"
    elif expect.secret:
        # A URL may hold credentials however malformed it is: never echo one back.
        shown = " (value not shown: it may hold credentials)"
    else:
        shown = f", got {env[name]!r}"
    return f"{name}: expected {expect.what}{shown}"


class PipelineSettings(EnvSettings):
    """Where the pipeline lives, as every program that touches it sees it: the broker, MongoDB,
    the queues and the delays that name the wait queues."""

    rabbitmq_url_secret: AmqpUrls = SecretStr("amqp://guest:guest@localhost:5672/%2F")
    rabbitmq_url_order: UrlOrder = Order.SHUFFLED
    mongodb_uri_secret: MongoUrl = SecretStr("mongodb://localhost:27017")
    mongodb_database: Text = "registry"
    mongodb_collection: Text = "users"
    inbound_queue: Text = "registrations"
    pending_queue: Text = "registrations.pending"
    failed_queue: Text = "registrations.failed"
    poll_first_delay_s: SecondsOrZero = 10.0
    poll_interval_s: Seconds = 2.0
    # The submitter's first hop and the wait queues depend on it (regbridge.topology).
    poll_schedule: PollSchedule = Schedule.ADAPTIVE
    max_message_bytes: Count = 64 * 1024

    @property
    def rabbitmq_url(self) -> str:
        return self.rabbitmq_url_secret.get_secret_value()

    @property
    def rabbitmq_urls(self) -> list[str]:
        """Each broker of the cluster, as listed (the runtime and the command choose the order)."""
        return split_urls(self.rabbitmq_url)

    @property
    def mongodb_uri(self) -> str:
        return self.mongodb_uri_secret.get_secret_value()

    @property
    def attempts_collection(self) -> str:
        # Bookkeeping of each inbound message's latest attempt (see regbridge.store).
        return f"{self.mongodb_collection}.attempts"

    @property
    def failures_collection(self) -> str:
        # The failure queue's index, one entry per record (see regbridge.failure_index).
        return f"{self.mongodb_collection}.failures"

    @property
    def counters_collection(self) -> str:
        # The index's sequence counter (regbridge.failure_index.COUNTER_ID).
        return f"{self.mongodb_collection}.counters"


def _eight_per_worker(settings: dict[str, Any]) -> int:
    # Beyond the workers, room for hops whose confirm is on its way (they hold no thread).
    return int(settings["workers"]) * 8


class LegacyLimitSettings(EnvSettings):
    """How hard a replica may press the legacy API: a rate cap, and a circuit breaker that backs
    off from a failing API (`regbridge.breaker`)."""

    legacy_max_rps: PerSecond = 1000.0
    legacy_breaker_failures: Count = 10
    legacy_breaker_probe_rps: PerSecond = 5.0
    legacy_breaker_open_s: Seconds = 5.0
    legacy_breaker_ramp_s: Seconds = 10.0

    def breaker_limits(self) -> Limits:
        return Limits(max_rps=self.legacy_max_rps, failures=self.legacy_breaker_failures,
                      probe_rps=self.legacy_breaker_probe_rps, open_s=self.legacy_breaker_open_s,
                      ramp_s=self.legacy_breaker_ramp_s)


class CommonSettings(PipelineSettings, LegacyLimitSettings):
    """What both services share: the pipeline, the legacy API, the registration's deadline, and
    the tuning knobs (named by the project, defaults that work)."""

    legacy_api_url_secret: HttpUrl = SecretStr("http://localhost:8080")
    poll_deadline_s: Seconds = 300.0
    http_port: Port
    # Loopback when run by hand; the images, the charts and compose set 0.0.0.0.
    http_host: Host = "127.0.0.1"
    log_level: LogLevel = "INFO"
    # pymongo, urllib3, pika, uvicorn and any other library: their DEBUG and INFO carry command
    # bodies and request lines (regbridge.logs).
    log_level_third_party: LogLevel = "WARNING"
    workers: Count
    prefetch: Count = Field(default_factory=_eight_per_worker)
    # One deadline for a whole legacy call: connect, request, and the answer to its last byte.
    legacy_timeout_s: Seconds = 10.0
    legacy_max_response_bytes: Count = 64 * 1024
    shutdown_timeout_s: Seconds = 30.0
    reconnect_max_s: Seconds = 10.0
    # RabbitMQ starts a new quorum queue on at most this many nodes, and on every node of a
    # smaller cluster: 3 is "all nodes, up to 3" (regbridge.topology).
    quorum_initial_group_size: Count = 3

    @property
    def legacy_api_url(self) -> str:
        return self.legacy_api_url_secret.get_secret_value()


class SubmitterSettings(CommonSettings):
    http_port: Port = 8081
    workers: Count = 64
    submit_max_attempts: Count = 6
    submit_backoff_base_s: Seconds = 0.5
    submit_backoff_max_s: Seconds = 30.0


class PollerSettings(CommonSettings):
    http_port: Port = 8082
    workers: Count = 16
    # The adaptive schedule (regbridge.poll_schedule): completions remembered, completions
    # before the first learned plan, the detection delay aimed at as a share of the median
    # completion age, and the most polls a registration is planned to take on average.
    poll_adaptive_window: Count = 500
    poll_adaptive_min_observations: Count = 20
    poll_adaptive_delay_ratio: Fraction = 0.05
    poll_adaptive_max_polls: AtLeastOne = 4.0


def submitter_settings(env: Mapping[str, str]) -> SubmitterSettings:
    return SubmitterSettings.from_env(env)


def poller_settings(env: Mapping[str, str]) -> PollerSettings:
    return PollerSettings.from_env(env)
