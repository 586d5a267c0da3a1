"""The life of a registration: two policies that say what to do next, and nothing else does.

This module contains no I/O whatsoever. The handlers turn HTTP answers into outcomes with
`classify_submit` / `classify_poll`, ask a policy for a decision, and turn the decision into
a plan (`regbridge.plans`). `SubmitPolicy.decide` is every move out of RECEIVED and
`PollPolicy.decide` every move out of SUBMITTED; REGISTERED and FAILED have none. Time and
randomness come in as arguments, so every path is testable without a clock, a socket or a
broker.

    RECEIVED --Accepted--> SUBMITTED --Completed--> REGISTERED
       |  ^                   |  ^
       |  +--Transient        |  +--Processing / Transient (before the deadline)
       +--Rejected / budget-->FAILED<--LegacyFailed / NotFound / deadline
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar


class State(StrEnum):
    RECEIVED = "received"
    SUBMITTED = "submitted"
    REGISTERED = "registered"
    FAILED = "failed"


class Stage(StrEnum):
    """Where a registration failed, as the failure record's `error.stage` names it."""

    VALIDATION = "validation"
    SUBMIT = "submit"
    LEGACY = "legacy"
    POLL = "poll"
    TIMEOUT = "timeout"
    STORE = "store"


# ---- outcomes: what just happened -------------------------------------------------------------
# Each names its metric label value itself: renaming a class never changes a dashboard's series.


@dataclass(frozen=True)
class Accepted:
    label: ClassVar[str] = "accepted"
    request_id: str


@dataclass(frozen=True)
class Rejected:
    """A permanent refusal of the submission (4xx other than 429, or an unusable 201)."""

    label: ClassVar[str] = "rejected"
    reason: str
    http_status: int | None


@dataclass(frozen=True)
class Transient:
    """Worth trying again: 429, 5xx, a timeout, a refused connection, an unreadable answer; or,
    with `sent` False, a call held back before any request (`regbridge.legacy_guard`)."""

    label: ClassVar[str] = "transient"
    reason: str
    http_status: int | None = None
    retry_after_s: float | None = None
    sent: bool = True


@dataclass(frozen=True)
class Processing:
    label: ClassVar[str] = "processing"


@dataclass(frozen=True)
class Completed:
    label: ClassVar[str] = "completed"


@dataclass(frozen=True)
class LegacyFailed:
    """The legacy system finished the registration and refused it; `reason` is its own."""

    label: ClassVar[str] = "legacyfailed"
    reason: str


@dataclass(frozen=True)
class NotFound:
    """The status endpoint does not know the request id (404), or refused the request for
    good (another 4xx): polling again cannot help."""

    label: ClassVar[str] = "notfound"
    reason: str
    http_status: int | None = 404


SubmitOutcome = Accepted | Rejected | Transient
PollOutcome = Processing | Completed | LegacyFailed | NotFound | Transient
Outcome = SubmitOutcome | PollOutcome
SUBMIT_OUTCOMES: tuple[type[SubmitOutcome], ...] = (Accepted, Rejected, Transient)
POLL_OUTCOMES: tuple[type[PollOutcome], ...] = (Processing, Completed, LegacyFailed, NotFound, Transient)


# ---- decisions: what to do next ---------------------------------------------------------------


@dataclass(frozen=True)
class HandOn:
    """Record the request id and hand the registration on to the pending stage."""

    request_id: str


@dataclass(frozen=True)
class RetrySubmit:
    delay_s: float


@dataclass(frozen=True)
class PollAfter:
    delay_s: float


@dataclass(frozen=True)
class Register:
    pass


@dataclass(frozen=True)
class Fail:
    stage: Stage
    reason: str
    http_status: int | None = None


Decision = HandOn | RetrySubmit | PollAfter | Register | Fail


# ---- policies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitPolicy:
    """Bounded, jittered exponential backoff that honours Retry-After up to `backoff_max_s`."""

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float

    def backoff(self, attempt: int, jitter: float, retry_after_s: float | None = None) -> float:
        """Delay after failed attempt number `attempt` (1-based); `jitter` is uniform in [0, 1)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        # "Equal jitter": never less than half the step, so a herd spreads without retrying hot.
        delay: float = ceiling / 2 + ceiling / 2 * jitter
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.backoff_max_s))
        return delay

    def decide(self, outcome: SubmitOutcome, *, attempt: int, jitter: float) -> Decision:
        """RECEIVED → SUBMITTED (HandOn), stays RECEIVED (RetrySubmit), or → FAILED (Fail)."""
        if isinstance(outcome, Accepted):
            return HandOn(outcome.request_id)
        if isinstance(outcome, Rejected):
            return Fail(Stage.SUBMIT, clean_text(outcome.reason), outcome.http_status)
        if attempt >= self.max_attempts:
            return Fail(Stage.SUBMIT, clean_text(f"gave up after {attempt} attempts: {outcome.reason}"),
                        outcome.http_status)
        return RetrySubmit(self.backoff(attempt, jitter, outcome.retry_after_s))


@dataclass(frozen=True)
class PollPolicy:
    """When to poll: not before `first_delay_s`, then every `interval_s`, until `deadline_s`.

    Delays are served by broker wait queues with a fixed TTL each, so a policy only ever asks
    for one of `tiers()`: the queues are declared from this same list.
    """

    first_delay_s: float
    interval_s: float
    deadline_s: float

    def tiers(self) -> tuple[float, ...]:
        return tuple(sorted({d for d in (self.first_delay_s, self.interval_s) if d > 0}))

    def tier_for(self, delay_s: float) -> float:
        """The shortest tier that waits at least `delay_s` (the longest, if none does)."""
        tiers = self.tiers()
        return next((t for t in tiers if t >= delay_s), tiers[-1])

    def first_wait(self, *, age_s: float, share: float = 0.0) -> float | None:
        """How long a registration that was never polled must still wait, or None: poll now.
        (`share` picks the ids that probe on an adaptive schedule; the fixed one has none.)"""
        remaining = self.first_delay_s - age_s
        return self.tier_for(remaining) if remaining > 0 else None

    def next_wait(self, *, age_s: float) -> float:
        """The wait after a poll that found the registration not done: the interval."""
        return self.tier_for(self.interval_s)

    def decide(self, outcome: PollOutcome, *, age_s: float, wait_s: float | None = None) -> Decision:
        """SUBMITTED → REGISTERED (Register), stays SUBMITTED (PollAfter), or → FAILED (Fail).
        A PollAfter waits `wait_s` when the caller's schedule chose it, else the interval."""
        if isinstance(outcome, Completed):
            return Register()
        if isinstance(outcome, LegacyFailed):
            return Fail(Stage.LEGACY, clean_text(outcome.reason), 200)
        if isinstance(outcome, NotFound):
            return Fail(Stage.POLL, clean_text(outcome.reason), outcome.http_status)
        if age_s >= self.deadline_s:
            last = "still processing" if isinstance(outcome, Processing) else outcome.reason
            status = outcome.http_status if isinstance(outcome, Transient) else 200
            return Fail(Stage.TIMEOUT, clean_text(
                f"no final status {self.deadline_s:g} s after submission (last poll: {last})"), status)
        return PollAfter(self.next_wait(age_s=age_s) if wait_s is None else wait_s)


