"""The messages that cross the broker, as frozen dataclasses with `encode`/`decode`.

Pure code, no I/O. Every decoding problem raises one error type, `DecodeError`, which carries
what the failure record needs (`original`, and `user_id` where one was found); the services
route it to the failure queue, never into a requeue loop.

What a message may hold is bounded at decode, so that every later encode of it (the pending
message, the failure record) succeeds: its size, its nesting (MAX_NESTING, checked before
parsing), finite numbers only, and no key twice in one object.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

USER_ID_MAX_CHARS = 128
# Room left for the record's other fields when an oversized original is truncated.
TRUNCATED_ORIGINAL_CHARS = 4096
# How deep arrays and objects may nest in an inbound body (the body itself is one level). json's
# parser and encoder recurse once per level, and the pending message and the failure record wrap
# the payload one level more: bounded here, no later encode comes near Python's recursion limit.
# It is checked on the text, by a loop, before anything parses it.
MAX_NESTING = 64


class DecodeError(ValueError):
    """A message body that cannot be used; `reason` is written for a human."""

    def __init__(self, reason: str, *, original: Any, user_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.original = original
        self.user_id = user_id


def _text_of(body: bytes, limit: int | None = None) -> str:
    text = body.decode("utf-8", errors="replace")
    if limit is not None and len(text) > limit:
        return text[:limit] + f"... [truncated, {len(body)} bytes in all]"
    return text


# A JSON string, to its closing quote or, when it has none, to the end of the text.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether arrays and objects in `text` nest more than `limit` levels, brackets inside
    strings not counted. Never a recursion: the strings are cut out and the brackets left are
    counted in a running sum, before json's parser (which recurses once per level) sees the
    text. Linear in the text, whose size is bounded before this runs."""
    depths = accumulate(map(_STEP.__getitem__, _BRACKET.findall(_STRING.sub("", text))))
    return next(filter(limit.__lt__, depths), None) is not None  # C loops all through, stopping at the first


def _shown(value: Any) -> str:
    """Text standing in for a value that json cannot write: its repr cut short, or, when even
    that fails (nesting, a broken __repr__), only its type's name."""
    try:
        text = repr(value)
    except Exception:
        return f"[a {type(value).__name__} that cannot be shown]"
    return text if len(text) <= TRUNCATED_ORIGINAL_CHARS else text[:TRUNCATED_ORIGINAL_CHARS] + "... [truncated]"


def valid_user_id(value: Any) -> str | None:
    """The user id if it is one the contract accepts, else None. Never an operator object,
    never a string MongoDB cannot store (a lone surrogate from a JSON escape)."""
    if not isinstance(value, str) or not 0 < len(value) <= USER_ID_MAX_CHARS:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


class DuplicateKey(ValueError):
    """An object that holds a key twice: parsers differ on which value counts."""

    def __init__(self, key: str) -> None:
        shown = repr(key[:64]) + ("..." if len(key) > 64 else "")  # repr shows control characters escaped
        super().__init__(f"the key {shown} appears twice in one object")
        self.key = key


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return value


def loads(data: bytes | str) -> Any:
    """Strict JSON. NaN, Infinity and numbers too large for a float are refused, since nothing
    downstream could write them back. A key twice in one object is refused (DuplicateKey), at
    any depth: the bridge forwards the body as received, and the value it reads must be the only
    one there is, whichever a reader keeps."""
    return json.loads(data, parse_constant=_no_constants, parse_float=_finite, object_pairs_hook=_unique_keys)


def _bounded_loads(text: str, body: bytes, what: str, depth: int) -> Any:
    """`text` parsed, or a DecodeError for a value nested deeper than `depth` (checked on the
    text, before json recurses through it) or holding a key twice; a ValueError for text that
    is not JSON. The raw text is the `original` of a refusal: a parsed value would show one of
    two values of a key as if it were the only one."""
    if nested_deeper_than(text, depth):
        raise DecodeError(f"{what} is nested more than {depth} levels deep",
                          original=_text_of(body, TRUNCATED_ORIGINAL_CHARS))
    try:
        return loads(text)
    except DuplicateKey as exc:
        raise DecodeError(f"{what} is refused: {exc}", original=_text_of(body, TRUNCATED_ORIGINAL_CHARS)) from None
    except RecursionError:  # not reached within `depth`; kept so that nothing else is raised
        raise DecodeError(f"{what} is nested too deeply", original=_text_of(body, TRUNCATED_ORIGINAL_CHARS)) from None


