"""The call queue into the I/O thread and the worker pool, driven by a hand-turned loop: no broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pika.spec import BasicProperties

from regbridge.amqp import Delivery
from regbridge.amqp.calls import CallQueue
from regbridge.amqp.pool import ERROR_PAUSE_S, WorkerPool

WAIT_S = 5.0


class FakeLoop:
    """pika's IOLoop as far as the call queue and the pool use it; the test turns it by hand."""

    def __init__(self) -> None:
        self.woken: list[Callable[[], None]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.refuse = False

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        if self.refuse:
            raise RuntimeError("loop closed")
        self.woken.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))

    def turn(self) -> int:
        """Run the wake-ups queued so far; how many there were."""
        woken, self.woken = self.woken, []
        for callback in woken:
            callback()
        return len(woken)

    def fire_timers(self) -> list[float]:
        timers, self.timers = self.timers, []
        for _delay, callback in timers:
            callback()
        return [delay for delay, _ in timers]


# ---- the call queue ----------------------------------------------------------------------------


def test_callbacks_queued_before_the_loop_turns_share_one_wake_up_and_keep_their_order() -> None:
    loop = FakeLoop()
    calls = CallQueue(loop)
    ran: list[int] = []
    threads = [threading.Thread(target=calls.submit, args=(lambda i=i: ran.append(i),)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loop.turn() == 1
    assert sorted(ran) == list(range(20))
    calls.submit(lambda: ran.append(99))
    assert loop.turn() == 1 and ran[-1] == 99


def test_a_failing_callback_does_not_stop_the_others() -> None:
    loop = FakeLoop()
    calls = CallQueue(loop)
    ran: list[str] = []

    def fail() -> None:
        raise ValueError("boom")

    calls.submit(lambda: ran.append("a"))
    calls.submit(fail)
    calls.submit(lambda: ran.append("c"))
    loop.turn()
    assert ran == ["a", "c"]


def test_close_runs_what_is_queued_then_refuses_with_on_closed() -> None:
    loop = FakeLoop()
    calls = CallQueue(loop)
    ran: list[str] = []
    calls.submit(lambda: ran.append("queued"))
    calls.close()
    assert ran == ["queued"]
    calls.submit(lambda: ran.append("late"), on_closed=lambda: ran.append("refused"))
    loop.turn()
    assert ran == ["queued", "refused"]


def test_a_loop_that_cannot_be_woken_refuses_and_the_next_caller_tries_again() -> None:
    loop = FakeLoop()
    calls = CallQueue(loop)
    ran: list[str] = []
    loop.refuse = True
    calls.submit(lambda: ran.append("lost"), on_closed=lambda: ran.append("refused"))
    loop.refuse = False
    calls.submit(lambda: ran.append("next"))
    loop.turn()
    assert ran == ["refused", "next"]


def test_call_runs_at_once_on_the_bound_thread_and_queues_elsewhere() -> None:
    loop = FakeLoop()
    calls = CallQueue(loop)
    calls.bind()
    ran: list[str] = []
    calls.call(lambda: ran.append("here"))
    other = threading.Thread(target=calls.call, args=(lambda: ran.append("there"),))
    other.start()
    other.join()
    assert ran == ["here"]
    loop.turn()
    assert ran == ["here", "there"]


# ---- the worker pool ---------------------------------------------------------------------------


@dataclass
class FakeLink:
    generation: int = 1
    settled: list[tuple[int, bool, bool]] = field(default_factory=list)

    def settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
        self.settled.append((delivery.delivery_tag, ack, requeue))


def delivery(tag: int, generation: int = 1) -> Delivery:
    return Delivery(b"{}", BasicProperties(), False, tag, "q", generation, time.time())


class Pool:
    """A started pool whose I/O-thread side the test runs by turning the fake loop."""

    def __init__(self, handler: Callable[[Delivery], None], workers: int = 2) -> None:
        self.loop = FakeLoop()
        self.link = FakeLink()
        self.pool = WorkerPool(workers=workers, name="t", calls=CallQueue(self.loop), ioloop=self.loop,
                               link=self.link)
        self.pool.start(handler)

    def until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, "timed out"
            self.loop.turn()
            time.sleep(0.005)

    def idle(self) -> None:
        self.until(lambda: self.pool.in_hand == 0)


MakePool = Callable[[Callable[[Delivery], None]], Pool]


@pytest.fixture
def handled() -> list[int]:
    return []


@pytest.fixture
def make_pool() -> Iterator[MakePool]:
    pools: list[Pool] = []

    def make(handler: Callable[[Delivery], None]) -> Pool:
        pools.append(Pool(handler))
        return pools[-1]

    yield make
    for pool in pools:
        pool.pool.end()


def test_deliveries_run_on_workers_and_leave_the_hand_when_done(handled: list[int], make_pool: MakePool) -> None:
    pool = make_pool(lambda d: handled.append(d.delivery_tag))
    for tag in (1, 2, 3):
        pool.pool.submit(delivery(tag))
    assert pool.pool.in_hand == 3
    pool.idle()
    assert sorted(handled) == [1, 2, 3]
    assert pool.link.settled == []  # settling is the handler's business


def test_a_failing_handler_requeues_after_a_pause_never_at_once(make_pool: MakePool) -> None:
    def fail(_d: Delivery) -> None:
        raise ValueError("boom")

    pool = make_pool(fail)
    pool.pool.submit(delivery(7))
    pool.until(lambda: bool(pool.loop.timers))
    assert pool.link.settled == []
    assert pool.pool.in_hand == 1  # held through the pause: a stop hands it back at once
    assert pool.loop.fire_timers() == [ERROR_PAUSE_S]
    assert pool.link.settled == [(7, False, True)]
    pool.idle()


def test_a_delivery_from_an_old_channel_is_not_run(handled: list[int], make_pool: MakePool) -> None:
    pool = make_pool(lambda d: handled.append(d.delivery_tag))
    pool.link.generation = 2
    pool.pool.submit(delivery(1, generation=1))
    pool.idle()
    assert handled == [] and pool.link.settled == []


def test_deferred_work_runs_when_its_timer_fires(handled: list[int], make_pool: MakePool) -> None:
    pool = make_pool(lambda d: None)
    pool.pool.defer(delivery(4), 1.5, lambda: handled.append(4))
    assert pool.pool.in_hand == 1 and pool.pool.deferred == 1
    assert pool.loop.fire_timers() == [1.5]
    assert pool.pool.deferred == 0
    pool.idle()
    assert handled == [4]


def test_deferred_work_is_handed_back_at_stop_and_its_timer_then_does_nothing(
        handled: list[int], make_pool: MakePool
) -> None:
    pool = make_pool(lambda d: None)
    pool.pool.defer(delivery(4), 1.5, lambda: handled.append(4))
    pool.pool.defer(delivery(5), 3.0, lambda: handled.append(5))
    assert pool.pool.deferred == 2
    assert pool.pool.hand_back() == (0, 2)
    assert sorted(pool.link.settled) == [(4, False, True), (5, False, True)]
    assert pool.pool.in_hand == 0 and pool.pool.deferred == 0
    pool.loop.fire_timers()
    pool.loop.turn()
    assert handled == [] and pool.pool.in_hand == 0


def test_deferred_work_of_a_lost_channel_is_dropped_for_its_redelivery(handled: list[int], make_pool: MakePool) -> None:
    pool = make_pool(lambda d: None)
    pool.pool.defer(delivery(4), 1.5, lambda: handled.append(4))
    pool.link.generation = 2
    pool.loop.fire_timers()
    assert pool.pool.in_hand == 0 and pool.pool.deferred == 0 and handled == [] and pool.link.settled == []


def test_at_the_stop_work_queued_and_not_started_goes_back_at_once_and_running_work_finishes(
        make_pool: MakePool
) -> None:
    release = threading.Event()
    started: list[int] = []

    def slow(d: Delivery) -> None:
        started.append(d.delivery_tag)
        release.wait(WAIT_S)

    pool = make_pool(slow)  # two workers
    for tag in range(1, 7):
        pool.pool.submit(delivery(tag))
    pool.until(lambda: len(started) == 2)
    queued, held = pool.pool.hand_back()
    assert (queued, held) == (4, 0)
    running = set(started)
    assert sorted(t for t, _, _ in pool.link.settled) == sorted(set(range(1, 7)) - running)
    assert pool.pool.in_hand == 2  # the two running ones
    release.set()
    pool.idle()
    assert set(started) == running  # nothing queued was started after the stop


def test_after_the_stop_whatever_reaches_the_pool_goes_straight_back(handled: list[int],
                                                                      make_pool: MakePool) -> None:
    pool = make_pool(lambda d: handled.append(d.delivery_tag))
    pool.pool.hand_back()
    pool.pool.submit(delivery(8))
    pool.pool.defer(delivery(9), 1.0, lambda: handled.append(9))
    pool.pool.pause_then_hand_back(delivery(10), 1.0)
    assert pool.link.settled == [(8, False, True), (9, False, True), (10, False, True)]
    assert pool.loop.timers == [] and pool.pool.in_hand == 0
    assert handled == []


def test_a_paused_hand_back_holds_the_delivery_then_requeues_it(make_pool: MakePool) -> None:
    pool = make_pool(lambda d: None)
    pool.pool.pause_then_hand_back(delivery(11), 4.0)
    assert pool.link.settled == [] and pool.pool.in_hand == 1
    assert pool.loop.fire_timers() == [4.0]
    assert pool.link.settled == [(11, False, True)] and pool.pool.in_hand == 0
