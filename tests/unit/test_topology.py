"""Queue declarations as data: durable quorum work queues with an explicit delivery limit, and TTL
wait queues that dead-letter back."""

from __future__ import annotations

import pytest

from regbridge.topology import (
    DEFAULT_GROUP_SIZE,
    DELIVERY_LIMIT,
    GROUP_SIZE_ARG,
    QueueSpec,
    first_hop,
    poller_queues,
    submitter_queues,
    wait_queue,
    wait_queue_name,
    work_queue,
)


def test_work_queue_is_quorum_with_an_explicit_delivery_limit() -> None:
    spec = work_queue("registrations")
    assert spec == QueueSpec("registrations", {"x-queue-type": "quorum", GROUP_SIZE_ARG: 3,
                                               "x-delivery-limit": DELIVERY_LIMIT})
    # Far above RabbitMQ 4.x's default of 20, and never -1, which 3.x takes literally.
    assert DELIVERY_LIMIT >= 1000


def test_work_queues_do_not_share_their_arguments() -> None:
    a, b = work_queue("a"), work_queue("b")
    assert a.arguments is not b.arguments
    assert QueueSpec("c").arguments == {"x-queue-type": "quorum"}


@pytest.mark.parametrize(
    ("delay", "name"),
    [
        (10.0, "registrations.pending.wait.10000ms"),
        (2.0, "registrations.pending.wait.2000ms"),
        (0.25, "registrations.pending.wait.250ms"),
        (0.1, "registrations.pending.wait.100ms"),
        (1.5, "registrations.pending.wait.1500ms"),
    ],
)
def test_wait_queue_name_is_named_after_its_delay(delay: float, name: str) -> None:
    assert wait_queue_name("registrations.pending", delay) == name


def test_wait_queue_dead_letters_back_to_pending_at_least_once() -> None:
    spec = wait_queue("registrations.pending", 2.0)
    assert spec.name == "registrations.pending.wait.2000ms"
    assert dict(spec.arguments) == {
        "x-queue-type": "quorum",
        GROUP_SIZE_ARG: DEFAULT_GROUP_SIZE,
        "x-message-ttl": 2000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "registrations.pending",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


@pytest.mark.parametrize("delay", [0.1, 0.25, 1.5, 2.0, 10.0, 300.0])
def test_wait_queue_ttl_matches_its_name(delay: float) -> None:
    spec = wait_queue("p", delay)
    assert spec.name == f"p.wait.{spec.arguments['x-message-ttl']}ms"


def test_tiny_delay_still_has_a_positive_ttl() -> None:
    assert wait_queue("p", 0.0001).arguments["x-message-ttl"] == 1


def test_submitter_queues() -> None:
    specs = submitter_queues(inbound="in", pending="pend", failed="dlq", first_delay_s=10.0)
    assert [s.name for s in specs] == ["in", "pend", "dlq", "pend.wait.10000ms"]
    assert all(dict(s.arguments) == {"x-queue-type": "quorum", GROUP_SIZE_ARG: 3, "x-delivery-limit": DELIVERY_LIMIT}
               for s in specs[:3])
    assert specs[3].arguments["x-message-ttl"] == 10000
    assert specs[3].arguments["x-dead-letter-routing-key"] == "pend"


def test_without_a_first_delay_the_submitter_hands_on_to_pending() -> None:
    specs = submitter_queues(inbound="in", pending="pend", failed="dlq", first_delay_s=0)
    assert [s.name for s in specs] == ["in", "pend", "dlq"]
    assert first_hop("pend", 0) == "pend"
    assert first_hop("pend", 10.0) == "pend.wait.10000ms"


def test_on_the_adaptive_schedule_the_submitter_hands_on_to_pending() -> None:
    # Only the poller knows when the first poll is due; the fixed schedule's hop is unchanged.
    assert first_hop("pend", 10.0, adaptive=True) == "pend"
    specs = submitter_queues(inbound="in", pending="pend", failed="dlq", first_delay_s=10.0, adaptive=True)
    assert [s.name for s in specs] == ["in", "pend", "dlq"]


def test_poller_queues_declare_one_wait_queue_per_delay() -> None:
    specs = poller_queues(pending="pend", failed="dlq", delays=(2.0, 10.0))
    assert [s.name for s in specs] == ["pend", "dlq", "pend.wait.2000ms", "pend.wait.10000ms"]
    assert [s.arguments.get("x-message-ttl") for s in specs] == [None, None, 2000, 10000]
    assert all(s.arguments["x-dead-letter-routing-key"] == "pend" for s in specs[2:])
    # A wait queue is never consumed: nothing is returned to it, and its arguments stay as they were.
    assert [s.arguments.get("x-delivery-limit") for s in specs] == [DELIVERY_LIMIT, DELIVERY_LIMIT, None, None]


def test_poller_queues_without_delays() -> None:
    assert [s.name for s in poller_queues(pending="p", failed="f", delays=())] == ["p", "f"]


def test_every_queue_is_created_on_the_configured_number_of_nodes() -> None:
    specs = [*submitter_queues(inbound="in", pending="p", failed="f", first_delay_s=1.0, group_size=5),
             *poller_queues(pending="p", failed="f", delays=(2.0,), group_size=5)]
    assert {s.arguments[GROUP_SIZE_ARG] for s in specs} == {5}


def test_a_queue_can_be_declared_with_the_group_size_it_exists_with() -> None:
    spec = work_queue("q")
    assert GROUP_SIZE_ARG not in spec.with_group_size(None).arguments
    assert spec.with_group_size(7).arguments == {**spec.arguments, GROUP_SIZE_ARG: 7}
    assert spec.with_group_size(7).with_group_size(3) == spec
