"""`make soak`: the pipeline at a steady rate for a set time, watching for slow growth.

Starts legacy-sim (sub-second latencies, a few transient 503s), a MongoDB as the tests pick
one (MONGODB_URI if set, else a mongo:7 container if Docker answers, else SecantusDB), one
submitter and one poller in a fresh vhost, and publishes registrations at a steady rate from a
paced publisher: mostly good ones, a few the legacy system refuses, a few the legacy
API rejects and a few invalid messages, so that every kind of outcome and failure record is
written. Every SAMPLE_S seconds it samples each process's RSS, open descriptors and threads
(/proc) and the broker's queue depths. After the set time it waits for every outcome and holds
each message to its expected one. Writes `bench/results/<stamp>-soak-<minutes>m.json` (every
series and the summary) and a PNG beside it, and prints the summary (`soak_report.py`).

A benchmark, not a test: the figures are reported, never asserted. It exits non-zero when an
outcome is wrong or a process died.

    .venv/bin/python bench/soak.py --minutes 30 --rate 50     # or: make soak MINUTES=30 RATE=50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import pika  # noqa: E402
import requests  # noqa: E402
import soak_report  # noqa: E402
from pymongo import MongoClient  # noqa: E402
from pymongo.errors import PyMongoError  # noqa: E402

from regbridge.failure_index import QUEUED  # noqa: E402
from regbridge.plans import RECORD_ID_HEADER  # noqa: E402
from regbridge.redact import redact_url_value  # noqa: E402

INBOUND, PENDING, FAILED = "registrations", "registrations.pending", "registrations.failed"
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("registered", "legacy", "submit", "validation")  # the expected outcome; a failure's stage
WEIGHTS = (94, 2, 2, 2)


def body_for(i: int, kind: str) -> bytes:
    uid = f"soak-{i:07d}"
    if kind == "validation":
        return b"{not json"
    good = {"user_id": uid, "name": "Maria da Silva", "email": f"{uid}@example.com", "cpf": f"{10000000000 + i:011d}"}
    if kind == "legacy":
        good["name"] = "FAIL Teste"  # legacy-sim's fail prefix: accepted, then answered `failed`
    elif kind == "submit":
        good["email"] = "no-at-sign"  # legacy-sim answers 400: a permanent rejection
    return json.dumps(good).encode()


def index_of(message_id: str) -> int:
    return int(message_id.rsplit("-", 1)[1])


# ---- /proc ------------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any] | None:
    """RSS (and its anonymous part), threads, open descriptors and CPU seconds; None once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

    def kb(name: str) -> int | None:
        return int(fields[name].split()[0]) if name in fields else None

    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return {"rss_kb": kb("VmRSS"), "rss_anon_kb": kb("RssAnon"), "threads": int(fields["Threads"]),
            "fds": fds, "cpu_s": (int(stat[11]) + int(stat[12])) / TICK}


def descriptors(pid: int, peers: dict[int, str]) -> dict[str, int]:
    """Open descriptors by kind: TCP sockets by the process they connect to (`peers`, by port),
    listening sockets, other sockets, pipes, files, and anonymous inodes (eventfd, epoll...)."""
    remote: dict[str, str] = {}  # socket inode -> what it is
    for table in ("tcp", "tcp6"):
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                port = int(cols[2].rsplit(":", 1)[1], 16)
                remote[cols[9]] = "tcp listen" if port == 0 else f"tcp {peers.get(port, 'other')}"
    kinds: dict[str, int] = {}
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                kind = remote.get(target[8:-1], "socket other")
            elif target.startswith("pipe:"):
                kind = "pipe"
            elif target.startswith("anon_inode:"):
                kind = target.removeprefix("anon_inode:").strip("[]")
            else:
                kind = "file"
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def queue_depths(url: str, *, exact: bool = False) -> dict[str, int]:
    """Messages (ready + unacked) per queue of the vhost: the management API's figures, a few
    seconds old at most, else (or when `exact`) `rabbitmqctl`'s (a second of CPU a call)."""
    vhost = url.rsplit("/", 1)[1]
    if harness.management_api() and not exact:
        response = requests.get(f"{harness.MANAGEMENT}/queues/{vhost}", params={"columns": "name,messages"},
                                auth=("guest", "guest"), timeout=10)
        response.raise_for_status()
        return {q["name"]: int(q.get("messages") or 0) for q in response.json()}
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "messages"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return {name: int(count) for name, _, count in (line.rpartition("\t") for line in out.splitlines()) if name}


