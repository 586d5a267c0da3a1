"""Retrying a store write until it succeeds: no ack happens before the write is acknowledged."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar

from pymongo.errors import AutoReconnect, ConnectionFailure, ExecutionTimeout, WTimeoutError

from regbridge.redact import redact_url

T = TypeVar("T")
log = logging.getLogger(__name__)

# Outages, not bugs: worth waiting out. Anything else propagates and the message is requeued.
RETRYABLE = (AutoReconnect, ConnectionFailure, ExecutionTimeout, WTimeoutError)


class HandBack(RuntimeError):
    """The service is stopping while the store is away: give the message back to the broker."""


def until_stored(operation: Callable[[], T], *, stopping: threading.Event, max_delay_s: float = 5.0,
                 on_retry: Callable[[], None] = lambda: None) -> T:
    delay = 0.1
    while True:
        try:
            return operation()
        except RETRYABLE as exc:
            if stopping.is_set():
                raise HandBack("store unreachable during shutdown") from exc
            on_retry()
            log.warning("MongoDB unavailable (%s); retrying in %.1f s", redact_url(str(exc))[:200], delay,
                        extra={"event": "store_retry"})
            stopping.wait(delay * random.uniform(0.5, 1.0))
            delay = min(max_delay_s, delay * 2)
