"""An in-memory world for the real handlers and the real executor: a broker, a store and a
legacy API, each a model, and faults injected at chosen effects.

Every call that a handler or the executor makes into the broker, the store or the legacy API
is an effect point, numbered across the whole run. A run names the points where it injects a
fault: the process dies just before the effect (`crash`), or the effect fails in one of the
ways it can (see FAULTS). After a crash a fresh process takes over, and the broker hands back
what the dead one held. The world runs until nothing is left to do, then the test checks its
invariants.

The broker model: at-least-once redelivery (`redelivered`, `x-delivery-count`), confirms that
can be refused or lost with the channel, dead-lettering from the wait queues that can
duplicate, settles dropped when their channel is gone, and RabbitMQ 4.x's delivery limit of 20,
counted the way 4.0-4.2 count it (every return) or the way 4.3 does (no requeueing nack).
The store model applies the status rule of `lifecycle.may_record` as MongoStore's filters do,
and keeps the failure queue's index (`regbridge.failure_index`) as MongoStore writes it.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pika.spec import BasicProperties
from pymongo.errors import AutoReconnect, OperationFailure

from poller.service import Poller
from regbridge.amqp import Delivery, PublishError
from regbridge.durable import Durable
from regbridge.executor import ERRORS_HEADER, Executor
from regbridge.failure_index import PUBLISHING, QUEUED
from regbridge.lifecycle import (
    Accepted,
    Completed,
    LegacyFailed,
    NotFound,
    PollOutcome,
    Processing,
    Rejected,
    State,
    SubmitOutcome,
    Transient,
    may_record,
)
from regbridge.messages import FailureRecord
from regbridge.plans import RECORD_ID_HEADER, AttemptAccepted, AttemptFailed, RecordIndexed, UserStatus, Write
from regbridge.settings import PollerSettings, SubmitterSettings
from regbridge.store import Attempt, UserState, WriteRefused
from submitter.service import Submitter

INBOUND = "registrations"
PENDING = "registrations.pending"
FAILED = "registrations.failed"
NOW = 1_800_000_000.0
# RabbitMQ 4.x's default delivery limit on quorum queues.
DELIVERY_LIMIT = 20

# The ways each kind of effect can fail, besides the process dying just before it.
FAULTS: dict[str, tuple[str, ...]] = {
    "read": ("crash", "outage", "error", "error_always", "disconnect"),
    "reset": ("crash", "outage", "disconnect"),
    "write": ("crash", "outage", "refused", "refused_user", "disconnect"),
    "index": ("crash", "outage", "refused", "error", "disconnect"),  # a failure record's index entry
    "post": ("crash", "transient", "lost_answer", "disconnect"),
    "get": ("crash", "transient", "disconnect"),
    "publish": ("crash", "nack", "lost_confirm", "disconnect"),
    "ack": ("crash", "lost"),
    "nack": ("crash", "lost"),
    "defer": ("crash", "disconnect"),
    "deadletter": ("dup",),
}


class Crash(BaseException):
    """The process dies here: nothing after this line of it runs."""


class NotSettled(AssertionError):
    pass


@dataclass(frozen=True)
class Fault:
    index: int
    mode: str


@dataclass
class Message:
    body: bytes
    message_id: str | None
    deliveries: int = 0  # how often it went back to its queue
    counted: int = 0  # of those, what the broker counts (`x-delivery-count`, the delivery limit)
    due: float = 0.0  # when a wait queue dead-letters it
    headers: dict[str, Any] | None = None  # as published

    @property
    def record_id(self) -> str | None:
        """A failure record's id: its header (`plans.RECORD_ID_HEADER`), not its message_id."""
        found = (self.headers or {}).get(RECORD_ID_HEADER)
        return found if isinstance(found, str) else None


def lineage_of_key(attempt_key: str) -> str | None:
    """The inbound message_id inside an attempt key (`user|mid:<id>|mark`)."""
    _, sep, rest = attempt_key.partition("|mid:")
    return rest.split("|")[0] if sep else None


