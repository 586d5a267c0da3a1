"""`/healthz`, `/readyz` and `/metrics` on `HTTP_HOST`:`HTTP_PORT`, served from a thread of their own.

Nothing here touches pika: liveness reads the I/O loop's last tick and whether the topology
could be declared, readiness reads flags (connected, publishing not blocked by a broker alarm)
and a cached store ping, so a slow broker or MongoDB never blocks the consume loop or the probe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class Probe:
    """Caches a slow check (a MongoDB ping) so that probes answer at once."""

    def __init__(self, check: Callable[[], bool], every_s: float = 2.0) -> None:
        self._check = check
        self._every_s = every_s
        self.ok = False
        self._thread = threading.Thread(target=self._loop, name="probe", daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            self.ok = self._check()
            time.sleep(self._every_s)


def create_app(*, live: Callable[[], bool], ready: Callable[[], dict[str, bool]],
               where: Callable[[], dict[str, str | None]] | None = None) -> FastAPI:
    """`ready` holds the checks that decide readiness; `where` adds what the answer reports
    beside them (the broker node), which decides nothing."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Response:
        ok = live()
        return Response('{"status":"ok"}' if ok else '{"status":"stalled"}', status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/readyz")
    def readyz() -> Response:
        checks = ready()
        ok = all(checks.values())
        body = json.dumps({**checks, **(where() if where else {})}, separators=(",", ":"))
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(app: FastAPI, port: int, host: str) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="http", daemon=True)
    thread.start()
    log.info("health and metrics on %s port %d", host, port, extra={"event": "http_listening"})
    return server
