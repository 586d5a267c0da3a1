"""The soak's summary, plot and docs table, computed from its samples (`bench/soak.py` writes
them). Run on its own to render a result file again:

    .venv/bin/python bench/soak_report.py bench/results/<stamp>-soak-30m.json [--docs bench/README.md]

`--docs FILE` writes the summary as markdown: between the `<!-- soak figures -->` and
`<!-- /soak figures -->` markers when FILE holds them, else as the whole of FILE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- soak figures -->", "<!-- /soak figures -->"
SERVICES = ("submitter", "poller")
# Shared with everything else on the machine (other vhosts, other runs): its figures are context.
SHARED = ("rabbitmq",)
# The bound for a service after the warm-up: its RSS grows by less than this, and its
# descriptors and threads stay constant.
RSS_BOUND_MB = 1.0


def fit_slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x (0 with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per process, after the warm-up: RSS slope (KB/min, and MB over the span after warm-up),
    growth (last - first, max - min), descriptors and threads min/max."""
    warmup_s = data["args"]["warmup_min"] * 60
    samples = [s for s in data["samples"] if s["phase"] == "load"]
    after = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    processes: dict[str, Any] = {}
    names = sorted({name for s in samples for name in s["processes"]})
    for name in names:
        rows = [(s["t"], s["processes"][name]) for s in after if name in s["processes"]]
        if not rows:
            continue
        rss = [(t / 60, p["rss_kb"]) for t, p in rows]
        slope = fit_slope(rss)
        span_min = rss[-1][0] - rss[0][0]
        entry: dict[str, Any] = {
            "rss_first_mb": rss[0][1] / 1024, "rss_last_mb": rss[-1][1] / 1024,
            "rss_growth_mb": (rss[-1][1] - rss[0][1]) / 1024,
            "rss_range_mb": (max(v for _, v in rss) - min(v for _, v in rss)) / 1024,
            "rss_slope_kb_per_min": slope, "rss_slope_mb_over_span": slope * span_min / 1024,
            "span_min": span_min,
        }
        anon = [(t / 60, p["rss_anon_kb"]) for t, p in rows if p.get("rss_anon_kb") is not None]
        if anon:
            entry["rss_anon_slope_kb_per_min"] = fit_slope(anon)
        if "fd_kinds" in rows[0][1]:
            entry["fd_kinds_first"], entry["fd_kinds_last"] = rows[0][1]["fd_kinds"], rows[-1][1]["fd_kinds"]
        load = [(s["published"], s["processes"][name]["cpu_s"]) for s in samples if name in s["processes"]]
        if len(load) > 1 and load[-1][0] > load[0][0]:
            entry["cpu_ms_per_registration"] = (load[-1][1] - load[0][1]) * 1000 / (load[-1][0] - load[0][0])
        for measure in ("fds", "threads"):
            values = [p[measure] for _, p in rows if p.get(measure) is not None]
            if values:
                entry[f"{measure}_min"], entry[f"{measure}_max"] = min(values), max(values)
        processes[name] = entry
    return {"processes": processes, "queues": queue_summary(after),
            "samples_after_warmup": len(after), "warmup_min": data["args"]["warmup_min"]}


def queue_summary(after: list[dict[str, Any]]) -> dict[str, Any]:
    """Per queue, and for all the pipeline's queues together ("all"): the most messages (ready
    and unacked) in a sample after the warm-up, and the slope of its depth (messages/min). A
    queue missing from a sample (not declared yet) counts as empty there."""
    names = sorted({q for s in after for q in s.get("queues", {})})
    if not names:
        return {}
    series = {q: [(s["t"] / 60, s.get("queues", {}).get(q) or 0) for s in after] for q in names}
    series["all"] = [(s["t"] / 60, sum(v or 0 for v in s.get("queues", {}).values())) for s in after]
    return {q: {"max": max(v for _, v in points), "last": points[-1][1], "slope_per_min": fit_slope(points)}
            for q, points in series.items()}


def verdict(p: dict[str, Any]) -> dict[str, bool]:
    """A service's figures against the issue's bound: the RSS grew by less than RSS_BOUND_MB after
    the warm-up, both from first to last sample and by the fitted slope over the span; the
    descriptors and the threads did not change."""
    return {
        "rss": p["rss_growth_mb"] < RSS_BOUND_MB and p["rss_slope_mb_over_span"] < RSS_BOUND_MB,
        "constant": p.get("fds_min") == p.get("fds_max") and p.get("threads_min") == p.get("threads_max"),
    }


def yes(ok: bool) -> str:
    return "yes" if ok else "no"


