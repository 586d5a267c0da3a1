"""`registrations init-indexes`: the index `stats` counts users with, created on purpose.

Building an index on a large production collection reads every document and costs I/O and CPU
on every member of the replica set, so no other command creates it; this one is run once, by an
operator who chose the moment. Running it again finds the index and changes nothing."""

from __future__ import annotations

import time

from . import mongo
from .output import Output
from .settings import CliSettings


def run(settings: CliSettings, out: Output, *, dry_run: bool = False) -> int:
    where = f"{settings.mongodb_database}.{settings.mongodb_collection}"
    key = f"{{{mongo.STATUS_KEY}: 1}}"
    # An index build on a large collection takes minutes: no time limit on the answer.
    with mongo.users(settings, answer_timeout_s=None) as users:
        started = time.monotonic()
        name, state = mongo.ensure_status_index(users, dry_run=dry_run)
        took = time.monotonic() - started
    if not out.is_table:
        out.document({"index": name, "key": {mongo.STATUS_KEY: 1}, "collection": where, "state": state,
                      "seconds": round(took, 3)})
    elif state == "created":
        out.line(f"created index {name} {key} on {where} in {took:.1f} s")
    elif state == "found":
        out.line(f"found index {name} on {where} (it leads with {mongo.STATUS_KEY}): nothing to do")
    else:
        out.line(f"would create index {name} {key} on {where} (nothing was created: --dry-run)")
    return 0
