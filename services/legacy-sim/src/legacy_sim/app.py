"""The HTTP face of legacy-sim: the legacy API of legacy-api.openapi.yaml plus /admin and /healthz.

The /v1 routes are the hot path of every benchmark, so they skip pydantic entirely: the raw
body is parsed by hand and each response is encoded once into a plain Response.

A POST's `Idempotency-Key` is honoured as the OpenAPI description says: a key seen in the last
24 hours gets the first POST's 201 again and registers nothing (`Registry.replay`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

from legacy_sim.config import LATENCY_FIELDS, Config, ConfigError, apply_patch, format_retry_after
from legacy_sim.registry import FAILED_REASON, Registry
from legacy_sim.validation import InvalidRegistration, parse_registration

_JSON = "application/json"
_UNKNOWN_ID = b'{"error":"unknown request id"}'
_UNAVAILABLE = b'{"error":"service unavailable, retry later"}'
_KEY_HEADER = b"idempotency-key"  # ASGI gives header names in lower case
KEY_MAX_CHARS = 255


def _json(status_code: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    content = json.dumps(body, separators=(",", ":")).encode()
    return Response(content=content, status_code=status_code, headers=headers, media_type=_JSON)


def _accepted(request_id: str) -> Response:
    return _json(201, {"request_id": request_id}, {"Location": f"/v1/registrations/{request_id}"})


class Simulator:
    """Holds the current Config (swapped whole on PATCH) and the Registry, for the route handlers."""

    def __init__(self, config: Config, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        # One seeded RNG for ids, latencies and faults, so a seeded run is reproducible.
        self.rng = random.Random(config.seed)
        self.registry = Registry(clock=clock, rng=self.rng)
        # When the latency profile took effect: a drift's phases count from here.
        self.latency_since = clock()

    def reconfigure(self, patch: object) -> None:
        """Applies a PATCH body (or raises ConfigError). Setting the latency, even to the profile
        in force, starts its clock again: a drift then begins with its first phase."""
        self.config = apply_patch(self.config, patch)
        if isinstance(patch, dict) and patch.keys() & LATENCY_FIELDS:
            self.latency_since = self.clock()

    def reset(self) -> None:
        """Forgets every registration and starts the latency profile's clock again."""
        self.registry.reset()
        self.latency_since = self.clock()

    async def submit(self, raw: bytes, idempotency_key: str | None = None) -> Response:
        registry = self.registry
        registry.note_post()
        refusal = await self.unavailable(self.config.post_503_rate, registry.count_post_503)
        if refusal is not None:
            return refusal
        config = self.config
        if config.accept_latency_s > 0:
            await asyncio.sleep(config.accept_latency_s)
        # From here to the registration nothing awaits: a POST with the same key that came in
        # meanwhile either registered already (and this one replays it) or comes after this one.
        if idempotency_key is not None:
            if len(idempotency_key) > KEY_MAX_CHARS:
                registry.count_rejection()
                return _json(400, {"error": f"Idempotency-Key: longer than {KEY_MAX_CHARS} characters"})
            known = registry.replay(idempotency_key)
            if known is not None:
                return _accepted(known)
        try:
            body = parse_registration(raw)
        except InvalidRegistration as exc:
            registry.count_rejection()
            return _json(400, {"error": str(exc)})
        request_id = registry.submit(
            user_id=body.get("user_id"),
            name=body["name"],
            latency=config.profile,
            latency_age_s=self.clock() - self.latency_since,
            fail_prefix=config.fail_prefix,
            idempotency_key=idempotency_key,
        )
        return _accepted(request_id)

    async def status(self, request_id: str) -> Response:
        registry = self.registry
        refusal = await self.unavailable(self.config.get_503_rate, registry.count_get_503)
        if refusal is not None:
            return refusal
        status = registry.poll(request_id)
        if status is None:
            return Response(content=_UNKNOWN_ID, status_code=404, media_type=_JSON)
        if status == "failed":
            return _json(200, {"request_id": request_id, "status": status, "reason": FAILED_REASON})
        return _json(200, {"request_id": request_id, "status": status})

    async def unavailable(self, rate_503: float, count: Callable[[], None]) -> Response | None:
        """Applies the slow mode, then answers 503 (and counts it) when down or when the fault
        dice say so."""
        config = self.config
        if config.response_delay_s > 0:
            await asyncio.sleep(config.response_delay_s)
        if config.down or (rate_503 > 0 and self.rng.random() < rate_503):
            count()
            return Response(
                content=_UNAVAILABLE,
                status_code=503,
                headers={"Retry-After": format_retry_after(config.retry_after_s)},
                media_type=_JSON,
            )
        return None