def summary_text(data: dict[str, Any]) -> str:
    summary = data["summary"]
    run = data["run"]
    lines = [f"soak: {run['published']} registrations in {run['publish_s'] / 60:.1f} min at "
             f"{run['achieved_rate']:.2f}/s (asked {data['args']['rate']}/s; publisher at most "
             f"{run['max_lag_s']:.2f} s behind), wall time {run['wall_s'] / 60:.1f} min",
             f"outcomes: {data['check']['verdict']}",
             f"after a {summary['warmup_min']:g}-minute warm-up ({summary['samples_after_warmup']} samples):"]
    header = f"  {'process':<11} {'RSS first→last MB':>19} {'growth MB':>9} {'max-min MB':>10} " \
             f"{'slope KB/min':>12} {'MB/span':>8} {'fds':>7} {'threads':>7} {'CPU ms/reg':>10}"
    lines.append(header)
    for name, p in summary["processes"].items():
        fds = f"{p['fds_min']}-{p['fds_max']}" if "fds_min" in p else "-"
        threads = f"{p['threads_min']}-{p['threads_max']}" if "threads_min" in p else "-"
        lines.append(f"  {name:<11} {p['rss_first_mb']:>8.2f} → {p['rss_last_mb']:>8.2f} "
                     f"{p['rss_growth_mb']:>+9.2f} {p['rss_range_mb']:>10.2f} {p['rss_slope_kb_per_min']:>+12.1f} "
                     f"{p['rss_slope_mb_over_span']:>+8.2f} {fds:>7} {threads:>7} "
                     f"{p.get('cpu_ms_per_registration', float('nan')):>10.2f}")
    for name, p in summary["processes"].items():
        if name in SERVICES:
            v = verdict(p)
            lines.append(f"  {name}: RSS growth after warm-up < {RSS_BOUND_MB:g} MB: {yes(v['rss'])} "
                         f"({p['rss_growth_mb']:+.2f} MB first to last, {p['rss_slope_mb_over_span']:+.2f} by the "
                         f"slope); descriptors and threads constant: {yes(v['constant'])} "
                         f"(fds {p.get('fds_min')}-{p.get('fds_max')}, "
                         f"threads {p.get('threads_min')}-{p.get('threads_max')})")
    queues = summary.get("queues") or {}
    if queues:
        lines.append(f"  {'queue (after warm-up)':<40} {'max':>7} {'last':>7} {'slope/min':>10}")
        for queue, q in queues.items():
            label = "all the pipeline's queues" if queue == "all" else queue
            lines.append(f"  {label:<40} {q['max']:>7} {q['last']:>7} {q['slope_per_min']:>+10.2f}")
    for name, p in summary["processes"].items():
        if p.get("fd_kinds_first") != p.get("fd_kinds_last"):
            lines.append(f"  {name} descriptors by kind, after warm-up → end: {p['fd_kinds_first']} → "
                         f"{p['fd_kinds_last']}")
    return "\n".join(lines)


