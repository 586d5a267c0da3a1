"""Memory does not grow with the number of deliveries: no allocation site of the project's code,
or of the libraries it calls, keeps growing once warmed up.

Each test drives a warm-up then N and N more deliveries (thousands of publishes) through the
real code with in-memory fakes, with `tracemalloc` on from the end of the warm-up (it would slow
the warm-up fivefold), takes a snapshot then and after N and 2N, and fails:
- naming every site that grew by more than SLACK_BYTES between N and 2N, about as much as it grew
  between the warm-up and N (a cache that fills up grows less the second time);
- if all the sites together grew by more than TOTAL_SLACK_BYTES between N and 2N: many small
  growths, each under SLACK_BYTES, add up (a few bytes a delivery kept at a handful of sites);
- for the handlers and the pool, if any delivery of the warm-up, its properties or its body, is
  still alive at a snapshot (tracemalloc does not see them: the test allocates them).
The 100 bytes a registration that a long run measured would show as 75 KB between N and 2N.
Bounded state must reach its bound during the warm-up: the poller's learner has a window of
LEARNER_WINDOW here (500 by default), which then shows as flat. The fakes record nothing that
outlives a delivery, and what they allocate themselves is left out, so what is measured is the
code under test. Logging goes through the services' JSON formatter to a stream that keeps nothing,
so the log calls are measured too; pytest's own capture of log records is set aside meanwhile.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import sys
import threading
import time
import tracemalloc
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from pika.spec import Basic, BasicProperties
from test_handlers import (
    BODY,
    FAILED,
    NOW,
    PollerRig,
    SubmitterRig,
    delivery,
    pending,
    pending_delivery,
    poller_rig,
    submitter_rig,
)
from test_runtime_workers import WAIT_S, FakeLoop

from regbridge.amqp import Delivery
from regbridge.amqp.calls import CallQueue
from regbridge.amqp.confirms import PUBLISH_SEQ_HEADER, Confirms
from regbridge.amqp.hops import RefusedHops
from regbridge.amqp.pool import WorkerPool
from regbridge.lifecycle import Accepted, Completed, LegacyFailed, Processing, Rejected, Transient
from regbridge.logs import JsonFormatter
from regbridge.poll_schedule import Observation, fit

WARM_UP = 1500
N = 750
# Publishes through the confirm tracker alone, which are cheap to drive.
CONFIRMS_N = 2000
# What a site may grow by between N and 2N more deliveries: caches filling, a dict resizing once,
# and what is alive by chance at the moment of a snapshot (a few KB measured in the log formatter).
SLACK_BYTES = 16384
# What all the sites together may grow by between N and 2N: the same noise at a few sites (a
# dict resizing, what is alive by chance), and bounded state allocated in the untraced warm-up
# being replaced by traced objects, a growth that slows (up to 15 KB measured in the poller,
# 6 KB in the submitter); well under the 75 KB of 100 bytes a delivery.
TOTAL_SLACK_BYTES = 32768
# The poller's learner window here: reached during the warm-up (about one delivery in four
# completes or fails), so its observations are shown to stop growing there.
LEARNER_WINDOW = 50
# Enough frames to reach from a library's allocation back to the project's code that called it.
FRAMES = 10
# A site: the allocating frame, its callers up to the project's code, named by their last frames.
SITE_FRAMES = 4
# The code under test: the project's packages and the libraries they call (by path).
MEASURED = ("*/regbridge/*", "*/submitter/*", "*/poller/*")


class Discard(io.TextIOBase):
    """A log stream that formats everything and keeps nothing."""

    def write(self, text: str) -> int:
        return len(text)


@contextmanager
def logging_to_nowhere() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handler = logging.StreamHandler(Discard())
    handler.setFormatter(JsonFormatter("leaks"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class Watch:
    """The deliveries of the warm-up, watched for being kept. Their objects are the test's, not
    seen by tracemalloc: a delivery and its properties by weak reference; its body (bytes take no
    weak reference) by its reference count, the watch's own reference being the only one left.
    `idle_hold`: how many of the last deliveries may stay alive, held by an idle worker thread's
    frame until its next item."""

    def __init__(self, idle_hold: int = 0) -> None:
        self.idle_hold = idle_hold
        self.watching = True
        self._refs: list[weakref.ref[Any]] = []
        self._bodies: list[bytes] = []

    def __call__(self, each: Delivery) -> Delivery:
        if self.watching:
            self._refs += [weakref.ref(each), weakref.ref(each.properties)]
            self._bodies.append(each.body)
        return each

    def kept(self) -> list[str]:
        """What of the watched deliveries is still alive (call after gc.collect())."""
        watched = len(self._bodies) - self.idle_hold
        alive = [ref() for ref in self._refs[:2 * watched]]
        # getrefcount counts its argument and the list's reference (no variable may hold the body).
        bodies = [self._bodies[i] for i in range(watched) if sys.getrefcount(self._bodies[i]) > 2]
        return [f"{type(obj).__name__} {obj!r:.120}" for obj in alive if obj is not None] + [
            f"body {body!r:.120}" for body in bodies]


def _snapshot(watch: Watch | None) -> dict[tuple[str, ...], int]:
    gc.collect()
    if watch is not None:
        kept = watch.kept()
        assert not kept, (f"{len(kept)} objects of the {len(watch._bodies)} deliveries of the warm-up are "
                          "still alive:\n" + "\n".join(kept[:6]))
    snapshot = tracemalloc.take_snapshot().filter_traces([
        # Allocated with the project's code somewhere on the stack...
        *(tracemalloc.Filter(True, pattern, all_frames=True) for pattern in MEASURED),
    ]).filter_traces([
        # ...but not by the fakes and the test itself, which stand in for the outside world.
        tracemalloc.Filter(False, "*/tests/*", all_frames=False),
        tracemalloc.Filter(False, tracemalloc.__file__),
    ])
    sizes: dict[tuple[str, ...], int] = defaultdict(int)
    for trace in snapshot.traces:
        frames = list(trace.traceback)[-SITE_FRAMES:]  # oldest first: the allocating frame last
        sizes[tuple(f"{frame.filename}:{frame.lineno}" for frame in frames)] += trace.size
    return sizes


def growth(drive: Callable[[int], None], n: int = N,
           watch: Watch | None = None) -> tuple[list[str], int]:
    """Drive `drive(i)` WARM_UP times, then n and n more. The sites that grew in the second n,
    largest first, each with its growth over n and over 2n; and the growth of all sites together
    in the second n. Fails at once if a watched delivery is kept."""
    with logging_to_nowhere():
        count = iter(range(WARM_UP + 2 * n))
        for i in itertools.islice(count, WARM_UP):
            drive(i)
        if watch is not None:
            watch.watching = False
        tracemalloc.start(FRAMES)
        try:
            start = _snapshot(watch)
            for i in itertools.islice(count, n):
                drive(i)
            middle = _snapshot(watch)
            for i in itertools.islice(count, n):
                drive(i)
            end = _snapshot(watch)
        finally:
            tracemalloc.stop()
    grown = sorted(((end.get(site, 0) - middle.get(site, 0), site) for site in end), reverse=True)
    # A leak grows as much in the second n as in the first; a cache filling up grows less.
    sites = [f"+{growth} B over the last {n} (+{end[site] - start.get(site, 0)} B over {2 * n}) at\n    "
             + "\n    ".join(reversed(site))
             for growth, site in grown
             if growth > SLACK_BYTES and 2 * growth >= middle.get(site, 0) - start.get(site, 0)]
    return sites, sum(end.values()) - sum(middle.values())


def assert_flat(drive: Callable[[int], None], n: int = N, watch: Watch | None = None) -> None:
    sites, total = growth(drive, n, watch)
    assert not sites, "memory grows with the number of deliveries:\n" + "\n".join(sites)
    assert total <= TOTAL_SLACK_BYTES, (
        f"memory grows with the number of deliveries: +{total} B over the last {n} at all sites together")


# ---- the handlers and their executor ---------------------------------------------------------------


def forget(rig: SubmitterRig | PollerRig) -> None:
    """What the fakes recorded of a delivery: gone before the next one, as in the outside world."""
    rig.log.clear()
    for recorded in (rig.broker.published, rig.broker.acks, rig.broker.nacks, rig.broker.handed_back,
                     rig.legacy.submitted, rig.legacy.keys, rig.legacy.polled):
        recorded.clear()
    rig.store.users.clear()
    rig.store.attempts.clear()
    rig.store.attempt_users.clear()
    rig.store.attempt_errors.clear()
    rig.store.index.clear()
    rig.store.index_tokens.clear()
    rig.store.index_log.clear()


def test_submitter_memory_is_flat_across_accepted_rejected_retried_and_handed_back_deliveries() -> None:
    rig = submitter_rig()
    busy = Transient("legacy API busy: HTTP 503", 503)
    watch = Watch()

    def drive(i: int) -> None:
        # Every delivery its own message id, tag and body: state kept per message would show.
        each = watch(delivery(bytes(bytearray(BODY)), message_id=f"m-{i}", tag=i + 1))
        kind = i % 4
        if kind == 0:  # accepted, handed on, acked
            rig.legacy.submit_outcomes.append(Accepted(f"R-{i}"))
        elif kind == 1:  # refused: a failure record
            rig.legacy.submit_outcomes.append(Rejected("rejected by the legacy API: bad cpf", 400))
        elif kind == 2:  # busy, then a deferred retry that is accepted
            rig.legacy.submit_outcomes.extend([busy, Accepted(f"R-{i}")])
        else:  # accepted, but the hop is refused: the delivery goes back
            rig.legacy.submit_outcomes.append(Accepted(f"R-{i}"))
            rig.broker.refuse.add("registrations.pending.wait.10000ms")
        rig.executor.run(each)
        while rig.broker.deferred:
            rig.broker.run_deferred()
        rig.broker.refuse.clear()
        assert not rig.legacy.submit_outcomes
        forget(rig)

    assert_flat(drive, watch=watch)


def test_poller_memory_is_flat_across_waiting_completed_and_failed_deliveries() -> None:
    rig = poller_rig(age=15.0, env={"POLL_ADAPTIVE_WINDOW": str(LEARNER_WINDOW)})
    learning = rig.poller.learning
    assert learning is not None and learning.config.window == LEARNER_WINDOW
    watch = Watch()

    def drive(i: int) -> None:
        msg = pending(polls=1, request_id=f"R-{i}")
        kind = i % 4
        if kind == 0:
            rig.legacy.status_outcomes.append(Processing())
        elif kind == 1:
            rig.legacy.status_outcomes.append(Completed())
        elif kind == 2:
            rig.legacy.status_outcomes.append(LegacyFailed("rejected by the legacy system"))
        else:  # a failure whose record the broker refuses: handed back
            rig.legacy.status_outcomes.append(LegacyFailed("rejected by the legacy system"))
            rig.broker.refuse.add(FAILED)
        rig.executor.run(watch(pending_delivery(msg, tag=i + 1)))
        # A fit runs on its own thread: not in flight at a snapshot, as a delivery is not.
        learning.wait_for_fit(timeout=WAIT_S)
        rig.broker.refuse.clear()
        assert not rig.legacy.status_outcomes
        forget(rig)

    assert_flat(drive, watch=watch)


def test_poller_fits_its_schedule_on_one_thread_whichever_worker_made_the_fit_due(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not seen by tracemalloc: glibc's malloc serves a thread from the arena it was given, and a
    fit allocates lists of the window's size (beyond pymalloc's 512 bytes). Run by whichever of
    the poller's 16 workers made it due, the fits wore through the pages of every worker's arena
    in turn, untouched pages becoming resident one after another: the poller's RSS grew about
    16 KB a minute for half an hour on the adaptive schedule and stayed flat on the fixed one
    (bench/memory_probe.py --service poller reads it by mapping: the worker arenas' RSS grew
    round after round, the rest stayed flat). The fits run on one thread of their own."""
    import poller.service

    fitted_on: list[threading.Thread] = []

    def recording(*args: Any) -> Any:
        fitted_on.append(threading.current_thread())
        return fit(*args)

    monkeypatch.setattr(poller.service, "fit", recording)
    learning = poller_rig().poller.learning
    assert learning is not None
    clock = itertools.count()

    def observe() -> None:
        for i in range(3 * learning.config.refit_every):
            now = float(next(clock))
            learning.observe(Observation(0.3 + (i % 7) * 0.05, 0.5 + (i % 7) * 0.05, submitted_s=now), now=now)

    workers = [threading.Thread(target=observe, name=f"worker-{k}") for k in range(4)]
    for worker in workers:  # one after another: each makes fits due
        worker.start()
        worker.join()
        learning.wait_for_fit(timeout=WAIT_S)
    assert len(fitted_on) >= len(workers)
    assert len(set(fitted_on)) == 1 and fitted_on[0] not in workers and fitted_on[0] is not threading.main_thread()


