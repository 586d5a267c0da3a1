"""Settings of legacy-sim: one frozen dataclass, built in main() from the CLI and environment.

The runtime-tunable fields (latencies and faults) can be changed through PATCH /admin/config;
the app then swaps in a new Config made by `apply_patch`, so a Config is never mutated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable, flag or field."""


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    latency_min_s: float = 10.0
    latency_max_s: float = 20.0
    accept_latency_s: float = 0.03
    post_503_rate: float = 0.0
    get_503_rate: float = 0.0
    retry_after_s: float = 1.0
    # None (or "") disables the forced failures.
    fail_prefix: str | None = "FAIL"
    down: bool = False
    response_delay_s: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Only the cross-field rule lives here; single values are checked by their parsers.
        if self.latency_min_s > self.latency_max_s:
            raise ConfigError(
                f"latency_min_s ({self.latency_min_s}) must not exceed latency_max_s ({self.latency_max_s})"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsers of text values (environment and CLI); each raises ValueError with the reason ----


def _parse_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _non_negative(raw: str) -> float:
    value = _parse_float(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _rate(raw: str) -> float:
    value = _parse_float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a probability between 0 and 1")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("not an integer") from None
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("not an integer") from None


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _host(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _prefix(raw: str) -> str | None:
    return raw or None


@dataclass(frozen=True, slots=True)
class _Setting:
    field: str
    env: str
    parse: Callable[[str], object]

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


_SETTINGS: tuple[_Setting, ...] = (
    _Setting("host", "LEGACY_SIM_HOST", _host),
    _Setting("port", "HTTP_PORT", _port),
    _Setting("latency_min_s", "LEGACY_SIM_LATENCY_MIN_S", _non_negative),
    _Setting("latency_max_s", "LEGACY_SIM_LATENCY_MAX_S", _non_negative),
    _Setting("accept_latency_s", "LEGACY_SIM_ACCEPT_LATENCY_S", _non_negative),
    _Setting("post_503_rate", "LEGACY_SIM_POST_503_RATE", _rate),
    _Setting("get_503_rate", "LEGACY_SIM_GET_503_RATE", _rate),
    _Setting("retry_after_s", "LEGACY_SIM_RETRY_AFTER_S", _non_negative),
    _Setting("fail_prefix", "LEGACY_SIM_FAIL_PREFIX", _prefix),
    _Setting("down", "LEGACY_SIM_DOWN", _bool),
    _Setting("response_delay_s", "LEGACY_SIM_RESPONSE_DELAY_S", _non_negative),
    _Setting("seed", "LEGACY_SIM_SEED", _int),
)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legacy-sim",
        description="Fake of the legacy registration adaptation layer. Flags override the environment.",
    )
    for setting in _SETTINGS:
        # Kept as text so that flags and variables share one parser and one kind of error message.
        parser.add_argument(setting.flag, dest=setting.field, metavar="V", help=f"overrides {setting.env}")
    return parser


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Config:
    """Builds the Config from CLI flags (which win) and environment variables."""
    args = build_arg_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for setting in _SETTINGS:
        flag_value: str | None = getattr(args, setting.field)
        if flag_value is not None:
            raw, source = flag_value, setting.flag
        elif setting.env in environ:
            raw, source = environ[setting.env], setting.env
        else:
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None
    try:
        return Config(**values)
    except ConfigError as exc:
        # The only cross-field rule is the latency range.
        raise ConfigError(
            f"LEGACY_SIM_LATENCY_MIN_S/LEGACY_SIM_LATENCY_MAX_S (or --latency-min-s/--latency-max-s): {exc}"
        ) from None


# ---- PATCH /admin/config: JSON values, so types are checked rather than parsed ----

TUNABLE_FIELDS: frozenset[str] = frozenset(
    {
        "latency_min_s",
        "latency_max_s",
        "accept_latency_s",
        "post_503_rate",
        "get_503_rate",
        "retry_after_s",
        "fail_prefix",
        "down",
        "response_delay_s",
    }
)


def _json_number(field: str, value: object) -> float:
    # bool is an int subclass in Python; `true` is no latency.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field} must be a number")
    if value < 0:
        raise ConfigError(f"{field} must be >= 0")
    if field.endswith("_rate") and value > 1:
        raise ConfigError(f"{field} must be a probability between 0 and 1")
    return float(value)


def apply_patch(config: Config, patch: object) -> Config:
    """Returns a new Config with the fields of a PATCH body applied, or raises ConfigError."""
    if not isinstance(patch, dict):
        raise ConfigError("body must be a JSON object")
    unknown = sorted(set(patch) - TUNABLE_FIELDS)
    if unknown:
        raise ConfigError(f"unknown or read-only fields: {', '.join(unknown)}")
    changes: dict[str, Any] = {}
    for field, value in patch.items():
        if field == "down":
            if not isinstance(value, bool):
                raise ConfigError("down must be true or false")
            changes[field] = value
        elif field == "fail_prefix":
            if value is not None and not isinstance(value, str):
                raise ConfigError("fail_prefix must be a string or null")
            changes[field] = value or None
        else:
            changes[field] = _json_number(field, value)
    return dataclasses.replace(config, **changes)


def format_retry_after(seconds: float) -> str:
    """`1.0` is written `1` (the usual integer header); fractions are kept as given, for fast tests."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))
