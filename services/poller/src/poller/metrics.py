"""The poller's Prometheus metrics: observed at the edges, base units, no ids as labels."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from regbridge.lifecycle import POLL_OUTCOMES, Stage
from regbridge.metrics import ServiceMetrics
from regbridge.plans import Failure, Finish

EDGE = ServiceMetrics("poller", consumed="Pending messages taken from the broker")
POLLS = Counter("poller_polls_total", "Status polls by result", ["result"])
FINALISED = Counter("poller_finalised_total", "Registrations finalised, by outcome and stage",
                    ["outcome", "stage"])
LEGACY_SECONDS = Histogram("poller_legacy_request_seconds", "Duration of GET /v1/registrations/{id}",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
END_TO_END_SECONDS = Histogram("poller_end_to_end_seconds", "From taking the inbound message to its outcome",
                               buckets=(1, 2.5, 5, 10, 12.5, 15, 17.5, 20, 25, 30, 45, 60, 120, 300))
# The stages a poller's failure record can carry.
STAGES = (Stage.VALIDATION, Stage.LEGACY, Stage.POLL, Stage.TIMEOUT, Stage.STORE)


def finished(plan: Finish | Failure) -> None:
    if isinstance(plan, Failure):
        FINALISED.labels("failed", plan.error.stage).inc()
    elif plan.registered:
        FINALISED.labels("registered", "").inc()
    else:
        return
    if plan.subject.received_at is not None:
        END_TO_END_SECONDS.observe(max(0.0, time.time() - plan.subject.received_at))


def _create_label_values() -> None:
    """Every label value the service can use, at zero from the start: rate() and increase() cannot
    count a series' first increment, so one created on first use hides the first burst."""
    for outcome in POLL_OUTCOMES:
        POLLS.labels(outcome.label)
    FINALISED.labels("registered", "")
    for stage in STAGES:
        FINALISED.labels("failed", stage)


_create_label_values()
