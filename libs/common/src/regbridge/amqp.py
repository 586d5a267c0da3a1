"""The RabbitMQ adapter: one I/O thread owns the pika connection; worker threads do the work.

pika is not thread-safe. The only call other threads make is
`ioloop.add_callback_threadsafe`; everything else (publish, ack, nack, timers) runs on the
I/O thread that `run()` turns. Workers get a `Future` for each publish, settled by the
broker's publisher confirm (or failed by a nack, a return of an unroutable message, or a lost
channel), so nothing is acknowledged before what it led to is stored.

A delivery tag is valid only on the channel that delivered it. Every delivery carries the
generation of its channel; after a reconnect, acks and nacks of older generations are dropped:
the broker has already put those messages back.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from regbridge.redact import redact_url
from regbridge.topology import QueueSpec

log = logging.getLogger(__name__)

# Carried on what we publish, so that a returned (unroutable) message names its confirm.
PUBLISH_SEQ_HEADER = "x-regbridge-seq"
# How often queue depths are read for the metrics: slow, since each read is a broker round trip.
DEPTH_EVERY_S = 10.0


class PublishError(RuntimeError):
    """The broker did not take the message: do not treat the publish as done."""


@dataclass(frozen=True)
class Delivery:
    body: bytes
    properties: BasicProperties
    redelivered: bool
    delivery_tag: int
    queue: str
    generation: int
    received_at: float


Handler = Callable[[Delivery], None]


@dataclass(frozen=True)
class RuntimeHooks:
    """Observers at the edge (metrics); all optional and called on the I/O thread."""

    on_connected: Callable[[], None] = lambda: None
    on_disconnected: Callable[[], None] = lambda: None
    on_delivery: Callable[[Delivery], None] = lambda d: None
    on_handler_error: Callable[[Delivery, BaseException], None] = lambda d, e: None
    on_queue_depth: Callable[[str, int], None] = lambda queue, messages: None


class AmqpRuntime:
    """Consumes `consume` queues into a pool of `workers` threads running `handler`."""

    def __init__(
        self,
        *,
        url: str,
        queues: Sequence[QueueSpec],
        consume: Sequence[str],
        handler: Handler,
        workers: int,
        prefetch: int,
        reconnect_max_s: float = 10.0,
        shutdown_timeout_s: float = 30.0,
        hooks: RuntimeHooks | None = None,
        name: str = "amqp",
    ) -> None:
        self._params = pika.URLParameters(url)
        self._url_shown = redact_url(url)
        self._queues = list(queues)
        self._consume = list(consume)
        self._handler = handler
        self._prefetch = prefetch
        self._reconnect_max_s = reconnect_max_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._hooks = hooks or RuntimeHooks()
        self._name = name

        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._generation = 0
        self._ready = False  # channel open, confirms on, consumers started
        self._consumer_tags: list[str] = []
        # Publisher confirms: sequence number → the worker's future.
        self._next_seq = 0
        self._unconfirmed: dict[int, Future[None]] = {}
        self._returned: set[int] = set()
        # Work handed to the pool and not yet finished (including deferred retries).
        self._in_hand = 0
        self._deferred: dict[int, Delivery] = {}
        self._next_deferred = 0
        self._stopping = False
        self._loop_closed = False
        self._io_thread: threading.Thread | None = None
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._wake_pending = False
        self._stop_deadline = 0.0
        self._reconnect_delay = 0.0
        self.last_tick = time.monotonic()
        # Set as soon as a stop is asked for; workers waiting out an outage watch it.
        self.stopping = threading.Event()

        self._work: queue.Queue[tuple[Delivery, Callable[[], None]] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-worker-{i}", daemon=True) for i in range(workers)
        ]

    # ---- what other threads may call --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        """Publish to the default exchange with `mandatory`; the future settles on the confirm."""
        future: Future[None] = Future()

        def send() -> None:
            channel = self._channel
            if not self._ready or channel is None or not channel.is_open:
                future.set_exception(PublishError("not connected to the broker"))
                return
            self._next_seq += 1
            seq = self._next_seq
            headers = dict(properties.headers or {})
            headers[PUBLISH_SEQ_HEADER] = seq
            properties.headers = headers
            try:
                channel.basic_publish("", routing_key, body, properties, mandatory=True)
            except Exception as exc:  # a closing channel raises here; the caller hands the work back
                future.set_exception(PublishError(f"publish failed: {exc}"))
                return
            self._unconfirmed[seq] = future

        self._threadsafe(send, on_closed=lambda: future.set_exception(PublishError("runtime stopped")))
        return future

    def current(self, delivery: Delivery) -> bool:
        """False once the channel that delivered it is gone: the broker will deliver it again,
        so work not yet done on it (a POST) is better left to that delivery."""
        return delivery.generation == self._generation and self._ready

    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None:
        """Publish, and ack `delivery` once the broker confirms it (nack it back if not).

        The worker does not wait: the confirm settles the delivery on the I/O thread, so a
        hop costs no blocking round trip and no second hand-over to the I/O thread.
        """

        def settle(future: Future[None]) -> None:
            ok = future.exception() is None
            if threading.current_thread() is self._io_thread:
                self._settle(delivery, ack=ok, requeue=True)
            else:  # failed before it reached the I/O thread
                self._threadsafe(lambda: self._settle(delivery, ack=ok, requeue=True))

        self.publish(routing_key, body, properties).add_done_callback(settle)

    def ack(self, delivery: Delivery) -> None:
        self._threadsafe(lambda: self._settle(delivery, ack=True, requeue=False))

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        self._threadsafe(lambda: self._settle(delivery, ack=False, requeue=requeue))

    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None:
        """Run `work` on a worker after `delay_s`, holding `delivery` unacked meanwhile.

        No thread sleeps out the delay: a timer on the I/O thread puts the work back in the
        pool's queue. On shutdown a deferred delivery is handed back (nacked with requeue).
        """

        def arm() -> None:
            self._next_deferred += 1
            key = self._next_deferred
            self._deferred[key] = delivery
            self._in_hand += 1
            self._ioloop.call_later(delay_s, lambda: self._fire_deferred(key, work))

        self._threadsafe(arm)

    def request_stop(self) -> None:
        """Begin a graceful stop; safe to call from a signal handler or any thread."""
        self.stopping.set()
        self._threadsafe(self._begin_stop)

    # ---- the I/O thread -----------------------------------------------------------------------

    def run(self) -> None:
        """Turn the I/O loop until stopped; reconnects on its own. Call from one thread only."""
        self._io_thread = threading.current_thread()
        for thread in self._threads:
            thread.start()
        self._ioloop.add_callback_threadsafe(self._connect)
        self._ioloop.call_later(1.0, self._tick)
        self._ioloop.start()
        self._loop_closed = True
        for _ in self._threads:
            self._work.put(None)
        log.info("stopped", extra={"event": "stopped"})

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self._ioloop.call_later(1.0, self._tick)

    def _threadsafe(self, callback: Callable[[], None], on_closed: Callable[[], None] | None = None) -> None:
        if not self._loop_closed:
            # One wake-up of the I/O loop carries every callback queued until it runs: under load
            # that saves a write to the loop's wake-up socket per callback.
            with self._calls_lock:
                self._calls.append(callback)
                wake = not self._wake_pending
                self._wake_pending = True
            if not wake:
                return
            try:
                self._ioloop.add_callback_threadsafe(self._run_calls)
                return
            except Exception:
                pass
        # The loop has stopped: nothing queued now would ever run.
        if on_closed is not None:
            on_closed()

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
            self._wake_pending = False
        for call in calls:
            try:
                call()
            except Exception:  # one failed callback must not take the others with it
                log.exception("callback on the I/O thread failed", extra={"event": "io_callback_error"})

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        log.info("connecting to %s", self._url_shown, extra={"event": "connecting"})
        self._connection = pika.SelectConnection(
            self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def _schedule_reconnect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        self._reconnect_delay = min(self._reconnect_max_s, max(0.25, self._reconnect_delay * 2))
        delay = self._reconnect_delay * random.uniform(0.5, 1.0)
        log.warning("broker unavailable; reconnecting in %.2f s", delay, extra={"event": "reconnect_wait"})
        self._ioloop.call_later(delay, self._connect)

    def _on_connection_open_error(self, _conn: Any, error: BaseException) -> None:
        # Some of pika's errors stringify to nothing: name the type, and what it carries.
        reason = redact_url(f"{type(error).__name__}: {error!r}")
        log.warning("cannot connect to the broker: %s", reason, extra={"event": "connect_failed"})
        self._connection = None
        self._schedule_reconnect()

    def _on_connection_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        self._lose_channel(f"connection closed: {reason}")
        self._connection = None
        if self._stopping:
            self._ioloop.stop()
        else:
            log.warning("connection lost: %s", redact_url(str(reason)), extra={"event": "disconnected"})
            self._schedule_reconnect()

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        self._generation += 1
        # Confirm sequence numbers are per channel: a new channel counts from 1 again.
        self._next_seq = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        self._declare(channel, list(self._queues))

    def _declare(self, channel: Channel, remaining: list[QueueSpec]) -> None:
        if not remaining:
            channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                     callback=lambda _f: self._on_confirm_mode(channel))
            return
        spec = remaining[0]
        channel.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments),
                              callback=lambda _f: self._declare(channel, remaining[1:]))

    def _on_confirm_mode(self, channel: Channel) -> None:
        # Per-consumer prefetch (quorum queues refuse global QoS), sized to what the pool holds.
        channel.basic_qos(prefetch_count=self._prefetch, callback=lambda _f: self._start_consuming(channel))

    def _start_consuming(self, channel: Channel) -> None:
        if self._stopping:
            self._close()
            return
        generation = self._generation
        self._consumer_tags = [
            channel.basic_consume(name, lambda ch, m, p, b, q=name: self._on_message(q, generation, ch, m, p, b))
            for name in self._consume
        ]
        self._ready = True
        self._reconnect_delay = 0.0
        log.info("connected; consuming %s", ", ".join(self._consume) or "nothing", extra={"event": "connected"})
        self._hooks.on_connected()
        self._measure_depths(channel, generation)

    def _measure_depths(self, channel: Channel, generation: int) -> None:
        """Every DEPTH_EVERY_S, a passive declare of each queue this service declared (so it
        exists) reports its ready messages, without a management API."""
        if generation != self._generation or not channel.is_open or self._stopping:
            return
        for spec in self._queues:
            channel.queue_declare(spec.name, passive=True, callback=lambda frame, q=spec.name:
                                  self._hooks.on_queue_depth(q, frame.method.message_count))
        self._ioloop.call_later(DEPTH_EVERY_S, lambda: self._measure_depths(channel, generation))

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        # Any channel error (a refused declare, a dead tag acked) ends the connection too:
        # one path back, through a fresh connection that declares everything again.
        if self._stopping:
            log.info("channel closed: %s", reason, extra={"event": "channel_closed"})
        else:
            log.warning("channel closed: %s", reason, extra={"event": "channel_closed"})
        self._lose_channel(f"channel closed: {reason}")
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()

    def _lose_channel(self, why: str) -> None:
        if self._ready and not self._stopping:
            self._hooks.on_disconnected()
        self._ready = False
        self._channel = None
        self._consumer_tags = []
        failed, self._unconfirmed = self._unconfirmed, {}
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
            future = self._unconfirmed.pop(seq, None)
            if future is None:
                continue
            if not ack:
                future.set_exception(PublishError("the broker refused the message (nack)"))
            elif seq in self._returned:
                self._returned.discard(seq)
                future.set_exception(PublishError("unroutable: no queue took the message"))
                # A missing queue: reconnect, which declares the topology again.
                self._ioloop.call_later(0, self._close_connection)
            else:
                future.set_result(None)

    def _on_message(self, queue_name: str, generation: int, _ch: Channel, method: Basic.Deliver,
                    properties: BasicProperties, body: bytes) -> None:
        delivery = Delivery(body, properties, bool(method.redelivered), method.delivery_tag, queue_name,
                            generation, time.time())
        self._hooks.on_delivery(delivery)
        self._in_hand += 1
        self._work.put((delivery, lambda: self._handler(delivery)))

    def _settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        channel = self._channel
        if delivery.generation != self._generation or channel is None or not channel.is_open:
            log.debug("dropping a settle of a delivery from a closed channel")
            return
        if ack:
            channel.basic_ack(delivery.delivery_tag)
        else:
            channel.basic_nack(delivery.delivery_tag, requeue=requeue)

    def _fire_deferred(self, key: int, work: Callable[[], None]) -> None:
        delivery = self._deferred.pop(key, None)
        if delivery is None:  # handed back at shutdown already
            return
        if delivery.generation != self._generation:
            self._in_hand -= 1  # its channel is gone; the broker redelivers it
            return
        self._work.put((delivery, work))

    def _done(self) -> None:
        self._in_hand -= 1

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            delivery, work = item
            try:
                if delivery.generation != self._generation:
                    pass  # its channel is gone and its tag with it; the broker redelivers it
                elif self._stopping and self._handing_back():
                    self.nack(delivery, requeue=True)
                else:
                    work()
            except Exception as exc:
                log.exception("handler failed; the message goes back to its queue after a pause",
                              extra={"event": "handler_error"})
                self._threadsafe(lambda d=delivery, e=exc: self._hooks.on_handler_error(d, e))  # type: ignore[misc]
                # Never drop it, never spin on it: requeue after a pause.
                self._threadsafe(lambda d=delivery: self._ioloop.call_later(  # type: ignore[misc]
                    2.0, lambda: self._settle(d, ack=False, requeue=True)))
            finally:
                self._threadsafe(self._done)

    def _handing_back(self) -> bool:
        # Past the shutdown deadline, work not yet started goes straight back to the broker.
        return time.monotonic() >= self._stop_deadline

    # ---- graceful stop ------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_deadline = time.monotonic() + self._shutdown_timeout_s
        log.info("stopping: no new messages; finishing what is in hand", extra={"event": "stopping"})
        channel = self._channel
        if channel is not None and channel.is_open:
            for tag in self._consumer_tags:
                channel.basic_cancel(tag)
        # Deferred retries are handed back at once rather than waited out.
        for key in list(self._deferred):
            delivery = self._deferred.pop(key)
            self._in_hand -= 1
            self._settle(delivery, ack=False, requeue=True)
        self._drain()

    def _drain(self) -> None:
        idle = self._in_hand <= 0 and not self._unconfirmed
        if idle or time.monotonic() >= self._stop_deadline:
            if not idle:
                log.warning("shutdown timeout: %d messages still in hand go back to the broker",
                            self._in_hand, extra={"event": "shutdown_timeout"})
            self._close()
            return
        self._ioloop.call_later(0.05, self._drain)

    def _close_connection(self) -> None:
        conn = self._connection
        if conn is not None and conn.is_open:
            conn.close()

    def _close(self) -> None:
        conn = self._connection
        if conn is not None and (conn.is_open or conn.is_opening):
            conn.close()
        elif conn is None or conn.is_closed:
            self._ioloop.stop()
