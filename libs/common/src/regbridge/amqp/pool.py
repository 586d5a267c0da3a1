"""The worker threads, and the count of what they hold.

Workers never touch pika: whatever they settle goes through the call queue to the I/O thread.
`in_hand` counts deliveries given to the pool and not yet finished, those held for later
included (a deferred retry, a pause before a hand-back); it is kept on the I/O thread, so
shutdown can wait for it to reach zero.

Once a stop begins, nothing new starts: every delivery not yet started, queued or held, goes
back to the broker at once, and so does anything that reaches the pool later. Only the work
already running on a worker is let finish.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
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
        self._held: dict[int, Delivery] = {}
        self._keys = itertools.count()
        # Set on the I/O thread when a stop begins; workers read it before starting an item.
        self._handing_back = False
        self.in_hand = 0

    @property
    def deferred(self) -> int:
        """Deliveries held for a timer: a deferred retry, or a pause before a hand-back."""
        return len(self._held)

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
        self._enqueue(delivery, lambda: handler(delivery))

    def defer(self, delivery: Delivery, delay_s: float, work: Work) -> None:
        """Put `work` in the queue after `delay_s`; `delivery` stays in hand meanwhile."""
        self._hold(delivery, delay_s, lambda d: self._enqueue(d, work))

    def pause_then_hand_back(self, delivery: Delivery, delay_s: float) -> None:
        """Keep `delivery` unacked for `delay_s`, then requeue it: its redelivery is not at once."""
        self._hold(delivery, delay_s, self._give_back)

    def hand_back(self) -> tuple[int, int]:
        """A stop begins: requeue every delivery not yet started, now, and any that comes later.
        Returns how many were queued for a worker and how many were held for later."""
        self._handing_back = True
        held = list(self._held.values())
        self._held.clear()
        queued: list[Delivery] = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is None:  # the pool is ending: leave the workers their signal
                self._work.put(None)
                break
            queued.append(item[0])
        for delivery in held + queued:
            self.in_hand -= 1
            self._give_back(delivery)
        return len(queued), len(held)

    def _enqueue(self, delivery: Delivery, work: Work) -> None:
        if self._handing_back:
            self._give_back(delivery)
            return
        self.in_hand += 1
        self._work.put((delivery, work))

    def _hold(self, delivery: Delivery, delay_s: float, then: Callable[[Delivery], None]) -> None:
        if self._handing_back:
            self._give_back(delivery)
            return
        key = next(self._keys)
        self._held[key] = delivery
        self.in_hand += 1
        self._ioloop.call_later(delay_s, lambda: self._due(key, then))

    def _due(self, key: int, then: Callable[[Delivery], None]) -> None:
        delivery = self._held.pop(key, None)
        if delivery is None:  # handed back at the stop already
            return
        self.in_hand -= 1
        if delivery.generation != self._link.generation:
            return  # its channel is gone; the broker redelivers it
        then(delivery)

    def _give_back(self, delivery: Delivery) -> None:
        self._link.settle(delivery, ack=False, requeue=True)

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
        try:
            if delivery.generation != self._link.generation:
                return  # its channel is gone and its tag with it; the broker redelivers it
            if self._handing_back:  # taken from the queue just as the stop began
                self._calls.submit(lambda: self._give_back(delivery))
                return
            work()
        except Exception:
            log.exception("handler failed; the message goes back to its queue after a pause",
                          extra={"event": "handler_error"})
            # Never drop it, never spin on it: requeue after a pause (at once if stopping).
            self._calls.submit(lambda: self.pause_then_hand_back(delivery, ERROR_PAUSE_S))
