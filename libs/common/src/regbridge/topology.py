"""Queue declarations, as data. Each service declares what it uses, idempotently, on every connect.

All queues are durable quorum queues. A wait queue holds a still-processing id for a fixed
time (`x-message-ttl`, one queue per delay so expiry is always at the head), then dead-letters
it back to the pending queue. `at-least-once` dead-lettering with `reject-publish` overflow is
the combination that never drops a message on the way back (RabbitMQ 3.10+); it can duplicate,
which the poller tolerates.

A queue the services consume (inbound, pending, failure) carries an explicit delivery limit
(`DELIVERY_LIMIT`). RabbitMQ 4.0+ gives a quorum queue without one a limit of 20, and 4.0-4.2
count every return toward it (a requeueing nack, the close of a channel holding the message):
past it the message is dropped. The services return a message only when they must hand it back
(a stop, a lost channel, a crash), and the operator's command browses by copying, never by
returning, so no return is routine; the explicit limit keeps hand-backs from ever adding up to a
drop. Why no dead-letter target instead, and how a policy combines with it: docs/design.md.
A wait queue is never consumed, so nothing is ever returned to it: it keeps the default.

Every queue is created on `x-quorum-initial-group-size` nodes (RabbitMQ takes every node of a
smaller cluster). The argument counts only when a queue is created, yet RabbitMQ compares it on
every declare: a queue that exists with another value, or none, is declared with what it has
(the link reads it from the broker's refusal) rather than reported as a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
GROUP_SIZE_ARG = "x-quorum-initial-group-size"
# A majority of 3 survives the loss of any one node; more replicas cost every publish more.
DEFAULT_GROUP_SIZE = 3

# High enough that hand-backs never reach it, and a positive number on purpose: 4.x reads -1 as
# "no limit", but 3.x takes it literally and drops a message at its first return.
DELIVERY_LIMIT = 1_000_000


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=lambda: dict(_QUORUM))

    def with_group_size(self, size: int | None) -> QueueSpec:
        """The same queue declared with another initial group size (None: without one)."""
        arguments = {k: v for k, v in self.arguments.items() if k != GROUP_SIZE_ARG}
        return QueueSpec(self.name, arguments if size is None else {**arguments, GROUP_SIZE_ARG: size})


def _quorum(group_size: int) -> dict[str, Any]:
    return {**_QUORUM, GROUP_SIZE_ARG: group_size}


def work_queue(name: str, group_size: int = DEFAULT_GROUP_SIZE) -> QueueSpec:
    """A queue the services consume from (or, for the failure queue, the operator's command)."""
    return QueueSpec(name, {**_quorum(group_size), "x-delivery-limit": DELIVERY_LIMIT})


def wait_queue_name(pending_queue: str, delay_s: float) -> str:
    # Named after its delay: a changed delay is a new queue, never a clash of arguments.
    return f"{pending_queue}.wait.{round(delay_s * 1000)}ms"


def wait_queue(pending_queue: str, delay_s: float, group_size: int = DEFAULT_GROUP_SIZE) -> QueueSpec:
    return QueueSpec(
        wait_queue_name(pending_queue, delay_s),
        {
            **_quorum(group_size),
            "x-message-ttl": max(1, round(delay_s * 1000)),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": pending_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def first_hop(pending_queue: str, first_delay_s: float, *, adaptive: bool = False) -> str:
    """Where the submitter hands a submitted registration on. On the fixed schedule: straight
    into the wait queue of the first delay (it dead-letters to pending when due), which spares
    every registration a trip through the poller only to be put there; pending itself when there
    is no first delay. On the adaptive schedule: pending, since only the poller knows when the
    first poll is due (what it has learned); it sends the id on to the wait that leads there."""
    return wait_queue_name(pending_queue, first_delay_s) if first_delay_s > 0 and not adaptive else pending_queue


def submitter_queues(*, inbound: str, pending: str, failed: str, first_delay_s: float, adaptive: bool = False,
                     group_size: int = DEFAULT_GROUP_SIZE) -> list[QueueSpec]:
    first = [wait_queue(pending, first_delay_s, group_size)] if first_delay_s > 0 and not adaptive else []
    return [work_queue(inbound, group_size), work_queue(pending, group_size), work_queue(failed, group_size), *first]


def poller_queues(*, pending: str, failed: str, delays: Iterable[float],
                  group_size: int = DEFAULT_GROUP_SIZE) -> list[QueueSpec]:
    return [work_queue(pending, group_size), work_queue(failed, group_size),
            *(wait_queue(pending, d, group_size) for d in delays)]
