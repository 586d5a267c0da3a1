"""The HTTP adapter for the legacy adaptation layer: bytes in, lifecycle outcomes out.

Calls go to a urllib3 connection pool shared by the worker threads and sized to them, not
through `requests`: its per-call machinery (merging settings, cookies, hooks, preparing the
request) costs as much CPU as the HTTP exchange itself, and none of it is used here. urllib3
reads nothing from the environment, so no proxy or netrc sneaks in; it follows no redirect and
retries nothing (the lifecycle decides what to retry), and it verifies TLS certificates. The
meaning of each answer is decided by the pure `lifecycle.classify_*` functions; this module
only moves bytes.

Every POST carries an `Idempotency-Key` header naming the registration's attempt, so that an
adapter honouring it answers a repeated POST (after a timeout, a lost answer, a crash before
the request id was recorded) with the first POST's request id instead of a second
registration (docs/legacy-adapter.md). The key holds a user id and a message id: it is never
logged here, and travels only in the header.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote, urlsplit

import urllib3

from regbridge.lifecycle import PollOutcome, SubmitOutcome, Transient, classify_poll, classify_submit

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Visible ASCII only, as many characters as the OpenAPI description allows: anything else (a
# user id in another script, a control character, a long message id) could not travel in a
# header as it is, or would be refused.
_HEADER_SAFE = re.compile(r"[!-~]{1,255}")


def idempotency_header(attempt_key: str) -> str:
    """The header's value for an attempt key: the key itself when it is visible ASCII of at most
    255 characters, else `sha256:` and the hex digest of its UTF-8 bytes. Either way the same
    attempt always sends the same value; the two forms never meet, since an attempt key always
    holds a `|` and a digest never does."""
    if _HEADER_SAFE.fullmatch(attempt_key):
        return attempt_key
    return "sha256:" + hashlib.sha256(attempt_key.encode("utf-8", errors="surrogatepass")).hexdigest()


class Legacy(Protocol):
    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome: ...
    def status(self, request_id: str) -> PollOutcome: ...


class LegacyClient:
    def __init__(self, base_url: str, *, timeout_s: float, pool_size: int) -> None:
        base = base_url.rstrip("/")
        self._prefix = urlsplit(base).path
        self._timeout = urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s)
        self._manager = urllib3.PoolManager(num_pools=1, maxsize=pool_size, block=False, cert_reqs="CERT_REQUIRED")
        self._pool = self._manager.connection_from_url(base)

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] = _JSON) -> urllib3.BaseHTTPResponse | Transient:
        try:
            response: urllib3.BaseHTTPResponse = self._pool.urlopen(
                method, self._prefix + path, body=body, headers=headers, retries=False, redirect=False,
                timeout=self._timeout, preload_content=True, assert_same_host=False)
            return response
        except urllib3.exceptions.HTTPError as exc:
            # Never the URL in the reason: the exception's text may carry it.
            kind = "timed out" if isinstance(exc, urllib3.exceptions.TimeoutError) else "unreachable"
            return Transient(f"legacy API {kind}: {type(exc).__name__}")

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        headers = {**_JSON, IDEMPOTENCY_HEADER: idempotency_header(idempotency_key)}
        response = self._call("POST", "/v1/registrations", body, headers)
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