@dataclass(frozen=True)
class Registration:
    """An inbound registration: the body as received, and what was read out of it."""

    user_id: str
    payload: Mapping[str, Any]
    body: bytes = field(repr=False)
    message_id: str | None = None
    # What sets this publish apart from an earlier one of the same message (a replay keeps the
    # message_id): the replay's mark, and the AMQP timestamp. Redeliveries carry the same.
    publish_mark: str | None = None

    @property
    def attempt_key(self) -> str:
        """Names this message across redeliveries, and only this publish of it: the user, its
        message_id or else a digest of its body, and its publish mark. (The user is part of it,
        so a message_id reused for another user is not taken for this one.)"""
        mark = f"|{self.publish_mark}" if self.publish_mark else ""
        if self.message_id:
            return f"{self.user_id}|mid:{self.message_id}{mark}"
        return f"{self.user_id}|sha256:" + hashlib.sha256(self.body).hexdigest() + mark

    @classmethod
    def decode(cls, body: bytes, *, message_id: str | None, max_bytes: int,
               publish_mark: str | None = None) -> Registration:
        if len(body) > max_bytes:
            raise DecodeError(
                f"message body is {len(body)} bytes, over the limit of {max_bytes}",
                original=_text_of(body, TRUNCATED_ORIGINAL_CHARS),
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"message body is not UTF-8 ({exc.reason} at byte {exc.start})",
                              original=_text_of(body)) from None
        try:
            parsed = _bounded_loads(text, body, "message body", MAX_NESTING)
        except DecodeError:
            raise
        except ValueError as exc:
            raise DecodeError(f"message body is not JSON ({exc})", original=text) from None
        # From here the value nests at most MAX_NESTING deep and holds only what json writes back.
        if not isinstance(parsed, dict):
            raise DecodeError(f"message body is JSON but not an object (it is {type(parsed).__name__})",
                              original=parsed)
        original = parsed
        if "user_id" not in parsed:
            raise DecodeError("message has no user_id", original=original)
        user_id = valid_user_id(parsed["user_id"])
        if user_id is None:
            raise DecodeError(
                f"user_id must be a non-empty string of at most {USER_ID_MAX_CHARS} characters",
                original=original,
            )
        return cls(user_id=user_id, payload=parsed, body=body, message_id=message_id or None,
                   publish_mark=publish_mark or None)


@dataclass(frozen=True)
class PendingMessage:
    """A submitted registration waiting for its status: what the poller needs, and nothing more."""

    request_id: str
    user_id: str
    payload: Mapping[str, Any]
    attempt_key: str
    submitted_at: float  # epoch seconds when the legacy API accepted it
    message_id: str | None = None
    received_at: float | None = None  # epoch seconds when the inbound message was taken
    submit_attempts: int = 1
    polls: int = 0
    # Seconds the broker has held it in wait queues, by their TTLs: a lower bound of its age
    # that no host's clock enters, so a clock behind the submitter's adds no wait.
    waited_s: float = 0.0
    # Its age at the last poll that found it still processing (None: no such poll yet): the
    # lower bound of its completion age, which the adaptive schedule learns from.
    processing_age_s: float | None = None

    def encode(self) -> bytes:
        # Every field, by its own name: the poller's decode reads the same names back.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> PendingMessage:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("pending message is not JSON (not UTF-8)", original=_text_of(body)) from None
        try:
            # The payload sits one level inside the message.
            data = _bounded_loads(text, body, "pending message", MAX_NESTING + 1)
        except DecodeError:
            raise
        except ValueError:
            raise DecodeError("pending message is not JSON", original=_text_of(body)) from None
        if not isinstance(data, dict):
            raise DecodeError("pending message is not a JSON object", original=data)
        user_id = valid_user_id(data.get("user_id"))
        try:
            msg = cls(
                request_id=_require(data, "request_id", str),
                user_id=_require(data, "user_id", str),
                payload=_require(data, "payload", dict),
                attempt_key=_require(data, "attempt_key", str),
                submitted_at=float(_require(data, "submitted_at", (int, float))),
                message_id=_optional(data, "message_id", str),
                received_at=_optional_float(data, "received_at"),
                submit_attempts=_require(data, "submit_attempts", int),
                polls=_require(data, "polls", int),
                waited_s=_optional_float(data, "waited_s") or 0.0,
                processing_age_s=_optional_float(data, "processing_age_s"),
            )
        except (ValueError, OverflowError) as exc:
            raise DecodeError(f"pending message is malformed: {exc}",
                              original=data.get("payload", data), user_id=user_id) from None
        if user_id is None:
            raise DecodeError("pending message has an invalid user_id", original=msg.payload)
        return msg

    def polled(self, *, processing_at_s: float | None = None) -> PendingMessage:
        """One more poll counted; `processing_at_s`: the age at which it said `processing`."""
        seen = self.processing_age_s if processing_at_s is None else processing_at_s
        return PendingMessage(**{**self.__dict__, "polls": self.polls + 1, "processing_age_s": seen})

    def waited(self, delay_s: float) -> PendingMessage:
        return PendingMessage(**{**self.__dict__, "waited_s": self.waited_s + delay_s})

    def age_s(self, now: float) -> float:
        """Its age by this host's clock, never less than the broker has held it: a clock behind
        the submitter's adds no wait, one ahead moves the deadline by no more than the skew."""
        return max(now - self.submitted_at, self.waited_s)


