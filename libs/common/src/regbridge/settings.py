"""Typed settings, one object per service, built once in `main()` from the environment.

Nothing here reads `os.environ` at import time: `from_env` takes the mapping, so tests pass a
dict. Every bad value is reported by its variable name, all at once, before anything starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from regbridge.redact import redact_url_value

T = TypeVar("T")


class SettingsError(ValueError):
    """One or more environment variables are invalid; the message names each of them."""


class _Reader:
    """Collects every problem instead of stopping at the first, so one start-up shows them all."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def get(self, name: str, default: T, parse: Callable[[str], T], what: str, *, secret: bool = False) -> T:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError):
            # A URL may hold credentials however malformed it is: never echo one back.
            shown = " (value not shown: it may hold credentials)" if secret else f", got {raw!r}"
            self.errors.append(f"{name}: expected {what}{shown}")
            return default

    def text(self, name: str, default: str) -> str:
        return self.get(name, default, _non_empty, "a non-empty string")

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        return self.get(name, default, lambda v: _url(v, schemes), f"a URL ({'/'.join(schemes)})", secret=True)

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        what = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"
        return self.get(name, default, lambda v: _seconds(v, allow_zero), what)

    def count(self, name: str, default: int, *, minimum: int = 1) -> int:
        return self.get(name, default, lambda v: _count(v, minimum), f"a whole number >= {minimum}")

    def port(self, name: str, default: int) -> int:
        return self.get(name, default, _port, "a TCP port (0-65535)")

    def done(self) -> None:
        if self.errors:
            raise SettingsError("invalid configuration: " + "; ".join(self.errors))


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError
    return value


def _url(value: str, schemes: tuple[str, ...]) -> str:
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


def _seconds(value: str, allow_zero: bool) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError
    return number


def _count(value: str, minimum: int) -> int:
    number = int(value)
    if number < minimum:
        raise ValueError
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError
    return number


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """What both services share: where things are, and the registration's timing."""

    rabbitmq_url: str
    mongodb_uri: str
    mongodb_database: str
    mongodb_collection: str
    legacy_api_url: str
    inbound_queue: str
    pending_queue: str
    failed_queue: str
    poll_first_delay_s: float
    poll_interval_s: float
    poll_deadline_s: float
    http_port: int
    log_level: str
    # Tuning knobs: named by the project, defaults that work.
    workers: int
    prefetch: int
    legacy_timeout_s: float
    max_message_bytes: int
    shutdown_timeout_s: float
    reconnect_max_s: float

    @property
    def attempts_collection(self) -> str:
        # Bookkeeping of each inbound message's latest attempt (see regbridge.store).
        return f"{self.mongodb_collection}.attempts"

    def safe_view(self) -> dict[str, Any]:
        """The settings as they may be logged: credentials removed from every URL."""
        view = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("rabbitmq_url", "mongodb_uri", "legacy_api_url"):
            view[key] = redact_url_value(view[key])
        return view


@dataclass(frozen=True, kw_only=True)
class SubmitterSettings(CommonSettings):
    submit_max_attempts: int
    submit_backoff_base_s: float
    submit_backoff_max_s: float


@dataclass(frozen=True, kw_only=True)
class PollerSettings(CommonSettings):
    pass


def _common(r: _Reader, *, default_port: int, default_workers: int) -> dict[str, Any]:
    workers = r.count("WORKERS", default_workers)
    return {
        "rabbitmq_url": r.url("RABBITMQ_URL", "amqp://guest:guest@localhost:5672/%2F", ("amqp", "amqps")),
        "mongodb_uri": r.url("MONGODB_URI", "mongodb://localhost:27017", ("mongodb", "mongodb+srv")),
        "mongodb_database": r.text("MONGODB_DATABASE", "registry"),
        "mongodb_collection": r.text("MONGODB_COLLECTION", "users"),
        "legacy_api_url": r.url("LEGACY_API_URL", "http://localhost:8080", ("http", "https")).rstrip("/"),
        "inbound_queue": r.text("INBOUND_QUEUE", "registrations"),
        "pending_queue": r.text("PENDING_QUEUE", "registrations.pending"),
        "failed_queue": r.text("FAILED_QUEUE", "registrations.failed"),
        "poll_first_delay_s": r.seconds("POLL_FIRST_DELAY_S", 10.0, allow_zero=True),
        "poll_interval_s": r.seconds("POLL_INTERVAL_S", 2.0),
        "poll_deadline_s": r.seconds("POLL_DEADLINE_S", 300.0),
        "http_port": r.port("HTTP_PORT", default_port),
        "log_level": r.get("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
        "workers": workers,
        # Beyond the workers, room for hops whose confirm is on its way (they hold no thread).
        "prefetch": r.count("PREFETCH", workers * 8),
        "legacy_timeout_s": r.seconds("LEGACY_TIMEOUT_S", 10.0),
        "max_message_bytes": r.count("MAX_MESSAGE_BYTES", 64 * 1024),
        "shutdown_timeout_s": r.seconds("SHUTDOWN_TIMEOUT_S", 30.0),
        "reconnect_max_s": r.seconds("RECONNECT_MAX_S", 10.0),
    }


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError
    return level


def submitter_settings(env: Mapping[str, str]) -> SubmitterSettings:
    r = _Reader(env)
    common = _common(r, default_port=8081, default_workers=64)
    settings = SubmitterSettings(
        **common,
        submit_max_attempts=r.count("SUBMIT_MAX_ATTEMPTS", 6),
        submit_backoff_base_s=r.seconds("SUBMIT_BACKOFF_BASE_S", 0.5),
        submit_backoff_max_s=r.seconds("SUBMIT_BACKOFF_MAX_S", 30.0),
    )
    r.done()
    return settings


def poller_settings(env: Mapping[str, str]) -> PollerSettings:
    r = _Reader(env)
    settings = PollerSettings(**_common(r, default_port=8082, default_workers=16))
    r.done()
    return settings
