"""What both services' `main()` share: the broker protocol the handlers see, and start-up."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from pika.spec import BasicProperties

from regbridge import health, logs
from regbridge.amqp import AmqpRuntime, Delivery, RuntimeHooks
from regbridge.legacy_http import LegacyClient
from regbridge.settings import CommonSettings, SettingsError
from regbridge.store import MongoStore, connect
from regbridge.topology import QueueSpec

log = logging.getLogger(__name__)
S = TypeVar("S", bound=CommonSettings)

# How long a worker waits for a publisher confirm before it hands the message back.
CONFIRM_TIMEOUT_S = 30.0
# A message whose handling raised an unexpected error this many times becomes a failure record
# instead of going round for ever (quorum queues count deliveries in `x-delivery-count`).
POISON_DELIVERIES = 10


def delivery_count(delivery: Delivery) -> int:
    """How many times the broker delivered this message before."""
    count = (delivery.properties.headers or {}).get("x-delivery-count")
    if isinstance(count, int):
        return count
    return 1 if delivery.redelivered else 0


def poison_reason(delivery: Delivery, exc: Exception) -> str | None:
    """A failure reason once `delivery` has failed too often, else None: hand it back again."""
    count = delivery_count(delivery)
    if count + 1 < POISON_DELIVERIES:
        return None
    return f"could not be processed in {count + 1} deliveries (last error: {type(exc).__name__})"


class Broker(Protocol):
    """The part of `AmqpRuntime` a handler uses; unit tests pass a fake."""

    stopping: threading.Event

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]: ...
    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None: ...
    def current(self, delivery: Delivery) -> bool: ...
    def ack(self, delivery: Delivery) -> None: ...
    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None: ...
    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None: ...


def persistent(message_id: str | None, **kwargs: Any) -> BasicProperties:
    return BasicProperties(delivery_mode=2, content_type="application/json", message_id=message_id, **kwargs)


def load_settings(name: str, build: Callable[[Mapping[str, str]], S], env: Mapping[str, str]) -> S:
    try:
        return build(env)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class ServiceMetrics(Protocol):
    """The metrics every service keeps at the runtime's edge, under its own prefix."""

    CONSUMED: Any
    RECONNECTS: Any
    QUEUE_MESSAGES: Any


class Handles(Protocol):
    broker: Broker

    def handle(self, delivery: Delivery) -> None: ...


def adapters(settings: CommonSettings) -> tuple[MongoStore, LegacyClient]:
    """The MongoDB store and the legacy API client, sized to the service's pool."""
    mongo = MongoStore(connect(settings.mongodb_uri, pool_size=max(2, settings.workers // 4)),
                       settings.mongodb_database, settings.mongodb_collection, settings.attempts_collection)
    return mongo, LegacyClient(settings.legacy_api_url, timeout_s=settings.legacy_timeout_s,
                               pool_size=settings.workers)


def serve(name: str, settings: CommonSettings, service: Handles, *, queues: Sequence[QueueSpec],
          consume: str, store: MongoStore, metrics: ServiceMetrics) -> None:
    """Wire `service` to a runtime on its queues, with its metrics at the edge, and run it."""
    runtime = AmqpRuntime(
        url=settings.rabbitmq_url,
        queues=queues,
        consume=[consume],
        workers=settings.workers,
        prefetch=settings.prefetch,
        reconnect_max_s=settings.reconnect_max_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        hooks=RuntimeHooks(on_delivery=lambda d: metrics.CONSUMED.inc(),
                           on_disconnected=metrics.RECONNECTS.inc,
                           on_queue_depth=lambda queue, n: metrics.QUEUE_MESSAGES.labels(queue).set(n)),
        name=name,
    )
    service.broker = runtime
    run(name, settings, runtime, store, service.handle)


def run(name: str, settings: CommonSettings, runtime: AmqpRuntime, store: MongoStore,
        handler: Callable[[Delivery], None]) -> None:
    """Serve probes and metrics, wire SIGTERM/SIGINT to a graceful stop, turn the I/O loop."""
    probe = health.Probe(store.ping).start()

    def live() -> bool:
        return time.monotonic() - runtime.last_tick < 30.0

    def ready() -> dict[str, bool]:
        return {"broker": runtime.connected, "mongodb": probe.ok}

    health.serve(health.create_app(live=live, ready=ready), settings.http_port)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum, extra={"event": "signal"})
        runtime.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s starting", name, extra={"event": "starting"})
    runtime.run(handler)


def setup_logging(name: str, settings: CommonSettings) -> None:
    logs.setup(name, settings.log_level)
    log.info("settings: %s", settings.safe_view(), extra={"event": "settings"})
