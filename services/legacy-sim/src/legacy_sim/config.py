"""Settings of legacy-sim: one frozen pydantic-settings model, built in main() from the CLI and
the environment.

The same mechanism as the bridge's programs (regbridge.settings): pydantic-settings fed only the
mapping it is given, each field's Annotated type parsing its text. The base class is not shared:
legacy-sim is built from its own folder, without the bridge's code, and an empty value is a value
here (LEGACY_SIM_FAIL_PREFIX="" turns the forced failures off).

The runtime-tunable fields (latencies and faults) can be changed through PATCH /admin/config;
the app then swaps in a new Config made by `apply_patch`, so a Config is never mutated.

The completion latency is one setting written two ways: a latency profile (legacy_sim.latency),
or the bounds latency_min_s/latency_max_s, which mean the profile uniform:MIN,MAX and are kept
as that default's representation. The two are never given together, at start or in one PATCH.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, PlainValidator, ValidationError, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from legacy_sim.latency import Drift, LatencyProfile, LogNormal, ProfileError, Uniform, parse_profile


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable, flag or field."""


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


def _profile(raw: object) -> LatencyProfile | None:
    if raw is None or isinstance(raw, Uniform | LogNormal | Drift):
        return raw
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    try:
        return parse_profile(raw)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None


Host = Annotated[str, BeforeValidator(_host)]
Port = Annotated[int, BeforeValidator(_port)]
Seconds = Annotated[float, BeforeValidator(_non_negative)]
Rate = Annotated[float, BeforeValidator(_rate)]
Switch = Annotated[bool, BeforeValidator(_bool)]
Prefix = Annotated[str | None, BeforeValidator(_prefix)]
Seed = Annotated[int | None, BeforeValidator(_int)]
# Parsed whole by its own code: pydantic is not asked to rebuild the frozen dataclasses.
Profile = Annotated[LatencyProfile | None, PlainValidator(_profile)]


def variable_name(field: str) -> str:
    """The environment variable that sets `field`: the port is HTTP_PORT, as for every service."""
    return "HTTP_PORT" if field == "port" else f"LEGACY_SIM_{field.upper()}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="ignore",
        alias_generator=variable_name,
        # The validators parse a variable's text; a default is a value already.
        validate_default=False,
    )

    host: Host = "127.0.0.1"
    port: Port = 8080
    # The bounds of the default profile, uniform:MIN,MAX. A latency_profile replaces them; the
    # two are never given together (see `_latency`).
    latency_min_s: Seconds = 10.0
    latency_max_s: Seconds = 20.0
    # None: uniform between the bounds. Never a plain Uniform once `folded`.
    latency_profile: Profile = None
    accept_latency_s: Seconds = 0.03
    post_503_rate: Rate = 0.0
    get_503_rate: Rate = 0.0
    retry_after_s: Seconds = 1.0
    # None (or "") disables the forced failures.
    fail_prefix: Prefix = "FAIL"
    down: Switch = False
    response_delay_s: Seconds = 0.0
    seed: Seed = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what load_config hands over: never os.environ behind the caller's back.
        return (init_settings,)

    @model_validator(mode="after")
    def _latency(self) -> Self:
        # Only at construction, from what was given: model_copy marks the fields it updates as
        # set, so apply_patch checks its own body for the same conflict.
        if "latency_profile" in self.model_fields_set and (
            {"latency_min_s", "latency_max_s"} & self.model_fields_set
        ):
            raise ConfigError(
                "give a latency profile or the latency bounds, not both (the bounds mean uniform:MIN,MAX)"
            )
        return self.checked()

    def checked(self) -> Self:
        """Self, once the cross-field rule holds; single values are checked by their parsers."""
        if self.latency_min_s > self.latency_max_s:
            raise ConfigError(
                f"latency_min_s ({self.latency_min_s}) must not exceed latency_max_s ({self.latency_max_s})"
            )
        return self

    @property
    def profile(self) -> LatencyProfile:
        """The latency profile in force."""
        if self.latency_profile is not None:
            return self.latency_profile
        return Uniform(self.latency_min_s, self.latency_max_s)

    def folded(self) -> Config:
        """The same settings with a plain uniform profile kept as the bounds, so that one state
        has one representation whichever way it was written."""
        profile = self.latency_profile
        if isinstance(profile, Uniform):
            return self.model_copy(
                update={"latency_min_s": profile.min_s, "latency_max_s": profile.max_s, "latency_profile": None}
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """The settings as GET /admin/config shows them: `latency_profile` is the profile in
        force, written as it is parsed; the bounds are null unless it is a plain uniform."""
        profile = self.profile
        low, high = (profile.min_s, profile.max_s) if isinstance(profile, Uniform) else (None, None)
        shown: dict[str, Any] = {}
        for field, value in self.model_dump(exclude={"latency_profile"}).items():
            if field == "latency_min_s":
                shown[field] = low
            elif field == "latency_max_s":
                shown.update(latency_max_s=high, latency_profile=str(profile))
            else:
                shown[field] = value
        return shown


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legacy-sim",
        description="Fake of the legacy registration adaptation layer. Flags override the environment.",
    )
    for field in Config.model_fields:
        # Kept as text so that flags and variables share one parser and one kind of error message.
        parser.add_argument(flag_name(field), dest=field, metavar="V", help=f"overrides {variable_name(field)}")
    return parser


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Config:
    """Builds the Config from CLI flags (which win) and environment variables; one ConfigError
    names every bad value by the flag or variable it came from."""
    args = build_arg_parser().parse_args(argv)
    given: dict[str, tuple[str, str]] = {}  # variable -> (where it came from, its text)
    for field in Config.model_fields:
        variable, flag_value = variable_name(field), getattr(args, field)
        if flag_value is not None:
            given[variable] = (flag_name(field), flag_value)
        elif variable in environ:
            given[variable] = (variable, environ[variable])
    texts: dict[str, Any] = {variable: raw for variable, (_, raw) in given.items()}
    try:
        return Config(**texts).folded()
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(error, given) for error in exc.errors())) from None


