"""Latency profiles: how long legacy-sim takes to complete a registration. Pure code, no I/O.

A profile is written as text, in the environment, on the command line and in PATCH /admin/config:

    uniform:MIN,MAX               MIN <= seconds <= MAX, uniformly (the default, uniform:10,20)
    lognormal:MEDIAN,SIGMA        MEDIAN * exp(SIGMA * N(0,1)): half the draws under MEDIAN, a long tail
    lognormal:MEDIAN,SIGMA,MAX    the same, a draw above MAX taken as MAX
    P1 for SECONDS then P2        P1 for the first SECONDS of the profile's life, P2 after that
    P1 for S1 then P2 for S2 then P3 ...

where each P is a uniform or lognormal phase. A lognormal without MAX is still cut at
`CEILING_S` (a day): a draw a hundred sigmas out must not overflow or outlive the simulator.

The drift's phases are written with words rather than symbols because the text is typed into
shells: `>` or `|` would redirect or pipe an unquoted value, while a space splits it into
arguments that the command line refuses loudly.

Each sample takes the RNG it is given (legacy-sim's one seeded generator, so a seeded run is
reproducible) and the age of the profile, that is the seconds since it took effect, which only
a drift looks at. A uniform draws exactly `rng.uniform(MIN, MAX)`, as legacy-sim always did.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# A day: also how long legacy-sim remembers an idempotency key.
CEILING_S = 86400.0


class ProfileError(ValueError):
    """A latency profile that cannot be parsed; the message says where and why."""


def _number(value: float) -> str:
    """The shortest text that parses back to `value`: 10.0 is written 10."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


@dataclass(frozen=True, slots=True)
class Uniform:
    min_s: float
    max_s: float

    def sample(self, rng: random.Random, age_s: float = 0.0) -> float:
        return rng.uniform(self.min_s, self.max_s)

    def __str__(self) -> str:
        return f"uniform:{_number(self.min_s)},{_number(self.max_s)}"


@dataclass(frozen=True, slots=True)
class LogNormal:
    median_s: float
    sigma: float
    # None: cut at CEILING_S only.
    max_s: float | None = None

    def sample(self, rng: random.Random, age_s: float = 0.0) -> float:
        cap = CEILING_S if self.max_s is None else min(self.max_s, CEILING_S)
        spread = self.sigma * rng.gauss(0.0, 1.0)
        # Compared in log space, so that no sigma can overflow exp().
        if math.log(self.median_s) + spread >= math.log(cap):
            return cap
        return self.median_s * math.exp(spread)

    def __str__(self) -> str:
        text = f"lognormal:{_number(self.median_s)},{_number(self.sigma)}"
        return text if self.max_s is None else f"{text},{_number(self.max_s)}"


Phase = Uniform | LogNormal


@dataclass(frozen=True, slots=True)
class Step:
    """One phase of a drift and how long it lasts."""

    phase: Phase
    duration_s: float


@dataclass(frozen=True, slots=True)
class Drift:
    """`steps` in turn, each for its duration from the profile's start, then `last` for good."""

    steps: tuple[Step, ...]
    last: Phase

    def phase_at(self, age_s: float) -> Phase:
        ends_at = 0.0
        for step in self.steps:
            ends_at += step.duration_s
            if age_s < ends_at:
                return step.phase
        return self.last

    def sample(self, rng: random.Random, age_s: float = 0.0) -> float:
        return self.phase_at(age_s).sample(rng, age_s)

    def __str__(self) -> str:
        return " ".join(f"{step.phase} for {_number(step.duration_s)} then" for step in self.steps) + f" {self.last}"


LatencyProfile = Uniform | LogNormal | Drift

EXAMPLES = "e.g. uniform:10,20, lognormal:15,0.5 or 'uniform:10,20 for 300 then uniform:40,80'"


def _parse_number(phase: str, name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ProfileError(f"{phase!r}: {name} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ProfileError(f"{phase!r}: {name} must be a finite number, not {raw!r}")
    return value


def parse_phase(text: str) -> Phase:
    """One uniform or lognormal phase, such as `uniform:10,20`."""
    kind, colon, args = text.partition(":")
    if not colon:
        raise ProfileError(f"{text!r}: expected KIND:NUMBERS, {EXAMPLES}")
    if kind == "uniform":
        names: tuple[str, ...] = ("MIN", "MAX")
    elif kind == "lognormal":
        names = ("MEDIAN", "SIGMA", "MAX")
    else:
        raise ProfileError(f"{text!r}: unknown kind {kind!r}; the kinds are uniform and lognormal")
    raws = args.split(",")
    required = 2
    if not required <= len(raws) <= len(names):
        wanted = "uniform:MIN,MAX" if kind == "uniform" else "lognormal:MEDIAN,SIGMA or lognormal:MEDIAN,SIGMA,MAX"
        raise ProfileError(f"{text!r}: expected {wanted}, comma-separated with no spaces, got {len(raws)} value(s)")
    values = [_parse_number(text, name, raw) for name, raw in zip(names, raws, strict=False)]
    if kind == "uniform":
        low, high = values
        if low < 0:
            raise ProfileError(f"{text!r}: MIN must be >= 0")
        if low > high:
            raise ProfileError(f"{text!r}: MIN ({_number(low)}) must not exceed MAX ({_number(high)})")
        return Uniform(low, high)
    median, sigma = values[0], values[1]
    cap = values[2] if len(values) == 3 else None
    if median <= 0:
        raise ProfileError(f"{text!r}: MEDIAN must be > 0")
    if sigma < 0:
        raise ProfileError(f"{text!r}: SIGMA must be >= 0")
    if cap is not None and cap < median:
        raise ProfileError(f"{text!r}: MAX ({_number(cap)}) must not be below MEDIAN ({_number(median)})")
    return LogNormal(median, sigma, cap)


def parse_profile(text: str) -> LatencyProfile:
    """A whole profile: one phase, or phases joined by `for SECONDS then`. Raises ProfileError."""
    words = text.split()
    if not words:
        raise ProfileError(f"empty latency profile; {EXAMPLES}")
    steps: list[Step] = []
    index = 0
    while True:
        phase = parse_phase(words[index])
        index += 1
        if index == len(words):
            break
        rest = " ".join(words[index:])
        if words[index] != "for":
            raise ProfileError(f"after {words[index - 1]!r}: expected 'for SECONDS then PROFILE', got {rest!r}")
        if index + 1 == len(words):
            raise ProfileError(f"after {words[index - 1]!r}: 'for' must be followed by SECONDS then PROFILE")
        raw_duration = words[index + 1]
        try:
            duration = float(raw_duration)
        except ValueError:
            raise ProfileError(f"'for {raw_duration}': {raw_duration!r} is not a number of seconds") from None
        if not (math.isfinite(duration) and duration > 0):
            raise ProfileError(f"'for {raw_duration}': the seconds must be a finite number > 0")
        if index + 2 == len(words) or words[index + 2] != "then":
            raise ProfileError(f"'{words[index - 1]} for {raw_duration}': must be followed by 'then PROFILE' "
                               "(the last phase has no 'for': it lasts)")
        if index + 3 == len(words):
            raise ProfileError(f"'{words[index - 1]} for {raw_duration} then': a phase must follow 'then'")
        steps.append(Step(phase, duration))
        index += 3
    return Drift(tuple(steps), phase) if steps else phase
