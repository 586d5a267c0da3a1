"""The worker threads, and the count of what they hold.

Workers never touch pika: whatever they settle goes through the call queue to the I/O thread.
`in_hand` counts deliveries given to the pool and not yet finished, deferred ones included; it
is kept on the I/O thread, so shutdown can wait for it to reach zero.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from pika.adapters.select_connection import IOLoop

from regbridge.amqp.calls import CallQueue
from regbridge.amqp.model import Delivery, Handler

log = logging.getLogger(__name__)

Work = Callable[[], None]
# After an unexpected error, how long a delivery waits before it goes back to its queue.
ERROR_PAUSE_S = 2.0


class Channels(Protocol):
    """The part of the broker link the pool needs."""

    @property
    def generation(self) -> int: ...

    def settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None: ...


class WorkerPool:
    def __init__(self, *, workers: int, name: str, calls: CallQueue, ioloop: IOLoop, link: Channels) -> None:
        self._calls = calls
        self._ioloop = ioloop
        self._link = link
        self._work: queue.Queue[tuple[Delivery, Work] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-worker-{i}", daemon=True) for i in range(workers)
        ]
        self._handler: Handler | None = None
        self._deferred: dict[int, Delivery] = {}
        self._keys = itertools.count()
        # Once past this instant, work not yet started goes straight back to the broker.
        self._hand_back_at = math.inf
        self.in_hand = 0

    def start(self, handler: Handler) -> None:
        self._handler = handler
        for thread in self._threads:
            thread.start()

    def end(self) -> None:
        """Let every worker finish its current item and exit."""
        for _ in self._threads:
            self._work.put(None)

    # ---- on the I/O thread ---------------------------------------------------------------------

    def submit(self, delivery: Delivery) -> None:
        handler = self._handler
        assert handler is not None, "the pool takes deliveries only once started"
        self.in_hand += 1
        self._work.put((delivery, lambda: handler(delivery)))

    def defer(self, delivery: Delivery, delay_s: float, work: Work) -> None:
        """Put `work` in the queue after `delay_s`; `delivery` stays in hand meanwhile."""
        key = next(self._keys)
        self._deferred[key] = delivery
        self.in_hand += 1
        self._ioloop.call_later(delay_s, lambda: self._fire_deferred(key, work))

    def hand_back(self, deadline: float) -> None:
        """Requeue deferred work now, and work not yet started once `deadline` (monotonic) passes."""
        self._hand_back_at = deadline
        for delivery in self._deferred.values():
            self.in_hand -= 1
            self._link.settle(delivery, ack=False, requeue=True)
        self._deferred.clear()

    def _fire_deferred(self, key: int, work: Work) -> None:
        delivery = self._deferred.pop(key, None)
        if delivery is None:  # handed back at shutdown already
            return
        if delivery.generation != self._link.generation:
            self.in_hand -= 1  # its channel is gone; the broker redelivers it
            return
        self._work.put((delivery, work))

    def _done(self) -> None:
        self.in_hand -= 1

    # ---- on the worker threads ----------------------------------------------------------------

    def _worker(self) -> None:
        while (item := self._work.get()) is not None:
            delivery, work = item
            try:
                self._run(delivery, work)
            finally:
                self._calls.submit(self._done)

    def _run(self, delivery: Delivery, work: Work) -> None:
        def requeue() -> None:
            self._link.settle(delivery, ack=False, requeue=True)

        try:
            if delivery.generation != self._link.generation:
                return  # its channel is gone and its tag with it; the broker redelivers it
            if time.monotonic() >= self._hand_back_at:
                self._calls.submit(requeue)
                return
            work()
        except Exception:
            log.exception("handler failed; the message goes back to its queue after a pause",
                          extra={"event": "handler_error"})
            # Never drop it, never spin on it: requeue after a pause.
            self._calls.submit(lambda: self._ioloop.call_later(ERROR_PAUSE_S, requeue))