_PREFIX = "/v1/registrations"


class FastPath:
    """Serves the two /v1 routes as a bare ASGI callable and hands everything else to FastAPI.

    The benchmark sends thousands of these a second to a process that shares two cores with
    everything it measures; FastAPI's routing, Request and Response objects cost more CPU than
    the simulation itself, so the hot path goes without them. Only these two routes exist under
    /v1; FastAPI answers anything else there with 404.
    """

    def __init__(self, app: FastAPI, sim: Simulator) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            method: str = scope["method"]
            if method == "POST" and path == _PREFIX:
                body = b""
                while True:
                    message = await receive()
                    body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
                await _send(send, await self.sim.submit(body, _idempotency_key(scope)))
                return
            if method == "GET" and path.startswith(_PREFIX + "/"):
                request_id = path[len(_PREFIX) + 1:]
                if request_id and "/" not in request_id:
                    await _send(send, await self.sim.status(request_id))
                    return
        await self.app(scope, receive, send)


def _idempotency_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _KEY_HEADER:
            # An empty value names no attempt: the POST is taken as one without a key.
            return value.decode("latin-1") or None
    return None


async def _send(send: Send, response: Response) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def create_app(config: Config, *, clock: Callable[[], float] = time.time) -> FastPath:
    """Builds the app. The clock is wall time by default so that the stats' timestamps can be
    compared with a benchmark's own."""
    sim = Simulator(config, clock=clock)
    registry = sim.registry
    # No generated docs: this is a test double and its contract is the OpenAPI file.
    app = FastAPI(title="legacy-sim", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.simulator = sim

    @app.get("/healthz")
    @app.get("/readyz")
    async def healthz() -> Response:
        return Response(content=b'{"status":"ok"}', media_type=_JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        # Read from the registry's counters at scrape time: nothing is added to the hot path.
        return Response(content=_metrics_text(registry.summary()), media_type="text/plain; version=0.0.4")

    @app.get("/admin/stats")
    async def admin_stats(summary: str | None = None) -> Response:
        if summary is not None and summary.lower() in ("1", "true", "yes"):
            return _json(200, registry.summary())
        return _json(200, registry.stats())

    @app.get("/admin/config")
    async def admin_config() -> Response:
        return _json(200, sim.config.to_json())

    @app.patch("/admin/config")
    async def admin_patch_config(request: Request) -> Response:
        try:
            patch = json.loads(await request.body())
        except ValueError:
            return _json(400, {"error": "body is not valid JSON"})
        try:
            sim.reconfigure(patch)
        except ConfigError as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, sim.config.to_json())

    @app.post("/admin/reset")
    async def admin_reset() -> Response:
        sim.reset()
        return _json(200, {"status": "reset"})

    return FastPath(app, sim)


_METRICS = (
    ("legacy_sim_submissions_total", "counter", "Registrations accepted with 201", "submissions_total"),
    ("legacy_sim_idempotent_replays_total", "counter", "POSTs answered with an earlier 201 for their Idempotency-Key",
     "idempotent_replays_total"),
    ("legacy_sim_rejections_total", "counter", "Registrations refused with 400", "rejected_total"),
    ("legacy_sim_polls_total", "counter", "Status polls of known request ids", "polls_total"),
    ("legacy_sim_detections_total", "counter", "Registrations whose final status was polled", "detected_total"),
    ("legacy_sim_post_503_total", "counter", "POSTs answered 503 (fault injection)", "post_503_total"),
    ("legacy_sim_get_503_total", "counter", "GETs answered 503 (fault injection)", "get_503_total"),
)


def _metrics_text(summary: dict[str, Any]) -> bytes:
    lines = []
    for name, kind, help_text, key in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {summary.get(key) or 0}"]
    return ("\n".join(lines) + "\n").encode()
