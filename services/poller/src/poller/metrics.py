"""The poller's Prometheus metrics: observed at the edges, base units, no ids as labels."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from regbridge.lifecycle import POLL_OUTCOMES, PollPolicy, Stage
from regbridge.metrics import ServiceMetrics
from regbridge.plans import Failure, Finish
from regbridge.poll_schedule import LearnedSchedule

EDGE = ServiceMetrics("poller", consumed="Pending messages taken from the broker")
POLLS = Counter("poller_polls_total", "Status polls by result", ["result"])
FINALISED = Counter("poller_finalised_total", "Registrations finalised, by outcome and stage",
                    ["outcome", "stage"])
LEGACY_SECONDS = Histogram("poller_legacy_request_seconds", "Duration of GET /v1/registrations/{id}",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
END_TO_END_SECONDS = Histogram("poller_end_to_end_seconds", "From taking the inbound message to its outcome",
                               buckets=(1, 2.5, 5, 10, 12.5, 15, 17.5, 20, 25, 30, 45, 60, 120, 300))
# The poll schedule in use (regbridge.poll_schedule), set each time it changes.
SCHEDULE_LEARNED = Gauge("poller_schedule_learned", "1 while polls follow a learned schedule, 0 on the configured one")
SCHEDULE_OBSERVATIONS = Gauge("poller_schedule_observations", "Completions the learned schedule was fitted to")
SCHEDULE_FIRST_POLL_SECONDS = Gauge("poller_schedule_first_poll_seconds", "Age of a registration at its first poll")
SCHEDULE_INTERVAL_SECONDS = Gauge("poller_schedule_interval_seconds", "Mean wait between planned polls")
SCHEDULE_PROBE_RATIO = Gauge("poller_schedule_probe_ratio", "Share of registrations polled early to probe")
SCHEDULE_EXPECTED_POLLS = Gauge("poller_schedule_expected_polls", "Polls a registration takes, as the schedule expects")
SCHEDULE_EXPECTED_DELAY_SECONDS = Gauge("poller_schedule_expected_delay_seconds",
                                        "Mean detection delay the schedule expects")
# A gauge may not carry `quantile`, the label of a summary: the percentile is its own label.
COMPLETION_AGE_SECONDS = Gauge("poller_completion_age_seconds",
                               "Learned age of registrations at completion, by percentile", ["percentile"])
PERCENTILES = ("10", "50", "90")
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


def schedule_changed(cold: PollPolicy, *, learned: LearnedSchedule | None) -> None:
    if learned is None:
        SCHEDULE_LEARNED.set(0)
        SCHEDULE_FIRST_POLL_SECONDS.set(cold.first_delay_s)
        SCHEDULE_INTERVAL_SECONDS.set(cold.interval_s)
        SCHEDULE_PROBE_RATIO.set(0)
        return
    SCHEDULE_LEARNED.set(1)
    SCHEDULE_OBSERVATIONS.set(learned.observations)
    SCHEDULE_FIRST_POLL_SECONDS.set(learned.first_poll_s)
    SCHEDULE_INTERVAL_SECONDS.set(learned.mean_interval_s)
    SCHEDULE_PROBE_RATIO.set(learned.probe_share)
    SCHEDULE_EXPECTED_POLLS.set(learned.expected_polls)
    SCHEDULE_EXPECTED_DELAY_SECONDS.set(learned.expected_delay_s)
    for name, value in zip(PERCENTILES, learned.quantiles, strict=True):
        COMPLETION_AGE_SECONDS.labels(name).set(value)


def _create_label_values() -> None:
    """Every label value the service can use, at zero from the start: rate() and increase() cannot
    count a series' first increment, so one created on first use hides the first burst."""
    for outcome in POLL_OUTCOMES:
        POLLS.labels(outcome.label)
    FINALISED.labels("registered", "")
    for stage in STAGES:
        FINALISED.labels("failed", stage)
    for name in PERCENTILES:
        COMPLETION_AGE_SECONDS.labels(name)


_create_label_values()
