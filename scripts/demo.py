"""`make demo`: the whole pipeline on this machine, with sample registrations, start to finish.

Starts legacy-sim, SecantusDB (unless MONGODB_URI is set), one submitter and one poller in a
fresh RabbitMQ vhost (unless RABBITMQ_URL is set), publishes a few dozen registrations (a few
meant to fail), shows their progress, prints the outcome of each kind, and stops everything.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness
from pymongo import MongoClient
from registrations_cli import listing, stats
from registrations_cli import settings as cli_settings
from registrations_cli.mongo import ensure_status_index

INBOUND, PENDING, FAILED = "registrations", "registrations.pending", "registrations.failed"
# Shorter than the real 10-20 s so that the demo takes seconds, with the same shape.
LATENCY = {"LEGACY_SIM_LATENCY_MIN_S": "3", "LEGACY_SIM_LATENCY_MAX_S": "6", "LEGACY_SIM_POST_503_RATE": "0.05",
           "LEGACY_SIM_GET_503_RATE": "0.05", "LEGACY_SIM_RETRY_AFTER_S": "0.2"}
POLL = {"POLL_FIRST_DELAY_S": "3", "POLL_INTERVAL_S": "1", "POLL_DEADLINE_S": "60"}


def samples() -> list[tuple[bytes, str]]:
    """(body, expected outcome) for each sample message."""
    people = ["Ana Souza", "Bruno Lima", "Carla Dias", "Diego Rocha", "Elisa Melo", "Fabio Reis"]
    out: list[tuple[bytes, str]] = []
    for i in range(30):
        body = {"user_id": f"demo-{i:03d}", "name": people[i % len(people)], "email": f"user{i}@example.com",
                "cpf": f"{10000000000 + i * 7919:011d}"}
        out.append((json.dumps(body).encode(), "registered"))
    for i in range(3):
        body = {"user_id": f"demo-fail-{i}", "name": f"FAIL Teste {i}", "email": "x@example.com",
                "cpf": "12345678909"}
        out.append((json.dumps(body).encode(), "failed: legacy"))
    for i in range(2):
        body = {"user_id": f"demo-badcpf-{i}", "name": "Cpf Ruim", "email": "y@example.com", "cpf": "123"}
        out.append((json.dumps(body).encode(), "failed: submit"))
    out.append((b"this is not JSON", "failed: validation"))
    out.append((json.dumps({"name": "Sem Id", "email": "z@example.com", "cpf": "12345678909"}).encode(),
                "failed: validation"))
    return out


@contextmanager
def broker_url() -> Iterator[str]:
    if os.environ.get("RABBITMQ_URL"):
        yield os.environ["RABBITMQ_URL"]
        return
    if not harness.port_open("127.0.0.1", 5672):
        sys.exit("RabbitMQ is not answering on 127.0.0.1:5672; start it with: rabbitmq-server -detached")
    with harness.vhost("demo") as url:
        yield url


def main() -> int:
    logs = Path(tempfile.mkdtemp(prefix="regbridge-demo-"))
    with ExitStack() as stack:
        url = stack.enter_context(broker_url())
        mongo = stack.enter_context(harness.mongodb())
        print(f"broker: {url.split('@')[-1]}   mongodb: {mongo.uri.split('@')[-1]}   logs: {logs}")
        legacy = harness.start_legacy_sim(LATENCY, log=logs / "legacy-sim.log")
        stack.callback(legacy.stop)
        database = f"demo_{os.getpid()}"
        env = harness.service_env(rabbitmq_url=url, mongodb_uri=mongo.uri, database=database,
                                  legacy_url=legacy.url, extra=POLL)
        services = [harness.Service(name, dict(env), logs / f"{name}.log") for name in ("submitter", "poller")]
        for service in services:
            service.start()
            stack.callback(lambda s=service: s.terminate() if s.process else None)
        for service in services:
            service.wait_ready()
        print("legacy-sim, submitter and poller are up; publishing sample registrations\n")

        broker = harness.Broker(url)
        stack.callback(broker.close)
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
        stack.callback(client.close)
        stack.callback(lambda: client.drop_database(database))
        users = client[database]["users"]
        ensure_status_index(users)  # what `registrations init-indexes` does: stats counts on it
        # The operator command's own pieces show the progress and the failure queue.
        cli = cli_settings.from_env(env)

        sent = samples()
        for i, (body, _) in enumerate(sent):
            broker.publish(INBOUND, body, message_id=f"demo-msg-{i}")
        expected = Counter(outcome for _, outcome in sent)
        start = time.monotonic()
        while True:
            snapshot = stats.take(broker.connection, users, cli)
            print(f"  t={time.monotonic() - start:5.1f}s  {stats.render_line(snapshot)}", flush=True)
            done = (snapshot.outcomes or {}).get("registered", 0) + snapshot.stages["failed"]
            if done >= len(sent) or time.monotonic() - start > 120:
                break
            broker.connection.sleep(1.0)

        failures = listing.read(broker.connection, cli)  # browsed: the records stay on the queue
        got = Counter({"registered": (snapshot.outcomes or {}).get("registered", 0)})
        for record in failures:
            got[f"failed: {record.stage}"] += 1
        print("\nOutcome by kind         expected  got")
        for kind in sorted(set(expected) | set(got)):
            print(f"  {kind:22s} {expected[kind]:8d}  {got[kind]:3d}")
        print(f"\nThe failure queue ({FAILED}), as `registrations failed list` shows it:")
        print(listing.table([listing.Row.of_failure(f) for f in failures], datetime.now(UTC), indent="  "))
        ok = got == expected
        print("\n" + ("every registration reached its expected outcome" if ok else "UNEXPECTED OUTCOMES"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