# ---- the runtime's bookkeeping -------------------------------------------------------------------


class Channel:
    """A channel in confirm mode that keeps only what is not yet confirmed."""

    def __init__(self) -> None:
        self.on_return: Callable[..., None] = lambda *_: None
        self.on_confirm: Callable[[Any], None] = lambda _: None
        self.sent: list[BasicProperties] = []

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        self.on_return = callback

    def confirm_delivery(self, *, ack_nack_callback: Callable[[Any], None], callback: Callable[[Any], None]) -> None:
        self.on_confirm = ack_nack_callback
        callback(None)

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties, *,
                      mandatory: bool) -> None:
        self.sent.append(properties)

    def confirm(self, seq: int, *, ack: bool, multiple: bool = False) -> None:
        method = Basic.Ack if ack else Basic.Nack
        self.on_confirm(SimpleNamespace(method=method(delivery_tag=seq, multiple=multiple)))

    def give_back(self, properties: BasicProperties) -> None:
        self.on_return(self, Basic.Return(reply_code=312, reply_text="NO_ROUTE"), properties, b"")


class Tracker:
    def __init__(self) -> None:
        self.confirms = Confirms(on_unroutable=lambda: None)
        self.channel = Channel()
        self.confirms.attach(self.channel, lambda: None)

    def publish(self) -> tuple[int, Future[None]]:
        future: Future[None] = Future()
        self.confirms.publish(self.channel, "q", b"{}", BasicProperties(headers={}), future)
        return self.channel.sent[-1].headers[PUBLISH_SEQ_HEADER], future


