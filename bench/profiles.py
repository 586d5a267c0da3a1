"""`make bench-profiles` (and the second half of `make bench`): the fixed poll schedule against the
adaptive one, side by side, on each of legacy-sim's latency profiles.

For each profile, two pipelines run at once, each in its own vhost with its own legacy-sim and
SecantusDB, one submitter and one poller: one on `POLL_SCHEDULE=fixed`, one on `adaptive`, both
with the defaults (first poll at 10 s, then every 2 s: the adaptive poller's cold start). One
paced publisher sends each registration to both at the same moment, at `--rate` per second:

1. warm-up: `--warmup` registrations, then a wait until both pipelines have finished them, so
   that the adaptive poller has learned from whole latencies and nothing of the warm-up is left
   in flight;
2. the measured phase: `--n` registrations at the same rate, then a wait until both have
   finished them. For a drift, legacy-sim is set at the start of this phase (PATCH
   /admin/config) to the profile's first phase for half the phase's publishing, then the second.

Per schedule, of the measured registrations only (legacy-sim's per-request record): polls per
registration, the mean and p95 detection delay (from completion to the poll that saw it), the
median latency drawn; the legacy requests per registration (POSTs and GETs over the phase), and
per second at `--rate` (what the same schedule asks of the legacy API at that arrival rate); CPU
milliseconds per registration over the phase of the submitter, the poller (the services), their
legacy-sim and their SecantusDB, net of what each spends idle (measured for `--idle-s` after
the phase: at a few registrations a second the idle share would swamp the rest), and of the
broker: its CPU over the phase times this vhost's
share of the messages it published and delivered in every vhost meanwhile (management API),
since one broker serves the whole machine. The adaptive poller's learned completion ages are
shown too. Every registration must end registered, or the run stops.

Writes `bench/results/<stamp>-profiles.json`, `.md` (the table) and `.png` (polls per
registration and detection delay against the median latency). Figures are measured and
reported, never asserted.

    .venv/bin/python bench/profiles.py                 # or: make bench-profiles
    .venv/bin/python bench/profiles.py --n 1000 --profiles uniform:10,20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import harness  # noqa: E402
import pika  # noqa: E402
import requests  # noqa: E402
import run  # noqa: E402

SCHEDULES = ("fixed", "adaptive")
# The profiles of issue 16; a drift is written FIRST->SECOND, the switch half-way through the
# measured phase's publishing.
PROFILES = ("uniform:2,4", "uniform:10,20", "uniform:40,80", "lognormal:15,0.5", "uniform:10,20->uniform:40,80")
DRIFT = "->"
QUOTE_BRACE = '"}'
# legacy-sim's request counters: every POST and GET it answered.
REQUEST_COUNTERS = ("submissions_total", "idempotent_replays_total", "rejected_total", "polls_total",
                    "unknown_polls_total", "post_503_total", "get_503_total")


@dataclass
class Figures:
    """One schedule on one profile, over the measured phase."""

    profile: str
    schedule: str
    n: int
    warmup: int
    rate_per_s: float
    warmup_s: float = 0.0
    phase_s: float = 0.0
    latency_median_s: float = 0.0
    polls_per_registration: float = 0.0
    delay_mean_s: float = 0.0
    delay_p95_s: float = 0.0
    legacy_requests_per_registration: float = 0.0
    legacy_requests_per_s: float = 0.0
    cpu_ms_per_registration: dict[str, float] = field(default_factory=dict)
    idle_cpu_ms_per_s: dict[str, float] = field(default_factory=dict)
    broker_share: float = 0.0
    learned_before: dict[str, float] = field(default_factory=dict)
    # A drift's measured registrations published before the switch and after it.
    drift: dict[str, dict[str, float]] = field(default_factory=dict)
    learned_after: dict[str, float] = field(default_factory=dict)

    @property
    def services_cpu_ms(self) -> float:
        return self.cpu_ms_per_registration.get("submitter", 0.0) + self.cpu_ms_per_registration.get("poller", 0.0)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def metrics(service: harness.Service) -> dict[str, float]:
    """The poller's schedule gauges: learned, observations, first poll, interval, completion-age percentiles."""
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    out = {}
    for name, labels, value in re.findall(r"^poller_(schedule_\w+|completion_age_seconds)(\{[^}]*\})? (\S+)$",
                                          text, re.MULTILINE):
        key = name if not labels else f"{name}_p{labels.split('=')[1].strip(QUOTE_BRACE)}"
        out[key] = float(value)
    return out


