"""Publisher confirms and returns on the current channel, on the I/O thread.

Each publish gets the channel's next sequence number and a future. The broker's ack settles
it, a nack fails it; with `mandatory`, an unroutable message is returned before its ack, and
its future fails too. Sequence numbers are per channel: a lost channel fails every future
still open, and the next channel counts from 1 again. Every future settles one of these ways,
or when the runtime stops (`fail_all` once the I/O loop has ended), so a worker may wait on
one without a timeout, even while a broker alarm holds the confirms back.

A confirm can also stop coming with no alarm: a quorum queue's channel-side state can stay
behind a leader change and hold what was published to it. `waiting_s` says how long the
oldest open confirm has waited, so that the runtime can end the connection (failing every
open future, handing their deliveries back) rather than let its workers wait for ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from regbridge.amqp.model import PublishError, PublishRefused

# Carried on what we publish, so that a returned (unroutable) message names its confirm.
PUBLISH_SEQ_HEADER = "x-regbridge-seq"


class Confirms:
    def __init__(self, on_unroutable: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        # A return means a queue is missing: the caller gets the topology declared again.
        self._on_unroutable = on_unroutable
        self._clock = clock
        self._next_seq = 0
        self._unconfirmed: dict[int, Future[None]] = {}
        self._sent_at: dict[int, float] = {}
        self._returned: set[int] = set()

    @property
    def pending(self) -> bool:
        return bool(self._unconfirmed)

    def waiting_s(self) -> float:
        """How long the oldest confirm still open has waited; 0 when none is open."""
        oldest = min(self._sent_at.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest

    def attach(self, channel: Channel, then: Callable[[], None]) -> None:
        """Put a fresh channel in confirm mode, then call `then`."""
        self._next_seq = 0
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: then())

    def publish(self, channel: Channel, routing_key: str, body: bytes, properties: BasicProperties,
                future: Future[None]) -> None:
        """Publish to the default exchange with `mandatory`; `future` settles on the confirm."""
        self._next_seq += 1
        seq = self._next_seq
        properties.headers = {**(properties.headers or {}), PUBLISH_SEQ_HEADER: seq}
        try:
            channel.basic_publish("", routing_key, body, properties, mandatory=True)
        except Exception as exc:  # a closing channel raises here; the caller hands the work back
            future.set_exception(PublishError(f"publish failed: {exc}"))
            return
        self._unconfirmed[seq] = future
        self._sent_at[seq] = self._clock()

    def fail_all(self, why: str) -> None:
        """The channel is gone, and with it every confirm still to come."""
        failed, self._unconfirmed = self._unconfirmed, {}
        self._sent_at.clear()
        self._returned.clear()
        for future in failed.values():
            if not future.done():
                future.set_exception(PublishError(f"unconfirmed when the {why}"))

    def _on_return(self, _ch: Channel, _method: Basic.Return, properties: BasicProperties, _body: bytes) -> None:
        seq = (properties.headers or {}).get(PUBLISH_SEQ_HEADER)
        if isinstance(seq, int):
            self._returned.add(seq)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ack = isinstance(method, Basic.Ack)
        tags = (
            [s for s in self._unconfirmed if s <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        )
        for seq in tags:
            self._sent_at.pop(seq, None)
            # A return comes before its confirm, whichever the confirm is: the seq is done with
            # here, or it would stay until the channel closes (a nack after a return keeps it too).
            returned = seq in self._returned
            self._returned.discard(seq)
            future = self._unconfirmed.pop(seq, None)
            if future is None:
                continue
            if not ack:
                future.set_exception(PublishRefused("the broker refused the message (nack)"))
            elif returned:
                future.set_exception(PublishError("unroutable: no queue took the message"))
                self._on_unroutable()
            else:
                future.set_result(None)