def markdown(data: dict[str, Any], json_path: Path, docs: Path) -> str:
    """The figures as the docs show them, with links relative to `docs`."""
    summary, run, args = data["summary"], data["run"], data["args"]
    rel_json = os.path.relpath(json_path, docs.parent)
    rel_png = os.path.relpath(json_path.with_suffix(".png"), docs.parent)
    out = [
        f"`make soak MINUTES={args['minutes']:g} RATE={args['rate']:g}` ({data['stamp']}, "
        f"[`{json_path.name}`]({rel_json})): {run['published']:,} registrations published at "
        f"{run['achieved_rate']:.2f}/s over {run['publish_s'] / 60:.1f} min (the publisher at most "
        f"{run['max_lag_s']:.2f} s behind its schedule); wall time of the run {run['wall_s'] / 60:.1f} min; "
        f"outcomes: {data['check']['verdict']}. Figures after the first {summary['warmup_min']:g} minutes "
        f"({summary['samples_after_warmup']} samples, every {args['sample_s']:g} s):",
        "",
        "| process | RSS after warm-up → end (MB) | growth (MB) | max-min (MB) | slope (KB/min) "
        f"| slope over the span (MB) | fds | threads | CPU ms/reg | RSS growth < {RSS_BOUND_MB:g} MB "
        "| fds and threads constant |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in summary["processes"].items():
        label = f"{name} (shared)" if name in SHARED else name
        fds = f"{p['fds_min']}-{p['fds_max']}" if "fds_min" in p else "-"
        threads = f"{p['threads_min']}-{p['threads_max']}" if "threads_min" in p else "-"
        out.append(f"| {label} | {p['rss_first_mb']:.2f} → {p['rss_last_mb']:.2f} | {p['rss_growth_mb']:+.2f} "
                   f"| {p['rss_range_mb']:.2f} | {p['rss_slope_kb_per_min']:+.1f} "
                   f"| {p['rss_slope_mb_over_span']:+.2f} | {fds} | {threads} "
                   f"| {p.get('cpu_ms_per_registration', float('nan')):.2f} "
                   + (f"| {yes(verdict(p)['rss'])} | {yes(verdict(p)['constant'])} |" if name in SERVICES
                      else "| - | - |"))
    queues = summary.get("queues") or {}
    if queues:
        idle = sum(1 for queue, q in queues.items() if queue != "all" and q["max"] == 0)
        out += ["", "Queue depths after the warm-up (messages ready and unacked, per sample"
                + (f"; {idle} wait queues that held nothing left out" if idle else "") + "):", "",
                "| queue | max | at the end | slope (messages/min) |", "| --- | --- | --- | --- |"]
        for queue, q in queues.items():
            if queue != "all" and q["max"] == 0:  # the adaptive ladder declares dozens; most stay empty
                continue
            label = "all the pipeline's queues" if queue == "all" else f"`{queue}`"
            out.append(f"| {label} | {q['max']:,} | {q['last']:,} | {q['slope_per_min']:+.2f} |")
    out += ["", f"![RSS, descriptors, threads and queue depths over the soak]({rel_png})"]
    return "\n".join(out)


def write_docs(text: str, docs: Path) -> None:
    """Between the markers when `docs` holds them, each on a line of its own (the rest of the
    file is kept; prose may name the markers), else the whole file."""
    lines = docs.read_text().splitlines() if docs.exists() else []
    if BEGIN in lines and END in lines[lines.index(BEGIN):]:
        begin = lines.index(BEGIN)
        end = lines.index(END, begin)
        docs.write_text("\n".join([*lines[:begin + 1], text, *lines[end:]]) + "\n")
    else:
        docs.write_text(text + "\n")


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = data["samples"]
    t = [s["t"] / 60 for s in samples]
    names = sorted({name for s in samples for name in s["processes"]})
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    panels = [
        (axes[0][0], "RSS of the services (MB)", [n for n in names if n in SERVICES], "rss_kb", 1 / 1024),
        (axes[0][1], "RSS of the other processes (MB)", [n for n in names if n not in SERVICES], "rss_kb", 1 / 1024),
        (axes[1][0], "open file descriptors", [n for n in names if n not in SHARED], "fds", 1.0),
        (axes[1][1], "threads", names, "threads", 1.0),
    ]
    for ax, title, shown, key, scale in panels:
        for name in shown:
            ys = [s["processes"].get(name, {}).get(key) for s in samples]
            ax.plot(t, [y * scale if y is not None else float("nan") for y in ys], marker=".", label=name)
        ax.set_title(title)
        ax.legend(fontsize="small")
    queues = sorted({q for s in samples for q, depth in s.get("queues", {}).items() if depth})
    ax = axes[2][0]
    for queue in queues:
        ax.plot(t, [s.get("queues", {}).get(queue, float("nan")) for s in samples], marker=".", label=queue)
    ax.set_title("queue depths (messages, ready + unacked)")
    ax.legend(fontsize="small")
    ax = axes[2][1]
    rates = [(b["t"] / 60, (b["published"] - a["published"]) / (b["t"] - a["t"]))
             for a, b in itertools.pairwise(samples) if b["t"] > a["t"] and b["phase"] == "load"]
    ax.plot([x for x, _ in rates], [y for _, y in rates], marker=".", label="published")
    ax.axhline(data["args"]["rate"], color="grey", linestyle=":", label="asked")
    ax.set_title("registrations published per second (between samples)")
    ax.legend(fontsize="small")
    warmup = data["args"]["warmup_min"]
    for row in axes:
        for ax in row:
            ax.axvspan(0, warmup, color="grey", alpha=0.12)
            ax.grid(alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("minutes (shaded: warm-up)")
    fig.suptitle(f"soak {data['stamp']}: {data['run']['published']:,} registrations at "
                 f"{data['run']['achieved_rate']:.1f}/s; outcomes {data['check']['verdict']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a bench/results/<stamp>-soak-<minutes>m.json")
    parser.add_argument("--docs", type=Path, help="write the figures as markdown into this file")
    parser.add_argument("--plot", action="store_true", help="draw the PNG beside the JSON again")
    args = parser.parse_args()
    data = json.loads(args.result.read_text())
    data["summary"] = summarise(data)
    print(summary_text(data))
    if args.plot:
        plot(data, args.result.with_suffix(".png"))
    if args.docs:
        write_docs(markdown(data, args.result.resolve(), args.docs.resolve()), args.docs)
        print(f"wrote the figures into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
