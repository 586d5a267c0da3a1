"""The HTTP adapter for the legacy adaptation layer: bytes in, lifecycle outcomes out.

Calls go to a urllib3 connection pool shared by the worker threads and sized to them, not
through `requests`: its per-call machinery (merging settings, cookies, hooks, preparing the
request) costs as much CPU as the HTTP exchange itself, and none of it is used here. urllib3
reads nothing from the environment, so no proxy or netrc sneaks in; it follows no redirect and
retries nothing (the lifecycle decides what to retry), and it verifies TLS certificates. The
meaning of each answer is decided by the pure `lifecycle.classify_*` functions; this module
only moves bytes.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import quote, urlsplit

import urllib3

from regbridge.lifecycle import PollOutcome, SubmitOutcome, Transient, classify_poll, classify_submit

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}


class Legacy(Protocol):
    def submit(self, body: bytes) -> SubmitOutcome: ...
    def status(self, request_id: str) -> PollOutcome: ...


class LegacyClient:
    def __init__(self, base_url: str, *, timeout_s: float, pool_size: int) -> None:
        base = base_url.rstrip("/")
        self._prefix = urlsplit(base).path
        self._timeout = urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s)
        self._manager = urllib3.PoolManager(num_pools=1, maxsize=pool_size, block=False, cert_reqs="CERT_REQUIRED")
        self._pool = self._manager.connection_from_url(base)

    def _call(self, method: str, path: str, body: bytes | None = None) -> urllib3.BaseHTTPResponse | Transient:
        try:
            response: urllib3.BaseHTTPResponse = self._pool.urlopen(
                method, self._prefix + path, body=body, headers=_JSON, retries=False, redirect=False,
                timeout=self._timeout, preload_content=True, assert_same_host=False)
            return response
        except urllib3.exceptions.HTTPError as exc:
            # Never the URL in the reason: the exception's text may carry it.
            kind = "timed out" if isinstance(exc, urllib3.exceptions.TimeoutError) else "unreachable"
            return Transient(f"legacy API {kind}: {type(exc).__name__}")

    def submit(self, body: bytes) -> SubmitOutcome:
        response = self._call("POST", "/v1/registrations", body)
        if isinstance(response, Transient):
            return response
        return classify_submit(response.status, response.data, response.headers.get("Retry-After"))

    def status(self, request_id: str) -> PollOutcome:
        # Quote everything: a request id never changes the path it is looked up under.
        response = self._call("GET", f"/v1/registrations/{quote(request_id, safe='')}")
        if isinstance(response, Transient):
            return response
        return classify_poll(response.status, response.data, response.headers.get("Retry-After"))

    def close(self) -> None:
        self._manager.clear()