def _require(data: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected an object holding {key!r}")
    value = data.get(key)
    # bool is an int in Python; a count or a time is never a bool.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is missing or of the wrong type")
    return value


def _optional(data: Mapping[str, Any], key: str, kind: type) -> Any:
    return None if data.get(key) is None else _require(data, key, kind)


def _optional_float(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else float(_require(data, key, (int, float)))


@dataclass(frozen=True)
class FailureError:
    stage: str
    reason: str
    http_status: int | None = None


@dataclass(frozen=True)
class FailureRecord:
    """One terminal failure, as the contract's failure queue carries it."""

    original: Any
    user_id: str | None
    legacy_request_id: str | None
    error: FailureError
    attempts: int
    failed_at: datetime

    def encode(self) -> bytes:
        try:
            return self._encode(self.original)
        except (RecursionError, ValueError, TypeError):
            # Nothing may keep a failure from its record: an original that cannot be written
            # back as JSON goes as text, cut short. (Decoding bounds what a message can hold, so
            # this is for a value from elsewhere, such as a handler's error path.)
            return self._encode(_shown(self.original))

    def _encode(self, original: Any) -> bytes:
        return json.dumps(
            {
                "original": original,
                "user_id": self.user_id,
                "legacy_request_id": self.legacy_request_id,
                "error": {
                    "stage": self.error.stage,
                    "reason": self.error.reason,
                    "http_status": self.error.http_status,
                },
                "attempts": self.attempts,
                "failed_at": self.failed_at.astimezone(UTC).isoformat(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, body: bytes) -> FailureRecord:
        try:
            data = loads(body)
            error = data["error"]
            return cls(
                original=data["original"],
                user_id=_optional(data, "user_id", str),
                legacy_request_id=_optional(data, "legacy_request_id", str),
                error=FailureError(
                    stage=_require(error, "stage", str),
                    reason=_require(error, "reason", str),
                    http_status=_optional(error, "http_status", int),
                ),
                attempts=_require(data, "attempts", int),
                failed_at=datetime.fromisoformat(_require(data, "failed_at", str)),
            )
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise DecodeError(f"failure record is malformed: {exc}", original=_text_of(body)) from None


REPLAY_HEADER = "x-replayed-at"


def publish_mark(headers: Mapping[str, Any] | None, timestamp: int | None) -> str | None:
    """The mark of one publish of a message: set by the replay tool, or the publisher's timestamp."""
    parts = []
    replayed = (headers or {}).get(REPLAY_HEADER)
    if isinstance(replayed, str | bytes) and replayed:
        parts.append("replay:" + (replayed.decode(errors="replace") if isinstance(replayed, bytes) else replayed))
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        parts.append(f"ts:{timestamp}")
    return "|".join(parts) or None
