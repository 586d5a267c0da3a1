"""The Grafana dashboard proven on real data: the pipeline carries registrations that succeed,
fail at each stage and meet transient 503s, a real Prometheus scrapes both services, legacy-sim
and the broker's per-queue metrics, and every query of every panel must give Grafana something to
draw.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Stack
from dashboard_live import (
    JOBS,
    Prometheus,
    Wave,
    as_query,
    ask,
    enable_broker_metrics,
    has_data,
    panels,
    prometheus,
    run_waves,
    scrape_config,
    variable_values,
)
from harness import Broker, LegacySim, unavailable, wait_until
from test_prometheus import tools  # noqa: F401 - `tools` is a fixture

# Panels (by title) that only have data under a condition this run cannot cheaply produce, with
# the reason. None at present: every counter the panels read exists at zero from a service's start.
DATA_LESS: dict[str, str] = {}
WAVES = 2


def _failure_queue(server: Prometheus, vhost: str) -> float:
    (stat,) = [panel for panel in panels() if panel.title == "Failure queue"]
    return server.value(as_query(stat.targets[0].expr, vhost=vhost, range_s=60))


@pytest.mark.integration
def test_every_panel_has_data_on_a_live_run(stack: Stack, broker: Broker, legacy: LegacySim,
                                            tools: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    if not enable_broker_metrics():
        unavailable("the broker's rabbitmq_prometheus plugin does not answer on 127.0.0.1:15692")
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    vhost = broker.url.rsplit("/", 1)[1]
    config = scrape_config(submitter=submitter.http.removeprefix("http://"),
                           poller=poller.http.removeprefix("http://"),
                           legacy=legacy.url.removeprefix("http://"), vhost=vhost)
    start = time.time()
    with prometheus(tools["prometheus"], config, tmp_path) as server:
        wait_until(lambda: server.targets_up() == {"submitter": 1, "poller": 1, "legacy-sim": 1, "rabbitmq": 1},
                   timeout=30, what="every target up", every=0.3)
        # The job variable finds the bridge's jobs, the ones `$job` stands for, and no other.
        assert variable_values(server, "job") == set(JOBS)
        run_waves(broker, legacy, server, WAVES)
        wave = Wave()
        # The load met what the retry panels are about.
        assert server.value("sum(submitter_submit_retries_total)") > 0, "no submit retry: no 503 on a POST"
        assert server.value('sum(poller_polls_total{result="transient"})') > 0, "no transient poll"
        # The broker's view of the failure queue: a failure record for each message not
        # registered (the broker refreshes its queue statistics every 5 s).
        records = WAVES * wave.total - server.value('sum(poller_finalised_total{outcome="registered"})')
        assert records >= WAVES * (wave.refused + wave.bad_cpf + wave.invalid)
        wait_until(lambda: _failure_queue(server, vhost) == records, timeout=30,
                   what=f"the broker's failure queue at {records}", every=0.5)

        without: list[str] = []

        def every_panel_has_data() -> bool:
            end = time.time()
            without[:] = [f"{panel.title} / {target.ref} ({target.legend}): {target.expr}"
                          for panel in panels() if panel.title not in DATA_LESS for target in panel.targets
                          if not has_data(ask(server, target, vhost=vhost, start=start, end=end))]
            return not without

        try:
            wait_until(every_panel_has_data, timeout=30, what="data for every panel", every=1)
        except AssertionError:
            pytest.fail("panels without data:\n  " + "\n  ".join(without))

        # The namespace and job filters are live: a value no series carries empties the service panels.
        registered = as_query('sum(poller_finalised_total{job=~"$job", namespace=~"$namespace"})', vhost=vhost,
                              range_s=60)
        assert server.query(registered) != []
        assert server.query(registered.replace('namespace=~".*"', 'namespace=~"elsewhere"')) == []
        assert server.query(registered.replace(f'job=~"({"|".join(JOBS)})"', 'job=~"elsewhere"')) == []
