"""The submitter's Prometheus metrics: observed at the edges, base units, no ids as labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("submitter_messages_consumed_total", "Inbound messages taken from the broker")
SUBMISSIONS = Counter("submitter_submissions_total", "Legacy submissions by result", ["result"])
RETRIES = Counter("submitter_submit_retries_total", "Submissions scheduled for another try")
FAILURES = Counter("submitter_failures_total", "Failure records published, by stage", ["stage"])
STORE_RETRIES = Counter("submitter_store_retries_total", "MongoDB operations retried during an outage")
RECONNECTS = Counter("submitter_broker_reconnects_total", "Broker connections lost")
LEGACY_SECONDS = Histogram("submitter_legacy_request_seconds", "Duration of POST /v1/registrations",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUE_MESSAGES = Gauge("submitter_queue_messages",
                       "Ready messages in each queue this service declared, read every 10 s", ["queue"])


def _create_label_values() -> None:
    """Every label value the service can use, at zero from the start: rate() and increase() cannot
    count a series' first increment, so one created on first use hides the first burst."""
    for result in ("accepted", "rejected", "transient", "already_registered", "resumed"):
        SUBMISSIONS.labels(result)
    for stage in ("validation", "submit"):
        FAILURES.labels(stage)


_create_label_values()
