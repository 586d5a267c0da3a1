"""The connection and its channel, on the I/O thread: connect with backoff, declare, consume.

Each channel goes through the same steps: declare every queue, confirm mode, per-consumer
prefetch, consume. Any channel error (a dead tag acked, a queue deleted under us) ends the
connection too: one way back, through a fresh connection that declares everything again. The
one error that no reconnect can cure is a queue that exists with other arguments (406
PRECONDITION_FAILED on its declare): that is reported as a conflict, once, and the owner stops.

A broker alarm (memory, disk) blocks the connection's publishing: the broker says so with
`connection.blocked` and stops reading from the socket, so confirms stop coming until it lifts
the block. The link reports both edges; nothing times out on it.

The link knows every broker of the cluster (`regbridge.brokers`): a failed or lost connection
moves on to the next node at once, and only a round in which every node failed waits out the
backoff. A queue that exists with another initial group size (an argument that counts only at
creation) is declared from then on with the value it has, on a fresh channel.

A delivery tag is valid only on the channel that delivered it. Every channel gets the next
generation and every delivery carries it; after a reconnect, acks and nacks of older
generations are dropped: the broker has already put those messages back.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.exceptions import ChannelClosedByBroker
from pika.spec import Basic, BasicProperties

from regbridge.amqp.model import Delivery
from regbridge.brokers import Order, Rotation, node_of
from regbridge.redact import redact_url, redact_url_value
from regbridge.topology import GROUP_SIZE_ARG, QueueSpec

log = logging.getLogger(__name__)

# How often queue depths are read for the metrics: slow, since each read is a broker round trip.
DEPTH_EVERY_S = 10.0
PRECONDITION_FAILED = 406
_INEQUIVALENT_ARG = re.compile(r"inequivalent arg '([^']+)'")
# RabbitMQ words it "current is none", "current is the value '5' of type ..." or "current is '5'".
_CURRENT_VALUE = re.compile(r"but current is (?:none|(?:the value )?'(-?\d+)')")
# After a failed try, the next node is tried this soon (a round of them is not a backoff).
NEXT_NODE_S = 0.05


def existing_group_size(reply_text: str) -> tuple[bool, int | None]:
    """From a refused declare: whether only the initial group size differs, and the value the
    queue has (None: declared without one)."""
    found = _INEQUIVALENT_ARG.search(reply_text)
    current = _CURRENT_VALUE.search(reply_text)
    if found is None or found.group(1) != GROUP_SIZE_ARG or current is None:
        return False, None
    return True, int(current.group(1)) if current.group(1) is not None else None


def conflict_message(queue: str, reply_text: str) -> str:
    """What an operator needs from a refused declare: the queue, the argument, the broker's words."""
    found = _INEQUIVALENT_ARG.search(reply_text)
    argument = f"argument {found.group(1)!r} differs" if found else "its arguments differ"
    return (f"queue {queue!r} exists with other arguments than this service declares: {argument} "
            f"(broker: {reply_text}). Reconnecting cannot fix this; migrate the queue "
            f"(docs/operations.md, \"Changing a queue's arguments\") or point the service at another name")


@dataclass(frozen=True)
class LinkSettings:
    urls: Sequence[str]  # every broker of the cluster
    queues: Sequence[QueueSpec]  # declared on every connect
    consume: Sequence[str]
    prefetch: int
    reconnect_max_s: float
    order: Order = Order.SHUFFLED


@dataclass(frozen=True)
class LinkEvents:
    """What the link tells its owner, on the I/O thread."""

    enable_confirms: Callable[[Channel, Callable[[], None]], None]  # then call the second argument
    delivered: Callable[[Delivery], None]
    channel_lost: Callable[[str], None]
    disconnected: Callable[[], None]  # a consuming channel lost while not stopping
    queue_depth: Callable[[str, int | None], None]  # None: no longer known (no channel)
    conflict: Callable[[str], None]  # a queue exists with other arguments: stop, do not reconnect
    blocked: Callable[[bool], None]  # the broker blocks (True) or lets through (False) our publishing


