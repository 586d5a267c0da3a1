"""The poller's Prometheus metrics: observed at the edges, base units, no ids as labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("poller_messages_consumed_total", "Pending messages taken from the broker")
POLLS = Counter("poller_polls_total", "Status polls by result", ["result"])
FINALISED = Counter("poller_finalised_total", "Registrations finalised, by outcome and stage",
                    ["outcome", "stage"])
STORE_RETRIES = Counter("poller_store_retries_total", "MongoDB operations retried during an outage")
RECONNECTS = Counter("poller_broker_reconnects_total", "Broker connections lost")
LEGACY_SECONDS = Histogram("poller_legacy_request_seconds", "Duration of GET /v1/registrations/{id}",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
END_TO_END_SECONDS = Histogram("poller_end_to_end_seconds", "From taking the inbound message to its outcome",
                               buckets=(1, 2.5, 5, 10, 12.5, 15, 17.5, 20, 25, 30, 45, 60, 120, 300))
QUEUE_MESSAGES = Gauge("poller_queue_messages", "Ready messages in each queue this service declared, read every 10 s",
                       ["queue"])


def _create_label_values() -> None:
    """Every label value the service can use, at zero from the start: rate() and increase() cannot
    count a series' first increment, so one created on first use hides the first burst."""
    for result in ("processing", "completed", "legacyfailed", "notfound", "transient"):
        POLLS.labels(result)
    FINALISED.labels("registered", "")
    for stage in ("validation", "legacy", "poll", "timeout"):
        FINALISED.labels("failed", stage)


_create_label_values()
