"""The one way into the I/O thread: callbacks queued from any thread, run there in order.

pika allows other threads a single call, `add_callback_threadsafe`, and each one writes to the
loop's wake-up socket. Callbacks queued while a wake-up is pending ride along with it, so under
load one wake-up carries many acks and publishes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class Wakeable(Protocol):
    """The part of pika's IOLoop this queue uses."""

    def add_callback_threadsafe(self, callback: Callback) -> None: ...


class CallQueue:
    def __init__(self, loop: Wakeable) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._calls: list[Callback] = []
        self._wake_pending = False
        self._closed = False
        self._io_thread: threading.Thread | None = None

    def bind(self) -> None:
        """Name the calling thread the I/O thread: `call` runs callbacks at once there."""
        self._io_thread = threading.current_thread()

    def call(self, callback: Callback) -> None:
        """Run `callback` now when on the I/O thread, else queue it for that thread."""
        if threading.current_thread() is self._io_thread:
            callback()
        else:
            self.submit(callback)

    def submit(self, callback: Callback, on_closed: Callback | None = None) -> None:
        """Queue `callback` for the I/O thread; once the loop has ended, run `on_closed` instead."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._calls.append(callback)
                wake = not self._wake_pending
                self._wake_pending = True
        if closed:
            if on_closed is not None:
                on_closed()
            return
        if wake:
            try:
                self._loop.add_callback_threadsafe(self._run)
            except Exception:
                log.warning("cannot wake the I/O loop", extra={"event": "io_wake_failed"})
                with self._lock:
                    if callback in self._calls:
                        self._calls.remove(callback)
                    self._wake_pending = False  # the next caller tries again
                if on_closed is not None:
                    on_closed()

    def close(self) -> None:
        """On the I/O thread once its loop has ended: run what is still queued, refuse the rest.

        Nothing is connected by then, so a queued publish fails its future instead of leaving
        it unsettled, and a queued ack finds no channel and is dropped.
        """
        with self._lock:
            self._closed = True
        self._run()

    def _run(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._wake_pending = False
        for call in calls:
            try:
                call()
            except Exception:  # one failed callback must not take the others with it
                log.exception("callback on the I/O thread failed", extra={"event": "io_callback_error"})