def test_confirm_bookkeeping_is_flat_across_acks_nacks_and_returns_on_one_channel() -> None:
    """One long-lived channel: what the tracker keeps for a publish goes when it is confirmed,
    whichever way (a channel lost would clear everything and hide what lingers)."""
    tracker = Tracker()
    channel = tracker.channel

    def drive(i: int) -> None:
        kind = i % 5
        seq, future = tracker.publish()
        if kind == 0:  # acked
            channel.confirm(seq, ack=True)
        elif kind == 1:  # nacked
            channel.confirm(seq, ack=False)
        elif kind == 2:  # returned, then acked: unroutable
            channel.give_back(channel.sent[-1])
            channel.confirm(seq, ack=True)
        elif kind == 3:  # returned, then nacked
            channel.give_back(channel.sent[-1])
            channel.confirm(seq, ack=False)
        else:  # three confirmed by one multiple ack
            tracker.publish()
            seq, _last = tracker.publish()
            channel.confirm(seq, ack=True, multiple=True)
        assert future.done()
        assert not tracker.confirms.pending
        channel.sent.clear()

    # A publish costs little to drive: enough of them that a few bytes kept per confirm show.
    assert_flat(drive, CONFIRMS_N)


def test_confirm_bookkeeping_is_flat_across_lost_channels() -> None:
    tracker = Tracker()

    def drive(i: int) -> None:
        _seq, future = tracker.publish()
        if i % 2:
            tracker.channel.give_back(tracker.channel.sent[-1])
        tracker.confirms.fail_all("channel closed")
        tracker.confirms.attach(tracker.channel, lambda: None)
        assert future.done()
        tracker.channel.sent.clear()

    assert_flat(drive)


