"""What both services' `main()` share: settings, adapters, and the wiring of a handler to its
executor and runtime."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from regbridge import health, logs
from regbridge.amqp import AmqpRuntime, Delivery, RuntimeHooks, TopologyConflict
from regbridge.breaker import Breaker
from regbridge.durable import Durable
from regbridge.executor import Executor, Handler, Observer
from regbridge.legacy_guard import GuardedLegacy, GuardHooks
from regbridge.legacy_http import LegacyClient
from regbridge.metrics import ServiceMetrics
from regbridge.plans import Failure, Finish
from regbridge.redact import Secrets
from regbridge.settings import CommonSettings, SettingsError
from regbridge.store import MongoStore, connect
from regbridge.topology import QueueSpec

log = logging.getLogger(__name__)
S = TypeVar("S", bound=CommonSettings)
# The exit status of a service stopped by a queue it cannot declare (sysexits' EX_CONFIG): a
# restart does not help, an operator does (docs/operations.md).
EXIT_TOPOLOGY_CONFLICT = 78


def load_settings(name: str, build: Callable[[Mapping[str, str]], S], env: Mapping[str, str]) -> S:
    try:
        return build(env)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def adapters(settings: CommonSettings, metrics: ServiceMetrics) -> tuple[MongoStore, GuardedLegacy]:
    """The MongoDB store and the legacy API client, sized to the service's pool; the client
    behind the replica's circuit breaker and rate cap."""
    mongo = MongoStore(connect(settings.mongodb_uri, pool_size=max(2, settings.workers // 4)),
                       settings.mongodb_database, settings.mongodb_collection, settings.attempts_collection,
                       failures=settings.failures_collection, counters=settings.counters_collection)
    client = LegacyClient(settings.legacy_api_url, timeout_s=settings.legacy_timeout_s,
                          max_response_bytes=settings.legacy_max_response_bytes, pool_size=settings.workers)
    # Monotonic: a step of the wall clock must neither open nor hold the breaker.
    breaker = Breaker(settings.breaker_limits(), clock=time.monotonic)
    hooks = GuardHooks(held=lambda reason: metrics.legacy_not_sent.labels(reason).inc(),
                       state=metrics.set_breaker_state)
    return mongo, GuardedLegacy(client, breaker, hooks)


def serve(name: str, settings: CommonSettings, *, handler: Callable[[Durable], Handler], queues: Sequence[QueueSpec],
          consume: str, store: MongoStore, metrics: ServiceMetrics,
          finished: Callable[[Finish | Failure], None]) -> None:
    """Wire the handler that `handler` builds to an executor and a runtime on its queues, with
    its metrics at the edge, and run it."""
    runtime = AmqpRuntime(
        url=settings.rabbitmq_url,
        queues=queues,
        consume=[consume],
        workers=settings.workers,
        prefetch=settings.prefetch,
        reconnect_max_s=settings.reconnect_max_s,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        hooks=RuntimeHooks(on_delivery=lambda d: metrics.consumed.inc(),
                           on_disconnected=metrics.reconnects.inc,
                           on_queue_depth=metrics.queue_depth,
                           on_hop_refused=functools.partial(metrics.hop_refused, failed_queue=settings.failed_queue),
                           on_blocked=metrics.blocked),
        name=name,
        order=settings.rabbitmq_url_order,
    )
    metrics.watch(unacked=runtime.unacked, consumed=[consume], deferred=lambda: runtime.deferred)
    durable = Durable(runtime.stopping, on_retry=metrics.store_retries.inc)
    executor = Executor(handler(durable), broker=runtime, store=store, durable=durable,
                        failed_queue=settings.failed_queue, clock=time.time,
                        observer=Observer(finished=finished, store_refused=metrics.store_refused.inc))
    run(name, settings, runtime, store, executor.run)


def run(name: str, settings: CommonSettings, runtime: AmqpRuntime, store: MongoStore,
        handler: Callable[[Delivery], None]) -> None:
    """Serve probes and metrics, wire SIGTERM/SIGINT to a graceful stop, turn the I/O loop.
    Exits with EXIT_TOPOLOGY_CONFLICT when a queue cannot be declared (the runtime logged why)."""
    probe = health.Probe(store.ping).start()

    def ready() -> dict[str, bool]:
        return {"broker": runtime.connected, "publishing": runtime.publishing, "mongodb": probe.ok}

    def where() -> dict[str, str | None]:
        return {"broker_node": runtime.node}

    health.serve(health.create_app(live=runtime.alive, ready=ready, where=where), settings.http_port,
                 settings.http_host)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum, extra={"event": "signal"})
        runtime.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s starting", name, extra={"event": "starting"})
    try:
        runtime.run(handler)
    except TopologyConflict:
        exit_now(EXIT_TOPOLOGY_CONFLICT)
    exit_now(0)


def exit_now(code: int) -> None:
    """End the process once the runtime has stopped: every worker has ended, every publish is
    confirmed or failed, every delivery settled or left to the broker. What the interpreter's
    own shutdown would add is waiting: pymongo joins its monitor threads at exit (up to a
    second under load), which would carry a stop past `SHUTDOWN_TIMEOUT_S`, the exit included."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_logging(name: str, settings: CommonSettings) -> None:
    logs.setup(name, settings.log_level, third_party=settings.log_level_third_party,
               secrets=Secrets.of_urls([settings.rabbitmq_url, settings.mongodb_uri, settings.legacy_api_url]))
    log.info("settings: %s", settings.safe_view(), extra={"event": "settings"})
