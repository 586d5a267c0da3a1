"""The graceful stop, on the I/O thread.

In order: stop consuming, hand deferred work back at once, let the workers finish what they
hold and the broker confirm what they published, then close. Past the deadline, work not yet
started goes back to the broker and whatever is still in hand is left to its redelivery.
"""

from __future__ import annotations

import logging
import time

from pika.adapters.select_connection import IOLoop

from regbridge.amqp.confirms import Confirms
from regbridge.amqp.link import BrokerLink
from regbridge.amqp.pool import WorkerPool

log = logging.getLogger(__name__)

DRAIN_EVERY_S = 0.05


class GracefulStop:
    def __init__(self, *, timeout_s: float, ioloop: IOLoop, link: BrokerLink, pool: WorkerPool,
                 confirms: Confirms) -> None:
        self._timeout_s = timeout_s
        self._ioloop = ioloop
        self._link = link
        self._pool = pool
        self._confirms = confirms
        self._deadline: float | None = None

    def begin(self) -> None:
        if self._deadline is not None:
            return
        deadline = self._deadline = time.monotonic() + self._timeout_s
        log.info("stopping: no new messages; finishing what is in hand", extra={"event": "stopping"})
        self._link.stop_consuming()
        self._pool.hand_back(deadline)
        self._drain(deadline)

    def _drain(self, deadline: float) -> None:
        idle = self._pool.in_hand <= 0 and not self._confirms.pending
        if idle or time.monotonic() >= deadline:
            if not idle:
                log.warning("shutdown timeout: %d messages still in hand go back to the broker",
                            self._pool.in_hand, extra={"event": "shutdown_timeout"})
            self._link.close()
            return
        self._ioloop.call_later(DRAIN_EVERY_S, lambda: self._drain(deadline))
