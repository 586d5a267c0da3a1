"""`registrations stats [--watch [SECONDS]]`: queue depths per stage and outcomes in MongoDB.

Users are counted by status on the status index only (`init-indexes`): a count without it reads
the whole users collection, every refresh of a watch. Without the index, `stats` shows the
collection's estimated size instead."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pika.adapters.blocking_connection import BlockingConnection
from pymongo.collection import Collection

from . import broker, mongo
from .output import Output
from .settings import CliSettings

STAGES = ("inbound", "pending", "waiting", "failed")
NO_INDEX = (f"no index on {mongo.STATUS_KEY}, and without one each count reads every document; "
            "create it once, on purpose: registrations init-indexes")


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    queues: list[tuple[str, str, broker.QueueInfo | None]]  # (stage, queue, None when it does not exist)
    outcomes: dict[str, int] | None  # None: no status index, so not counted
    users_estimated: int | None = None  # the collection's size, when the statuses are not counted

    @property
    def stages(self) -> dict[str, int]:
        """Ready messages per stage; `waiting` sums the wait queues."""
        totals = dict.fromkeys(STAGES, 0)
        for stage, _, info in self.queues:
            if info is not None:
                totals[stage] += info.ready
        return totals

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "stages": self.stages,
            "queues": {name: {"stage": stage, "ready": info.ready if info else None,
                              "consumers": info.consumers if info else None, "exists": info is not None}
                       for stage, name, info in self.queues},
            "outcomes": self.outcomes,
            **({} if self.outcomes is not None else
               {"outcomes_unavailable": NO_INDEX, "users_estimated": self.users_estimated}),
        }


def take(connection: BlockingConnection, users: Collection[dict[str, Any]], settings: CliSettings) -> Snapshot:
    queues: list[tuple[str, str, broker.QueueInfo | None]] = [
        ("inbound", settings.inbound_queue, broker.queue_info(connection, settings.inbound_queue)),
        ("pending", settings.pending_queue, broker.queue_info(connection, settings.pending_queue)),
    ]
    for name in settings.wait_queues:
        info = broker.queue_info(connection, name)
        if info is not None:  # the poller declares them; one not there yet holds nothing
            queues.append(("waiting", name, info))
    queues.append(("failed", settings.failed_queue, broker.queue_info(connection, settings.failed_queue)))
    outcomes = mongo.outcome_counts(users)
    estimated = mongo.estimated_users(users) if outcomes is None else None
    return Snapshot(datetime.now(UTC), queues, outcomes, estimated)


def render_table(snapshot: Snapshot, settings: CliSettings, out: Output | None = None) -> str:
    out = out or Output()
    rows = [[stage, name, info.ready if info else "not declared", info.consumers if info else "-"]
            for stage, name, info in snapshot.queues]
    queues = out.table(["STAGE", "QUEUE", "READY", "CONSUMERS"], rows, right=["READY", "CONSUMERS"])
    totals = "  ".join(f"{k}={v}" for k, v in snapshot.stages.items())
    if snapshot.outcomes is None:
        outcomes = (f"users by status: not counted ({NO_INDEX})\n"
                    f"about {snapshot.users_estimated} users in all (estimated from the collection's metadata)")
    else:
        outcomes = out.table(["STATUS", "USERS"], [[k, v] for k, v in snapshot.outcomes.items()], right=["USERS"])
    if not out.headers:  # the rows only: the queues', then the outcomes'
        return f"{queues}\n{outcomes}"
    return (f"broker {settings.broker_shown}\n\n{queues}\n\nby stage: {totals}\n\n"
            f"MongoDB {settings.mongodb_database}.{settings.mongodb_collection}\n{outcomes}")


def render_line(snapshot: Snapshot) -> str:
    stages = "  ".join(f"{k if k != 'failed' else 'failure-records'}={v:<3d}" for k, v in snapshot.stages.items())
    if snapshot.outcomes is None:
        outcomes = f"users~{snapshot.users_estimated} (by status: run registrations init-indexes)"
    else:
        outcomes = "  ".join(f"{k}={v:<3d}" for k, v in snapshot.outcomes.items())
    return f"{snapshot.at.astimezone().strftime('%H:%M:%S')}  {stages}|  {outcomes}".rstrip()


def run(settings: CliSettings, out: Output, *, watch_s: float | None = None, count: int | None = None) -> int:
    # Counting a status that most users have reads that many index keys (and, on servers
    # that fetch what they count, that many documents): seconds on a large collection.
    with broker.connect(settings) as connection, mongo.users(settings, answer_timeout_s=120.0) as users:
        if watch_s is None and count is None:
            snapshot = take(connection, users, settings)
            if out.is_table:
                out.line(render_table(snapshot, settings, out))
            else:
                out.document(snapshot.as_json())
            return 0
        interval = watch_s if watch_s is not None else 2.0
        shown = 0
        try:
            while count is None or shown < count:
                if shown:
                    connection.sleep(interval)  # keeps the connection's heartbeats going
                snapshot = take(connection, users, settings)
                if out.is_table:  # -o json as well as jsonl: one object per refresh, per line
                    out.line(render_line(snapshot))
                else:
                    out.row(snapshot.as_json())
                shown += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C ends a watch: that is how it is meant to stop
    return 0
