"""`make dashboard`: a picture of the Grafana dashboard's panels drawn from live data, for a
machine where Grafana cannot run.

Starts the pipeline the way `make demo` does (a fresh vhost, SecantusDB unless MONGODB_URI is set,
legacy-sim with sub-second latencies and transient 503s), enables the broker's
rabbitmq_prometheus plugin, runs a real Prometheus scraping both services, legacy-sim and the
broker's per-queue metrics every second, pushes a few waves of registrations (successes, failures
at each stage, retries), then asks Prometheus for each panel's queries as Grafana would and draws
them with matplotlib on the dashboard's own grid. Writes docs/dashboard.png (or the path given).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dashboard_live import (
    Panel,
    Prometheus,
    Wave,
    as_query,
    dashboard,
    enable_broker_metrics,
    legend,
    panels,
    prometheus,
    run_waves,
    scrape_config,
)
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pymongo import MongoClient

OUT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
WAVES = 4
# Waves big enough to stay in the queues across one of the broker's 5 s statistics rounds.
WAVE = Wave(good=150, refused=8, bad_cpf=4, invalid=4)
# Grafana's dark theme, near enough that the picture reads like the dashboard.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLOURS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c", "yellow": "#fade2a", "blue": "#5794f2"}
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d"]
UNITS = {"s": "seconds", "ops": "per second", "short": ""}
# One grid unit of height, in inches (Grafana's is 30 px beside a 24-column width).
UNIT_H = 0.42
WIDTH = 24.0

Series = tuple[str, list[float], list[float]]  # (legend, times, values)


def fetch(server: Prometheus, panel: Panel, *, vhost: str, start: float, end: float) -> list[Series]:
    """Every series of every target of the panel over the run, as Grafana would fetch them."""
    out: list[Series] = []
    for target in panel.targets:
        expr = as_query(target.expr, vhost=vhost, range_s=end - start)
        if target.instant:
            for series in server.query(expr, at=end):
                out.append((legend(target.legend, series["metric"]), [end], [float(series["value"][1])]))
        else:
            for series in server.query_range(expr, start, end):
                times = [float(t) for t, _ in series["values"]]
                out.append((legend(target.legend, series["metric"]), times, [float(v) for _, v in series["values"]]))
    return out


def threshold_colour(panel: Panel, value: float) -> str:
    steps = panel.field_config.get("defaults", {}).get("thresholds", {}).get("steps", [])
    colour = "green"
    for step in steps:
        if step["value"] is None or value >= step["value"]:
            colour = step["color"]
    return COLOURS.get(colour, colour)


def number(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "s":
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def draw_stat(ax: Axes, panel: Panel, data: Sequence[Series]) -> None:
    ax.set_axis_off()
    unit = panel.field_config.get("defaults", {}).get("unit", "")
    shown = [(name, values[-1]) for name, _, values in data if values]
    for i, (name, value) in enumerate(shown):
        x = (i + 0.5) / len(shown)
        named = panel.options.get("textMode") == "value_and_name"
        ax.text(x, 0.45 if named else 0.5, number(value, unit), ha="center", va="center", fontsize=22,
                fontweight="bold", color=threshold_colour(panel, value), transform=ax.transAxes)
        if named:
            ax.text(x, 0.85, name, ha="center", va="center", fontsize=9, color=TEXT, transform=ax.transAxes)


def draw_bars(ax: Axes, panel: Panel, data: Sequence[Series]) -> None:
    shown = [(name, values[-1]) for name, _, values in data if values and not math.isnan(values[-1])]
    names = [name for name, _ in shown]
    values = [value for _, value in shown]
    ax.barh(names, values, color=[threshold_colour(panel, v) for v in values])
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.0f}", va="center", color=TEXT, fontsize=9)
    ax.invert_yaxis()


def draw_lines(ax: Axes, panel: Panel, data: Sequence[Series], start: float) -> None:
    defaults = panel.field_config.get("defaults", {})
    stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
    colours = iter(PALETTE * 4)
    if stacked:
        # One time axis for all: range queries share start, end and step; a missing point is 0.
        grid = sorted({t for _, times, _ in data for t in times})
        rows = []
        for _, times, values in data:
            at = dict(zip(times, values, strict=True))
            rows.append([0.0 if math.isnan(at.get(t, 0.0)) else at.get(t, 0.0) for t in grid])
        ax.stackplot([t - start for t in grid], rows, labels=[name for name, _, _ in data],
                     colors=[next(colours) for _ in data], alpha=0.75)
    else:
        for name, times, values in data:
            ax.plot([t - start for t in times], values, label=name, color=next(colours), linewidth=1.4)
    ax.margins(y=0.12)  # a line at the top of its range stays clear of the frame
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    if UNITS.get(defaults.get("unit", "")):
        ax.set_ylabel(UNITS[defaults["unit"]], fontsize=7, color=TEXT)
    # Below the plot, as Grafana places it, so that it never hides a line.
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(0, -0.08), frameon=False, labelcolor=TEXT,
              ncol=max(1, panel.grid["w"] // 4), columnspacing=1.2, handlelength=1.5)


def draw(all_data: Mapping[int, list[Series]], start: float, end: float, out: Path) -> None:
    board = dashboard()
    every = panels(board)
    height = max(p.grid["y"] + p.grid["h"] for p in every)
    title_h = 0.8
    fig: Figure = plt.figure(figsize=(WIDTH, height * UNIT_H + title_h), facecolor=BACKGROUND)
    total = height * UNIT_H + title_h
    when = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    heading = (f"{board['title']}: {len(every)} panels, from a live run of {end - start:.0f} s ({when}); "
               "time axes in seconds into the run")
    fig.text(0.005, 1 - 0.35 / total, heading, color=TEXT, fontsize=15, fontweight="bold", va="center")

    def box(grid: Mapping[str, int]) -> tuple[float, float, float, float]:
        left = grid["x"] / 24
        top = 1 - (title_h + grid["y"] * UNIT_H) / total
        return left, top, grid["w"] / 24, grid["h"] * UNIT_H / total

    for panel in every:
        left, top, width, tall = box(panel.grid)
        if panel.type == "row":
            fig.text(left + 0.004, top - tall / 2, panel.title, color=TEXT, fontsize=12, fontweight="bold",
                     va="center")
            continue
        # Room for the title above and the tick labels below, as a Grafana panel has.
        pad_x, pad_top, pad_bottom = 0.022, 0.3 / total, (0.95 if panel.type == "timeseries" else 0.1) / total
        ax = fig.add_axes((left + pad_x, top - tall + pad_bottom, width - pad_x - 0.006,
                           tall - pad_top - pad_bottom))
        ax.set_facecolor(PANEL)
        ax.set_title(panel.title, loc="left", color=TEXT, fontsize=10, fontweight="bold")
        ax.tick_params(colors=TEXT, labelsize=7)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        ax.grid(color=GRID, linewidth=0.5)
        data = all_data.get(panel.id, [])
        if not data:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "No data", ha="center", va="center", color=TEXT, transform=ax.transAxes)
        elif panel.type == "stat":
            draw_stat(ax, panel, data)
        elif panel.type == "bargauge":
            draw_bars(ax, panel, data)
        else:
            draw_lines(ax, panel, data, start)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BACKGROUND)
    plt.close(fig)


def stop(service: harness.Service) -> None:
    if service.process is not None:
        service.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--waves", type=int, default=WAVES)
    args = parser.parse_args()
    began = time.monotonic()
    if not harness.port_open("127.0.0.1", 5672):
        sys.exit("RabbitMQ is not answering on 127.0.0.1:5672; start it with: rabbitmq-server -detached")
    if not enable_broker_metrics():
        sys.exit("the broker's rabbitmq_prometheus plugin does not answer on 127.0.0.1:15692")
    try:
        tools = harness.fetch_tools("prometheus")
    except BaseException as exc:  # pytest.skip outside pytest: only its message matters
        sys.exit(f"no prometheus binary: {exc}")
    work = Path(tempfile.mkdtemp(prefix="regbridge-dashboard-"))
    with ExitStack() as stack:
        url = stack.enter_context(harness.vhost("dashboard"))
        vhost = url.rsplit("/", 1)[1]
        mongo = stack.enter_context(harness.mongodb())
        legacy = harness.start_legacy_sim(log=work / "legacy-sim.log")
        stack.callback(legacy.stop)
        database = f"dashboard_{os.getpid()}"
        client: MongoClient[dict[str, Any]] = MongoClient(mongo.uri)
        stack.callback(client.close)
        stack.callback(client.drop_database, database)
        env = harness.service_env(rabbitmq_url=url, mongodb_uri=mongo.uri, database=database,
                                  legacy_url=legacy.url)
        services = [harness.Service(name, dict(env), work / f"{name}.log") for name in ("submitter", "poller")]
        for service in services:
            service.start()
            stack.callback(stop, service)
        for service in services:
            service.wait_ready()
        submitter, poller = (service.http.removeprefix("http://") for service in services)
        config = scrape_config(submitter=submitter, poller=poller, legacy=legacy.url.removeprefix("http://"),
                               vhost=vhost)
        server = stack.enter_context(prometheus(tools["prometheus"], config, work))
        broker = harness.Broker(url)
        stack.callback(broker.close)
        start = time.time()
        harness.wait_until(lambda: len(server.targets_up()) == 4 and all(server.targets_up().values()),
                           timeout=30, what="every target up", every=0.3)
        print(f"vhost {vhost}, logs in {work}: {args.waves} waves of registrations", flush=True)
        run_waves(broker, legacy, server, args.waves, WAVE, quiet=True)
        # A quiet tail, so that the rates fall back to zero and the broker's statistics (every
        # 5 s) show the queues drained.
        harness.wait_until(lambda: server.value("sum(rate(poller_finalised_total[5s]))") == 0
                           and server.value("sum(rate(submitter_messages_consumed_total[5s]))") == 0,
                           timeout=60, what="the load to end", every=0.5)
        (waiting,) = [panel.targets[0].expr for panel in panels() if panel.title == "Waiting in queues"]

        def drained() -> bool:
            # Read as the time series will be: their last step, not an instant query, may be the
            # first to see the broker's statistics refreshed.
            series = server.query_range(as_query(waiting, vhost=vhost, range_s=60), start, time.time())
            return bool(series) and float(series[0]["values"][-1][1]) == 0

        harness.wait_until(drained, timeout=30, what="the broker's statistics to show the queues drained", every=0.5)
        end = time.time()
        data = {panel.id: fetch(server, panel, vhost=vhost, start=start, end=end) for panel in panels()}
    draw(data, start, end, args.out)
    empty = [panel.title for panel in panels() if panel.targets and not data[panel.id]]
    print(f"wrote {args.out} in {time.monotonic() - began:.0f} s" + (f"; no data for {empty}" if empty else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