# ---- what the legacy API's answers mean -------------------------------------------------------

# A request id goes into a URL path: letters, digits and a few marks, never '/', '..' or spaces.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._:-]{0,127}")
_REASON_CHARS = 300


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


# Characters that steer a terminal or the direction of text rather than show anything: C0 and
# DEL, C1, and the bidirectional marks, embeddings, overrides and isolates. A reason is read in
# terminals, logs and dashboards, so outside text loses them before it becomes one; line breaks
# and tabs become spaces.
_LINE_BREAKS = "\t\n\v\f\r\x85\u2028\u2029"
_CONTROLS = {
    *range(0x00, 0x20), 0x7F, *range(0x80, 0xA0),
    0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A),
}
_CLEAN = str.maketrans({**{code: None for code in _CONTROLS}, **{ord(c): " " for c in _LINE_BREAKS}})


def clean_text(text: str) -> str:
    """`text` without control characters (see _CONTROLS), its runs of whitespace one space each."""
    return " ".join(text.translate(_CLEAN).split())


def _short(text: str) -> str:
    text = clean_text(text)
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _error_text(body: bytes) -> str:
    data = _json_object(body)
    if data is not None and isinstance(data.get("error"), str):
        return _short(str(data["error"]))
    return _short(body.decode("utf-8", errors="replace")) or "no body"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; the HTTP-date form is ignored (the backoff applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def classify_submit(status: int, body: bytes, retry_after: str | None = None) -> SubmitOutcome:
    if 200 <= status < 300:
        data = _json_object(body)
        if data is None:
            return Rejected(f"legacy API answered {status} without a JSON object body: "
                            f"{_short(body.decode('utf-8', errors='replace'))!r}", status)
        request_id = data.get("request_id")
        if not valid_request_id(request_id):
            return Rejected(f"legacy API answered {status} without a usable request_id "
                            f"(got {_short(repr(request_id))})", status)
        assert isinstance(request_id, str)
        return Accepted(request_id)
    if status == 429 or status >= 500:
        return Transient(f"legacy API busy: HTTP {status}", status, parse_retry_after(retry_after))
    if 400 <= status < 500:
        return Rejected(f"rejected by the legacy API: {_error_text(body)}", status)
    return Transient(f"unexpected HTTP {status} from the legacy API", status)


_POLL_STATUSES: dict[str, PollOutcome] = {"processing": Processing(), "completed": Completed()}


def classify_poll(status: int, body: bytes, retry_after: str | None = None) -> PollOutcome:
    if status == 200:
        data = _json_object(body)
        if data is None:
            return Transient(f"unreadable status answer: {_short(body.decode('utf-8', errors='replace'))!r}",
                             status)
        value = data.get("status")
        if value == "failed":
            reason = data.get("reason")
            return LegacyFailed(_short(reason) if isinstance(reason, str) and reason
                                else "the legacy system reported failure without a reason")
        if isinstance(value, str) and value in _POLL_STATUSES:
            return _POLL_STATUSES[value]
        return Transient(f"unknown status value {_short(repr(value))} in the status answer", status)
    if status == 404:
        return NotFound(f"the status endpoint does not know this request id: {_error_text(body)}", 404)
    if status == 429 or status >= 500:
        return Transient(f"status endpoint busy: HTTP {status}", status, parse_retry_after(retry_after))
    if 400 <= status < 500:
        return NotFound(f"the status endpoint refused the request: HTTP {status}: {_error_text(body)}",
                        status)
    return Transient(f"unexpected HTTP {status} from the status endpoint", status)


# ---- the status field in MongoDB --------------------------------------------------------------


def may_record(current_status: str | None, current_request_id: str | None, request_id: str | None) -> bool:
    """Whether a new status for attempt `request_id` may replace what the user's document holds.

    Within one attempt (one legacy request id) a status never moves backwards: a late or
    duplicate event does not turn `registered` into anything else, nor `failed` into anything.
    A new attempt (another request id) may move `failed` to `submitted` and on.
    """
    if current_status == State.REGISTERED:
        return False
    same_attempt = request_id is not None and request_id == current_request_id
    return not (current_status == State.FAILED and same_attempt)
