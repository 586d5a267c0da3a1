"""Browsing a queue by cycling it: every record taken once, in order, and put back as an exact copy.

Why a cycle rather than get-and-requeue: RabbitMQ 4.0-4.2 count every return of a message (a
requeueing nack, the close of a channel that holds it) against the queue's delivery limit and
drop the message past it, so a browse that hands records back wears them out (on 4.x's default
of 20, about 20 browses empty the queue). A cycle returns nothing. It takes each record with
`basic.get`, publishes an exact copy to the back of the same queue, waits for the broker's
confirm, and only then acks the original. The copies join the queue in the order the originals
left it, so once every record that was there at the start has gone round, the queue is in its
own order again and no record has been returned once.

What a cycle holds to:
- It takes the records on the queue when it starts and no others: the first `basic.get` says
  how many are left behind it. A record that arrives later is never taken.
- One cycle of a queue at a time. Two interleaved cycles would swap records, and each would
  take some of the other's copies. The lock is an exclusive queue, `<queue>.browse-lock`: the
  broker lets one connection hold it and deletes it when that connection ends, however it ends.
- Records the caller sends elsewhere (a replay to the inbound queue) leave last: they are held
  while the others go round, then published one by one, each acked on its confirm. Whatever
  their sending causes (a replay that fails again at once) lands behind the records put back.
- Records the caller drops (a discard, or a second copy of a record replayed just before) are
  held too, and acked in their turn: none before `before_drops` has returned for all of them (a
  discard's export, written to disk), and a copy of a record sent elsewhere only once that
  record has gone.
- Nothing held leaves before `before_leaving` has returned for all of them (the failure index
  marks their entries): should it fail, every held record goes round instead.
- Ctrl-C and SIGTERM during the take let it finish, so that the queue keeps its order; a second
  one stops at once. A browse (`stoppable` false) then raises KeyboardInterrupt. A `stoppable`
  cycle sends nothing after the take: the held records are put back, as exact copies, and `run`
  returns with `interrupted` set. During the sends, a first signal stops them after the record
  in hand (its send is confirmed and it is acked, or it goes back): the held records not sent
  are put back, at the broker's pace (a confirm each, a few milliseconds), and `run` returns
  with `interrupted` set. Those put back land behind the rest of the queue, as the copies of a
  cycle always do, so they leave their places: a chosen record that was at the head is now at
  the tail. Nothing is handed back to the broker on the way.

How long a record is held: RabbitMQ closes a channel whose oldest unacked delivery is older
than its `consumer_timeout` (30 minutes by default; a `basic.get`'s delivery counts as a
consumer's does, since the timeout came in 3.8.0), handing back every record it held: returns,
which count against a delivery limit (4.3's quorum queues return the timed-out records instead:
returns as well). A record held to be sent waits through the rest of the
take and the sends before its own, at `rate`. With `max_hold_s`, the caller asks `has_room`
before it chooses a record to send, and a cycle stops choosing once one more would be held past
the bound; the records left out go round like the others, and the caller runs another cycle for
them (a replay in passes). The bound's cost is a whole cycle of the queue per pass.

What a cycle keeps: with `keep` (a browse that shows the queue), every record taken; without, only
the records it holds, and `on_put_back` is told each record that goes round, so that the caller
keeps of it what it needs (its id): memory grows with what the cycle moves, not with the queue.

On a terminal (`progress`), a bar on stderr counts the records taken out of the count the first
`basic.get` reported.

What it cannot hold to:
- A record published while a cycle runs (a service's new failure) lands among the copies:
  behind those put back so far, ahead of the rest. The records that were there keep their
  order among themselves, and the new ones theirs.
- If the command dies mid-cycle (SIGKILL, a lost connection, a second signal), nothing is
  lost, but the queue is left rotated where it stopped: the records not reached yet come first,
  then those put back. The broker returns what the command held (the record in hand, and those
  held to be sent elsewhere or dropped and not yet gone) to the head of a queue that has a
  delivery limit, as ours have; each such return counts once against the limit. A death
  between a copy's confirm and its original's ack leaves that record twice on the queue; a
  death between a send's confirm and its original's ack leaves that record both sent and
  returned, so the next replay sends it again. A quorum queue applies an ack through its log,
  so the record acked just before can come back too when the queue had not applied its ack:
  a crash sends at most those two twice.
"""

from __future__ import annotations

import copy
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .errors import CliError
from .progress import Progress
from .sanitize import warn