@dataclass
class Windows:
    """The windows the guarantees doc lists, as they stand at each moment of the run."""

    post_unrecorded: set[str] = field(default_factory=set)  # a POST made, its request id not yet on record
    record_unmarked: set[str] = field(default_factory=set)  # a failure record out, its attempt not yet marked
    dup_posts_allowed: set[str] = field(default_factory=set)
    dup_records_allowed: set[str] = field(default_factory=set)
    # A message published again under a failed attempt's key, taken before it clears that attempt.
    uncleared: set[str] = field(default_factory=set)
    taken_for_earlier: set[str] = field(default_factory=set)
    # A copy sent round after an error is out; the delivery it copies is not yet acked.
    copy_unacked: set[str] = field(default_factory=set)

    def fault_fired(self) -> None:
        self.dup_posts_allowed |= self.post_unrecorded | self.copy_unacked
        self.dup_records_allowed |= self.record_unmarked | self.copy_unacked
        self.taken_for_earlier |= self.uncleared


class World:
    def __init__(self, faults: Iterable[Fault], *, submitter: SubmitterSettings, poller: PollerSettings,
                 submits: list[str], statuses: list[str], broker_version: str = "4.0") -> None:
        self.broker_version = broker_version
        self.dropped: list[Message] = []
        self.faults = {f.index: f.mode for f in faults}
        self.fired: list[tuple[str, str]] = []
        self.points: list[str] = []
        self.now = NOW
        self.queues: dict[str, list[Message]] = defaultdict(list)
        self.windows = Windows()
        self.store = ModelStore(self)
        self.legacy = ModelLegacy(self, submits, statuses)
        self.users_of: dict[str, str] = {}  # user_id → the lineage (inbound message_id) it belongs to
        self._settings = (submitter, poller)
        self.generation = 1
        self.next_tag = 0
        self.in_hand: dict[int, tuple[str, Message, int]] = {}  # tag → queue, message, generation
        self.deferred: list[tuple[float, Delivery, Callable[[], None]]] = []
        self.acked: list[str | None] = []
        self.index_disagreements: list[str] = []
        self._processes()

    # ---- faults ---------------------------------------------------------------------------

    def at(self, kind: str, lineage: str | None = None) -> str | None:
        """An effect point: the mode of the fault injected here, if any (a crash raises)."""
        self._read_index()
        index = len(self.points)
        self.points.append(kind)
        mode = self.faults.get(index)
        if mode is None or mode not in FAULTS[kind]:
            return None
        self.fired.append((kind, mode))
        self.windows.fault_fired()
        if mode == "crash":
            raise Crash(f"crash before effect {index} ({kind})")
        if mode == "disconnect":
            self.lose_channel()
            return None
        return mode

    def _read_index(self) -> None:
        """A reader of the failure index at this moment: what it would get wrong. Nothing is
        excused but a record whose entry a refusal or an error kept out (it went out without)."""
        on_queue = {m.record_id for m in self.queues[FAILED] if m.record_id is not None}
        index = self.store.index
        for missing in on_queue - set(index) - self.store.unindexed:
            self.index_disagreements.append(f"record {missing} on the queue without an entry (point "
                                            f"{len(self.points)})")
        for rid, (state, _) in index.items():
            if state == QUEUED and rid not in on_queue:
                self.index_disagreements.append(f"entry {rid} queued without its record (point {len(self.points)})")

    # ---- processes --------------------------------------------------------------------------

    def _processes(self) -> None:
        submitter_settings, poller_settings = self._settings
        broker = ModelBroker(self)
        durable = Durable(broker.stopping, max_delay_s=0.0)
        clock = self.clock
        submitter = Submitter(submitter_settings, store=self.store, legacy=self.legacy, durable=durable,
                              clock=clock, rng=lambda: 0.5)
        poller = Poller(poller_settings, legacy=self.legacy, clock=clock)
        self.executors = {
            INBOUND: Executor(submitter, broker=broker, store=self.store, durable=durable, failed_queue=FAILED,
                              clock=clock),
            PENDING: Executor(poller, broker=broker, store=self.store, durable=durable, failed_queue=FAILED,
                              clock=clock),
        }

    def clock(self) -> float:
        return self.now

    def crash(self) -> None:
        """The process died: the broker takes back all it held; a fresh process starts."""
        self.generation += 1
        self._hand_back(lambda gen: True)
        self.deferred.clear()
        self._processes()

    def _hand_back(self, which: Callable[[int], bool]) -> None:
        for tag in [t for t, (_, _, gen) in self.in_hand.items() if which(gen)]:
            queue, message, _ = self.in_hand.pop(tag)
            self._return(queue, message, nacked=False)

    def _return(self, queue: str, message: Message, *, nacked: bool) -> None:
        """A message goes back to the head of its queue. RabbitMQ 4.0-4.2 count every return
        against a delivery limit of 20 and drop a message past it; 4.3 counts no requeueing nack."""
        message.deliveries += 1
        if not (nacked and self.broker_version == "4.3"):
            message.counted += 1
        if message.counted > DELIVERY_LIMIT:
            self.dropped.append(message)
            return
        self.queues[queue].insert(0, message)

    def lose_channel(self) -> None:
        """Every delivery in hand goes back to the broker; settles of them are dropped."""
        self.generation += 1
        self._hand_back(lambda gen: gen < self.generation)

    # ---- the broker's side ------------------------------------------------------------------

    def deliver(self, queue: str) -> Delivery:
        message = self.queues[queue].pop(0)
        self.next_tag += 1
        tag = self.next_tag
        self.in_hand[tag] = (queue, message, self.generation)
        if queue == INBOUND and message.deliveries == 0 and message.message_id is not None and any(
                lineage_of_key(k) == message.message_id and a.failed for k, a in self.store.attempts.items()):
            self.windows.uncleared.add(message.message_id)
        headers = dict(message.headers or {})
        if message.counted:
            headers["x-delivery-count"] = message.counted
        props = BasicProperties(message_id=message.message_id, headers=headers or None, delivery_mode=2)
        return Delivery(message.body, props, message.deliveries > 0, tag, queue, self.generation, self.now)

    def enqueue(self, queue: str, body: bytes, message_id: str | None, delay_s: float = 0.0,
                headers: dict[str, Any] | None = None) -> None:
        self.queues[queue].append(Message(body, message_id, due=self.now + delay_s, headers=headers))
        if ERRORS_HEADER in (headers or {}) and message_id is not None:
            self.windows.copy_unacked.add(message_id)
        if queue == FAILED and message_id is not None:
            self.windows.record_unmarked.add(message_id)

    def settle(self, delivery: Delivery, *, ack: bool) -> None:
        if delivery.generation != self.generation:
            return  # its channel is gone: the broker has taken it back already
        assert delivery.delivery_tag in self.in_hand, f"delivery {delivery.delivery_tag} settled twice"
        queue, message, _ = self.in_hand.pop(delivery.delivery_tag)
        if not ack:
            self._return(queue, message, nacked=True)
            return
        lineage = message.message_id
        self.acked.append(lineage)
        self.windows.copy_unacked.discard(lineage or "")
        assert lineage is None or lineage in self.windows.taken_for_earlier or self.continues(lineage), (
            f"{lineage} acked from {queue} before its outcome was durable")
        if lineage is not None and not self._has_attempt(lineage):
            # No attempt to mark: the window of a second record closes with the ack.
            self.windows.record_unmarked.discard(lineage)

    def _has_attempt(self, lineage: str) -> bool:
        return any(lineage_of_key(key) == lineage for key in self.store.attempts)

    def continues(self, lineage: str) -> bool:
        """Whether the message's lineage lives on durably: a message of it in a queue or in
        hand, its failure record out, or its user registered."""
        held = [m for q in self.queues.values() for m in q] + [m for _, m, _ in self.in_hand.values()]
        if any(m.message_id == lineage for m in held):
            return True
        user = next((u for u, mid in self.users_of.items() if mid == lineage), None)
        return user is not None and self.store.users.get(user, ("",))[0] == State.REGISTERED

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, max_steps: int = 300) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise NotSettled(f"still busy after {max_steps} steps: {self.describe()}")

    def step(self) -> bool:
        for queue in (INBOUND, PENDING):
            if self.queues[queue]:
                delivery = self.deliver(queue)
                self._guarded(delivery, partial(self.executors[queue].run, delivery))
                return True
        return self._advance()

    def _advance(self) -> bool:
        """Move the clock to the next deferred retry or the next wait queue's expiry."""
        waits = [(q[0].due, name) for name, q in self.queues.items() if ".wait." in name and q]
        retries = [(due, i) for i, (due, _, _) in enumerate(self.deferred)]
        if not waits and not retries:
            return False
        if retries and (not waits or min(retries)[0] <= min(waits)[0]):
            due, index = min(retries)
            _, delivery, work = self.deferred.pop(index)
            self.now = max(self.now, due)
            if delivery.generation == self.generation:
                self._guarded(delivery, work)
            return True
        due, name = min(waits)
        self.now = max(self.now, due)
        message = self.queues[name].pop(0)
        copies = 2 if self.at("deadletter", message.message_id) == "dup" else 1
        for _ in range(copies):
            self.queues[PENDING].append(Message(message.body, message.message_id))
        return True

    def _guarded(self, delivery: Delivery, work: Callable[[], None]) -> None:
        """What the runtime's worker does around the executor."""
        try:
            work()
        except Crash:
            self.crash()
        except AssertionError:
            raise
        except Exception:
            # The runtime's last resort: the delivery goes back after a pause.
            self.settle(delivery, ack=False)

    def describe(self) -> str:
        held = {q: len(m) for q, m in self.queues.items() if m}
        return f"queues {held}, in hand {len(self.in_hand)}, deferred {len(self.deferred)}, faults {self.fired}"

    # ---- what the test reads ------------------------------------------------------------------

    def records(self) -> list[tuple[str | None, FailureRecord]]:
        return [(m.message_id, FailureRecord.decode(m.body)) for m in self.queues[FAILED]]

    def busy(self) -> bool:
        return bool(self.in_hand or self.deferred or any(q for n, q in self.queues.items() if n != FAILED))


