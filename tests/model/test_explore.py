"""Every crash point explored: the real handlers and executor in a model world, with a fault at
every effect of every scenario, in every way that effect can fail.

For each scenario a clean run counts its effect points. Then, for each point k and each fault
that fits its kind (`world.FAULTS`), a run injects that fault at k, lets fresh processes
redeliver until everything settles, and checks the invariants. A second sweep adds a crash a
few effects after the first fault, so that recovery itself is crashed. In the spirit of
FoundationDB's simulation and TigerBeetle's VOPR, but exhaustive over one or two faults rather
than random.

Invariants, after every run:
- it settles: nothing left in a queue, in hand or deferred (no loop);
- every inbound message ends in exactly one terminal outcome: its user `registered`, or a
  failure record of the expected stage;
- nothing is acked before its outcome is durable (checked at each ack, in `World.settle`), and
  no delivery is settled twice;
- no status moves backwards within an attempt;
- at most one failure record and one POST per message, unless a fault struck inside a window
  that docs/guarantees.md lists (a POST whose request id is not yet on record; a failure
  record whose attempt is not yet marked);
- at most one registration per message, inside those windows too: the model legacy API honours
  the Idempotency-Key, so a POST made again is answered with the first one's request id.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from world import FAILED, FAULTS, INBOUND, NOW, PENDING, Fault, Message, NotSettled, World, lineage_of_key

from regbridge.failure_index import PUBLISHING, QUEUED
from regbridge.lifecycle import State
from regbridge.messages import PendingMessage, Registration
from regbridge.settings import poller_settings, submitter_settings
from regbridge.store import Attempt

SUBMITTER = submitter_settings({"SUBMIT_MAX_ATTEMPTS": "3", "SUBMIT_BACKOFF_BASE_S": "1",
                                "SUBMIT_BACKOFF_MAX_S": "4", "POLL_FIRST_DELAY_S": "10", "POLL_INTERVAL_S": "2"})
POLLER = poller_settings({"POLL_FIRST_DELAY_S": "10", "POLL_INTERVAL_S": "2", "POLL_DEADLINE_S": "16"})
USER = "u-1"
MID = "m-1"
BODY = json.dumps({"user_id": USER, "name": "Maria", "cpf": "12345678909"}).encode()


@dataclass(frozen=True)
class Scenario:
    name: str
    expect: str  # "registered", or the failure record's stage
    submits: list[str] = field(default_factory=lambda: ["accept"])
    statuses: list[str] = field(default_factory=lambda: ["processing", "completed"])
    setup: Callable[[World], None] = lambda world: world.queues[INBOUND].append(Message(BODY, MID))
    posts: int = 1  # POSTs a clean run makes (at most)


def _key() -> str:
    return Registration.decode(BODY, message_id=MID, max_bytes=65536).attempt_key


def _redelivered_with_request_id(world: World) -> None:
    key = _key()
    world.store.attempts[key] = Attempt("R0", False)
    world.store.users[USER] = ("submitted", "R0", None)
    world.legacy.seed("R0", MID, key)
    world.queues[INBOUND].append(Message(BODY, MID, deliveries=1))


def _pending_twice(world: World) -> None:
    key = _key()
    world.store.attempts[key] = Attempt("R0", False)
    world.store.users[USER] = ("submitted", "R0", None)
    world.legacy.seed("R0", MID, key)
    pending = PendingMessage(request_id="R0", user_id=USER, payload=json.loads(BODY), attempt_key=key,
                             submitted_at=NOW - 12, message_id=MID, received_at=NOW - 12, polls=1)
    # Two copies, as at-least-once dead-lettering can make: two pollers take one each.
    world.queues[PENDING] += [Message(pending.encode(), MID), Message(pending.encode(), MID)]


def _already_registered(world: World) -> None:
    world.store.users[USER] = ("registered", "R0", None)
    world.queues[INBOUND].append(Message(BODY, MID))


def _replay_after_a_failure(world: World) -> None:
    # The legacy API no longer holds the earlier attempt's key (it is past its retention), so
    # the POST registers anew.
    world.store.attempts[_key()] = Attempt("OLD", True)
    world.store.users[USER] = ("failed", "OLD", {"stage": "legacy", "reason": "no"})
    world.queues[INBOUND].append(Message(BODY, MID))


def _republished_within_the_retention(world: World) -> None:
    # The same, but the legacy API still holds the earlier attempt's key: the new publish's own
    # mark in its Idempotency-Key makes the POST a new registration all the same.
    _replay_after_a_failure(world)
    world.legacy.seed("OLD", MID, _key())


def _invalid(world: World) -> None:
    world.queues[INBOUND].append(Message(b'{"user_id": ', MID))


SCENARIOS = [
    Scenario("submit accepted, completed", "registered"),
    Scenario("submit refused", "submit", submits=["reject"], posts=0),
    Scenario("busy, then accepted", "registered", submits=["busy", "accept"]),
    Scenario("transport errors past the budget", "submit", submits=["transport"], posts=0),
    Scenario("legacy failed", "legacy", statuses=["processing", "failed"]),
    Scenario("unknown request id", "poll", statuses=["unknown"]),
    Scenario("still processing past the deadline", "timeout", statuses=["processing"]),
    Scenario("invalid message", "validation", setup=_invalid, posts=0),
    Scenario("redelivered with a request id on record", "registered", setup=_redelivered_with_request_id, posts=0),
    Scenario("a duplicate pending message, completed", "registered", setup=_pending_twice, posts=0),
    Scenario("two pollers on one id, failed", "legacy", statuses=["failed"], setup=_pending_twice, posts=0),
    Scenario("user registered already", "registered", setup=_already_registered, posts=0),
    Scenario("a new attempt after a failure", "registered", setup=_replay_after_a_failure),
    Scenario("published again while the legacy API holds the earlier key", "registered",
             setup=_republished_within_the_retention),
]
# The lineage (inbound message_id) of each user, for the model's windows.
LINEAGES = {USER: MID}


BROKERS = ["4.0", "4.3"]


def run(scenario: Scenario, faults: list[Fault], broker: str = "4.0") -> World:
    world = World(faults, submitter=SUBMITTER, poller=POLLER, submits=scenario.submits, statuses=scenario.statuses,
                  broker_version=broker)
    world.users_of.update(LINEAGES)
    scenario.setup(world)
    world.run()
    return world


def check(scenario: Scenario, world: World) -> None:
    assert not world.busy(), world.describe()
    assert not world.dropped, f"{len(world.dropped)} messages dropped by the delivery limit"
    records = [r for mid, r in world.records() if mid == MID]
    stages = {r.error.stage for r in records}
    user = world.store.users.get(USER)
    registered = user is not None and user[0] == State.REGISTERED
    refused = any(mode.startswith("refused") for _, mode in world.fired)
    poisoned = any(mode == "error_always" for _, mode in world.fired)
    # Exactly one terminal outcome. A user registered before this message was taken stays so;
    # the message itself is acked without a trace, unless it became poison.
    if scenario.setup is _already_registered:
        assert registered and (not records or poisoned), records
        return
    if not records and not registered and MID in world.windows.taken_for_earlier:
        # Published again under the key of an attempt that failed, and cut off before it cleared
        # that attempt: it is taken for the earlier publish (docs/guarantees.md lists it).
        assert user is not None and user[0] == State.FAILED and user[1] == "OLD", user
        return
    assert registered != bool(records), f"registered={registered}, records={records}"
    # A write refused for good is a `store` failure; a store that always errors makes the
    # message poison, a `validation` failure after POISON_DELIVERIES.
    expected = {scenario.expect} | ({"store"} if refused else set()) | ({"validation"} if poisoned else set())
    if scenario.expect == "registered" and not refused and not poisoned:
        assert registered, f"expected registered, got records of {stages}"
    else:
        assert (registered and "registered" in expected) or stages <= expected, (stages, expected)
    if scenario.expect == "registered" and refused and not registered:
        assert stages == {"store"}, stages
    # At most one record, one POST, outside the windows the docs list.
    # A store that errors on every read makes a message poison, and its record goes out
    # without the attempt's check (docs/guarantees.md lists it).
    if MID not in world.windows.dup_records_allowed and not poisoned:
        assert len(records) <= 1, f"{len(records)} failure records"
    else:
        assert len(records) <= 1 + len(world.fired)  # one more for each fault inside the window
    # POSTs may repeat inside the windows; registrations may not, the key sees to it.
    posts = world.legacy.posts_of[MID]
    republished = scenario.setup in (_replay_after_a_failure, _republished_within_the_retention)
    budget = scenario.posts + (1 if republished else 0)
    allowed = max(1, budget) + (len(world.fired) if MID in world.windows.dup_posts_allowed else 0)
    assert posts <= allowed, f"{posts} POSTs"
    registrations = sum(n for key, n in world.legacy.registrations_of.items() if lineage_of_key(key) == MID)
    assert registrations <= min(1, budget), f"{registrations} registrations"
    # The user's document agrees with the outcome, unless MongoDB refused that write.
    if records and user is not None and not refused and not poisoned and scenario.setup is not _already_registered:
        assert user[0] == State.FAILED
    # No status moves backwards within an attempt.
    _monotonic(world.store.history[USER])
    _index_agrees(world)


def _index_agrees(world: World) -> None:
    """Read at every effect point of the run (`World._read_index`), the failure queue's index
    never misses a record on the queue (unless a refusal or an error kept its entry out) and
    never says `queued` of a record that is not there. At the end it is unsure (`publishing`)
    of an entry only after a fault."""
    assert not world.index_disagreements, world.index_disagreements[:3]
    on_queue = {m.record_id for m in world.queues[FAILED] if m.record_id is not None}
    index = world.store.index
    assert on_queue - world.store.unindexed <= set(index), f"records without an entry: {on_queue - set(index)}"
    queued = {rid for rid, (state, _) in index.items() if state == QUEUED}
    assert queued <= on_queue, f"entries queued whose record is not on the queue: {queued - on_queue}"
    unsure = {rid for rid, (state, _) in index.items() if state != QUEUED}
    assert not unsure or world.fired, f"entries left {PUBLISHING} without a fault: {unsure}"


def _monotonic(history: list[tuple[str, str | None]]) -> None:
    rank = {"submitted": 1, "registered": 2, "failed": 2}
    last: dict[str | None, str] = {}
    finals: set[str] = set()
    for status, request_id in history:
        assert "registered" not in finals, f"a status after registered: {history}"
        before = last.get(request_id)
        assert before is None or rank[status] >= rank[before], f"backwards: {history}"
        assert before not in ("registered", "failed") or status == before, f"a final status changed: {history}"
        last[request_id] = status
        if status == "registered":
            finals.add(status)


def single_faults(scenario: Scenario) -> Iterator[list[Fault]]:
    clean = run(scenario, [])
    check(scenario, clean)
    for index, kind in enumerate(clean.points):
        for mode in FAULTS[kind]:
            yield [Fault(index, mode)]


def double_faults(scenario: Scenario) -> Iterator[list[Fault]]:
    """A crash a little after a first fault: recovery crashed too."""
    clean = run(scenario, [])
    for index, kind in enumerate(clean.points):
        for mode in FAULTS[kind]:
            for later in range(1, 6):
                yield [Fault(index, mode), Fault(index + later, "crash")]


EXPLORED: Counter[str] = Counter()


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_single_fault_settles_with_one_outcome(scenario: Scenario, broker: str) -> None:
    for faults in single_faults(scenario):
        _explore(scenario, faults, broker)


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_crash_during_recovery_settles_with_one_outcome(scenario: Scenario, broker: str) -> None:
    for faults in double_faults(scenario):
        _explore(scenario, faults, broker)


def _explore(scenario: Scenario, faults: list[Fault], broker: str) -> None:
    try:
        world = run(scenario, faults, broker)
        check(scenario, world)
    except (AssertionError, NotSettled) as exc:
        raise AssertionError(f"{scenario.name} on RabbitMQ {broker} with {faults}: {exc}") from exc
    EXPLORED["runs"] += 1
    EXPLORED["faults fired"] += len(world.fired)


def test_zz_report_the_count_of_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints how many runs the explorer made (run with -s to see it in the output)."""
    with capsys.disabled():
        print(f"\nexplorer: {EXPLORED['runs']} runs, {EXPLORED['faults fired']} faults fired, "
              f"{len(SCENARIOS)} scenarios, brokers {', '.join(BROKERS)}")
    if EXPLORED["runs"]:
        assert EXPLORED["runs"] > 1000