MAX_HOLD_S = 600.0  # well under RabbitMQ's consumer_timeout, 30 minutes by default (see `Cycle.has_room`)
LOCK_WAIT_S = 120.0  # a cycle costs 3-5 ms a record on a local broker: 10,000 records in under a minute
LOCK_RETRY_S = 0.1
PACE_SLICE_S = 0.05  # a send that waits for its turn looks at a stop this often


@dataclass(frozen=True)
class Record:
    """One message as the cycle took it."""

    position: int  # 1-based, in queue order when the cycle started
    properties: pika.BasicProperties
    body: bytes


@dataclass(frozen=True)
class Send:
    """Where a record goes instead of back to its queue."""

    queue: str
    body: bytes
    properties: pika.BasicProperties


@dataclass(frozen=True)
class Drop:
    """A record to remove: acked without a copy, once `Cycle`'s `before_drops` has kept it. With
    `copy_of` (the position of a record sent elsewhere in this cycle), only once that record
    has gone; if it does not go, the copy stays as well."""

    copy_of: int | None = None


def exact_copy(properties: pika.BasicProperties) -> pika.BasicProperties:
    """Every property and header of the original but `x-delivery-count`, which the broker adds to
    a delivery: on the copy it would claim returns that the copy never had."""
    duplicate = copy.copy(properties)
    headers = {k: _writable(v) for k, v in (properties.headers or {}).items() if k != "x-delivery-count"}
    duplicate.headers = headers or None
    return duplicate