LATENCY_FIELDS = ("latency_min_s", "latency_max_s", "latency_profile")


def _problem(error: ErrorDetails, given: Mapping[str, tuple[str, str]]) -> str:
    reason = error.get("ctx", {}).get("error", error["msg"])
    if not error["loc"]:
        # The cross-field rules are all about the latency: name what was given of it.
        latency = [given[variable_name(field)] for field in LATENCY_FIELDS if variable_name(field) in given]
        sources = ", ".join(f"{source}={raw!r}" for source, raw in latency)
        return f"{sources or 'the latency settings'}: {reason}"
    source, raw = given[str(error["loc"][0])]
    return f"{source}={raw!r}: {reason}"


# ---- PATCH /admin/config: JSON values, so types are checked rather than parsed ----

TUNABLE_FIELDS: frozenset[str] = frozenset(
    {
        "latency_min_s",
        "latency_max_s",
        "latency_profile",
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
    changes: dict[str, Any] = _latency_changes(config, patch)
    for field, value in patch.items():
        if field in LATENCY_FIELDS:
            continue
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
    return config.model_copy(update=changes).checked()


def _latency_changes(config: Config, patch: dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH body's latency settings change: a `latency_profile`, or one or both
    bounds of the uniform profile in force (which a bound alone cannot turn a lognormal or a
    drift into)."""
    bounds = [field for field in ("latency_min_s", "latency_max_s") if field in patch]
    if "latency_profile" in patch:
        if bounds:
            raise ConfigError(
                f"latency_profile and {'/'.join(bounds)} given together: give one "
                "(the bounds mean uniform:MIN,MAX)"
            )
        text = patch["latency_profile"]
        if not isinstance(text, str):
            raise ConfigError("latency_profile must be a string such as uniform:10,20")
        try:
            profile = parse_profile(text)
        except ProfileError as exc:
            raise ConfigError(f"latency_profile: {exc}") from None
        if isinstance(profile, Uniform):
            return {"latency_min_s": profile.min_s, "latency_max_s": profile.max_s, "latency_profile": None}
        return {"latency_profile": profile}
    if not bounds:
        return {}
    current = config.profile
    if not isinstance(current, Uniform) and len(bounds) == 1:
        raise ConfigError(
            f"{bounds[0]} alone cannot change the latency profile {current}: "
            "give both latency_min_s and latency_max_s, or a latency_profile"
        )
    changes: dict[str, Any] = {field: _json_number(field, patch[field]) for field in bounds}
    if isinstance(current, Uniform):
        changes.setdefault("latency_min_s", current.min_s)
        changes.setdefault("latency_max_s", current.max_s)
    changes["latency_profile"] = None
    return changes


def format_retry_after(seconds: float) -> str:
    """`1.0` is written `1` (the usual integer header); fractions are kept as given, for fast tests."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))
