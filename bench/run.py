"""`make bench`: N registrations in one burst through the pipeline, then through the plain
threaded baseline, on this machine, at the legacy system's real latency (10-20 s).

Reports makespan against the ideal (publish time + the longest latency drawn), throughput, CPU
seconds per registration and peak RSS per process, polls per registration and the mean delay
between completion and detection (legacy-sim's counters). Writes
`bench/results/<stamp>-n<N>.json` and a PNG plot of submitted / in flight / finished over time.
Figures are measured and reported, never asserted.

    .venv/bin/python bench/run.py --n 2000            # or: make bench N=2000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402
import pika  # noqa: E402
import requests  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mib(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def peak_rss_mib(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


@dataclass
class Result:
    design: str
    n: int
    publish_s: float = 0.0
    makespan_s: float = 0.0
    ideal_s: float = 0.0
    throughput_per_s: float = 0.0
    cpu_ms_per_registration: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    polls_per_registration: float | None = None
    detection_delay_mean_s: float | None = None
    finalisations: int | None = None
    # The shared broker's and the Mongo-wire server's RSS at its highest during the run, sampled
    # with the progress (their own peak, VmHWM, spans their whole life, not this run).
    side_peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # Every process's CPU-seconds in the run (services, legacy-sim, MongoDB, the broker, this
    # publisher) over the machine's cores: the makespan if the run were CPU-bound and perfectly spread.
    cpu_floor_s: float = 0.0
    submissions: int | None = None
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, submitted, finished)

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.ideal_s if self.ideal_s else 0.0


def registration(user_id: str, i: int) -> bytes:
    """A good registration's body; `i` makes its CPF and e-mail unique."""
    return json.dumps({"user_id": user_id, "name": "Maria da Silva", "email": f"bench{i}@example.com",
                       "cpf": f"{10000000000 + i:011d}"}).encode()


def publish_burst(url: str, n: int) -> float:
    """Publish `n` good registrations as fast as the broker takes them; returns the seconds spent."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    began = time.monotonic()
    for i in range(n):
        props.message_id = f"bench-{i:06d}"
        channel.basic_publish("", "registrations", registration(props.message_id, i), props)
    spent = time.monotonic() - began
    connection.close()
    return spent


def finalised(service: harness.Service) -> int:
    text = requests.get(f"{service.http}/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(r"^poller_finalised_total\{[^}]*\} (\S+)$", text, re.MULTILINE)))


def start_legacy(stack: ExitStack, latency: dict[str, str], log: Path) -> harness.LegacySim:
    """legacy-sim at `latency` (harness.latency_env), 30 ms to accept, stopped with `stack`."""
    legacy = harness.start_legacy_sim({**latency, "LEGACY_SIM_ACCEPT_LATENCY_S": "0.03",
                                       "LEGACY_SIM_RETRY_AFTER_S": "1"}, log=log)
    stack.callback(legacy.stop)
    return legacy


def pipeline_env(args: argparse.Namespace, *, url: str, mongo_uri: str, database: str, legacy_url: str,
                 n: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The services' environment: the bench's poll settings, `--env`, then `extra`."""
    return harness.service_env(rabbitmq_url=url, mongodb_uri=mongo_uri, database=database, legacy_url=legacy_url,
                               extra={"POLL_FIRST_DELAY_S": str(args.first_delay),
                                      "POLL_INTERVAL_S": str(args.interval), "POLL_DEADLINE_S": "300",
                                      "SUBMIT_BACKOFF_BASE_S": "0.5", "SUBMIT_BACKOFF_MAX_S": "30",
                                      "LOG_LEVEL": args.log_level, "BENCH_N": str(n),
                                      **dict(kv.split("=", 1) for kv in args.env), **(extra or {})})


def start_pipeline(stack: ExitStack, env: dict[str, str], logs: Path, *, pollers: int = 1,
                   tag: str = "") -> tuple[list[harness.Service], dict[str, int]]:
    """One submitter and `pollers` pollers, ready, terminated with `stack`; with their pids by name."""
    names = ["submitter"] + ["poller"] * pollers
    services = [harness.Service(name, dict(env), logs / f"{name}{tag}-{i}.log") for i, name in enumerate(names)]
    for service in services:
        service.start()
        stack.callback(lambda s=service: s.terminate() if s.process else None)
    procs: dict[str, int] = {}
    for service in services:
        service.wait_ready()
        assert service.process is not None
        procs[service.name if service.name == "submitter" or pollers == 1 else f"poller-{len(procs)}"] = \
            service.process.pid
    return services, procs


