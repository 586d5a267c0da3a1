"""The metrics every service keeps at the runtime's edge, each under the service's prefix."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

from regbridge.breaker import Hold, State


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_labels(service: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What `<service>_build_info` says. The revision is the commit the image was built from
    (services/pipeline.Dockerfile sets REGBRIDGE_REVISION): it describes the code, not how to run
    it, so it is no setting. Versions alone would not tell two commits of one release apart."""
    return {"version": _version(f"regbridge-{service}"), "revision": environ.get("REGBRIDGE_REVISION") or "unknown",
            "common": _version("regbridge-common"), "python": platform.python_version(),
            "pika": _version("pika"), "pymongo": _version("pymongo")}


class ServiceMetrics:
    def __init__(self, prefix: str, *, consumed: str) -> None:
        # What runs, as one series of value 1: a rollout shows as its labels changing, and a
        # mixed fleet as two series at once.
        build = build_labels(prefix)
        self.build = Gauge(f"{prefix}_build_info", "The running build, always 1: versions of the service, its "
                           "library, Python and the clients, and the commit built", list(build))
        self.build.labels(**build).set(1)
        self.deliveries_in_hand = Gauge(f"{prefix}_deliveries_in_hand",
                                        "Deliveries this replica holds unsettled, by queue: its share of the "
                                        "queue's unacked messages (running, waiting for a worker or a confirm, "
                                        "or deferred)", ["queue"])
        self.retries_deferred = Gauge(f"{prefix}_retries_deferred",
                                      "Deliveries held unacked for a timer: a deferred retry, or a pause before "
                                      "a hand-back")
        self.consumed = Counter(f"{prefix}_messages_consumed_total", consumed)
        self.reconnects = Counter(f"{prefix}_broker_reconnects_total", "Broker connections lost")
        self.store_retries = Counter(f"{prefix}_store_retries_total", "MongoDB operations retried during an outage")
        self.store_refused = Counter(f"{prefix}_store_refused_total",
                                     "MongoDB writes refused for good: each a `store` failure, or a failure's "
                                     "status left unwritten beside its record")
        self.queue_messages = Gauge(f"{prefix}_queue_messages",
                                    "Ready messages in each queue this service declared, read every 10 s; "
                                    "absent while disconnected (unacked ones: *_deliveries_in_hand)", ["queue"])
        self.breaker_state = Gauge(f"{prefix}_legacy_breaker_state",
                                   "The legacy API's circuit breaker: 1 for the state it is in, 0 for the others",
                                   ["state"])
        self.legacy_not_sent = Counter(f"{prefix}_legacy_calls_not_sent_total",
                                       "Legacy API calls held back without a request: the breaker open, or "
                                       "the rate cap reached", ["reason"])
        self.hops_refused = Counter(f"{prefix}_hops_refused_total",
                                    "Publishes to the next queue that the broker refused (a nack, such as a length "
                                    "limit with reject-publish); each message goes back after a growing pause")
        self.records_refused = Counter(f"{prefix}_failure_records_refused_total",
                                       "Failure records the broker refused (the failure queue at its length "
                                       "limit, with reject-publish): each also counts as a refused hop, and its "
                                       "message goes back after a growing pause; nothing is dropped")
        self.broker_blocked = Gauge(f"{prefix}_broker_blocked",
                                    "1 while the broker blocks this service's publishing (a memory or disk alarm)")
        self.broker_blocks = Counter(f"{prefix}_broker_blocks_total",
                                     "Times the broker blocked this service's publishing (a memory or disk alarm)")
        # Every label value at zero from the start: rate() cannot count a series' first increment.
        self.set_breaker_state(State.CLOSED)
        for hold in Hold:
            self.legacy_not_sent.labels(hold)

    def set_breaker_state(self, state: str) -> None:
        for each in State:
            self.breaker_state.labels(each).set(1.0 if each == state else 0.0)

    def watch(self, *, unacked: Callable[[str], int], consumed: Sequence[str], deferred: Callable[[], int]) -> None:
        """Read the work in hand from the runtime at each scrape, rather than on every delivery."""
        for queue in consumed:
            self.deliveries_in_hand.labels(queue).set_function(functools.partial(unacked, queue))
        self.retries_deferred.set_function(deferred)

    def queue_depth(self, queue: str, messages: int | None) -> None:
        if messages is not None:
            self.queue_messages.labels(queue).set(messages)
        else:
            with contextlib.suppress(KeyError):  # never read since the service started
                self.queue_messages.remove(queue)

    def all(self) -> tuple[MetricWrapperBase, ...]:
        return (self.build, self.deliveries_in_hand, self.retries_deferred, self.consumed, self.reconnects,
                self.store_retries, self.store_refused, self.queue_messages,
                self.breaker_state, self.legacy_not_sent, self.hops_refused, self.records_refused, self.broker_blocked,
                self.broker_blocks)

    def hop_refused(self, queue: str, *, failed_queue: str) -> None:
        self.hops_refused.inc()
        if queue == failed_queue:
            self.records_refused.inc()

    def blocked(self, blocked: bool) -> None:
        self.broker_blocked.set(1 if blocked else 0)
        if blocked:
            self.broker_blocks.inc()
