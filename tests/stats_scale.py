"""`registrations stats` on a large users collection: the figures the scale test prints and
`bench/stats.py` reports. Measured, never asserted.

The users are a production-like mix: most registered long ago, a few in flight or failed, and
some who never went through the bridge (no registration_status at all)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from harness import BIN
from pymongo.collection import Collection
from registrations_cli import mongo

# Per 100 users: (status or None, how many).
MIX = (("registered", 90), ("submitted", 1), ("failed", 2), (None, 7))
STATUSES = ("submitted", "registered", "failed")
BATCH = 10_000


def status_of(i: int) -> str | None:
    slot = i % 100
    for status, share in MIX:
        if slot < share:
            return status
        slot -= share
    return None


def insert_users(users: Collection[dict[str, Any]], n: int) -> float:
    """n user documents in bulk; returns the seconds it took."""
    started = time.monotonic()
    batch: list[dict[str, Any]] = []
    for i in range(n):
        doc: dict[str, Any] = {"_id": f"u-{i:07d}", "name": "Maria da Silva", "email": f"u-{i}@example.com",
                               "cpf": "12345678909"}
        status = status_of(i)
        if status is not None:
            doc["registration_status"] = status
            doc["legacy_request_id"] = f"R-{i:07d}"
        batch.append(doc)
        if len(batch) == BATCH:
            users.insert_many(batch, ordered=False)
            batch = []
    if batch:
        users.insert_many(batch, ordered=False)
    return time.monotonic() - started


def _timed_cli(env: Mapping[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = subprocess.run([str(BIN / "registrations"), *args], env=dict(env), capture_output=True, text=True,
                            timeout=1800)
    return time.monotonic() - started, result


def _count_pipeline(status: str) -> list[dict[str, Any]]:
    # What pymongo's count_documents sends, so that explain describes the count stats runs.
    return [{"$match": {"registration_status": status}}, {"$group": {"_id": 1, "n": {"$sum": 1}}}]


def explain_counts(users: Collection[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per status: the plan's stage and index, and the keys and documents it examined."""
    shown = {}
    for status in STATUSES:
        out = users.database.command("explain", {"aggregate": users.name, "pipeline": _count_pipeline(status),
                                                 "cursor": {}}, verbosity="executionStats")
        plan = out["queryPlanner"]["winningPlan"]
        scan = plan.get("inputStage", plan)
        stats = out["executionStats"]
        shown[status] = {"stage": scan["stage"], "index": scan.get("indexName"),
                         "keys_examined": stats["totalKeysExamined"], "docs_examined": stats["totalDocsExamined"]}
    return shown


def measure(users: Collection[dict[str, Any]], env: Mapping[str, str], n: int,
            log: Any = print) -> dict[str, Any]:
    """Insert n users, then time: the old unindexed counts, `stats` without the index, the
    index build by `init-indexes`, and `stats` with the index. `env` runs the command against
    `users`' database and a vhost of its own."""
    figures: dict[str, Any] = {"n": n, "mix_per_100": {str(k): v for k, v in MIX}}
    figures["insert_s"] = round(insert_users(users, n), 2)
    log(f"inserted {n} users in {figures['insert_s']} s")

    started = time.monotonic()
    scanned = {s: users.count_documents({"registration_status": s}) for s in STATUSES}
    figures["unindexed_counts_s"] = round(time.monotonic() - started, 2)
    log(f"the three counts without an index (what stats ran before): {figures['unindexed_counts_s']} s")

    started = time.monotonic()
    assert mongo.outcome_counts(users) is None
    mongo.estimated_users(users)
    figures["stats_mongodb_part_without_index_s"] = round(time.monotonic() - started, 3)

    took, result = _timed_cli(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    without = json.loads(result.stdout)
    figures["stats_without_index_s"] = round(took, 2)
    figures["stats_without_index_shows"] = {"outcomes": without["outcomes"],
                                            "users_estimated": without.get("users_estimated")}
    log(f"stats without the index (estimated total only): {figures['stats_without_index_s']} s")

    took, result = _timed_cli(env, "init-indexes")
    assert result.returncode == 0, result.stderr
    figures["init_indexes_s"] = round(took, 2)
    figures["init_indexes_says"] = result.stdout.strip()
    log(f"init-indexes: {figures['init_indexes_s']} s: {figures['init_indexes_says']}")

    took, result = _timed_cli(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    figures["stats_with_index_s"] = round(took, 2)
    figures["stats_with_index_outcomes"] = json.loads(result.stdout)["outcomes"]
    log(f"stats with the index: {figures['stats_with_index_s']} s")
    started = time.monotonic()
    mongo.outcome_counts(users)
    figures["stats_mongodb_part_with_index_s"] = round(time.monotonic() - started, 3)
    log(f"stats' MongoDB part: {figures['stats_mongodb_part_without_index_s']} s without the index, "
        f"{figures['stats_mongodb_part_with_index_s']} s with it")
    took, _ = _timed_cli(env, "--help")
    figures["command_start_s"] = round(took, 2)  # the interpreter and imports, in every figure above

    per_status = {}
    for status in STATUSES:
        started = time.monotonic()
        users.count_documents({"registration_status": status})
        per_status[status] = round(time.monotonic() - started, 3)
    figures["indexed_count_s_per_status"] = per_status
    figures["explain"] = explain_counts(users)
    figures["unindexed_counts"] = scanned
    log(json.dumps(figures, indent=2))
    return figures
