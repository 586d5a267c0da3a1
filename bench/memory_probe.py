"""A real submitter in this process under `tracemalloc`: which allocation sites grow with deliveries.

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
reading), tells arena growth from the interpreter's own.
"""

from __future__ import annotations

import argparse
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

from regbridge import logs
from regbridge.amqp import AmqpRuntime, RuntimeHooks
from regbridge.durable import Durable
from regbridge.executor import Executor, Observer
from regbridge.process import adapters
from regbridge.settings import submitter_settings
from regbridge.topology import submitter_queues
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
    parser.add_argument("--out", type=Path, help="the readings as JSON (default: "
                        "bench/results/<stamp>-memory-probe.json)")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    if args.out is None:
        args.out = RESULTS / f"{stamp}-memory-probe.json"
    args.stamp = stamp

    with harness.vhost("memprobe") as url, harness.mongodb() as mongo:
        sim = harness.start_legacy_sim({"LEGACY_SIM_POST_503_RATE": "0.01"})
        try:
            env = harness.service_env(rabbitmq_url=url, mongodb_uri=mongo.uri, database="memprobe",
                                      legacy_url=sim.url)
            probe(env, url, args)
        finally:
            sim.stop()


def probe(env: dict[str, str], url: str, args: argparse.Namespace) -> None:
    settings = submitter_settings(env)
    logs.setup("submitter", "INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the whole run
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
    sent = 0
    baseline: tracemalloc.Snapshot | None = None
    started = time.monotonic()
    # What the readings depend on besides the code: the allocator's settings in the environment.
    result: dict[str, Any] = {
        "stamp": args.stamp, "argv": sys.argv[1:],
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "stamp")},
        "allocator_env": {k: os.environ[k] for k in sorted(os.environ)
                          if k.startswith(("GLIBC_TUNABLES", "MALLOC_", "PYTHONMALLOC"))},
        "workers": settings.workers, "rounds": [],
    }
    print("round  delivered  traced_KB  rss_KB  malloc_used_KB  malloc_free_KB  arenas  s", flush=True)
    for round_ in range(args.rounds + 1):
        for _ in range(args.round):
            sent += 1
            broker.publish(inbound, {"user_id": f"u-{sent:07d}", "name": "Maria da Silva",
                                     "email": f"m{sent}@example.com", "cpf": "12345678909"},
                           message_id=f"m-{sent}")
        harness.wait_until(lambda: broker.depth(inbound) == 0 and runtime.unacked(inbound) == 0
                           and runtime.deferred == 0, timeout=900, what="the round to be settled", every=0.5)
        gc.collect()
        # The snapshot kept as the baseline is traced too, and tracemalloc's own tables add to
        # the RSS: the RSS that counts is the one of a run with --no-tracemalloc.
        traced = tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else 0
        used_kb, free_kb = malloc_kb()
        reading: dict[str, Any] = {
            "round": round_, "delivered": sent, "traced_kb": traced, "rss_kb": rss_kb(args.trim),
            "malloc_used_kb": used_kb, "malloc_free_kb": free_kb, "arenas": pymalloc_arenas(),
            "seconds": round(time.monotonic() - started, 1), "grown": []}
        result["rounds"].append(reading)
        print(f"{round_:5d}  {sent:9d}  {traced:9d}  {reading['rss_kb']:6d}  {used_kb:14d}  {free_kb:14d}  "
              f"{reading['arenas']:>6}  {reading['seconds']:.0f}", flush=True)
        if not tracemalloc.is_tracing():
            write(result, args.out)
            continue
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if baseline is None:
            baseline = snapshot
            write(result, args.out)
            continue
        grown = sorted(snapshot.compare_to(baseline, "traceback"), key=lambda stat: -stat.size_diff)
        for stat in grown[:args.top]:
            if stat.size_diff <= 0:
                break
            frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback))
            print(f"      +{stat.size_diff / 1024:8.1f} KB {stat.count_diff:+6d} blocks  {frames}")
            reading["grown"].append({"kb": round(stat.size_diff / 1024, 1), "blocks": stat.count_diff,
                                     "frames": frames})
        write(result, args.out)
    print(f"wrote {args.out}", flush=True)
    broker.close()
    runtime.request_stop()
    thread.join(60)


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