class BrokerLink:
    def __init__(self, settings: LinkSettings, ioloop: IOLoop, events: LinkEvents) -> None:
        self._settings = settings
        self._ioloop = ioloop
        self._events = events
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._consumer_tags: list[str] = []
        self._reconnect_delay = 0.0
        self._stopping = False
        self._declaring: str | None = None  # the queue whose declare is on its way
        self._adopted: dict[str, QueueSpec] = {}  # queues declared as they exist (group size)
        self._brokers = Rotation(settings.urls, settings.order)
        self._target = ""  # the URL being connected to, or connected to
        # Read by other threads too: plain values, written only here on the I/O thread.
        self.generation = 0
        self.ready = False  # channel open, confirms on, consumers started
        self.blocked = False  # the broker holds back this connection's publishing (an alarm)
        self.node: str | None = None  # host:port of the broker while ready
        # Deliveries of the current channel not yet acked or nacked, by queue: the broker's
        # unacked count of this consumer. Keys are fixed, so other threads may read them.
        self.unacked: dict[str, int] = dict.fromkeys(settings.consume, 0)

    def current(self, delivery: Delivery) -> bool:
        """Whether the channel that delivered `delivery` is still the one consuming."""
        return delivery.generation == self.generation and self.ready

    def open_channel(self) -> Channel | None:
        """The channel to publish on, or None while there is no ready one."""
        channel = self._channel
        return channel if self.ready and channel is not None and channel.is_open else None

    @property
    def closed(self) -> bool:
        conn = self._connection
        return conn is None or conn.is_closed

    def settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        channel = self._channel
        if delivery.generation != self.generation or channel is None or not channel.is_open:
            log.debug("dropping a settle of a delivery from a closed channel")
            return
        if ack:
            channel.basic_ack(delivery.delivery_tag)
        else:
            channel.basic_nack(delivery.delivery_tag, requeue=requeue)
        self.unacked[delivery.queue] -= 1

    # ---- connecting ---------------------------------------------------------------------------

    def connect(self) -> None:
        if self._stopping:
            return
        self._target = url = self._brokers.next()
        log.info("connecting to %s", redact_url_value(url), extra={"event": "connecting", "node": node_of(url)})
        self._connection = connection = pika.SelectConnection(
            pika.URLParameters(url),
            on_open_callback=lambda connection: connection.channel(on_open_callback=self._on_channel_open),
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(lambda _conn, _frame: self._set_blocked(False))

    def _schedule_reconnect(self) -> None:
        if self._stopping:
            return
        if not self._brokers.round_failed:
            self._ioloop.call_later(NEXT_NODE_S, self.connect)
            return
        self._brokers.start_round()
        self._reconnect_delay = min(self._settings.reconnect_max_s, max(0.25, self._reconnect_delay * 2))
        delay = self._reconnect_delay * random.uniform(0.5, 1.0)
        log.warning("no broker available; reconnecting in %.2f s", delay, extra={"event": "reconnect_wait"})
        self._ioloop.call_later(delay, self.connect)

    def _on_connection_open_error(self, _conn: Any, error: BaseException) -> None:
        # Some of pika's errors stringify to nothing: name the type, and what it carries.
        reason = redact_url(f"{type(error).__name__}: {error!r}")
        log.warning("cannot connect to the broker: %s", reason, extra={"event": "connect_failed"})
        self._connection = None
        self._schedule_reconnect()

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        self._lose_channel(f"connection closed: {reason}")
        self._connection = None
        self._set_blocked(False)  # a block belongs to its connection; the next one starts free
        if self._stopping:
            log.info("connection closed: %s", redact_url(str(reason)), extra={"event": "closed"})
        else:
            log.warning("connection lost: %s", redact_url(str(reason)), extra={"event": "disconnected"})
            self._schedule_reconnect()

    def _on_blocked(self, _conn: Any, frame: Any) -> None:
        reason = getattr(frame.method, "reason", None) or "no reason given"
        log.warning("the broker blocks publishing (%s): confirms wait until it lifts the block", reason,
                    extra={"event": "broker_blocked", "reason": reason})
        self._set_blocked(True)

    def _set_blocked(self, blocked: bool) -> None:
        if blocked == self.blocked:
            return
        self.blocked = blocked
        if not blocked:
            log.info("the broker lets publishing through again", extra={"event": "broker_unblocked"})
        self._events.blocked(blocked)

    # ---- a channel's steps --------------------------------------------------------------------

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self.generation += 1
        channel.add_on_close_callback(self._on_channel_closed)
        self._declare(channel, list(self._settings.queues))

    def _declare(self, channel: Channel, remaining: list[QueueSpec]) -> None:
        if not remaining:
            self._declaring = None
            self._events.enable_confirms(channel, lambda: self._set_qos(channel))
            return
        spec = self._adopted.get(remaining[0].name, remaining[0])
        self._declaring = spec.name
        channel.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments),
                              callback=lambda _f: self._declare(channel, remaining[1:]))

    def _set_qos(self, channel: Channel) -> None:
        # Per-consumer prefetch (quorum queues refuse global QoS), sized to what the pool holds.
        channel.basic_qos(prefetch_count=self._settings.prefetch, callback=lambda _f: self._start_consuming(channel))

    def _start_consuming(self, channel: Channel) -> None:
        if self._stopping:
            self.close()
            return
        generation = self.generation
        self._consumer_tags = [
            channel.basic_consume(name, lambda ch, m, p, b, q=name: self._on_message(q, generation, m, p, b))
            for name in self._settings.consume
        ]
        self.ready = True
        self._reconnect_delay = 0.0
        self._brokers.start_round()
        self.node = node_of(self._target)
        consumed = ", ".join(self._settings.consume) or "nothing"
        cluster = self._cluster_name()
        log.info("connected to %s (cluster %s); consuming %s", self.node, cluster, consumed,
                 extra={"event": "connected", "node": self.node, "cluster": cluster})
        self._measure_depths(channel, generation)

    def _on_message(self, queue_name: str, generation: int, method: Basic.Deliver, properties: BasicProperties,
                    body: bytes) -> None:
        self.unacked[queue_name] += 1
        self._events.delivered(Delivery(body, properties, bool(method.redelivered), method.delivery_tag,
                                        queue_name, generation, time.time()))

    def _cluster_name(self) -> str:
        properties = getattr(self._connection, "server_properties", None) or {}
        name = properties.get("cluster_name", "")
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)) or "unnamed"

    def _measure_depths(self, channel: Channel, generation: int) -> None:
        """Every DEPTH_EVERY_S, a passive declare of each queue this service declared (so it
        exists) reports its ready messages, without a management API."""
        if generation != self.generation or not channel.is_open or self._stopping:
            return
        for spec in self._settings.queues:
            channel.queue_declare(spec.name, passive=True, callback=lambda frame, q=spec.name:
                                  self._events.queue_depth(q, frame.method.message_count))
        self._ioloop.call_later(DEPTH_EVERY_S, lambda: self._measure_depths(channel, generation))

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        declaring, self._declaring = self._declaring, None
        self._lose_channel(f"channel closed: {reason}")
        if (declaring is not None and isinstance(reason, ChannelClosedByBroker)
                and reason.reply_code == PRECONDITION_FAILED):
            if self._adopt(declaring, reason.reply_text):
                return
            message = conflict_message(declaring, reason.reply_text)
            log.error("%s", message, extra={"event": "topology_conflict", "queue": declaring,
                                            "reason": reason.reply_text})
            self._events.conflict(message)
        else:
            level = logging.INFO if self._stopping else logging.WARNING
            log.log(level, "channel closed: %s", reason, extra={"event": "channel_closed"})
        self._close_connection()

    def _adopt(self, queue: str, reply_text: str) -> bool:
        """Declare `queue` with the initial group size it has, if that is all that differs, on a
        fresh channel of the same connection. False when something else differs (a conflict)."""
        only_group_size, size = existing_group_size(reply_text)
        conn = self._connection
        spec = next((s for s in self._settings.queues if s.name == queue), None)
        if not only_group_size or spec is None or conn is None or not conn.is_open:
            return False
        adopted = spec.with_group_size(size)
        if self._adopted.get(queue) == adopted:  # refused as it is: something else is wrong
            return False
        self._adopted[queue] = adopted
        log.info("queue %r exists with %s %s; its members were chosen when it was created, so it is "
                 "declared as it is", queue, GROUP_SIZE_ARG, "unset" if size is None else size,
                 extra={"event": "group_size_adopted", "queue": queue})
        conn.channel(on_open_callback=self._on_channel_open)
        return True

    def _lose_channel(self, why: str) -> None:
        unexpected = self.ready and not self._stopping
        self.ready = False
        self.node = None
        self._channel = None
        self._consumer_tags = []
        # The broker takes back what the channel held, and its depths are read again once
        # a channel is back: a gauge left at its last value would describe a queue no one reads.
        for queue in self.unacked:
            self.unacked[queue] = 0
        for spec in self._settings.queues:
            self._events.queue_depth(spec.name, None)
        if unexpected:
            self._events.disconnected()
        self._events.channel_lost(why)

    # ---- ending -------------------------------------------------------------------------------

    def restart(self) -> None:
        """Close the connection on the loop's next turn; the reconnect declares everything again."""
        self._ioloop.call_later(0, self._close_connection)

    def stop_consuming(self) -> None:
        """No new deliveries; no reconnect from now on."""
        self._stopping = True
        channel = self._channel
        if channel is not None and channel.is_open:
            for tag in self._consumer_tags:
                channel.basic_cancel(tag)

    def close(self) -> None:
        """Close the connection (`closed` tells when it is)."""
        conn = self._connection
        if conn is not None and (conn.is_open or conn.is_opening):
            conn.close()

    def _close_connection(self) -> None:
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()
