"""The runtime's stop, its reading of a refused declare and its refused-hop pauses, without a broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from pika.spec import BasicProperties

from regbridge.amqp import AmqpRuntime, Delivery
from regbridge.amqp.calls import CallQueue
from regbridge.amqp.hops import HOP_PAUSE_MAX_S, HOP_PAUSE_S, RefusedHops
from regbridge.amqp.link import conflict_message
from regbridge.amqp.model import PublishError, PublishRefused
from regbridge.amqp.pool import WorkerPool
from regbridge.amqp.shutdown import GracefulStop

# ---- the stop --------------------------------------------------------------------------------------


class Loop:
    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.stopped_at: float | None = None

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        callback()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, callback))

    def stop(self) -> None:
        self.stopped_at = time.monotonic()

    def run_until_stopped(self, limit_s: float = 10.0) -> None:
        ends = time.monotonic() + limit_s
        while self.stopped_at is None:
            assert time.monotonic() < ends, "the loop was never stopped"
            due = [t for t in self.timers if t[0] <= time.monotonic()]
            for timer in due:
                self.timers.remove(timer)
                timer[1]()
            time.sleep(0.005)


@dataclass
class Link:
    answers_close: bool = True
    generation: int = 1
    closed: bool = False
    calls: list[str] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)

    def stop_consuming(self) -> None:
        self.calls.append("stop_consuming")

    def close(self) -> None:
        self.calls.append("close")
        self.closed = self.answers_close

    def settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        self.settled.append(delivery.delivery_tag)


@dataclass
class Confirms:
    pending: bool = False


def delivery(tag: int) -> Delivery:
    return Delivery(b"{}", BasicProperties(), False, tag, "q", 1, time.time())


def stop(timeout_s: float, link: Link, *, in_hand: int = 0, pending: bool = False) -> tuple[Loop, WorkerPool]:
    loop = Loop()
    pool = WorkerPool(workers=0, name="t", calls=CallQueue(loop), ioloop=loop, link=link)  # type: ignore[arg-type]
    pool.start(lambda d: None)
    pool.in_hand = in_hand  # work running on workers that never finish
    pool.defer(delivery(1), 60, lambda: None)
    graceful = GracefulStop(timeout_s=timeout_s, ioloop=loop, link=link, pool=pool,  # type: ignore[arg-type]
                            confirms=Confirms(pending))  # type: ignore[arg-type]
    graceful.begin()
    return loop, pool


def test_an_idle_stop_hands_back_what_is_held_closes_and_stops_the_loop_at_once() -> None:
    link = Link()
    began = time.monotonic()
    loop, pool = stop(5.0, link)
    loop.run_until_stopped()
    assert link.calls == ["stop_consuming", "close"] and link.settled == [1]
    assert loop.stopped_at is not None and loop.stopped_at - began < 0.5
    assert pool.in_hand == 0


@pytest.mark.parametrize("answers_close, in_hand, pending", [(True, 1, False), (True, 0, True), (False, 0, False)])
def test_work_that_never_ends_or_a_close_never_answered_still_stops_within_the_timeout(
        answers_close: bool, in_hand: int, pending: bool) -> None:
    timeout_s = 2.0
    link = Link(answers_close=answers_close)
    began = time.monotonic()
    loop, _ = stop(timeout_s, link, in_hand=in_hand, pending=pending)
    loop.run_until_stopped()
    assert loop.stopped_at is not None
    took = loop.stopped_at - began
    # Stopped before the timeout, with a margin for the process to exit (0.2 s here).
    assert took < timeout_s - 0.1
    assert "close" in link.calls


# ---- what the executor asks the runtime -------------------------------------------------------------


def test_a_delivery_is_no_longer_current_once_a_stop_is_asked_for() -> None:
    runtime = AmqpRuntime(url="amqp://guest:guest@127.0.0.1:1/%2F", queues=[], consume=[], workers=1, prefetch=1)
    link = runtime._link  # a channel that stands, without a broker
    link.ready = True
    link.generation = 1
    assert runtime.current(delivery(1))
    runtime.request_stop()
    assert not runtime.current(delivery(1))
    assert runtime.publishing and runtime.alive()


def test_a_delivery_whose_publish_was_refused_goes_back_after_the_hop_pause_and_otherwise_at_once() -> None:
    runtime = AmqpRuntime(url="amqp://guest:guest@127.0.0.1:1/%2F", queues=[], consume=[], workers=1, prefetch=1)
    paused: list[tuple[int, float]] = []
    settled: list[tuple[int, bool]] = []
    runtime._pool.pause_then_hand_back = lambda d, s: paused.append((d.delivery_tag, s))  # type: ignore[method-assign]
    runtime._link.settle = lambda d, *, ack, requeue: settled.append((d.delivery_tag, ack))  # type: ignore[method-assign]
    runtime._calls.call = lambda callback: callback()  # type: ignore[method-assign]
    runtime.hand_back(delivery(1), "registrations.failed", PublishRefused("the broker refused the message (nack)"))
    runtime.hand_back(delivery(2), "registrations.failed", PublishError("unconfirmed when the channel closed"))
    assert [tag for tag, _ in paused] == [1] and HOP_PAUSE_S / 2 <= paused[0][1] <= HOP_PAUSE_S
    assert settled == [(2, False)]


# ---- a refused declare ---------------------------------------------------------------------------


def test_a_conflict_names_the_queue_the_argument_and_the_broker_s_words() -> None:
    text = ("PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'registrations.pending.wait.300ms' "
            "in vhost '/': received '300' but current is '500'")
    message = conflict_message("registrations.pending.wait.300ms", text)
    assert message.startswith("queue 'registrations.pending.wait.300ms' exists with other arguments")
    assert "argument 'x-message-ttl' differs" in message
    assert text in message and "docs/operations.md" in message


def test_a_conflict_without_the_usual_wording_still_names_the_queue() -> None:
    message = conflict_message("registrations", "PRECONDITION_FAILED - something else")
    assert "'registrations'" in message and "its arguments differ" in message


# ---- refused hops --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hops(clock: Clock, jitter: float = 1.0) -> RefusedHops:
    return RefusedHops(base_s=1.0, max_s=HOP_PAUSE_MAX_S, rng=lambda: jitter, clock=clock)


def test_refusals_that_keep_coming_double_the_pause_up_to_its_cap() -> None:
    clock = Clock()
    refused = hops(clock)
    pauses = []
    for _ in range(8):
        pauses.append(refused.refused("wait"))
        clock.now += 0.1
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert refused.streak("wait") == 8


def test_the_pause_is_jittered_but_never_under_half_its_step() -> None:
    clock = Clock()
    assert hops(clock, jitter=0.0).refused("wait") == 0.5


def test_each_queue_has_its_own_streak() -> None:
    clock = Clock()
    refused = hops(clock)
    refused.refused("a")
    refused.refused("a")
    assert refused.refused("b") == 1.0
    assert refused.streak("a") == 2 and refused.streak("b") == 1


def test_a_delivery_refused_again_after_its_own_pause_still_counts_as_the_same_streak() -> None:
    clock = Clock()
    refused = hops(clock)
    pause = refused.refused("wait")
    clock.now += pause + 0.5  # its pause, then the handler's legacy call and the publish
    assert refused.refused("wait") == 2.0


def test_a_queue_quiet_for_twice_its_step_starts_over() -> None:
    clock = Clock()
    refused = hops(clock)
    for _ in range(3):
        refused.refused("wait")  # step now 4 s
    clock.now += 8.5
    assert refused.refused("wait") == 1.0
