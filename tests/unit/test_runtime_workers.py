"""The call queue into the I/O thread and the worker pool, driven by a hand-turned loop: no broker."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pika.spec import BasicProperties

from regbridge.amqp import Delivery
from regbridge.amqp.calls import CallQueue
from regbridge.amqp.pool import ERROR_PAUSE_S, LastIdleFirst, WorkerPool

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


# ---- the hand-off to the workers --------------------------------------------------------------


def until(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def takers(work: LastIdleFirst[int | None], count: int, took: list[tuple[str, int]],
           run: Callable[[int], None] = lambda item: None) -> list[threading.Thread]:
    lock = threading.Lock()

    def take() -> None:
        while (item := work.get()) is not None:
            run(item)
            with lock:
                took.append((threading.current_thread().name, item))

    threads = [threading.Thread(target=take, name=f"taker-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_a_light_load_stays_on_the_worker_idle_last() -> None:
    """One item at a time, each put once every worker waits: the same worker takes them all, so
    the others' memory stays cold. Handed out in turn (queue.Queue), the 40 would reach all 8."""
    work: LastIdleFirst[int | None] = LastIdleFirst()
    took: list[tuple[str, int]] = []
    threads = takers(work, 8, took)
    for i in range(40):
        until(lambda: work.idle == 8)
        work.put(i)
        until(lambda i=i: len(took) == i + 1)
    assert [item for _, item in took] == list(range(40))
    assert len({name for name, _ in took}) == 1, took
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join(WAIT_S)


def test_items_put_together_wake_as_many_workers() -> None:
    """Each of three items waits for the other two to be running: a put that woke no worker, or
    woke one already woken, would leave them waiting."""
    work: LastIdleFirst[int | None] = LastIdleFirst()
    together = threading.Barrier(3, timeout=WAIT_S)
    took: list[tuple[str, int]] = []
    threads = takers(work, 5, took, run=lambda item: together.wait() and None)
    until(lambda: work.idle == 5)
    for i in range(3):
        work.put(i)
    until(lambda: len(took) == 3)
    assert sorted(item for _, item in took) == [0, 1, 2] and len({name for name, _ in took}) == 3
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join(WAIT_S)


def test_under_contention_every_item_is_taken_once_in_order() -> None:
    work: LastIdleFirst[int | None] = LastIdleFirst()
    took: list[tuple[str, int]] = []
    threads = takers(work, 6, took)
    producers = [threading.Thread(target=lambda base=base: [work.put(base + i) for i in range(2_500)])
                 for base in (0, 10_000)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join(WAIT_S)
    until(lambda: len(took) == 5_000)
    items = sorted(item for _, item in took)
    assert items == [*range(2_500), *range(10_000, 12_500)]
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)


def test_get_nowait_takes_in_order_and_says_when_there_is_nothing() -> None:
    work: LastIdleFirst[str] = LastIdleFirst()
    work.put("a")
    work.put("b")
    assert (work.get_nowait(), work.get_nowait()) == ("a", "b")
    with pytest.raises(queue.Empty):
        work.get_nowait()


def test_the_pool_runs_a_light_load_on_one_worker() -> None:
    ran_on: list[str] = []
    pool = Pool(lambda d: ran_on.append(threading.current_thread().name), workers=8)
    try:
        for tag in range(30):
            pool.until(lambda: pool.pool._work.idle == 8)
            pool.pool.submit(delivery(tag))
            pool.idle()
        assert len(ran_on) == 30 and len(set(ran_on)) == 1, ran_on
    finally:
        pool.pool.end()
