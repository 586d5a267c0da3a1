"""`AmqpRuntime`: the parts of the package put together, and the calls other threads may make."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from pika.adapters.select_connection import IOLoop
from pika.spec import BasicProperties

from regbridge.amqp.calls import CallQueue
from regbridge.amqp.confirms import Confirms
from regbridge.amqp.hops import RefusedHops
from regbridge.amqp.link import BrokerLink, LinkEvents, LinkSettings
from regbridge.amqp.model import Delivery, Handler, PublishError, PublishRefused, RuntimeHooks, TopologyConflict
from regbridge.amqp.pool import WorkerPool
from regbridge.amqp.shutdown import GracefulStop
from regbridge.brokers import Order, split_urls
from regbridge.topology import QueueSpec

log = logging.getLogger(__name__)

TICK_S = 1.0
# A loop whose last tick is older than this is stalled: liveness fails.
STALLED_S = 30.0
# A confirm this late, with no broker alarm to explain it, is not coming: the connection is
# ended and made again (every open publish fails and its delivery goes back). Confirms take
# milliseconds, a quorum queue's leader election a few seconds.
CONFIRM_STALL_S = 20.0


class AmqpRuntime:
    """Consumes `consume` queues into a pool of `workers` threads running the handler given to `run`."""

    def __init__(
        self,
        *,
        url: str,  # one broker URL, or several of one cluster separated by commas
        queues: Sequence[QueueSpec],
        consume: Sequence[str],
        workers: int,
        prefetch: int,
        reconnect_max_s: float = 10.0,
        shutdown_timeout_s: float = 30.0,
        hooks: RuntimeHooks | None = None,
        name: str = "amqp",
        order: Order = Order.SHUFFLED,
    ) -> None:
        self._hooks = hooks or RuntimeHooks()
        self._ioloop = IOLoop()
        self._calls = CallQueue(self._ioloop)
        self._confirms = Confirms(on_unroutable=self._restart_link)
        self._link = BrokerLink(
            LinkSettings(split_urls(url), list(queues), list(consume), prefetch, reconnect_max_s, order),
            self._ioloop,
            LinkEvents(enable_confirms=self._confirms.attach, delivered=self._delivered,
                       channel_lost=self._confirms.fail_all, disconnected=self._hooks.on_disconnected,
                       queue_depth=self._hooks.on_queue_depth, conflict=self._conflict,
                       blocked=self._hooks.on_blocked),
        )
        self._pool = WorkerPool(workers=workers, name=name, calls=self._calls, ioloop=self._ioloop, link=self._link)
        self._stop = GracefulStop(timeout_s=shutdown_timeout_s, ioloop=self._ioloop, link=self._link,
                                  pool=self._pool, confirms=self._confirms)
        self._hops = RefusedHops()
        self.last_tick = time.monotonic()
        # Set as soon as a stop is asked for; workers waiting out an outage watch it.
        self.stopping = threading.Event()
        # Why the runtime stopped on its own: a topology no reconnect can declare.
        self.failure: str | None = None

    # ---- what other threads may call --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link.ready

    @property
    def node(self) -> str | None:
        """host:port of the broker the service is connected to, None while it is not."""
        return self._link.node

    @property
    def publishing(self) -> bool:
        """False while a broker alarm blocks this connection's publishing."""
        return not self._link.blocked

    def unacked(self, queue: str) -> int:
        """Deliveries of `queue` this service holds unsettled: its share of the queue's unacked."""
        return self._link.unacked.get(queue, 0)

    @property
    def deferred(self) -> int:
        """Deliveries held unacked for a timer (a deferred retry, a pause before a hand-back)."""
        return self._pool.deferred

    def alive(self) -> bool:
        """The I/O loop turns, and nothing has made the service unable to run (a topology
        conflict): an orchestrator restarting it on a failed liveness probe is what it needs."""
        return self.failure is None and time.monotonic() - self.last_tick < STALLED_S

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        """Publish to the default exchange with `mandatory`; the future settles on the confirm."""
        future: Future[None] = Future()

        def send() -> None:
            channel = self._link.open_channel()
            if channel is None:
                future.set_exception(PublishError("not connected to the broker"))
            else:
                self._confirms.publish(channel, routing_key, body, properties, future)

        self._calls.submit(send, on_closed=lambda: future.set_exception(PublishError("runtime stopped")))
        return future

    def current(self, delivery: Delivery) -> bool:
        """False once the channel that delivered it is gone, or once a stop has begun: the
        broker will deliver it again, so work not yet done on it (a POST) is better left to
        that delivery. The stop hands the delivery back."""
        return not self.stopping.is_set() and self._link.current(delivery)

    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None:
        """Publish, and ack `delivery` once the broker confirms it; if not, hand it back.

        The worker does not wait: the confirm settles the delivery on the I/O thread, so a
        hop costs no blocking round trip and no second hand-over to the I/O thread. A hop the
        broker refuses (a nack) goes back only after a pause that grows while that queue keeps
        refusing, so that its redelivery does not repeat the handler's legacy call in a loop
        (`hops`).
        """
        self.publish(routing_key, body, properties).add_done_callback(
            lambda future: self._calls.call(lambda: self._hop_settled(delivery, routing_key, future)))

    def ack(self, delivery: Delivery) -> None:
        self._calls.submit(lambda: self._link.settle(delivery, ack=True, requeue=False))

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        self._calls.submit(lambda: self._link.settle(delivery, ack=False, requeue=requeue))

    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None:
        """Run `work` on a worker after `delay_s`, holding `delivery` unacked meanwhile.

        No thread sleeps out the delay: a timer on the I/O thread puts the work back in the
        pool's queue. On shutdown a deferred delivery is handed back (nacked with requeue).
        """
        self._calls.submit(lambda: self._pool.defer(delivery, delay_s, work))

    def request_stop(self) -> None:
        """Begin a graceful stop; safe to call from a signal handler or any thread."""
        self.stopping.set()
        self._calls.submit(self._stop.begin)

    # ---- the I/O thread -----------------------------------------------------------------------

    def run(self, handler: Handler) -> None:
        """Turn the I/O loop, giving each delivery to `handler` on a worker, until stopped;
        reconnects on its own. Call once, from the thread that is to be the I/O thread.
        Raises `TopologyConflict` when it stopped because a queue cannot be declared."""
        self._calls.bind()
        self._pool.start(handler)
        self._ioloop.add_callback_threadsafe(self._link.connect)
        self._ioloop.call_later(TICK_S, self._tick)
        self._ioloop.start()
        # What was queued for the loop runs now, against no connection; then every confirm
        # still open fails, so that no worker waits on a publish for ever.
        self._calls.close()
        self._confirms.fail_all("runtime stopped")
        self._pool.end()
        log.info("stopped", extra={"event": "stopped"})
        if self.failure is not None:
            raise TopologyConflict(self.failure)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self._watch_confirms()
        self._ioloop.call_later(TICK_S, self._tick)

    def _watch_confirms(self) -> None:
        waited = self._confirms.waiting_s()
        if waited > CONFIRM_STALL_S and not self._link.blocked and not self.stopping.is_set():
            log.warning("a publisher confirm has not come for %.0f s with no broker alarm; reconnecting, which "
                        "fails the publishes still open and hands their messages back", waited,
                        extra={"event": "confirms_stalled", "waited_s": round(waited, 1)})
            self._confirms.fail_all("confirms stalled")
            self._link.restart()

    def _delivered(self, delivery: Delivery) -> None:
        self._hooks.on_delivery(delivery)
        self._pool.submit(delivery)

    def _restart_link(self) -> None:
        self._link.restart()

    def hand_back(self, delivery: Delivery, queue: str, error: BaseException) -> None:
        """Give `delivery` back after a publish to `queue` it led to failed: after the refused-hop
        pause when the broker refused the publish, at once otherwise (`hops`)."""
        self._calls.call(lambda: self._handed_back(delivery, queue, error))

    def _hop_settled(self, delivery: Delivery, queue: str, future: Future[None]) -> None:
        error = future.exception()
        if error is None:
            self._link.settle(delivery, ack=True, requeue=False)
        else:
            self._handed_back(delivery, queue, error)

    def _handed_back(self, delivery: Delivery, queue: str, error: BaseException) -> None:
        if isinstance(error, PublishRefused):
            pause = self._hops.refused(queue)
            self._hooks.on_hop_refused(queue)
            streak = self._hops.streak(queue)
            log.log(logging.WARNING if streak == 1 else logging.DEBUG,
                    "%s refused a hop (%d in this run of refusals); its message goes back in %.1f s",
                    queue, streak, pause,
                    extra={"event": "hop_refused", "queue": queue, "delay_s": round(pause, 3)})
            self._pool.pause_then_hand_back(delivery, pause)
        else:
            self._link.settle(delivery, ack=False, requeue=True)

    def _conflict(self, message: str) -> None:
        self.failure = message
        self.stopping.set()
        self._stop.begin()
