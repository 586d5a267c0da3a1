"""What the runtime hands out and takes in: deliveries, the handler, hooks, the errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pika.spec import BasicProperties


class PublishError(RuntimeError):
    """The broker did not take the message: do not treat the publish as done."""


class PublishRefused(PublishError):
    """The broker nacked the message: the queue would not take it (a length limit with
    `reject-publish`, for one). Trying again at once would only be refused again."""


class TopologyConflict(RuntimeError):
    """A queue exists with arguments other than those this service declares. Reconnecting
    cannot fix it: someone has to migrate the queue (docs/operations.md)."""


@dataclass(frozen=True)
class Delivery:
    body: bytes
    properties: BasicProperties
    redelivered: bool
    delivery_tag: int
    queue: str
    # Which channel delivered it: its tag means nothing on any other.
    generation: int
    received_at: float


Handler = Callable[[Delivery], None]


@dataclass(frozen=True)
class RuntimeHooks:
    """Observers at the edge (metrics); all optional and called on the I/O thread."""

    on_disconnected: Callable[[], None] = lambda: None
    on_delivery: Callable[[Delivery], None] = lambda d: None
    # The ready messages of a queue, read every 10 s; None once they are no longer known.
    on_queue_depth: Callable[[str, int | None], None] = lambda queue, messages: None
    on_hop_refused: Callable[[str], None] = lambda queue: None
    # True when the broker blocks this connection's publishing (a memory or disk alarm), False
    # when it lifts the block or the connection ends.
    on_blocked: Callable[[bool], None] = lambda blocked: None
