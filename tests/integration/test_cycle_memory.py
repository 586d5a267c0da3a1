"""A cycle of a large failure queue holds only what it moves (issue 13): a replay that matches a
few records of 2,000 keeps the ids it needs, not the records that go round. Its peak memory is
compared with that of a command that reads 20 entries: a cycle that kept every record taken (and
parsed them all to count what was left) holds each record's 8 KB reason at least twice, tens of
MB here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import Stack
from failure_records import FailureRecords
from harness import Broker
from outcomes import FAILED, INBOUND, good
from test_cli_failure_index import timed

from regbridge.messages import FailureError, FailureRecord

pytestmark = pytest.mark.integration

N = 2_000
MATCHING = 10  # legacy records, spread over the queue; the rest are submit failures


@pytest.mark.long
def test_a_replay_over_2000_records_holds_only_what_it_moves(stack: Stack, broker: Broker,
                                                              failure_records: FailureRecords) -> None:
    now = datetime.now(UTC)
    every = N // MATCHING
    messages = []
    for i in range(N):
        stage = "legacy" if i % every == every - 1 else "submit"
        user = f"u-{i:06d}"
        messages.append((f"r-{i:06d}", FailureRecord(original=good(user), user_id=user, legacy_request_id=None,
                                                     error=FailureError(stage, f"it went wrong ({'x' * 8000})"),
                                                     attempts=1, failed_at=now - timedelta(seconds=N - i)).encode()))
    broker.publish_in_order(FAILED, messages, timeout=120)
    failure_records.index_many(messages)
    chosen = [mid for i, (mid, _) in enumerate(messages) if i % every == every - 1]

    _, _, small = timed(stack.env, "failed", "list", "--limit", "20", "-o", "json")
    out, took, rss = timed(stack.env, "failed", "replay", "--stage", "legacy", "--yes")
    assert f"replayed {MATCHING} failure records to {INBOUND}; {N - MATCHING} left on {FAILED}" in out
    assert [p.message_id for p, _ in broker.drain(INBOUND)] == chosen
    print(f"\nreplay of {MATCHING} records among {N:,}: {took:.1f} s, max RSS {rss} MB "
          f"(failed list --limit 20: {small} MB)")
    # The ids of 2,000 records (the index's, the tally's, the keeper's) are well under a MB; the
    # records themselves would be 2,000 x 8 KB, twice over.
    assert rss < small + 12
