"""The broker link's count of what it holds unsettled, driven with a fake channel: no broker."""

from __future__ import annotations

from dataclasses import dataclass, field

from pika.spec import Basic, BasicProperties

from regbridge.amqp import Delivery
from regbridge.amqp.link import BrokerLink, LinkEvents, LinkSettings
from regbridge.topology import QueueSpec

PENDING, FAILED = "registrations.pending", "registrations.failed"


@dataclass
class FakeChannel:
    is_open: bool = True
    settled: list[tuple[str, int]] = field(default_factory=list)

    def basic_ack(self, tag: int) -> None:
        self.settled.append(("ack", tag))

    def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.settled.append(("nack", tag))


@dataclass
class Seen:
    delivered: list[Delivery] = field(default_factory=list)
    depths: list[tuple[str, int | None]] = field(default_factory=list)


def make_link() -> tuple[BrokerLink, FakeChannel, Seen]:
    seen = Seen()
    events = LinkEvents(enable_confirms=lambda channel, then: then(), delivered=seen.delivered.append,
                        channel_lost=lambda why: None, disconnected=lambda: None,
                        queue_depth=lambda queue, n: seen.depths.append((queue, n)),
                        conflict=lambda message: None, blocked=lambda blocked: None)
    settings = LinkSettings(["amqp://127.0.0.1:5672/"], [QueueSpec(PENDING), QueueSpec(FAILED)], [PENDING], 10, 1.0)
    link = BrokerLink(settings, ioloop=object(), events=events)  # never turned here
    channel = FakeChannel()
    link._channel = channel  # as _on_channel_open sets it
    link.generation, link.ready = 1, True
    return link, channel, seen


def deliver(link: BrokerLink, tag: int, generation: int = 1) -> None:
    link._on_message(PENDING, generation, Basic.Deliver(delivery_tag=tag), BasicProperties(), b"{}")


def test_each_delivery_is_counted_until_it_is_acked_or_nacked() -> None:
    link, channel, seen = make_link()
    for tag in (1, 2, 3):
        deliver(link, tag)
    assert link.unacked == {PENDING: 3}
    link.settle(seen.delivered[0], ack=True, requeue=False)
    link.settle(seen.delivered[1], ack=False, requeue=True)
    assert link.unacked == {PENDING: 1}
    assert channel.settled == [("ack", 1), ("nack", 2)]


def test_a_settle_for_an_old_channel_changes_nothing() -> None:
    link, channel, seen = make_link()
    deliver(link, 1)
    link.generation = 2  # a new channel: the old delivery's tag means nothing on it
    deliver(link, 1, generation=2)
    link.settle(seen.delivered[0], ack=True, requeue=False)
    assert link.unacked == {PENDING: 2} and channel.settled == []
    link.settle(seen.delivered[1], ack=True, requeue=False)
    assert channel.settled == [("ack", 1)] and link.unacked == {PENDING: 1}


def test_losing_the_channel_gives_everything_back_and_forgets_the_depths() -> None:
    link, _channel, seen = make_link()
    for tag in (1, 2):
        deliver(link, tag)
    link._lose_channel("test")  # what a closed channel or connection calls
    assert link.unacked == {PENDING: 0}
    assert {queue for queue, n in seen.depths if n is None} == {PENDING, FAILED}
