"""The graceful stop, on the I/O thread.

In order: stop consuming; hand back at once every delivery not yet started (queued for a
worker, a deferred retry, one pausing before its hand-back); let the workers finish what they
are running and the broker confirm what they published; close the connection; stop the loop.

It all fits in `timeout_s`, the process's exit included. The loop stops a moment before the
timeout, leaving the process time to exit; the drain may take all the time before that but a
grace for the close, and past it whatever is still running is left to its redelivery. A close
the broker does not answer (its alarm blocks the connection, and it reads nothing from us) is
not waited for past that point: the loop stops anyway, and the runtime then fails every
confirm still open.
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
# Kept for closing the connection: a fifth of the timeout, at most 2 s.
CLOSE_SHARE, CLOSE_GRACE_S = 0.2, 2.0
# Kept for the process to exit once the loop stops (pymongo's monitor threads alone take about
# 0.5 s to end): a fifth of the timeout, at most 1 s.
EXIT_SHARE, EXIT_GRACE_S = 0.2, 1.0


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
        timeout = self._timeout_s
        deadline = self._deadline = time.monotonic() + timeout - min(EXIT_GRACE_S, timeout * EXIT_SHARE)
        log.info("stopping: no new messages; finishing what is in hand", extra={"event": "stopping"})
        self._link.stop_consuming()
        queued, held = self._pool.hand_back()
        log.info("handed back %d messages not yet started and %d held for later", queued, held,
                 extra={"event": "handed_back"})
        self._drain(deadline - min(CLOSE_GRACE_S, timeout * CLOSE_SHARE), deadline)

    def _drain(self, close_by: float, deadline: float) -> None:
        idle = self._pool.in_hand <= 0 and not self._confirms.pending
        if idle or time.monotonic() >= close_by:
            if not idle:
                log.warning("shutdown timeout: %d messages still in hand are left to their redelivery",
                            self._pool.in_hand, extra={"event": "shutdown_timeout"})
            self._link.close()
            self._await_close(deadline)
            return
        self._ioloop.call_later(DRAIN_EVERY_S, lambda: self._drain(close_by, deadline))

    def _await_close(self, deadline: float) -> None:
        closed = self._link.closed
        if closed or time.monotonic() >= deadline:
            if not closed:
                log.warning("the broker did not answer the close in time; stopping without it",
                            extra={"event": "close_timeout"})
            self._ioloop.stop()
            return
        self._ioloop.call_later(DRAIN_EVERY_S, lambda: self._await_close(deadline))