class ModelBroker:
    """The broker as the executor sees it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.stopping = threading.Event()

    def publish(self, routing_key: str, body: bytes, properties: BasicProperties) -> Future[None]:
        world, generation = self.world, self.world.generation
        mode = world.at("publish", properties.message_id)
        future: Future[None] = Future()
        if (generation != world.generation and mode is None) or mode == "nack":
            future.set_exception(PublishError("the broker refused the message (nack)"))
            return future
        delay = _ttl(routing_key)
        world.enqueue(routing_key, body, properties.message_id, delay, properties.headers)
        if mode == "lost_confirm":  # the broker has it; the channel died before its confirm
            world.windows.fault_fired()  # the record is out, unconfirmed: inside the window
            world.lose_channel()
            future.set_exception(PublishError("unconfirmed when the channel closed"))
            return future
        future.set_result(None)
        return future

    def forward(self, delivery: Delivery, routing_key: str, body: bytes, properties: BasicProperties) -> None:
        future = self.publish(routing_key, body, properties)
        if future.exception() is None:
            self.ack(delivery)
        else:
            self.nack(delivery, requeue=True)

    def current(self, delivery: Delivery) -> bool:
        return delivery.generation == self.world.generation

    def ack(self, delivery: Delivery) -> None:
        if self.world.at("ack", delivery.properties.message_id) == "lost":
            self.world.lose_channel()
            return
        self.world.settle(delivery, ack=True)

    def hand_back(self, delivery: Delivery, queue: str, error: BaseException) -> None:
        self.nack(delivery)  # the runtime's pause before it is time the model does not need

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        if self.world.at("nack", delivery.properties.message_id) == "lost":
            self.world.lose_channel()
            return
        self.world.settle(delivery, ack=False)

    def defer(self, delivery: Delivery, delay_s: float, work: Callable[[], None]) -> None:
        self.world.at("defer", delivery.properties.message_id)
        self.world.deferred.append((self.world.now + delay_s, delivery, work))


def _ttl(queue: str) -> float:
    if ".wait." not in queue:
        return 0.0
    return int(queue.rsplit(".", 1)[1].removesuffix("ms")) / 1000


class ModelStore:
    """MongoDB as the handlers and the executor see it, with outages and refusals on cue."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.users: dict[str, tuple[str, str | None, dict[str, str] | None]] = {}
        self.attempts: dict[str, Attempt] = {}
        self.history: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
        self.refused: set[str] = set()
        self.broken_reads = False
        # The failure queue's index: record id -> (state, the world's time of the write), the
        # token of each entry's last whole write, and the ids whose entry a fault kept out.
        self.index: dict[str, tuple[str, float]] = {}
        self.index_tokens: dict[str, str] = {}
        self.unindexed: set[str] = set()

    def _point(self, kind: str, lineage: str | None) -> str | None:
        mode = self.world.at(kind, lineage)
        if mode == "outage":
            raise AutoReconnect("connection refused")  # this call only: Durable tries again
        if mode == "error":
            raise OperationFailure("unexpected server error", 8000)
        if mode == "error_always":
            self.broken_reads = True
        if kind == "read" and self.broken_reads:
            raise OperationFailure("unexpected server error", 8000)
        return mode

    def user(self, user_id: str) -> UserState:
        self._point("read", self.world.users_of.get(user_id))
        doc = self.users.get(user_id)
        return UserState(None, None) if doc is None else UserState(doc[0], doc[1])

    def attempt(self, key: str) -> Attempt | None:
        self._point("read", lineage_of_key(key))
        return self.attempts.get(key)

    def reset_attempt(self, key: str, publish: str) -> None:
        self._point("reset", lineage_of_key(key))
        self.world.windows.uncleared.discard(lineage_of_key(key) or "")
        self.attempts[key] = Attempt(None, False, publish=publish)

    def apply(self, write: Write) -> bool:
        if isinstance(write, RecordIndexed):
            return self._index(write)
        lineage = (self.world.users_of.get(write.user_id) if isinstance(write, UserStatus)
                   else lineage_of_key(write.attempt_key))
        mode = self._point("write", lineage)
        kind = _kind(write)
        if mode == "refused":
            self.refused.add(kind)
        if mode == "refused_user":
            self.refused.add("user")
        if isinstance(write, AttemptAccepted):
            self.attempts[write.attempt_key] = Attempt(write.request_id, False)
            if lineage is not None:
                self.world.windows.post_unrecorded.discard(lineage)
            return self._status(UserStatus(write.user_id, State.SUBMITTED, write.request_id), kind)
        if isinstance(write, AttemptFailed):
            self._refuse_if(kind)
            self.attempts[write.attempt_key] = Attempt(write.request_id, True, write.error)
            if lineage is not None:
                self.world.windows.record_unmarked.discard(lineage)
            return True
        return self._status(write, kind)

    def _index(self, write: RecordIndexed) -> bool:
        # The record id is the inbound message_id wherever the message had one: its lineage.
        mode = self.world.at("index", write.record_id)
        if mode == "outage":
            raise AutoReconnect("connection refused")  # this call only: Durable tries again
        if mode in ("refused", "error"):
            self.unindexed.add(write.record_id)  # the record goes out without it
            raise (WriteRefused("Document failed validation (index)") if mode == "refused"
                   else OperationFailure("Index already exists with a different name", 85))
        if write.entry is not None:
            self.index[write.record_id] = (write.state, self.world.now)
            self.index_tokens[write.record_id] = write.token
        elif self.index.get(write.record_id, ("", 0.0))[0] == PUBLISHING and \
                self.index_tokens.get(write.record_id) == write.token:
            self.index[write.record_id] = (write.state, self.world.now)
        return True

    def _refuse_if(self, kind: str) -> None:
        if kind in self.refused or (kind.startswith("user") and "user" in self.refused):
            raise WriteRefused(f"Document failed validation ({kind})")

    def _status(self, write: UserStatus, kind: str) -> bool:
        doc = self.users.get(write.user_id)
        if doc is not None and not may_record(doc[0], doc[1], write.request_id):
            return False  # the filter matches nothing: no document is written, none refused
        self._refuse_if(kind)
        error = None if write.error is None else {"stage": write.error.stage, "reason": write.error.reason}
        self.users[write.user_id] = (write.status.value, write.request_id, error)
        self.history[write.user_id].append((write.status.value, write.request_id))
        return True

    def ping(self) -> bool:
        return True


