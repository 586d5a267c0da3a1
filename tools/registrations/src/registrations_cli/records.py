"""Failure records as read from the failure queue, and the filters an operator applies to them.

Pure code: a record is judged by `regbridge.messages.FailureRecord.decode`; one that does not
decode is still shown (and never replayed without an `original`), never a crash.
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from regbridge.messages import DecodeError, FailureRecord, loads

STAGES = ("validation", "submit", "legacy", "poll", "timeout", "store")


@dataclass(frozen=True)
class Failure:
    position: int  # 1-based, in queue order
    message_id: str | None
    properties: dict[str, Any]
    body: bytes
    data: Any  # the body parsed as JSON, or None
    record: FailureRecord | None  # None when the body is not a well-formed failure record
    problem: str | None  # why it is not

    @classmethod
    def parse(cls, position: int, body: bytes, *, message_id: str | None = None,
              properties: dict[str, Any] | None = None) -> Failure:
        data: Any = None
        with suppress(ValueError, RecursionError):
            data = loads(body)
        try:
            record: FailureRecord | None = FailureRecord.decode(body)
            problem = None
        except DecodeError as exc:
            record, problem = None, exc.reason
        return cls(position, message_id, dict(properties or {}), body, data, record, problem)

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
            "id": self.message_id,
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
    ids: frozenset[str] | None = None  # record ids (AMQP message_id), exactly
    reason: re.Pattern[str] | None = None  # searched in the reason

    def matches(self, failure: Failure) -> bool:
        if self.stage is not None and failure.stage != self.stage:
            return False
        if self.user_id is not None and failure.user_id != self.user_id:
            return False
        if self.ids is not None and failure.message_id not in self.ids:
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


def first_copies(failures: list[Failure]) -> tuple[list[Failure], dict[str, int]]:
    """Each record once: the first of the copies that share an id (a crash window's duplicate),
    and how many copies each id has. A record without an id is its own."""
    seen: dict[str, int] = {}
    first: list[Failure] = []
    for failure in failures:
        if failure.message_id is None:
            first.append(failure)
            continue
        if failure.message_id not in seen:
            first.append(failure)
        seen[failure.message_id] = seen.get(failure.message_id, 0) + 1
    return first, seen
