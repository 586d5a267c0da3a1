"""Failure records as read from the failure queue, and the filters an operator applies to them.

Pure code: a record is judged by `regbridge.messages.FailureRecord.decode`; one that does not
decode is still shown (and never replayed without an `original`), never a crash.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from regbridge.messages import DecodeError, FailureRecord, loads
from regbridge.plans import RECORD_ID_HEADER

STAGES = ("validation", "submit", "legacy", "poll", "timeout", "store")


# Where a record's id came from (`record_id_of`).
FROM_HEADER = "header"
FROM_MESSAGE_ID = "message_id"
FROM_BODY = "body"


# What makes two records copies of one (`Failure.copy_key`): the id, and the body where the id
# alone cannot tell.
CopyKey = tuple[str, bytes | None]


def record_id_of(message_id: str | None, headers: Any, body: bytes) -> tuple[str, str]:
    """A record's id as read from the queue, and where it came from: the id the service wrote
    (`regbridge.plans.RECORD_ID_HEADER`); for a record an earlier release wrote, its AMQP
    message_id (which may be an inbound message_id another user's record shares); for a record
    with neither, a digest of its body. The one place the CLI reads an id from a record."""
    found = headers.get(RECORD_ID_HEADER) if isinstance(headers, dict) else None
    if isinstance(found, bytes):
        found = found.decode("utf-8", errors="replace")
    if isinstance(found, str) and found:
        return found, FROM_HEADER
    if message_id:
        return message_id, FROM_MESSAGE_ID
    return "sha256:" + hashlib.sha256(body).hexdigest(), FROM_BODY


@dataclass(frozen=True)
class Failure:
    position: int  # 1-based, in queue order
    record_id: str  # `record_id_of`, or the index entry's `_id`
    message_id: str | None  # the AMQP message_id: the inbound one, carried on
    properties: dict[str, Any]
    body: bytes
    data: Any  # the body parsed as JSON, or None
    record: FailureRecord | None  # None when the body is not a well-formed failure record
    problem: str | None  # why it is not
    id_from: str = FROM_HEADER

    @classmethod
    def parse(cls, position: int, body: bytes, *, message_id: str | None = None, headers: Any = None,
              properties: dict[str, Any] | None = None, record_id: str | None = None) -> Failure:
        """`record_id` given (an index entry's), or read from the record (`record_id_of`)."""
        data: Any = None
        with suppress(ValueError, RecursionError):
            data = loads(body)
        try:
            record: FailureRecord | None = FailureRecord.decode(body)
            problem = None
        except DecodeError as exc:
            record, problem = None, exc.reason
        found, id_from = (record_id, FROM_HEADER) if record_id is not None else record_id_of(message_id, headers, body)
        return cls(position, found, message_id, dict(properties or {}), body, data, record, problem, id_from)

    @property
    def copy_key(self) -> CopyKey:
        """Two records are copies of one (a crash window's duplicate, shown once, replayed once)
        when their keys are equal. An id the service wrote names one attempt of one user's
        message, so records that share it are copies even where `failed_at` differs (a redelivery
        writes the record again). An id read from an earlier release's message_id may be shared by
        other users' records: only a byte-identical body makes those copies."""
        return (self.record_id, self.body if self.id_from == FROM_MESSAGE_ID else None)

    @property
    def copy_digest(self) -> CopyKey:
        """`copy_key` as kept for every record of a whole queue: a body in it as a digest."""
        record_id, body = self.copy_key
        return (record_id, None if body is None else hashlib.blake2b(body, digest_size=16).digest())

    def _error_field(self, key: str) -> Any:
        error = self.data.get("error") if isinstance(self.data, dict) else None
        return error.get(key) if isinstance(error, dict) else None

    @property
    def stage(self) -> str:
        if self.record is not None:
            return self.record.error.stage
        stage = self._error_field("stage")
        return stage if isinstance(stage, str) else "?"

    @property
    def reason(self) -> str:
        if self.record is not None:
            return self.record.error.reason
        return f"unreadable failure record: {self.problem}"

    @property
    def user_id(self) -> str | None:
        if self.record is not None:
            return self.record.user_id
        value = self.data.get("user_id") if isinstance(self.data, dict) else None
        return value if isinstance(value, str) else None

    @property
    def failed_at(self) -> datetime | None:
        if self.record is None:
            return None
        moment = self.record.failed_at
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

    @property
    def has_original(self) -> bool:
        return isinstance(self.data, dict) and "original" in self.data

    def replay_body(self) -> bytes:
        """What republishing `original` sends: its JSON encoding, or its UTF-8 text when the body
        it came from did not parse (the record then holds it as a string)."""
        if not self.has_original:
            raise ValueError("the record has no original to replay")
        return encode_original(self.data["original"])

    def view(self, now: datetime) -> dict[str, Any]:
        """The record as `--json` shows it."""
        return {
            "id": self.record_id,
            "position": self.position,
            "message_id": self.message_id,
            "age_s": round(self.age_s(now), 3) if self.failed_at is not None else None,
            "record": self.data if self.data is not None else self.body.decode("utf-8", errors="replace"),
            **({"problem": self.problem} if self.problem else {}),
        }

    def age_s(self, now: datetime) -> float:
        return (now - self.failed_at).total_seconds() if self.failed_at is not None else 0.0


def encode_original(original: Any) -> bytes:
    if isinstance(original, str):
        return original.encode("utf-8")
    return json.dumps(original, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class Filter:
    stage: str | None = None
    user_id: str | None = None
    since: datetime | None = None  # failed at or after
    older_than: datetime | None = None  # failed before
    ids: frozenset[str] | None = None  # record ids (`record_id_of`), exactly
    reason: re.Pattern[str] | None = None  # searched in the reason

    def matches(self, failure: Failure) -> bool:
        if self.stage is not None and failure.stage != self.stage:
            return False
        if self.user_id is not None and failure.user_id != self.user_id:
            return False
        if self.ids is not None and failure.record_id not in self.ids:
            return False
        if self.reason is not None and not self.reason.search(failure.reason):
            return False
        failed_at = failure.failed_at
        if self.since is not None and (failed_at is None or failed_at < self.since):
            return False
        # A record whose time cannot be read is never old enough to be taken by age.
        return self.older_than is None or (failed_at is not None and failed_at < self.older_than)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.stage, self.user_id, self.since, self.older_than, self.ids,
                                            self.reason))


def first_copies(failures: list[Failure]) -> tuple[list[Failure], dict[CopyKey, int]]:
    """Each record once: the first of its copies (`Failure.copy_key`), and how many copies each
    key has. Distinct records that share an id are each their own."""
    seen: dict[CopyKey, int] = {}
    first: list[Failure] = []
    for failure in failures:
        if failure.copy_key not in seen:
            first.append(failure)
        seen[failure.copy_key] = seen.get(failure.copy_key, 0) + 1
    return first, seen