def _kind(write: Write) -> str:
    if isinstance(write, UserStatus):
        return f"user-{write.status.value}"
    if isinstance(write, AttemptAccepted):
        return "user-submitted"  # the same document write as a resumed hand-on's
    return "attempt-failed"


class ModelLegacy:
    """The legacy API: POSTs answered from a script, each request id's status from another. It
    honours the Idempotency-Key as legacy-sim does: a POST whose key it holds is answered with
    that key's request id and registers nothing."""

    def __init__(self, world: World, submits: list[str], statuses: list[str]) -> None:
        self.world = world
        self.submits = submits
        self.statuses = statuses
        self.posts = 0
        self.registered: dict[str, str] = {}  # request id → lineage
        self.request_id_of_key: dict[str, str] = {}
        self.polls: Counter[str] = Counter()
        self.posts_of: Counter[str] = Counter()  # accepted POSTs per lineage, replayed ones included
        self.registrations_of: Counter[str] = Counter()  # registrations made in the run, per attempt key

    def seed(self, request_id: str, lineage: str, idempotency_key: str) -> None:
        """A registration made before the run, its key still held."""
        self.registered[request_id] = lineage
        self.request_id_of_key[idempotency_key] = request_id

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        lineage = self.world.users_of.get(json.loads(body)["user_id"])
        mode = self.world.at("post", lineage)
        self.world.windows.uncleared.discard(lineage or "")  # a POST comes only after the clearing
        if mode == "transient":
            return Transient("legacy API unreachable: NewConnectionError")
        answer = self.submits[min(self.posts, len(self.submits) - 1)]
        self.posts += 1
        if answer == "busy":
            return Transient("legacy API busy: HTTP 503", 503)
        if answer == "transport":
            return Transient("legacy API timed out: ReadTimeoutError")
        if answer == "reject":
            return Rejected("rejected by the legacy API: cpf: must have 11 digits", 400)
        request_id = self.request_id_of_key.get(idempotency_key)
        if request_id is None:
            request_id = f"R{len(self.registered) + 1}"
            self.registered[request_id] = lineage or ""
            self.request_id_of_key[idempotency_key] = request_id
            self.registrations_of[idempotency_key] += 1
        if lineage is not None:
            self.posts_of[lineage] += 1
            self.world.windows.post_unrecorded.add(lineage)
        if mode == "lost_answer":  # accepted, but the answer never came back
            if lineage is not None:
                self.world.windows.dup_posts_allowed.add(lineage)
            return Transient("legacy API timed out: ReadTimeoutError")
        return Accepted(request_id)

    def status(self, request_id: str) -> PollOutcome:
        mode = self.world.at("get", self.registered.get(request_id))
        if mode == "transient":
            return Transient("status endpoint busy: HTTP 503", 503)
        if request_id not in self.registered:
            return NotFound("the status endpoint does not know this request id: unknown", 404)
        answer = self.statuses[min(self.polls[request_id], len(self.statuses) - 1)]
        self.polls[request_id] += 1
        outcomes: dict[str, PollOutcome] = {
            "processing": Processing(), "completed": Completed(),
            "failed": LegacyFailed("rejected by the legacy system"),
            "unknown": NotFound("the status endpoint does not know this request id: unknown", 404),
        }
        return outcomes[answer]