class Side:
    """One schedule's pipeline: a vhost, legacy-sim, SecantusDB, a submitter and a poller."""

    def __init__(self, stack: ExitStack, schedule: str, latency: str, args: argparse.Namespace, logs: Path,
                 tag: str) -> None:
        self.schedule = schedule
        self.url = stack.enter_context(harness.vhost(f"bench-{schedule}"))
        self.vhost = self.url.rsplit("/", 1)[1]
        broker = harness.Broker(self.url)
        broker.declare("registrations", "registrations.pending", "registrations.failed")
        broker.close()
        self.mongo = harness.start_secantus()
        stack.callback(lambda: shutil.rmtree(self.mongo.storage, ignore_errors=True))
        stack.callback(self.mongo.stop)
        self.legacy = run.start_legacy(stack, {"LEGACY_SIM_LATENCY_PROFILE": latency},
                                       logs / f"legacy-{tag}-{schedule}.log")
        self.database = "bench"
        env = run.pipeline_env(args, url=self.url, mongo_uri=self.mongo.uri, database=self.database,
                               legacy_url=self.legacy.url, n=args.warmup + args.n,
                               extra={"POLL_SCHEDULE": schedule})
        self.services, procs = run.start_pipeline(stack, env, logs, tag=f"-{tag}-{schedule}")
        assert self.mongo.process is not None
        self.pids = {**procs, "legacy-sim": self.legacy.process.pid, "mongodb": self.mongo.process.pid}

    @property
    def poller(self) -> harness.Service:
        return self.services[1]

    def finished(self) -> int:
        for service in self.services:
            if service.process is None or service.process.poll() is not None:
                raise SystemExit(f"{self.schedule}: {service.name} exited:\n{service.log()[-3000:]}")
        return run.finalised(self.poller)

    def cpu(self) -> dict[str, float]:
        return {name: run.cpu_seconds(pid) for name, pid in self.pids.items()}

    def registered(self) -> int:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(self.mongo.uri)
        try:
            return client[self.database]["users"].count_documents({"registration_status": "registered"})
        finally:
            client.close()


class BrokerMessages:
    """Messages the broker published and delivered, per vhost, sampled every few seconds from the
    management API over a phase: a vhost that goes away mid-phase keeps its last count."""

    def __init__(self, every_s: float = 4.0) -> None:
        self.first: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            vhosts = requests.get(f"{harness.MANAGEMENT}/vhosts", auth=("guest", "guest"), timeout=10).json()
        except (requests.RequestException, ValueError):
            return
        for v in vhosts:
            stats = v.get("message_stats") or {}
            count = int(stats.get("publish", 0)) + int(stats.get("deliver_get", 0))
            self.first.setdefault(v["name"], count)
            self.last[v["name"]] = count

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self._sample()

    def __enter__(self) -> BrokerMessages:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def share(self, vhost: str) -> float:
        moved = {name: self.last[name] - self.first[name] for name in self.last}
        total = sum(max(0, m) for m in moved.values())
        return max(0, moved.get(vhost, 0)) / total if total else 0.0


def publish_paced(sides: list[Side], prefix: str, first: int, n: int, rate: float) -> None:
    """Registrations `prefix`-first .. first+n-1, one every 1/rate s, each to every side at once."""
    connections = [pika.BlockingConnection(pika.URLParameters(side.url)) for side in sides]
    try:
        channels = [c.channel() for c in connections]
        for channel in channels:
            channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        began = time.monotonic()
        for k in range(n):
            ahead = began + k / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # the pace of arrivals, not a wait for a condition
            i = first + k
            props.message_id = f"{prefix}-{i:06d}"
            body = run.registration(props.message_id, i)
            for channel in channels:
                channel.basic_publish("", "registrations", body, props)
    finally:
        for connection in connections:
            connection.close()


def wait_finished(sides: list[Side], total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = [side.finished() for side in sides]
        if all(d >= total for d in done):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"after {timeout} s: " + ", ".join(f"{s.schedule} {d} of {total} finished"
                                                                  for s, d in zip(sides, done, strict=True)))
        time.sleep(0.5)


