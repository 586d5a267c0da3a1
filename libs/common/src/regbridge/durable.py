"""Store operations waited out through an outage: nothing is acked before its write is acknowledged."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

from pymongo.errors import AutoReconnect, ConnectionFailure, ExecutionTimeout, OperationFailure, WriteConcernError

from regbridge.redact import redact_url

T = TypeVar("T")
log = logging.getLogger(__name__)

# Outages, not bugs: worth waiting out. A write concern not met may be rolled back after a
# failover, so it is written again rather than taken for done.
_RETRYABLE = (AutoReconnect, ConnectionFailure, ExecutionTimeout, WriteConcernError)
# Server codes of a node that is stepping down, shutting down or unreachable: the write did
# not happen, and will on a later try.
_TRANSIENT_CODES = frozenset({6, 7, 50, 64, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436})


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, _RETRYABLE):
        return True
    if isinstance(exc, OperationFailure):
        return exc.code in _TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")
    return False


class HandBack(RuntimeError):
    """The service is stopping while the store is away: give the message back to the broker."""


class Durable:
    """Runs a store operation until it succeeds, backing off; during a stop, gives up with
    `HandBack` instead, so that shutdown is never held by an outage."""

    def __init__(self, stopping: threading.Event, *, on_retry: Callable[[], None] = lambda: None,
                 max_delay_s: float = 5.0) -> None:
        self.stopping = stopping
        self._on_retry = on_retry
        self._max_delay_s = max_delay_s

    def __call__(self, operation: Callable[[], T]) -> T:
        delay = min(0.1, self._max_delay_s)
        while True:
            try:
                return operation()
            except Exception as exc:
                if not retryable(exc):
                    raise
                if self.stopping.is_set():
                    raise HandBack("store unreachable during shutdown") from exc
                self._on_retry()
                log.warning("MongoDB unavailable (%s); retrying in %.1f s", redact_url(str(exc))[:200], delay,
                            extra={"event": "store_retry"})
                self.stopping.wait(delay * random.uniform(0.5, 1.0))
                delay = min(self._max_delay_s, delay * 2)