def _writable(value: Any) -> Any:
    """pika reads AMQP floats but cannot write them; rather than stop every browse at a record
    that carries one (our services never write one), the copy keeps such a value as its text."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: _writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_writable(v) for v in value]
    return value


class Cycle:
    """One cycle of `queue` (see the module's docstring). `route` decides, record by record, which
    go elsewhere (a `Send`); the rest are put back. After `run`: `records` holds every record
    taken, in queue order (without `keep`, only those held); `taken` counts them; `left_out`
    counts those `has_room` turned away; `sent` those that went elsewhere; `refused` the first send the broker
    would not take, with why (that record and every later one to be sent were put back instead);
    `interrupted` whether a signal stopped a `stoppable` cycle before every held record had gone
    (those that had not were put back)."""

    def __init__(self, connection: BlockingConnection, queue: str,
                 route: Callable[[Record], Send | Drop | None] | None = None,
                 *, on_sent: Callable[[Record], None] | None = None,
                 before_drops: Callable[[list[Record]], None] | None = None,
                 before_leaving: Callable[[list[Record]], None] | None = None,
                 on_held: Callable[[int], None] | None = None, rate: float | None = None,
                 stoppable: bool = False, max_hold_s: float | None = None, stop: Stop | None = None,
                 keep: bool = True, on_put_back: Callable[[Record], None] | None = None,
                 progress: bool = False) -> None:
        self._connection = connection
        self.queue = queue
        self._route = route
        self._on_sent = on_sent
        self._before_drops = before_drops
        self._before_leaving = before_leaving
        self._on_held = on_held  # told how many records are to be sent, before the first goes
        # A caller that runs several cycles (a replay in passes) hears a signal between them too.
        self._stop = stop if stop is not None else Stop(queue, stoppable)
        self._own_stop = stop is None
        self._max_hold_s = max_hold_s
        self._keep = keep  # every record taken in `records`, or (a cycle that moves records) only those held
        self._on_put_back = on_put_back
        self._progress = progress
        # Sends a second at most: the legacy API is what a replay loads, and it is the scarce part.
        self._interval_s = 1.0 / rate if rate else 0.0
        self._next_send = 0.0
        self.records: list[Record] = []
        self.taken = 0
        self.total: int | None = None  # the records there when the cycle started, as the first get said
        self.left_out = 0  # records `has_room` turned away: a replay runs another pass for them
        self._closed = False
        self._take_began = 0.0
        self._first_held_at: float | None = None
        self._to_send = 0
        self._left = 0
        self.sent: list[Record] = []
        self.dropped: list[Record] = []
        self.put_back = 0
        self.refused: tuple[Record, str] | None = None
        self.interrupted = False
        self._sending: Record | None = None

    def run(self) -> Cycle:
        self._stop.sending = False
        hearing: AbstractContextManager[None] = finishing_first(self._stop) if self._own_stop else nullcontext()
        with _lock(self._connection, self.queue), hearing:
            channel = self._connection.channel()
            channel.confirm_delivery()
            try:
                held = self._take_all(channel)
                self._send(channel, held)
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise CliError(self._broken(f"the broker closed the channel ({exc.reply_code} "
                                            f"{str(exc.reply_text)[:200]})")) from None
            except pika.exceptions.AMQPError as exc:
                raise CliError(self._broken(f"lost the broker ({type(exc).__name__})")) from None
            # close-ok comes after the broker has handled every ack sent before it.
            with suppress(pika.exceptions.AMQPError):
                channel.close()
        return self

    def has_room(self) -> bool:
        """Whether one more record can be held to be sent and still leave within `max_hold_s` of
        the first held: RabbitMQ closes a channel whose oldest unacked delivery (a `basic.get`'s
        too) is older than its `consumer_timeout`, handing back every record it held. The
        projection: the time since the first held record, the rest of the take at the pace so far,
        and each send at `rate` (or at the take's pace, if slower). Once it says no after a record
        was held, it says no for the rest of the cycle, so that a pass sends a run of the matching
        records in queue order and the next pass starts where it stopped; before, it says no while
        the rest of the take alone needs more than half the bound (a queue whose take outlasts
        that: the first records chosen are then later ones). Each no counts in `left_out`."""
        if self._max_hold_s is None:
            return True
        if not self._closed:
            now = time.monotonic()
            per_record = (now - self._take_began) / self.taken if self.taken else 0.0
            since_first = now - self._first_held_at if self._first_held_at is not None else 0.0
            rest_of_take = self._left * per_record
            projected = since_first + rest_of_take + (self._to_send + 1) * max(self._interval_s, per_record)
            # The first hold waits until the rest of the take needs half the bound at most, so
            # that the sends have the other half rather than room for one record.
            if projected <= self._max_hold_s and (self._first_held_at is not None
                                                  or rest_of_take <= self._max_hold_s / 2):
                return True
            self._closed = self._first_held_at is not None
        self.left_out += 1
        return False

    def _take_all(self, channel: BlockingChannel) -> list[tuple[int, Record, Send | Drop]]:
        held: list[tuple[int, Record, Send | Drop]] = []
        left: int | None = None
        self._take_began = time.monotonic()
        bar: Progress | None = None
        try:
            while left is None or left > 0:
                method, properties, body = channel.basic_get(self.queue, auto_ack=False)
                if method is None:
                    break  # fewer than counted: something else consumes this queue
                assert method.delivery_tag is not None and properties is not None
                if left is None:
                    left = int(method.message_count or 0) + 1
                    self.total = left
                    bar = Progress(left, sys.stderr, enabled=self._progress, label="going round")
                left -= 1
                self._left = left
                self.taken += 1
                record = Record(self.taken, properties, body or b"")
                if self._keep:
                    self.records.append(record)
                send = self._route(record) if self._route is not None else None
                if send is None:
                    self._put_back(channel, method.delivery_tag, record)
                else:
                    if isinstance(send, Send):
                        self._to_send += 1
                        if self._first_held_at is None:
                            self._first_held_at = time.monotonic()
                    held.append((method.delivery_tag, record, send))
                    if not self._keep:
                        self.records.append(record)
                if bar is not None:
                    bar.advance()
        finally:
            if bar is not None:
                bar.close()
        return held

    def _send(self, channel: BlockingChannel, held: list[tuple[int, Record, Send | Drop]]) -> None:
        self._stop.sending = True
        if self._stop.stopping:  # during the take: nothing goes, every held record goes round
            self.interrupted = bool(held)
            for tag, record, _ in held:
                self._put_back(channel, tag, record)
            return
        drops = [record for _, record, send in held if isinstance(send, Drop)]
        if self._on_held is not None:
            self._on_held(len(held) - len(drops))
        try:
            if held and self._before_leaving is not None:
                self._before_leaving([record for _, record, _ in held])
            if drops and self._before_drops is not None:
                self._before_drops(drops)
        except Exception:
            for tag, record, _ in held:  # nothing leaves: every held record goes round
                self._put_back(channel, tag, record)
            raise
        sent: set[int] = set()
        for tag, record, send in held:
            if isinstance(send, Drop):
                if (self.refused is None) if send.copy_of is None else send.copy_of in sent:
                    channel.basic_ack(tag)
                    self.dropped.append(record)
                else:  # what it follows did not go: it stays, as that did
                    self._put_back(channel, tag, record)
                continue
            if self.refused is None and not self._stop.stopping and self._pace():
                self._sending = record
                try:
                    channel.basic_publish("", send.queue, send.body, send.properties, mandatory=True)
                except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                    self.refused = (record, _why(exc))
                else:
                    channel.basic_ack(tag)  # only now: what it was sent as is confirmed
                    self._sending = None
                    self.sent.append(record)
                    sent.add(record.position)
                    if self._on_sent is not None:
                        self._on_sent(record)
                    continue
                self._sending = None
            # The broker would not take a send, or a signal stopped the sends: this record and the
            # later ones go back instead, behind the others, rather than be handed back (a return
            # would count).
            self.interrupted = self.interrupted or self.refused is None
            self._put_back(channel, tag, record)

    def _pace(self) -> bool:
        """Wait for the next send's turn; the connection's own sleep keeps its heartbeats going.
        False if a signal came meanwhile: that send is not made."""
        if self._interval_s:
            while (wait := self._next_send - time.monotonic()) > 0 and not self._stop.stopping:
                self._connection.sleep(min(wait, PACE_SLICE_S))
            self._next_send = max(self._next_send, time.monotonic() - self._interval_s) + self._interval_s
        return not self._stop.stopping

    def _put_back(self, channel: BlockingChannel, tag: int, record: Record) -> None:
        try:
            channel.basic_publish("", self.queue, record.body, exact_copy(record.properties), mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            channel.basic_nack(tag, requeue=True)  # no copy, so the original stays: one return
            raise CliError(self._broken(f"the broker would not take the copy of record #{record.position} back "
                                        f"onto {self.queue} ({_why(exc)})")) from None
        channel.basic_ack(tag)  # only now: its copy is confirmed
        self.put_back += 1
        if self._on_put_back is not None:
            self._on_put_back(record)

    def _broken(self, what: str) -> str:
        sent = f", {len(self.sent)} sent elsewhere" if self._route is not None else ""
        maybe = (f" (record #{self._sending.position} may have been sent as well)"
                 if self._sending is not None else "")
        return (f"{what} while cycling {self.queue}: {self.put_back} of the {self.taken} records taken were "
                f"put back{sent}{maybe}. None is lost, but the ones not put back yet now stand ahead of those "
                "that were")


def _why(exc: pika.exceptions.AMQPError) -> str:
    return "returned: no such queue" if isinstance(exc, pika.exceptions.UnroutableError) else "refused"


@contextmanager
def _lock(connection: BlockingConnection, queue: str) -> Iterator[None]:
    name = f"{queue}.browse-lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    waiting = False
    while True:
        channel = connection.channel()
        try:
            channel.queue_declare(name, exclusive=True)
            break
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:
                raise CliError(f"the broker does not let this user declare {name!r}, the lock that keeps two "
                               f"browses of {queue} apart (it needs the configure permission on that name)") from None
            if exc.reply_code != 405:  # RESOURCE_LOCKED: another connection holds it
                raise
        if time.monotonic() >= deadline:
            raise CliError(f"another browse of {queue} has held {name!r} for over {LOCK_WAIT_S:.0f} s; "
                           "try again once it is done")
        if not waiting:
            warn(f"waiting for another browse of {queue} to finish")
            waiting = True
        connection.sleep(LOCK_RETRY_S)
    try:
        yield
    finally:
        with suppress(pika.exceptions.AMQPError):
            channel.queue_delete(name)
            channel.close()


class Stop:
    """The first Ctrl-C or SIGTERM of a cycle, which the cycle reads between records."""

    def __init__(self, queue: str, stoppable: bool) -> None:
        self.queue = queue
        self.stoppable = stoppable
        self.requested = False
        self.sending = False  # past the take: the held records are being sent or dropped

    @property
    def stopping(self) -> bool:
        """Whether the cycle is to stop short: a cycle that is not stoppable runs to its end."""
        return self.requested and self.stoppable

    def notice(self) -> str:
        if not self.stoppable:
            return "finishing the browse first, so that the queue keeps its order (interrupt again to stop now)"
        if not self.sending:
            return (f"finishing the browse first, so that the queue keeps its order; then the records chosen go "
                    f"back onto {self.queue} unsent (interrupt again to stop now)")
        return (f"stopping after the record in hand; the records not sent yet go back onto {self.queue} "
                "(interrupt again to stop now)")


@contextmanager
def finishing_first(stop: Stop) -> Iterator[None]:
    """A first Ctrl-C or SIGTERM sets `stop.requested` for the cycle to read (see the module's
    docstring); a second one stops at once. A cycle that is not stoppable raises
    KeyboardInterrupt once it has ended. Signal handlers belong to the main thread only: in
    another thread a cycle hears no signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        warn(stop.notice())

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop.requested and not stop.stoppable:
        raise KeyboardInterrupt