def test_deferred_retries_and_hand_backs_are_flat_in_the_worker_pool() -> None:
    """Deferred work, pauses before a hand-back and refused hops, on the pool's timers and its
    worker thread, with the I/O loop turned by hand."""
    loop = FakeLoop()
    calls = CallQueue(loop)
    settled: list[tuple[int, bool]] = []

    class Link:
        generation = 1

        def settle(self, delivery: Delivery, *, ack: bool, requeue: bool) -> None:
            settled.append((delivery.delivery_tag, ack))

    pool = WorkerPool(workers=1, name="leaks", calls=calls, ioloop=loop, link=Link())
    calls.bind()
    pool.start(lambda d: pool_ran.append(d.delivery_tag))
    pool_ran: list[int] = []
    hops = RefusedHops(clock=lambda: NOW)
    watch = Watch(idle_hold=1)  # the pool's one worker

    def until_idle() -> None:
        # The worker reports each finished item through the call queue: turn until it has.
        deadline = time.monotonic() + WAIT_S
        while pool.in_hand:
            assert time.monotonic() < deadline, "the worker did not finish its item"
            loop.turn()
            time.sleep(0)  # let the worker have the GIL
        loop.turn()

    def drive(i: int) -> None:
        each = watch(Delivery(f'{{"i": {i}}}'.encode(), BasicProperties(message_id=f"m-{i}"), False, i + 1, "q", 1,
                              NOW))
        kind = i % 3
        if kind == 0:  # a deferred retry: a timer, then the work on a worker
            pool.defer(each, 0.5, lambda: pool_ran.append(-1))
            loop.fire_timers()
        elif kind == 1:  # a refused hop: a pause, then back to the broker
            pool.pause_then_hand_back(each, hops.refused("q"))
            loop.fire_timers()
        else:  # a delivery run at once
            pool.submit(each)
        until_idle()
        assert pool.deferred == 0 and pool.in_hand == 0
        settled.clear()
        pool_ran.clear()

    try:
        assert_flat(drive, watch=watch)
    finally:
        pool.end()
