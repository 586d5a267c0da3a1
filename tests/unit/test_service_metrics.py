"""The metrics every service keeps at its edge: what they say once the broker is gone, and
what the runtime's work in hand looks like at a scrape."""

from __future__ import annotations

import itertools
from importlib import metadata

from prometheus_client import REGISTRY, generate_latest

from regbridge.metrics import ServiceMetrics, build_labels

_PREFIXES = (f"unit{n}" for n in itertools.count())


def fresh() -> tuple[str, ServiceMetrics]:
    # Each test its own prefix: the metrics register in the process-wide registry.
    prefix = next(_PREFIXES)
    return prefix, ServiceMetrics(prefix, consumed="test")


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_depth_no_longer_known_is_absent_rather_than_its_last_reading() -> None:
    prefix, metrics = fresh()
    metrics.queue_depth("registrations", 40)
    metrics.queue_depth("registrations.failed", 3)
    assert value(f"{prefix}_queue_messages", queue="registrations") == 40
    metrics.queue_depth("registrations", None)
    metrics.queue_depth("registrations.failed", None)
    metrics.queue_depth("never.read", None)  # lost before its first reading: nothing to remove
    assert value(f"{prefix}_queue_messages", queue="registrations") is None
    assert f"{prefix}_queue_messages{{" not in generate_latest().decode()
    metrics.queue_depth("registrations", 7)
    assert value(f"{prefix}_queue_messages", queue="registrations") == 7


def test_work_in_hand_is_read_from_the_runtime_at_each_scrape() -> None:
    prefix, metrics = fresh()
    unacked = {"registrations.pending": 0}
    deferred = [0]
    metrics.watch(unacked=unacked.__getitem__, consumed=["registrations.pending"], deferred=lambda: deferred[0])
    assert value(f"{prefix}_deliveries_in_hand", queue="registrations.pending") == 0
    assert value(f"{prefix}_retries_deferred") == 0
    unacked["registrations.pending"], deferred[0] = 12, 3
    assert value(f"{prefix}_deliveries_in_hand", queue="registrations.pending") == 12
    assert value(f"{prefix}_retries_deferred") == 3


def test_the_build_is_one_series_of_value_one_naming_the_versions() -> None:
    prefix, _metrics = fresh()
    samples = [s for m in REGISTRY.collect() if m.name == f"{prefix}_build_info" for s in m.samples]
    assert len(samples) == 1 and samples[0].value == 1
    assert set(samples[0].labels) == {"version", "revision", "common", "python", "pika", "pymongo"}
    assert samples[0].labels["common"] != "unknown"  # installed as regbridge-common


def test_the_build_names_the_service_s_own_version_and_the_commit_the_image_was_built_from() -> None:
    for service in ("submitter", "poller"):
        labels = build_labels(service, {"REGBRIDGE_REVISION": "3f2a9c1"})
        assert labels["version"] == metadata.version(f"regbridge-{service}")
        assert labels["revision"] == "3f2a9c1"
        assert labels["common"] == metadata.version("regbridge-common")
    assert build_labels("submitter", {})["revision"] == "unknown"
    assert build_labels("submitter", {"REGBRIDGE_REVISION": ""})["revision"] == "unknown"


def test_a_refused_failure_record_counts_as_a_refused_hop_and_on_its_own() -> None:
    prefix, metrics = fresh()
    metrics.hop_refused("registrations.pending.wait.2000ms", failed_queue="registrations.failed")
    assert value(f"{prefix}_hops_refused_total") == 1
    assert value(f"{prefix}_failure_records_refused_total") == 0
    metrics.hop_refused("registrations.failed", failed_queue="registrations.failed")
    metrics.hop_refused("registrations.failed", failed_queue="registrations.failed")
    assert value(f"{prefix}_hops_refused_total") == 3
    assert value(f"{prefix}_failure_records_refused_total") == 2
