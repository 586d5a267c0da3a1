"""The command's settings: the services' environment variables, with the contract's defaults.

Built once from a mapping (tests pass a dict). Every bad value is named at once, and a URL is
never echoed back: it may hold credentials.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from regbridge.redact import redact_url_value
from regbridge.topology import wait_queue_name

from .errors import USAGE, CliError

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class CliSettings:
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/%2F"
    mongodb_uri: str = "mongodb://localhost:27017"
    mongodb_database: str = "registry"
    mongodb_collection: str = "users"
    inbound_queue: str = "registrations"
    pending_queue: str = "registrations.pending"
    failed_queue: str = "registrations.failed"
    poll_first_delay_s: float = 10.0
    poll_interval_s: float = 2.0
    max_message_bytes: int = 64 * 1024

    @property
    def wait_queues(self) -> list[str]:
        """The poller's wait queues for the configured delays (the submitter's first hop, then
        the poll interval), each named once."""
        delays = [d for d in (self.poll_first_delay_s, self.poll_interval_s) if d > 0]
        return list(dict.fromkeys(wait_queue_name(self.pending_queue, d) for d in delays))

    @property
    def broker_shown(self) -> str:
        return redact_url_value(self.rabbitmq_url)

    @property
    def mongodb_shown(self) -> str:
        return redact_url_value(self.mongodb_uri)


def _text(value: str) -> str:
    if not value:
        raise ValueError
    return value


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in schemes or not rest:
            raise ValueError
        return value

    return parse


def _seconds(allow_zero: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            raise ValueError
        return number

    return parse


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError
    return number


def from_env(env: Mapping[str, str]) -> CliSettings:
    errors: list[str] = []
    defaults = CliSettings()

    def get(name: str, default: T, parse: Callable[[str], T], what: str, *, secret: bool = False) -> T:
        raw = env.get(name)
        if raw is None or not raw.strip():
            return default
        try:
            return parse(raw.strip())
        except (ValueError, TypeError):
            shown = " (value not shown: it may hold credentials)" if secret else f", got {raw!r}"
            errors.append(f"{name}: expected {what}{shown}")
            return default

    settings = CliSettings(
        rabbitmq_url=get("RABBITMQ_URL", defaults.rabbitmq_url, _url(("amqp", "amqps")), "an amqp:// URL",
                         secret=True),
        mongodb_uri=get("MONGODB_URI", defaults.mongodb_uri, _url(("mongodb", "mongodb+srv")), "a mongodb:// URL",
                        secret=True),
        mongodb_database=get("MONGODB_DATABASE", defaults.mongodb_database, _text, "a name"),
        mongodb_collection=get("MONGODB_COLLECTION", defaults.mongodb_collection, _text, "a name"),
        inbound_queue=get("INBOUND_QUEUE", defaults.inbound_queue, _text, "a queue name"),
        pending_queue=get("PENDING_QUEUE", defaults.pending_queue, _text, "a queue name"),
        failed_queue=get("FAILED_QUEUE", defaults.failed_queue, _text, "a queue name"),
        poll_first_delay_s=get("POLL_FIRST_DELAY_S", defaults.poll_first_delay_s, _seconds(True),
                               "a number of seconds >= 0"),
        poll_interval_s=get("POLL_INTERVAL_S", defaults.poll_interval_s, _seconds(False),
                            "a number of seconds > 0"),
        max_message_bytes=get("MAX_MESSAGE_BYTES", defaults.max_message_bytes, _positive_int,
                              "a whole number >= 1"),
    )
    if errors:
        raise CliError("invalid configuration: " + "; ".join(errors), USAGE)
    return settings
