"""The HTTP adapter for the legacy adaptation layer: requests in, lifecycle outcomes out.

One pooled `requests.Session` shared by the worker threads (its connection pool is
thread-safe; it is sized to the pool). `trust_env` is off, so no proxy or netrc from the
environment sneaks in. The meaning of each answer is decided by the pure
`lifecycle.classify_*` functions; this module only moves bytes.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from regbridge.lifecycle import PollOutcome, SubmitOutcome, Transient, classify_poll, classify_submit
from regbridge.redact import redact_url


class Legacy(Protocol):
    def submit(self, body: bytes) -> SubmitOutcome: ...
    def status(self, request_id: str) -> PollOutcome: ...


class LegacyClient:
    def __init__(self, base_url: str, *, timeout_s: float, pool_size: int) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = (min(timeout_s, 3.0), timeout_s)  # (connect, read)
        self._session = requests.Session()
        self._session.trust_env = False
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0, pool_block=False)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def submit(self, body: bytes) -> SubmitOutcome:
        try:
            response = self._session.post(f"{self._base}/v1/registrations", data=body,
                                          headers={"Content-Type": "application/json"},
                                          timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return _transport_error(exc)
        return classify_submit(response.status_code, response.content, response.headers.get("Retry-After"))

    def status(self, request_id: str) -> PollOutcome:
        # Quote everything: a request id never changes the path it is looked up under.
        url = f"{self._base}/v1/registrations/{quote(request_id, safe='')}"
        try:
            response = self._session.get(url, timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return _transport_error(exc)
        return classify_poll(response.status_code, response.content, response.headers.get("Retry-After"))

    def close(self) -> None:
        self._session.close()


def _transport_error(exc: requests.RequestException) -> Transient:
    kind = "timed out" if isinstance(exc, requests.Timeout) else "unreachable"
    return Transient(f"legacy API {kind}: {redact_url(type(exc).__name__)}")
