"""The metrics every service keeps at the runtime's edge, each under the service's prefix."""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase


class ServiceMetrics:
    def __init__(self, prefix: str, *, consumed: str) -> None:
        self.consumed = Counter(f"{prefix}_messages_consumed_total", consumed)
        self.reconnects = Counter(f"{prefix}_broker_reconnects_total", "Broker connections lost")
        self.store_retries = Counter(f"{prefix}_store_retries_total", "MongoDB operations retried during an outage")
        self.store_refused = Counter(f"{prefix}_store_refused_total",
                                     "MongoDB writes refused for good: each a `store` failure, or a failure's "
                                     "status left unwritten beside its record")
        self.queue_messages = Gauge(f"{prefix}_queue_messages",
                                    "Ready messages in each queue this service declared, read every 10 s", ["queue"])
        self.hops_refused = Counter(f"{prefix}_hops_refused_total",
                                    "Publishes to the next queue that the broker refused (a nack, such as a length "
                                    "limit with reject-publish); each message goes back after a growing pause")
        self.broker_blocked = Gauge(f"{prefix}_broker_blocked",
                                    "1 while the broker blocks this service's publishing (a memory or disk alarm)")
        self.broker_blocks = Counter(f"{prefix}_broker_blocks_total",
                                     "Times the broker blocked this service's publishing (a memory or disk alarm)")

    def all(self) -> tuple[MetricWrapperBase, ...]:
        return (self.consumed, self.reconnects, self.store_retries, self.store_refused, self.queue_messages,
                self.hops_refused, self.broker_blocked, self.broker_blocks)

    def blocked(self, blocked: bool) -> None:
        self.broker_blocked.set(1 if blocked else 0)
        if blocked:
            self.broker_blocks.inc()
