"""A real submitter (or poller) in this process under `tracemalloc`: which allocation sites grow
with deliveries.

The submitter is wired as `submitter.main` wires it (runtime, executor, MongoDB store with its
batcher, legacy client behind the breaker, metrics, JSON logs to /dev/null), against the local
broker (a fresh vhost), SecantusDB and legacy-sim with 1 % transient 503s. Registrations are
published in rounds of `--round`; after each round has been taken and settled, the probe prints
the traced total, the process's RSS and the sites that grew most since the snapshot after the
warm-up round. A leak shows as a site that grows round after round in proportion; warm-up as
growth that stops; allocator fragmentation as RSS growth while the traced total stays flat.

    PYTHONPATH=... .venv/bin/python bench/memory_probe.py --rounds 6 --round 3000

Its readings, round by round, go to `--out FILE` as JSON (default
`bench/results/<stamp>-memory-probe.json`), rewritten after each round so that a run cut short
keeps what it read.

`MALLOC_ARENA_MAX=2` in the environment, or `--trim` (glibc `malloc_trim(0)` before each RSS
reading), tells arena growth from the interpreter's own. The services run with
`GLIBC_TUNABLES=glibc.malloc.tcache_count=0` (tests/harness.py ALLOCATOR_ENV): set it in the
probe's environment too to read what they would (glibc reads it at start only).

`--service poller` probes the poller instead: a real submitter runs as a subprocess and turns
the registrations into pending messages, legacy-sim completes them in 0.3-0.9 s (as the soak's
do), and the poller runs here on its schedule (`--schedule adaptive`, the default, or `fixed`).
Each round publishes `--round` registrations paced at `--rate` a second (the schedule learns
from steady arrivals, as in the soak), then waits until every one is settled. Besides the sites,
each round lists the Python object types whose count grew since the warm-up (`gc.get_objects`).

    GLIBC_TUNABLES=glibc.malloc.tcache_count=0 PYTHONPATH=... .venv/bin/python bench/memory_probe.py \
        --service poller --rounds 5 --round 1500 --rate 50
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness

from poller import metrics as poller_metrics
from poller.service import Poller
from regbridge import logs
from regbridge.amqp import AmqpRuntime, RuntimeHooks
from regbridge.durable import Durable
from regbridge.executor import Executor, Observer
from regbridge.process import adapters
from regbridge.settings import poller_settings, submitter_settings
from regbridge.topology import poller_queues, submitter_queues, wait_queue_name
from submitter import metrics
from submitter.service import Submitter

RESULTS = Path(__file__).resolve().parent / "results"


def rss_kb(trim: bool) -> int:
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_kb() -> tuple[int, int]:
    """glibc's own account of its heaps, every arena together (`mallinfo2`): the bytes handed
    out and not freed (a chunk parked in a thread's tcache counts as handed out), and the bytes
    free inside the heaps. The first growing is memory held; the second, fragmentation."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks // 1024, info.fordblks // 1024


def malloc_heaps() -> list[tuple[int, int]]:
    """Per glibc arena (the main one first, then one per set of threads that met contention):
    the bytes it holds from the system and the bytes free inside it (`malloc_info`). Growth in
    the arenas the worker threads use, with the bytes handed out flat, is fragmentation there."""
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile() as out:
        handle = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, handle)
        libc.fclose(handle)
        xml = Path(out.name).read_text()
    heaps = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.S):
        current = re.search(r'<system type="current" size="(\d+)"', heap)
        free = re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', heap)
        heaps.append((int(current.group(1)) // 1024 if current else 0, sum(int(f) for f in free) // 1024))
    return heaps


def rss_by_mapping() -> dict[str, int]:
    """The RSS (KB) by kind of mapping (`/proc/self/smaps`): glibc's main heap (`[heap]`); its
    thread arenas (aligned to 64 MiB, the rest of the reservation inaccessible after them); thread
    stacks (8 MiB after a guard page); other anonymous memory, mostly the interpreter's own 1 MiB
    arenas (pymalloc's, merged by the kernel when adjacent) and glibc's mmapped large blocks;
    files (code and libraries)."""
    maps: list[tuple[int, int, str, str]] = []
    rsses: list[int] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            maps.append((lo, hi, head[1], head[5] if len(head) > 5 else ""))
            rsses.append(0)
        elif head and head[0] == "Rss:":
            rsses[-1] = int(head[1])
    kinds: collections.Counter[str] = collections.Counter()
    for i, ((lo, hi, perms, name), rss) in enumerate(zip(maps, rsses, strict=True)):
        before = maps[i - 1] if i > 0 else None
        after = maps[i + 1] if i + 1 < len(maps) else None
        if name == "[heap]":
            kind = "heap"
        elif name.startswith("/"):
            kind = "files"
        elif name or perms != "rw-p":
            kind = "other"
        elif hi - lo == 8 << 20 and before is not None and before[1] == lo and before[2] == "---p":
            kind = "stacks"
        elif lo % (64 << 20) == 0 and after is not None and after[0] == hi and after[2] == "---p":
            kind = "glibc_arenas"
        else:
            kind = "anon"
        kinds[kind] += rss
    return dict(sorted(kinds.items()))


def pymalloc_arenas() -> str:
    """How many of the interpreter's own 1 MiB arenas are allocated (`sys._debugmallocstats`,
    which writes to the C stderr)."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        found = re.search(rb"# arenas allocated current\s*=\s*([\d,]+)", out.read())
    return found.group(1).decode() if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trim", action="store_true")
    parser.add_argument("--no-tracemalloc", action="store_true", help="RSS only, at full speed")
    parser.add_argument("--service", choices=("submitter", "poller"), default="submitter")
    parser.add_argument("--schedule", choices=("adaptive", "fixed"), default="adaptive",
                        help="the poller's POLL_SCHEDULE")
    parser.add_argument("--rate", type=float, default=50.0, help="registrations a second (poller probe)")
    parser.add_argument("--window", type=int, help="the poller's POLL_ADAPTIVE_WINDOW (default: its own)")
    parser.add_argument("--out", type=Path, help="the readings as JSON (default: "
                        "bench/results/<stamp>-memory-probe.json)")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    if args.out is None:
        args.out = RESULTS / f"{stamp}-memory-probe.json"
    args.stamp = stamp

    poller = args.service == "poller"
    with harness.vhost("memprobe") as url, harness.mongodb() as mongo:
        # The poller's registrations complete as the soak's do, in 0.3-0.9 s.
        sim = harness.start_legacy_sim({"LEGACY_SIM_POST_503_RATE": "0.01",
                                        **(harness.latency_env(0.3, 0.9) if poller else {}),
                                        **({"LEGACY_SIM_ACCEPT_LATENCY_S": "0.01"} if poller else {})})
        try:
            env = harness.service_env(
                rabbitmq_url=url, mongodb_uri=mongo.uri, database="memprobe", legacy_url=sim.url,
                extra={"POLL_SCHEDULE": args.schedule, "POLL_DEADLINE_S": "60",
                       **({"POLL_ADAPTIVE_WINDOW": str(args.window)} if args.window else {})})
            if poller:
                submitter = harness.Service("submitter", dict(env), Path(tempfile.mkdtemp()) / "submitter.log")
                submitter.start()
                try:
                    submitter.wait_ready()
                    probe_poller(env, url, args)
                finally:
                    submitter.terminate()
            else:
                probe(env, url, args)
        finally:
            sim.stop()


def quiet_logs(service: str) -> None:
    """The service's own logging, formatted as it runs, written to /dev/null: the probe measures
    what logging costs without printing it."""
    logs.setup(service, "INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run


def probe(env: dict[str, str], url: str, args: argparse.Namespace) -> None:
    settings = submitter_settings(env)
    quiet_logs("submitter")
    mongo, legacy = adapters(settings, metrics.EDGE)
    runtime = AmqpRuntime(url=url, queues=submitter_queues(inbound=settings.inbound_queue,
                                                           pending=settings.pending_queue,
                                                           failed=settings.failed_queue,
                                                           first_delay_s=settings.poll_first_delay_s,
                                                           adaptive=settings.poll_schedule == "adaptive",
                                                           group_size=settings.quorum_initial_group_size),
                          consume=[settings.inbound_queue], workers=settings.workers, prefetch=settings.prefetch,
                          hooks=RuntimeHooks(on_delivery=lambda d: metrics.EDGE.consumed.inc()), name="submitter")
    durable = Durable(runtime.stopping)
    executor = Executor(Submitter(settings, store=mongo, legacy=legacy, durable=durable), broker=runtime,
                        store=mongo, durable=durable, failed_queue=settings.failed_queue, clock=time.time,
                        observer=Observer(finished=metrics.finished))
    thread = threading.Thread(target=runtime.run, args=(executor.run,), name="io", daemon=True)
    thread.start()
    harness.wait_until(lambda: runtime.connected, timeout=30, what="the submitter to connect")
    broker = harness.Broker(url)
    inbound = settings.inbound_queue
    if not args.no_tracemalloc:
        tracemalloc.start(args.frames)
    readings = Readings(args, workers=settings.workers)
    sent = 0
    for round_ in range(args.rounds + 1):
        for _ in range(args.round):
            sent += 1
            broker.publish(inbound, {"user_id": f"u-{sent:07d}", "name": "Maria da Silva",
                                     "email": f"m{sent}@example.com", "cpf": "12345678909"},
                           message_id=f"m-{sent}")
        harness.wait_until(lambda: broker.depth(inbound) == 0 and runtime.unacked(inbound) == 0
                           and runtime.deferred == 0, timeout=900, what="the round to be settled", every=0.5)
        readings.read(round_, sent)
    print(f"wrote {args.out}", flush=True)
    broker.close()
    runtime.request_stop()
    thread.join(60)


def probe_poller(env: dict[str, str], url: str, args: argparse.Namespace) -> None:
    """The poller wired as `poller.main` wires it, fed by the submitter subprocess."""
    settings = poller_settings(env)
    quiet_logs("poller")
    mongo, legacy = adapters(settings, poller_metrics.EDGE)
    poller = Poller(settings, legacy=legacy)
    pending = settings.pending_queue
    waits = [wait_queue_name(pending, d) for d in poller.tiers()]
    runtime = AmqpRuntime(url=url, queues=poller_queues(pending=pending, failed=settings.failed_queue,
                                                        delays=poller.tiers(),
                                                        group_size=settings.quorum_initial_group_size),
                          consume=[pending], workers=settings.workers, prefetch=settings.prefetch,
                          hooks=RuntimeHooks(on_delivery=lambda d: poller_metrics.EDGE.consumed.inc()), name="poller")
    durable = Durable(runtime.stopping)
    executor = Executor(poller, broker=runtime, store=mongo, durable=durable, failed_queue=settings.failed_queue,
                        clock=time.time, observer=Observer(finished=poller_metrics.finished))
    thread = threading.Thread(target=runtime.run, args=(executor.run,), name="io", daemon=True)
    thread.start()
    harness.wait_until(lambda: runtime.connected, timeout=30, what="the poller to connect")
    broker = harness.Broker(url)
    inbound = submitter_settings(env).inbound_queue
    if not args.no_tracemalloc:
        tracemalloc.start(args.frames)
    readings = Readings(args, workers=settings.workers)
    sent = 0

    def settled() -> bool:
        return (broker.depth(inbound) == 0 and broker.depth(pending) == 0 and runtime.unacked(pending) == 0
                and runtime.deferred == 0 and all(broker.depth(q) == 0 for q in waits))

    for round_ in range(args.rounds + 1):
        started = time.monotonic()
        for i in range(args.round):
            # Paced: the adaptive schedule learns from steady arrivals, as in the soak.
            ahead = started + i / args.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            sent += 1
            broker.publish(inbound, {"user_id": f"u-{sent:07d}", "name": "Maria da Silva",
                                     "email": f"m{sent}@example.com", "cpf": "12345678909"},
                           message_id=f"m-{sent}")
        # Twice in a row: a message between a wait queue and pending is in neither for a moment.
        harness.wait_until(lambda: settled() and settled(), timeout=900, what="the round to be settled", every=0.5)
        readings.read(round_, sent, extra={"schedule": repr(poller.schedule)[:300]})
    print(f"wrote {args.out}", flush=True)
    broker.close()
    runtime.request_stop()
    thread.join(60)


class Readings:
    """A reading after each round: RSS, glibc's heaps, pymalloc's arenas; under tracemalloc, the
    sites and the object types that grew since the warm-up round's."""

    def __init__(self, args: argparse.Namespace, *, workers: int) -> None:
        self.args = args
        self.started = time.monotonic()
        self.baseline: tracemalloc.Snapshot | None = None
        self.types: collections.Counter[str] | None = None
        # What the readings depend on besides the code: the allocator's settings in the environment.
        self.result: dict[str, Any] = {
            "stamp": args.stamp, "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "stamp")},
            "allocator_env": {k: os.environ[k] for k in sorted(os.environ)
                              if k.startswith(("GLIBC_TUNABLES", "MALLOC_", "PYTHONMALLOC"))},
            "workers": workers, "rounds": [],
        }
        print("round  delivered  traced_KB  rss_KB  malloc_used_KB  malloc_free_KB  arenas  s", flush=True)

    def read(self, round_: int, sent: int, extra: dict[str, Any] | None = None) -> None:
        args, result = self.args, self.result
        gc.collect()
        # The snapshot kept as the baseline is traced too, and tracemalloc's own tables add to
        # the RSS: the RSS that counts is the one of a run with --no-tracemalloc.
        traced = tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else 0
        used_kb, free_kb = malloc_kb()
        reading: dict[str, Any] = {
            "round": round_, "delivered": sent, "traced_kb": traced, "rss_kb": rss_kb(args.trim),
            "malloc_used_kb": used_kb, "malloc_free_kb": free_kb, "arenas": pymalloc_arenas(),
            "seconds": round(time.monotonic() - self.started, 1), "grown": [], "heaps_kb": malloc_heaps(),
            "rss_by_mapping_kb": rss_by_mapping(),
            **(extra or {})}
        result["rounds"].append(reading)
        print(f"{round_:5d}  {sent:9d}  {traced:9d}  {reading['rss_kb']:6d}  {used_kb:14d}  {free_kb:14d}  "
              f"{reading['arenas']:>6}  {reading['seconds']:.0f}", flush=True)
        print("      rss by mapping (KB): " + " ".join(f"{k} {v}" for k, v in reading["rss_by_mapping_kb"].items()),
              flush=True)
        print("      glibc arenas (held/free KB): " + " ".join(f"{h}/{f}" for h, f in reading["heaps_kb"]),
              flush=True)
        types = collections.Counter(type(o).__name__ for o in gc.get_objects())
        if self.types is None:
            self.types = types
        else:
            more = sorted(((n - self.types.get(t, 0), t) for t, n in types.items()), reverse=True)
            reading["types_grown"] = {t: d for d, t in more[:args.top] if d > 0}
            print("      objects: " + ", ".join(f"{t} {d:+d}" for d, t in more[:args.top] if d > 0), flush=True)
        if not tracemalloc.is_tracing():
            write(result, args.out)
            return
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if self.baseline is None:
            self.baseline = snapshot
            write(result, args.out)
            return
        grown = sorted(snapshot.compare_to(self.baseline, "traceback"), key=lambda stat: -stat.size_diff)
        for stat in grown[:args.top]:
            if stat.size_diff <= 0:
                break
            frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback))
            print(f"      +{stat.size_diff / 1024:8.1f} KB {stat.count_diff:+6d} blocks  {frames}")
            reading["grown"].append({"kb": round(stat.size_diff / 1024, 1), "blocks": stat.count_diff,
                                     "frames": frames})
        write(result, args.out)


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