def run_profile(profile: str, args: argparse.Namespace, logs: Path, tag: str) -> list[Figures]:
    first_phase, _, then = profile.partition(DRIFT)
    figures = [Figures(profile, schedule, args.n, args.warmup, args.rate) for schedule in SCHEDULES]
    with ExitStack() as stack:
        sides = [Side(stack, schedule, first_phase, args, logs, tag) for schedule in SCHEDULES]
        began = time.monotonic()
        publish_paced(sides, "w", 0, args.warmup, args.rate)
        wait_finished(sides, args.warmup, args.timeout)
        warmup_s = time.monotonic() - began
        for side, f in zip(sides, figures, strict=True):
            f.warmup_s = warmup_s
            f.learned_before = metrics(side.poller) if side.schedule == "adaptive" else {}
            if then:
                side.legacy.configure(latency_profile=f"{first_phase} for {args.n / args.rate / 2:g} then {then}")
        counters0 = [side.legacy.stats(summary=True) for side in sides]
        cpu0 = [side.cpu() for side in sides]
        rabbit = run.broker_pid()
        rabbit0 = run.cpu_seconds(rabbit) if rabbit else 0.0
        began = time.monotonic()
        with BrokerMessages() as messages:
            publish_paced(sides, "m", args.warmup, args.n, args.rate)
            wait_finished(sides, args.warmup + args.n, args.timeout)
            phase_s = time.monotonic() - began
            cpu1 = [side.cpu() for side in sides]
            rabbit_cpu = (run.cpu_seconds(rabbit) - rabbit0) if rabbit else 0.0
        # What each process spends with nothing to do (heartbeats, timers, metrics), over the same
        # span as the phase: at a few registrations a second it would otherwise dominate.
        time.sleep(args.idle_s)  # a span to measure over, not a wait for a condition
        cpu2 = [side.cpu() for side in sides]
        for side, f, c0, c1, c2, k0 in zip(sides, figures, cpu0, cpu1, cpu2, counters0, strict=True):
            registered = side.registered()
            if registered != args.warmup + args.n:
                raise SystemExit(f"{profile} {side.schedule}: {registered} of {args.warmup + args.n} registered")
            stats = side.legacy.stats()
            measured = [(rid, r) for rid, r in stats["requests"].items() if str(r["user_id"]).startswith("m-")]
            if len(measured) != args.n or any(r["detected_at"] is None for _, r in measured):
                raise SystemExit(f"{profile} {side.schedule}: {len(measured)} measured registrations in legacy-sim, "
                                 "or some never seen done")
            delays = [r["detected_at"] - r["completes_at"] for _, r in measured]
            if then:
                # Published in order, one every 1/rate s from the switch's clock: the first half
                # before the drift, the second after it.
                halves = {"before": [(rid, r) for rid, r in measured
                                     if int(r["user_id"][2:]) < args.warmup + args.n // 2]}
                halves["after"] = [m for m in measured if m not in halves["before"]]
                f.drift = {name: {"n": len(part),
                                  "polls_per_registration": sum(stats["polls_by_request"][rid] for rid, _ in part)
                                  / len(part),
                                  "delay_mean_s": sum(r["detected_at"] - r["completes_at"] for _, r in part)
                                  / len(part)}
                           for name, part in halves.items()}
            f.phase_s = phase_s
            f.latency_median_s = percentile([r["completes_at"] - r["submitted_at"] for _, r in measured], 50)
            f.polls_per_registration = sum(stats["polls_by_request"][rid] for rid, _ in measured) / args.n
            f.delay_mean_s = sum(delays) / len(delays)
            f.delay_p95_s = percentile(delays, 95)
            f.legacy_requests_per_registration = sum(stats[k] - k0[k] for k in REQUEST_COUNTERS) / args.n
            f.legacy_requests_per_s = f.legacy_requests_per_registration * args.rate
            f.idle_cpu_ms_per_s = {name: (c2[name] - c1[name]) * 1000 / args.idle_s for name in c0}
            f.cpu_ms_per_registration = {
                name: max(0.0, (c1[name] - c0[name]) * 1000 - f.idle_cpu_ms_per_s[name] * phase_s) / args.n
                for name in c0}
            f.broker_share = messages.share(side.vhost)
            f.cpu_ms_per_registration["rabbitmq"] = rabbit_cpu * f.broker_share * 1000 / args.n
            f.learned_after = metrics(side.poller) if side.schedule == "adaptive" else {}
    return figures


def table(figures: list[Figures]) -> str:
    head = ("profile", "schedule", "polls/reg", "delay mean (s)", "delay p95 (s)", "legacy req/reg",
            "legacy req/s", "CPU ms/reg broker", "CPU ms/reg services", "submitter", "poller", "legacy-sim",
            "mongodb", "latency median (s)", "learned p10/p50/p90 (s)")
    rows = []
    for f in figures:
        cpu = f.cpu_ms_per_registration
        learned = "/".join(f"{f.learned_after.get(f'completion_age_seconds_p{p}', 0):.1f}" for p in (10, 50, 90)) \
            if f.learned_after else "-"
        rows.append((f.profile.replace(DRIFT, " → "), f.schedule, f"{f.polls_per_registration:.2f}",
                     f"{f.delay_mean_s:.2f}", f"{f.delay_p95_s:.2f}", f"{f.legacy_requests_per_registration:.2f}",
                     f"{f.legacy_requests_per_s:.1f}", f"{cpu.get('rabbitmq', 0):.2f}", f"{f.services_cpu_ms:.2f}",
                     f"{cpu.get('submitter', 0):.2f}", f"{cpu.get('poller', 0):.2f}", f"{cpu.get('legacy-sim', 0):.2f}",
                     f"{cpu.get('mongodb', 0):.2f}", f"{f.latency_median_s:.1f}", learned))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for f in figures:
        if f.drift:
            before, after = f.drift["before"], f.drift["after"]
            lines.append(f"\n{f.profile.replace(DRIFT, ' → ')}, {f.schedule}: published before the switch "
                         f"{before['polls_per_registration']:.2f} polls/reg, {before['delay_mean_s']:.2f} s mean delay "
                         f"({before['n']:.0f}); after it {after['polls_per_registration']:.2f} polls/reg, "
                         f"{after['delay_mean_s']:.2f} s ({after['n']:.0f})")
    return "\n".join(lines)


def plot(figures: list[Figures], args: argparse.Namespace, path: Path) -> None:
    """Per profile, ordered by latency: polls per registration, and the mean detection delay with
    its p95 as a tick, the two schedules side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One place per profile, for both schedules: the median of what both legacy-sims drew.
    where = {p: sum(f.latency_median_s for f in figures if f.profile == p) / len(SCHEDULES)
             for p in {f.profile for f in figures}}
    order = sorted(where, key=lambda p: where[p])
    fig, (polls, delay) = plt.subplots(1, 2, figsize=(14, 5.5))
    colours = {"fixed": "tab:red", "adaptive": "tab:blue"}
    width = 0.38
    for k, schedule in enumerate(SCHEDULES):
        mine = {f.profile: f for f in figures if f.schedule == schedule}
        x = [i + (k - 0.5) * width for i in range(len(order))]
        bars = polls.bar(x, [mine[p].polls_per_registration for p in order], width, color=colours[schedule],
                         label=schedule)
        polls.bar_label(bars, fmt="%.1f", fontsize=8)
        bars = delay.bar(x, [mine[p].delay_mean_s for p in order], width, color=colours[schedule],
                         label=f"{schedule}: mean")
        delay.bar_label(bars, fmt="%.1f", fontsize=8)
        delay.plot(x, [mine[p].delay_p95_s for p in order], "_", markersize=18, markeredgewidth=2,
                   color="black" if schedule == "fixed" else "dimgrey", label=f"{schedule}: p95")
    labels = [p.replace(DRIFT, " →\n") + f"\nmedian {where[p]:.1f} s" for p in order]
    for ax, label in ((polls, "polls per registration"), (delay, "detection delay (s)")):
        ax.set_xticks(range(len(order)), labels, fontsize=8)
        ax.set_xlabel("latency profile, by the median latency of the measured registrations")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    n = figures[0]
    fig.suptitle(f"fixed (first poll {args.first_delay:g} s, then every {args.interval:g} s) against adaptive: "
                 f"N={n.n} per run after a warm-up of {n.warmup}, {n.rate_per_s:g} registrations/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", default=os.environ.get("PROFILES", ";".join(PROFILES)),
                        help="latency profiles, separated by semicolons; FIRST->SECOND drifts half-way through")
    parser.add_argument("--n", type=int, default=int(os.environ.get("PROFILE_N", "400")),
                        help="measured registrations per profile and schedule")
    parser.add_argument("--warmup", type=int, default=int(os.environ.get("PROFILE_WARMUP", "200")),
                        help="registrations before the measured ones, finished before they start")
    parser.add_argument("--rate", type=float, default=10.0, help="registrations published per second")
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="seconds after each phase over which the processes' idle CPU is measured")
    parser.add_argument("--first-delay", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each phase may take to finish")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for both services, e.g. --env WORKERS=8 (repeatable)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--replot", type=Path, metavar="RESULT.json",
                        help="draw the PNG (and write the table) again from a result file, and run nothing")
    args = parser.parse_args()
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        figures_saved = [Figures(**r) for r in saved["results"]]
        plot(figures_saved, argparse.Namespace(**saved["args"]), args.replot.with_suffix(".png"))
        args.replot.with_suffix(".md").write_text(table(figures_saved) + "\n")
        return 0
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    logs = Path(os.environ.get("BENCH_LOGS", f"/tmp/regbridge-bench-{stamp}"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"fixed against adaptive, per latency profile: N={args.n} measured per run after a warm-up of "
          f"{args.warmup}, both at {args.rate:g} registrations/s (logs: {logs})", flush=True)
    figures: list[Figures] = []
    for k, profile in enumerate(args.profiles.split(";")):
        began = time.monotonic()
        figures += run_profile(profile, args, logs, tag=f"p{k}")
        print(f"  {profile}: {time.monotonic() - began:.0f} s", flush=True)
    report = table(figures)
    print(report)
    out = HERE / "results" / f"{stamp}-profiles"
    out.parent.mkdir(exist_ok=True)
    meta = {"machine": {"cores": os.cpu_count()}, "args": vars(args), "table": report}
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(f) for f in figures]}, indent=1))
    out.with_suffix(".md").write_text(report + "\n")
    plot(figures, args, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