def broker_pid() -> int | None:
    """The machine's broker: the oldest Erlang VM (a test's own node comes and goes later)."""
    beam = subprocess.run(["pgrep", "-o", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
    return int(beam[0]) if beam else None


def run_design(design: str, n: int, args: argparse.Namespace, mongo: harness.Mongo, logs: Path) -> Result:
    result = Result(design, n)
    with ExitStack() as stack:
        url = stack.enter_context(harness.vhost(f"bench-{design}"))
        broker = harness.Broker(url)
        broker.declare("registrations", "registrations.pending", "registrations.failed")
        broker.close()
        legacy = start_legacy(stack, harness.latency_env(args.latency_min, args.latency_max, args.latency_profile),
                              logs / f"legacy-{design}.log")
        database = f"bench_{design}_{os.getpid()}"
        env = pipeline_env(args, url=url, mongo_uri=mongo.uri, database=database, legacy_url=legacy.url, n=n)
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
        stack.callback(client.close)
        stack.callback(lambda: client.drop_database(database))

        procs: dict[str, int] = {}
        progress = {"submitted": 0, "finished": 0}
        if design == "pipeline":
            services, procs = start_pipeline(stack, env, logs, pollers=args.pollers)

            def sample() -> None:
                progress["submitted"] = int(legacy.stats(summary=True)["submissions_total"])
                progress["finished"] = sum(finalised(p) for p in services[1:])
        else:
            proc = subprocess.Popen([sys.executable, str(HERE / "baseline.py")], env=env, stdout=subprocess.PIPE,
                                    stderr=open(logs / "baseline.log", "wb"), text=True)  # noqa: SIM115
            stack.callback(lambda: proc.kill() if proc.poll() is None else None)
            procs["baseline"] = proc.pid

            def read_progress() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith("progress "):
                        _, sub, fin = line.split()
                        progress["submitted"], progress["finished"] = int(sub), int(fin)

            threading.Thread(target=read_progress, daemon=True).start()

            def sample() -> None:
                pass

        mongo_pid = mongo.process.pid if mongo.process is not None else None
        rabbit_pid = broker_pid()
        cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
        side0 = {"legacy-sim": cpu_seconds(legacy.process.pid),
                 **({"mongodb": cpu_seconds(mongo_pid)} if mongo_pid else {}),
                 **({"rabbitmq": cpu_seconds(rabbit_pid)} if rabbit_pid else {}),
                 "bench publisher": time.process_time()}
        sides = {"rabbitmq": rabbit_pid, "mongodb": mongo_pid}
        began = time.monotonic()
        publisher = threading.Thread(target=lambda: setattr(result, "publish_s", publish_burst(url, n)))
        publisher.start()
        deadline = began + args.timeout
        while True:
            sample()
            for side, pid in sides.items():
                if pid:
                    seen = result.side_peak_rss_mib.get(side, 0.0)
                    result.side_peak_rss_mib[side] = round(max(seen, rss_mib(pid)), 1)
            t = time.monotonic() - began
            result.timeline.append((round(t, 2), progress["submitted"], progress["finished"]))
            if progress["finished"] >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{design}: {progress['finished']} of {n} finished after {args.timeout} s")
            time.sleep(0.25)
        result.makespan_s = time.monotonic() - began
        publisher.join()
        for name, pid in procs.items():
            result.cpu_ms_per_registration[name] = (cpu_seconds(pid) - cpu0[name]) * 1000 / n
            result.peak_rss_mib[name] = round(peak_rss_mib(pid), 1)
        legacy_cpu = cpu_seconds(legacy.process.pid) - side0["legacy-sim"]
        result.cpu_ms_per_registration["legacy-sim"] = legacy_cpu * 1000 / n
        if mongo_pid:
            result.cpu_ms_per_registration["mongodb"] = (cpu_seconds(mongo_pid) - side0["mongodb"]) * 1000 / n
        if rabbit_pid:
            result.cpu_ms_per_registration["rabbitmq"] = (cpu_seconds(rabbit_pid) - side0["rabbitmq"]) * 1000 / n
        # This process: the burst's publisher and the sampling of progress.
        result.cpu_ms_per_registration["bench publisher"] = (time.process_time() - side0["bench publisher"]) * 1000 / n
        result.cpu_floor_s = sum(result.cpu_ms_per_registration.values()) * n / 1000 / (os.cpu_count() or 1)
        stats = legacy.stats()
        longest = max(r["completes_at"] - r["submitted_at"] for r in stats["requests"].values())
        result.ideal_s = result.publish_s + longest
        result.throughput_per_s = n / result.makespan_s
        result.polls_per_registration = stats["polls_per_registration"]
        result.detection_delay_mean_s = stats["detection_delay_mean_s"]
        registered = client[database]["users"].count_documents({"registration_status": "registered"})
        if registered != n:
            raise SystemExit(f"{design}: only {registered} of {n} registered")
        if design == "pipeline":
            # Exactly once, however many pollers: finalisations counted by the pollers, and
            # submissions counted by the legacy API, both equal N.
            result.finalisations = sum(finalised(p) for p in services[1:])
            result.submissions = int(stats["submissions_total"])
    return result


def table(results: list[Result]) -> str:
    rows = [("", *(r.design for r in results))]

    def add(label: str, fmt: str, values: list[Any]) -> None:
        rows.append((label, *(fmt.format(v) if v is not None else "-" for v in values)))

    add("registrations", "{:d}", [r.n for r in results])
    add("publish (s)", "{:.1f}", [r.publish_s for r in results])
    add("makespan (s)", "{:.1f}", [r.makespan_s for r in results])
    add("ideal (s)", "{:.1f}", [r.ideal_s for r in results])
    add("makespan / ideal", "{:.2f}", [r.ratio for r in results])
    add("throughput (reg/s)", "{:.0f}", [r.throughput_per_s for r in results])
    add("CPU floor (s)", "{:.1f}", [r.cpu_floor_s for r in results])
    add("makespan / CPU floor", "{:.2f}", [r.makespan_s / r.cpu_floor_s if r.cpu_floor_s else None for r in results])
    names = sorted({k for r in results for k in r.cpu_ms_per_registration})
    for name in names:
        add(f"CPU ms/reg {name}", "{:.2f}", [r.cpu_ms_per_registration.get(name) for r in results])
    add("CPU ms/reg services", "{:.2f}", [sum(v for k, v in r.cpu_ms_per_registration.items()
                                               if k.startswith(("submitter", "poller", "baseline"))) for r in results])
    for name in sorted({k for r in results for k in r.peak_rss_mib}):
        add(f"peak RSS MiB {name}", "{:.0f}", [r.peak_rss_mib.get(name) for r in results])
    for name in sorted({k for r in results for k in r.side_peak_rss_mib}):
        add(f"peak RSS MiB {name} (in the run)", "{:.0f}", [r.side_peak_rss_mib.get(name) for r in results])
    add("legacy submissions", "{:d}", [r.submissions for r in results])
    add("finalisations", "{:d}", [r.finalisations for r in results])
    add("polls / registration", "{:.2f}", [r.polls_per_registration for r in results])
    add("detection delay (s)", "{:.2f}", [r.detection_delay_mean_s for r in results])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        t = [p[0] for p in r.timeline]
        sub = [p[1] for p in r.timeline]
        fin = [p[2] for p in r.timeline]
        ax.plot(t, sub, label="submitted")
        ax.plot(t, [s - f for s, f in zip(sub, fin, strict=True)], label="in flight")
        ax.plot(t, fin, label="finished")
        ax.axvline(r.ideal_s, color="grey", linestyle=":", label="ideal makespan")
        ax.set_title(f"{r.design}: N={r.n}, {r.makespan_s:.1f} s ({r.ratio:.2f}x ideal)")
        ax.set_xlabel("seconds since the burst began")
        ax.legend(loc="center right")
    axes[0][0].set_ylabel("registrations")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", "2000")))
    parser.add_argument("--designs", default=os.environ.get("DESIGNS", "pipeline,baseline"))
    parser.add_argument("--latency-min", type=float, default=10.0)
    parser.add_argument("--latency-max", type=float, default=20.0)
    parser.add_argument("--latency-profile", default=None, metavar="PROFILE",
                        help="legacy-sim's latency profile instead of --latency-min/--latency-max, "
                             "e.g. lognormal:15,0.5 or 'uniform:10,20 for 300 then uniform:40,80'")
    parser.add_argument("--first-delay", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--pollers", type=int, default=1, help="copies of the poller sharing the pending queue")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for both services, e.g. --env WORKERS=8 (repeatable)")
    args = parser.parse_args()

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    logs = Path(os.environ.get("BENCH_LOGS", f"/tmp/regbridge-bench-{stamp}"))
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    with harness.mongodb() as mongo:
        for design in args.designs.split(","):
            print(f"running {design} with N={args.n} (logs: {logs})", flush=True)
            results.append(run_design(design, args.n, args, mongo, logs))
    report = table(results)
    print(report)
    out = HERE / "results" / f"{stamp}-n{args.n}"
    out.parent.mkdir(exist_ok=True)
    meta = {"machine": {"cores": os.cpu_count()}, "args": vars(args), "table": report}
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
