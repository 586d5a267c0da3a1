"""What a handler decided, as data: the effects of one delivery, for `regbridge.executor`.

A handler reads what it needs, makes its one call to the legacy API and returns one plan. It
never acks, nacks or publishes and holds no broker: the executor carries every plan out in
the one order the guarantees need, so a test of a handler asserts on the plan alone.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from regbridge.failure_index import IndexEntry
from regbridge.lifecycle import State
from regbridge.messages import FailureError

SHORTSTR_BYTES = 255  # the most an AMQP short string (such as message_id) holds
# The AMQP header that carries a failure record's id (`Subject.record_id`). Its message_id is the
# inbound one where there was one (the contract), which another user's message may reuse.
RECORD_ID_HEADER = "x-record-id"

# ---- store writes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptAccepted:
    """The attempt's request id and the user's `submitted`: from here a redelivery resumes
    with the request id instead of submitting again."""

    attempt_key: str
    user_id: str
    request_id: str


@dataclass(frozen=True)
class UserStatus:
    """The user's registration fields, under the status rule of `lifecycle.may_record`."""

    user_id: str
    status: State
    request_id: str | None
    error: FailureError | None = None


@dataclass(frozen=True)
class AttemptFailed:
    """The attempt's failure is on the failure queue: a redelivery publishes no second record."""

    attempt_key: str
    user_id: str | None
    request_id: str | None
    error: FailureError


@dataclass(frozen=True)
class RecordIndexed:
    """The failure record's entry in the failure queue's index (`regbridge.failure_index`):
    with `entry`, the whole entry upserted in `state` under `token`; without, only a move to
    `state` of the entry this same failure wrote under `token` and left `publishing` (so that
    an entry a reader or another attempt wrote since is never overwritten)."""

    record_id: str
    state: str
    token: str
    entry: IndexEntry | None = None


Write = AttemptAccepted | UserStatus | AttemptFailed | RecordIndexed


# ---- who a plan is about --------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """What a failure record of this delivery says, whichever step fails."""

    original: Any
    user_id: str | None = None
    attempt_key: str | None = None
    request_id: str | None = None
    attempts: int = 0
    message_id: str | None = None
    received_at: float | None = None  # epoch seconds the inbound message entered the system
    # Of a message without an attempt key (no user could be read): what sets this publish of it
    # apart (`messages.publish_mark`), so that its record's id is this publish's alone.
    publish_mark: str | None = None

    def record_id(self, body: bytes) -> str:
        """The failure record's id (its `RECORD_ID_HEADER`, and its index entry's `_id`): the
        same for every copy a crash window makes of one record, so that readers show it once and
        a replay moves it once, and different for every other record. The attempt key, which
        names the user, the message and this publish of it (two users' messages that reuse one
        message_id are two records); else, for a message no user could be read from, the same
        built from what there is: its message_id, a digest of the body as delivered, and its
        publish mark (invalid messages often share a body, as two publishes of one message do).
        An AMQP short string holds 255 bytes: a longer key is digested. Not the inbound
        message_id alone: the contract keeps that on the record as its AMQP message_id, and it is
        not unique to one user."""
        key = self.attempt_key or self._key_without_user(body)
        return key if len(key.encode()) <= SHORTSTR_BYTES else "sha256:" + hashlib.sha256(key.encode()).hexdigest()

    def _key_without_user(self, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        key = f"mid:{self.message_id}|{digest}" if self.message_id else digest
        return key + (f"|{self.publish_mark}" if self.publish_mark else "")


# ---- plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Hand the registration on: `writes`, then a confirmed publish of `body` to `queue`, then
    the ack. A write refused for good makes it a `store` failure instead."""

    subject: Subject
    queue: str
    body: bytes
    writes: tuple[Write, ...] = ()


@dataclass(frozen=True)
class Finish:
    """A success, or nothing left to do: `writes`, then the ack. A write refused for good
    makes it a `store` failure instead."""

    subject: Subject
    writes: tuple[Write, ...] = ()
    registered: bool = False  # the legacy system completed it (what the poller counts)


@dataclass(frozen=True)
class Failure:
    """A terminal failure: one record on the failure queue (confirmed), the attempt's mark,
    the user's `failed`, then the ack. No second record for an attempt already marked."""

    subject: Subject
    error: FailureError


@dataclass(frozen=True)
class Retry:
    """Hold the delivery unacked and run the handler again at `attempt` after `delay_s`."""

    delay_s: float
    attempt: int


@dataclass(frozen=True)
class Requeue:
    """Give the delivery back to the broker untouched (the service is stopping)."""


Plan = Forward | Finish | Failure | Retry | Requeue


def failure_writes(subject: Subject, error: FailureError) -> tuple[Write, ...]:
    """What a failure writes after its record is out: the attempt's mark first (it ends the
    window for a second record), then the user's status."""
    writes: list[Write] = []
    if subject.attempt_key is not None:
        writes.append(AttemptFailed(subject.attempt_key, subject.user_id, subject.request_id, error))
    if subject.user_id is not None:
        writes.append(UserStatus(subject.user_id, State.FAILED, subject.request_id, error))
    return tuple(writes)
