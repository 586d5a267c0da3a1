"""The submitter's Prometheus metrics: observed at the edges, base units, no ids as labels."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from regbridge.lifecycle import SUBMIT_OUTCOMES, Stage
from regbridge.metrics import ServiceMetrics
from regbridge.plans import Failure, Finish

EDGE = ServiceMetrics("submitter", consumed="Inbound messages taken from the broker")
SUBMISSIONS = Counter("submitter_submissions_total", "Legacy submissions by result", ["result"])
RETRIES = Counter("submitter_submit_retries_total", "Submissions scheduled for another try")
FAILURES = Counter("submitter_failures_total", "Failure records published, by stage", ["stage"])
LEGACY_SECONDS = Histogram("submitter_legacy_request_seconds", "Duration of POST /v1/registrations",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
# Results beside the legacy API's answers: a user registered already, a request id on record, or
# a copy of a message whose attempt is in flight.
ALREADY_REGISTERED = "already_registered"
RESUMED = "resumed"
COPY_IN_FLIGHT = "copy_in_flight"
# The stages a submitter's failure record can carry.
STAGES = (Stage.VALIDATION, Stage.SUBMIT, Stage.STORE)


def finished(plan: Finish | Failure) -> None:
    if isinstance(plan, Failure):
        FAILURES.labels(plan.error.stage).inc()


def _create_label_values() -> None:
    """Every label value the service can use, at zero from the start: rate() and increase() cannot
    count a series' first increment, so one created on first use hides the first burst."""
    for result in (*(outcome.label for outcome in SUBMIT_OUTCOMES), ALREADY_REGISTERED, RESUMED, COPY_IN_FLIGHT):
        SUBMISSIONS.labels(result)
    for stage in STAGES:
        FAILURES.labels(stage)


_create_label_values()