# ---- the publisher ----------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes `rate` messages a second for `seconds`, each at its scheduled time (catching up
    when behind), with confirms. Keeps one byte per message: its expected outcome."""

    def __init__(self, url: str, rate: float, seconds: float, seed: int) -> None:
        super().__init__(name="publisher", daemon=True)
        self.url, self.rate, self.seconds = url, rate, seconds
        self.rng = random.Random(seed)
        self.kinds = bytearray()
        self.published = 0
        self.max_lag_s = 0.0
        self.began = 0.0
        self.ended = 0.0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:  # reported by the main loop, which stops the run
            self.error = exc

    def _publish(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        channel.confirm_delivery()
        total = round(self.rate * self.seconds)
        self.began = time.monotonic()
        while self.published < total and not self.stopping.is_set():
            now = time.monotonic()
            due = min(total, int((now - self.began) * self.rate) + 1)
            while self.published < due:
                i = self.published
                kind = self.rng.choices(range(len(KINDS)), weights=WEIGHTS)[0]
                properties = pika.BasicProperties(delivery_mode=2, message_id=f"soak-{i:07d}",
                                                  content_type="application/json")
                channel.basic_publish("", INBOUND, body_for(i, KINDS[kind]), properties, mandatory=True)
                self.kinds.append(kind)
                self.published = i + 1
                self.max_lag_s = max(self.max_lag_s, time.monotonic() - (self.began + i / self.rate))
            next_at = self.began + self.published / self.rate
            connection.sleep(max(0.0, next_at - time.monotonic()))  # keeps heartbeats going
        self.ended = time.monotonic()
        connection.close()


# ---- failure records --------------------------------------------------------------------------


def digest(record: Any) -> str:
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()


class FailureLog:
    """Takes the failure queue's records as they come, keeping per message id only what the
    check needs: (stage, user_id, legacy_request_id) and a digest of the record."""

    def __init__(self, broker: harness.Broker) -> None:
        self.broker = broker
        self.records: dict[str, list[tuple[str, str | None, str | None, str]]] = {}
        self.stray: list[str] = []  # records without a message id of ours
        # The id each record carries (RECORD_ID_HEADER: the failure index's key), to its message id.
        self.record_ids: dict[str, str] = {}
        self.total = 0

    def collect(self) -> None:
        while True:
            method, props, body = self.broker.channel.basic_get(FAILED, auto_ack=True)
            if method is None:
                return
            self.total += 1
            record = json.loads(body)
            key = (record["error"]["stage"], record["user_id"], record["legacy_request_id"], digest(record))
            if not props.message_id or not props.message_id.startswith("soak-"):
                self.stray.append(f"{props.message_id}: {record['error']}")
                continue
            self.records.setdefault(props.message_id, []).append(key)
            record_id = (props.headers or {}).get(RECORD_ID_HEADER)
            if isinstance(record_id, bytes):
                record_id = record_id.decode()
            self.record_ids[record_id if isinstance(record_id, str) else props.message_id] = props.message_id


# ---- the check --------------------------------------------------------------------------------


def check(kinds: bytearray, failures: FailureLog, users: Any) -> dict[str, Any]:
    """Every message against its expected outcome, streaming the users (never all in memory):
    registered, or one failure record of the right stage (identical copies counted), the user's
    document failed at that stage, and the failure index agreeing with the records."""
    problems: list[str] = []
    counts = {kind: 0 for kind in KINDS}
    extra = 0

    def problem(text: str) -> None:
        if len(problems) < 50:
            problems.append(text)

    problems.extend(f"stray failure record {s}" for s in failures.stray[:10])
    for message_id, records in failures.records.items():
        i = index_of(message_id)
        want = KINDS[kinds[i]] if i < len(kinds) else "?"
        distinct = {r[:3] for r in records}
        extra += len(records) - 1
        if want == "registered" or want == "?":
            problem(f"{message_id}: failure record(s) {sorted(distinct)}, expected {want}")
        elif len(distinct) != 1:
            problem(f"{message_id}: conflicting failure records {sorted(distinct)}")
        elif next(iter(distinct))[0] != want:
            problem(f"{message_id}: stage {next(iter(distinct))[0]}, expected {want}")
    seen = bytearray(len(kinds))  # 1: the user's document was found, and was right
    for doc in users.find({}, {"registration_status": 1, "registration_error.stage": 1}, batch_size=2000):
        i = index_of(doc["_id"])
        want = KINDS[kinds[i]] if i < len(kinds) else "?"
        status = doc.get("registration_status")
        got = "registered" if status == "registered" else (doc.get("registration_error") or {}).get("stage", status)
        if status not in ("registered", "failed") or got != want:
            problem(f"{doc['_id']}: document {status} ({got}), expected {want}")
        elif i < len(kinds):
            seen[i] = 1
    for i, kind in enumerate(kinds):
        name = KINDS[kind]
        message_id = f"soak-{i:07d}"
        if name != "validation" and not seen[i]:
            problem(f"{message_id}: no user document, expected {name}")
        if name != "registered" and message_id not in failures.records:
            problem(f"{message_id}: no failure record, expected {name}")
        counts[name] += 1
    index = users.database[f"{users.name}.failures"]
    # The index is keyed by record id; a record without one is keyed by its message id.
    message_of = {m: m for m in failures.records} | failures.record_ids
    queued_without_record = 0
    indexed: set[str] = set()  # the message ids whose record has an entry
    for entry in index.find({}, {"state": 1, "stage": 1, "body": 1}, batch_size=2000):
        received = failures.records.get(message_id := message_of.get(entry["_id"], ""))
        if received is None:
            queued_without_record += entry["state"] == QUEUED
            continue
        indexed.add(message_id)
        if digest(json.loads(entry["body"])) not in {r[3] for r in received} or entry["stage"] != received[0][0]:
            problem(f"{entry['_id']}: the failure index entry holds no record that was published")
    if queued_without_record:
        problem(f"{queued_without_record} failure index entries queued without a record")
    for message_id in failures.records.keys() - indexed:
        problem(f"{message_id}: a failure record without an index entry")
    ok = not problems
    verdict = (f"all {len(kinds):,} right ({counts['registered']:,} registered, "
               f"{sum(counts.values()) - counts['registered']:,} failed at the right stage"
               f"{f', {extra} identical extra records' if extra else ''})" if ok
               else f"{len(problems)}{'+' if len(problems) >= 50 else ''} WRONG (first: {problems[0]})")
    return {"ok": ok, "verdict": verdict, "expected": counts, "extra_records": extra, "problems": problems}


# ---- the run ----------------------------------------------------------------------------------


class Died(Exception):
    pass


def stop(service: harness.Service) -> int | None:
    """SIGTERM, and the exit code; a service that does not stop in time is killed (None)."""
    if service.process is None:
        return None
    try:
        return int(service.terminate())
    except subprocess.TimeoutExpired:
        print(f"!!! {service.name} did not stop within 40 s of SIGTERM: killed", file=sys.stderr, flush=True)
        service.kill()
        return None


def provenance(env: dict[str, str], mongo: harness.Mongo) -> dict[str, Any]:
    """What the figures were measured on: the commit (and whether the tree differed from it),
    the services' allocator and poll schedule as they were started, and which MongoDB."""
    def git(*argv: str) -> str:
        run = subprocess.run(["git", *argv], cwd=HERE, capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else "unknown"

    return {"revision": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--untracked-files=no") != "",
            "GLIBC_TUNABLES": env.get("GLIBC_TUNABLES"), "POLL_SCHEDULE": env.get("POLL_SCHEDULE", "adaptive"),
            "mongodb": "SecantusDB" if mongo.process is not None else redact_url_value(mongo.uri)}


def main() -> int:
    env_default = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=float(env_default("MINUTES", "30")))
    parser.add_argument("--rate", type=float, default=float(env_default("RATE", "50")), help="registrations/s")
    parser.add_argument("--sample-s", type=float, default=float(env_default("SAMPLE_S", "30")))
    parser.add_argument("--warmup-min", type=float, default=2.0, help="left out of the slopes")
    parser.add_argument("--latency-min", type=float, default=0.3)
    parser.add_argument("--latency-max", type=float, default=0.9)
    parser.add_argument("--latency-profile", default=None, metavar="PROFILE",
                        help="legacy-sim's latency profile instead of --latency-min/--latency-max")
    parser.add_argument("--fault-rate", type=float, default=0.01, help="legacy-sim's 503s on POST and GET")
    parser.add_argument("--first-delay", type=float, default=0.3)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="for the last outcomes, after publishing")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a setting for both services")
    docs = env_default("DOCS")
    parser.add_argument("--docs", type=Path, default=Path(docs) if docs else None,
                        help="also write the figures as markdown into this file (see soak_report.py)")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    logs = Path(env_default("BENCH_LOGS", f"/tmp/regbridge-soak-{stamp}"))
    logs.mkdir(parents=True, exist_ok=True)
    # Not Path.with_suffix: a run of 1.5 minutes would lose its ".5m".
    out = HERE / "results" / f"{stamp}-soak-{args.minutes:g}m.json"
    out.parent.mkdir(exist_ok=True)
    data: dict[str, Any] = {"stamp": stamp, "machine": {"cores": os.cpu_count()}, "args": vars(args) | {
        "docs": str(args.docs) if args.docs else None}, "samples": [], "logs": str(logs)}
    wall0 = time.monotonic()
    print(f"soak: {args.minutes:g} min at {args.rate:g}/s, a sample every {args.sample_s:g} s (logs: {logs})",
          flush=True)
    code = 0
    with ExitStack() as stack:
        mongo = stack.enter_context(harness.mongodb())
        url = stack.enter_context(harness.vhost("soak"))
        broker = harness.Broker(url)
        stack.callback(broker.close)
        broker.declare(INBOUND, PENDING, FAILED)
        legacy = harness.start_legacy_sim(
            {**harness.latency_env(args.latency_min, args.latency_max, args.latency_profile),
             "LEGACY_SIM_ACCEPT_LATENCY_S": "0.01", "LEGACY_SIM_RETRY_AFTER_S": "0.2",
             "LEGACY_SIM_POST_503_RATE": str(args.fault_rate), "LEGACY_SIM_GET_503_RATE": str(args.fault_rate)},
            log=logs / "legacy-sim.log")
        stack.callback(legacy.stop)
        database = f"soak_{os.getpid()}"
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
        stack.callback(client.close)

        def drop() -> None:
            with suppress(PyMongoError):  # a database that died with the run needs no dropping
                client.drop_database(database)

        stack.callback(drop)
        env = harness.service_env(rabbitmq_url=url, mongodb_uri=mongo.uri, database=database, legacy_url=legacy.url,
                                  extra={"POLL_FIRST_DELAY_S": str(args.first_delay),
                                         "POLL_INTERVAL_S": str(args.interval), "POLL_DEADLINE_S": "60",
                                         "LOG_LEVEL": args.log_level,
                                         **dict(kv.split("=", 1) for kv in args.env)})
        services = [harness.Service(name, dict(env), logs / f"{name}.log") for name in ("submitter", "poller")]
        data["provenance"] = provenance(env, mongo)
        for service in services:
            service.start()
            stack.callback(stop, service)
        for service in services:
            service.wait_ready()
        pids = {s.name: s.process.pid for s in services if s.process is not None}
        pids["legacy-sim"] = legacy.process.pid
        if mongo.process is not None:
            pids["mongodb"] = mongo.process.pid
        beam = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
        if beam:
            pids["rabbitmq"] = int(beam[0])
        peers = {5672: "rabbitmq", 15672: "rabbitmq-management", int(legacy.url.rsplit(":", 1)[1]): "legacy-sim"}
        with suppress(ValueError):  # a URI of several hosts: their sockets count as `other`
            peers[urlsplit(mongo.uri).port or 27017] = "mongodb"
        failures = FailureLog(broker)
        publisher = Publisher(url, args.rate, args.minutes * 60, args.seed)

        def alive() -> None:
            """Loudly, at once, if anything the run needs is gone."""
            for service in services:
                assert service.process is not None
                if service.process.poll() is not None:
                    raise Died(f"{service.name} exited with {service.process.returncode}:\n{service.log()[-3000:]}")
            if legacy.process.poll() is not None:
                raise Died(f"legacy-sim exited with {legacy.process.returncode} (log: {logs / 'legacy-sim.log'})")
            if mongo.process is not None and mongo.process.poll() is not None:
                raise Died(f"SecantusDB exited with {mongo.process.returncode}")
            if publisher.error is not None:
                raise Died(f"the publisher failed: {publisher.error!r}")

        began = time.monotonic()

        def sample(phase: str) -> None:
            processes = {name: s for name, pid in pids.items() if (s := proc_sample(pid)) is not None}
            for name in soak_report.SERVICES:
                if name in processes:
                    processes[name]["fd_kinds"] = descriptors(pids[name], peers)
            try:
                queues = queue_depths(url, exact=phase != "load")
            except (requests.RequestException, subprocess.SubprocessError) as exc:
                print(f"  (queue depths not read: {exc})", flush=True)
                queues = {}
            row: dict[str, Any] = {"t": round(time.monotonic() - began, 2), "phase": phase,
                                   "published": publisher.published, "failure_records": failures.total,
                                   "processes": processes, "queues": queues}
            data["samples"].append(row)
            rss = "  ".join(f"{n}={p['rss_kb'] / 1024:.2f}MB/{p['fds']}fd/{p['threads']}th"
                            for n, p in processes.items() if n in soak_report.SERVICES)
            print(f"  t={row['t'] / 60:5.1f} min  published={row['published']:>7}  in queues="
                  f"{sum(v for q, v in queues.items() if q != FAILED):>4}  {rss}", flush=True)

        try:
            publisher.start()
            next_sample = began
            while publisher.is_alive():
                alive()
                if time.monotonic() >= next_sample:
                    sample("load")
                    next_sample += args.sample_s
                failures.collect()
                broker.connection.process_data_events(time_limit=1)  # heartbeats, and the tick
            alive()
            sample("load")
            print(f"published {publisher.published} in {publisher.ended - publisher.began:.1f} s; "
                  "waiting for the last outcomes", flush=True)
            drain_began = time.monotonic()
            empty = 0
            # Three readings in a row with nothing in any queue but the failure queue: a message
            # moving from a wait queue to pending is counted in neither for a moment.
            while empty < 3:
                alive()
                if time.monotonic() - drain_began > args.drain_timeout:
                    raise Died(f"the pipeline still held {broker.in_pipeline(exclude=FAILED)} messages "
                               f"{args.drain_timeout:g} s after the last publish")
                empty = empty + 1 if broker.in_pipeline(exclude=FAILED) == 0 else 0
                failures.collect()
                broker.connection.process_data_events(time_limit=0.5)
            failures.collect()
            sample("drained")
            data["drain_s"] = time.monotonic() - drain_began
            print(f"drained in {data['drain_s']:.1f} s; checking every outcome", flush=True)
            check_began = time.monotonic()
            data["check"] = check(publisher.kinds, failures, client[database]["users"])
            data["check"]["seconds"] = time.monotonic() - check_began
            data["exit_codes"] = {}
            for service in services:
                data["exit_codes"][service.name] = stop(service)
            if not data["check"]["ok"] or any(c != 0 for c in data["exit_codes"].values()):
                code = 1
        except (Died, KeyboardInterrupt, Exception) as exc:  # 30 minutes of samples are written whatever ended them
            publisher.stopping.set()
            print(f"\n!!! SOAK ABORTED: {exc}\n", file=sys.stderr, flush=True)
            data["aborted"] = str(exc)
            data.setdefault("check", {"ok": False, "verdict": f"NOT CHECKED: aborted ({str(exc).splitlines()[0]})"})
            code = 2
        publisher.stopping.set()
        publisher.join(10)
        with suppress(requests.RequestException):
            data["stats"] = {k: v for k, v in legacy.stats(summary=True).items() if not isinstance(v, dict | list)}
        publish_s = (publisher.ended or time.monotonic()) - publisher.began
        data["run"] = {"published": publisher.published, "publish_s": publish_s,
                       "achieved_rate": publisher.published / publish_s if publish_s else 0.0,
                       "max_lag_s": publisher.max_lag_s, "wall_s": time.monotonic() - wall0}
    data["run"]["wall_s"] = time.monotonic() - wall0
    data["summary"] = soak_report.summarise(data) if data["samples"] else {}
    out.write_text(json.dumps(data, indent=1))
    if data["samples"]:
        soak_report.plot(data, out.with_suffix(".png"))
        print(soak_report.summary_text(data))
    if args.docs:
        soak_report.write_docs(soak_report.markdown(data, out, args.docs.resolve()), args.docs)
        print(f"wrote the figures into {args.docs}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
