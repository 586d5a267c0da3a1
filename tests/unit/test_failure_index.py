"""The failure index's pure rules: what an entry's upsert writes, how a reconciliation brings the
index into line with one whole pass of the queue, and where readers may start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from regbridge.failure_index import (
    LEAVING,
    LOW_MARGIN,
    PUBLISHING,
    PUBLISHING_GRACE,
    QUEUED,
    RECONCILE_GRACE,
    STATES,
    WINDOW,
    IndexEntry,
    Seen,
    entry_update,
    reconcile,
    safe_low,
    window_of,
)

PASS = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
OLD = PASS - RECONCILE_GRACE - timedelta(seconds=1)
RECENT = PASS - RECONCILE_GRACE + timedelta(seconds=1)
ANCIENT = PASS - PUBLISHING_GRACE - timedelta(seconds=1)


def test_an_upsert_sets_every_field_and_the_seq_only_on_insert() -> None:
    entry = IndexEntry("m-1", "legacy", "no", "u-1", "R1", PASS, "{}")
    update = entry_update(entry, QUEUED, seq=7, now=PASS, token="t")
    assert update["$setOnInsert"] == {"seq": 7}
    assert update["$set"]["state"] == QUEUED and update["$set"]["token"] == "t"
    assert update["$set"]["body"] == "{}" and update["$set"]["failed_at"] == PASS


def test_reconcile_adds_confirms_and_deletes_what_the_pass_says() -> None:
    entries = {
        "queued-there": Seen(QUEUED, OLD, "a"),
        "publishing-there": Seen(PUBLISHING, OLD, "b"),
        "leaving-there": Seen(LEAVING, OLD, "c"),  # a removal that never happened
        "queued-gone": Seen(QUEUED, OLD, "d"),  # a reader outside the bridge took it
        "publishing-gone": Seen(PUBLISHING, ANCIENT, "e"),  # a crash before the publish
        "publishing-held": Seen(PUBLISHING, OLD, "h"),  # a publish a broker alarm may still hold
        "leaving-gone": Seen(LEAVING, OLD, "f"),  # a crash after the ack
        "recent-gone": Seen(PUBLISHING, RECENT, "g"),  # may land behind the pass
    }
    plan = reconcile(["queued-there", "publishing-there", "leaving-there", "unindexed", "unindexed"], entries,
                     started_at=PASS)
    assert plan.add == ("unindexed",)
    assert plan.confirm == ("leaving-there", "publishing-there")
    assert plan.delete == (("leaving-gone", "f"), ("publishing-gone", "e"), ("queued-gone", "d"))
    assert plan.changes == 6


ids = st.sampled_from([f"m-{i}" for i in range(8)])


@given(on_queue=st.lists(ids), entries=st.dictionaries(ids, st.tuples(st.sampled_from(STATES), st.booleans())))
def test_after_a_reconciliation_the_index_is_the_queue_but_for_recent_writes(
        on_queue: list[str], entries: dict[str, tuple[str, bool]]) -> None:
    seen = {rid: Seen(state, RECENT if recent else ANCIENT) for rid, (state, recent) in entries.items()}
    plan = reconcile(on_queue, seen, started_at=PASS)
    after = (set(seen) | set(plan.add)) - {rid for rid, _ in plan.delete}
    recent_gone = {rid for rid, (_, recent) in entries.items() if recent and rid not in on_queue}
    assert after == set(on_queue) | recent_gone
    assert set(plan.confirm) == {rid for rid in set(on_queue) & set(seen) if seen[rid].state != QUEUED}


def test_windows_and_the_readers_starting_point() -> None:
    assert window_of(0) == (0, WINDOW)
    assert window_of(WINDOW + 5) == (WINDOW, 2 * WINDOW)
    assert safe_low(None, 3) == 0
    assert safe_low(50, 100_000) == 50
    assert safe_low(99_999, 100_000) == 100_000 - LOW_MARGIN  # never close to the newest seqs
    assert safe_low(None, 100_000) == 100_000 - LOW_MARGIN
