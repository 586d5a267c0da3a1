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

Each call is bounded, whatever the adapter does: one deadline covers the connect, the request and
the whole answer, headers and body; and the body is read as a stream, at most a cap of bytes. A
breach is a `Transient` with its reason, and its connection is closed, never pooled half-read.
urllib3's read timeout is a limit per socket read, which an answer dripped a byte at a time never
reaches; so the response that http.client builds reads through `_DeadlineReader`, which gives
each socket read only the time left to the call. No thread watches a call: the reading thread
itself runs out of time. A TLS handshake is bounded as a whole by the connect timeout (Python's
ssl module counts it once per handshake). Name resolution (`getaddrinfo`) has no timeout and
stays outside the deadline, and a name with several addresses gives each attempt the time left.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import re
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import urllib3
import urllib3.connection

from regbridge.lifecycle import PollOutcome, SubmitOutcome, Transient, classify_poll, classify_submit

_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Visible ASCII only, as many characters as the OpenAPI description allows: anything else (a
# user id in another script, a control character, a long message id) could not travel in a
# header as it is, or would be refused.
_HEADER_SAFE = re.compile(r"[!-~]{1,255}")
# The body is read this much at a time: memory stays at the cap whatever the adapter sends.
_CHUNK_BYTES = 16 * 1024


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


class _CallDeadline(threading.local):
    """The monotonic deadline of the legacy call the current thread is making, or None. A call
    runs start to end on one thread, which holds its pooled connection throughout; urllib3 hands
    no per-call value down to the connection, so this is how the connection learns it."""

    at: float | None = None


_deadline = _CallDeadline()


def _time_left() -> float | None:
    """Seconds left to the current call, None outside a call; a timeout when none are left."""
    if _deadline.at is None:
        return None
    left = _deadline.at - time.monotonic()
    if left <= 0:
        raise TimeoutError("the legacy call's deadline passed")
    return left


class _DeadlineReader(io.RawIOBase):
    """The socket as the response reads it: each read may wait only for the time left."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        # socket.makefile counts this reader as a user of the socket, so that http.client closing
        # the connection of a `Connection: close` answer leaves the socket open until the body is read.
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = _time_left()
        if left is not None:
            self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What http.client's response is built on: the one thing it asks of the socket is a file."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock))


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(_DeadlineSocket(sock), debuglevel, method, url)  # type: ignore[arg-type]


class _DeadlineConnection(urllib3.connection.HTTPConnection):
    response_class = _DeadlineResponse

    def request(self, *args: Any, **kwargs: Any) -> None:
        # The connect of a new connection and the sending both wait on `timeout`: no longer than
        # the time left.
        left = _time_left()
        if left is not None and (not isinstance(self.timeout, int | float) or self.timeout > left):
            self.timeout = left
        super().request(*args, **kwargs)


class _DeadlineTlsConnection(urllib3.connection.HTTPSConnection, _DeadlineConnection):
    response_class = _DeadlineResponse


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


class _TlsPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _DeadlineTlsConnection


def _pool(base_url: str, size: int) -> urllib3.HTTPConnectionPool:
    url = urllib3.util.parse_url(base_url)
    if not url.host:
        raise ValueError("the legacy API's URL names no host")  # settings refuse such a URL first
    # No request ever waits for a pooled connection (block=False): past `size`, a call opens one
    # of its own and closes it after.
    if url.scheme == "https":
        return _TlsPool(url.host, url.port, maxsize=size, block=False, cert_reqs="CERT_REQUIRED")
    return _Pool(url.host, url.port, maxsize=size, block=False)


class LegacyClient:
    def __init__(self, base_url: str, *, timeout_s: float, max_response_bytes: int, pool_size: int) -> None:
        base = base_url.rstrip("/")
        self._prefix = urlsplit(base).path
        self._deadline_s = timeout_s
        self._max_bytes = max_response_bytes
        # The connect's own bound, within the call's deadline.
        self._timeout = urllib3.Timeout(connect=min(timeout_s, 3.0), read=timeout_s)
        self._pool = _pool(base, pool_size)

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] = _JSON) -> tuple[urllib3.BaseHTTPResponse, bytes] | Transient:
        _deadline.at = time.monotonic() + self._deadline_s
        response: urllib3.BaseHTTPResponse | None = None
        try:
            response = self._pool.urlopen(
                method, self._prefix + path, body=body, headers=headers, retries=False, redirect=False,
                timeout=self._timeout, preload_content=False, assert_same_host=False)
            data = self._read(response)
            if isinstance(data, Transient):
                return data
            return response, data
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
            return self._failed(exc)
        finally:
            _deadline.at = None
            if response is not None:
                # A body read to its end has already handed its connection back for reuse; a
                # connection left mid-answer (a breach, an error) is closed first, so no half-read
                # connection is ever pooled.
                if not response.closed:
                    response.close()
                response.release_conn()

    def _read(self, response: urllib3.BaseHTTPResponse) -> bytes | Transient:
        cap = self._max_bytes
        declared = response.length_remaining
        if declared is not None and declared > cap:
            return Transient(f"legacy API answer exceeded the {cap}-byte cap (Content-Length {declared})",
                             response.status)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(min(_CHUNK_BYTES, cap + 1 - size))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                return Transient(f"legacy API answer exceeded the {cap}-byte cap", response.status)
            chunks.append(chunk)

    def _failed(self, exc: Exception) -> Transient:
        at = _deadline.at
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError) or (at is not None and time.monotonic() >= at):
            return Transient(f"legacy API answer took longer than the {self._deadline_s:g} s deadline")
        # Never the URL in the reason: the exception's text may carry it.
        kind = "timed out" if isinstance(exc, urllib3.exceptions.TimeoutError) else "unreachable"
        return Transient(f"legacy API {kind}: {type(exc).__name__}")

    def submit(self, body: bytes, idempotency_key: str) -> SubmitOutcome:
        headers = {**_JSON, IDEMPOTENCY_HEADER: idempotency_header(idempotency_key)}
        answer = self._call("POST", "/v1/registrations", body, headers)
        if isinstance(answer, Transient):
            return answer
        response, data = answer
        return classify_submit(response.status, data, response.headers.get("Retry-After"))

    def status(self, request_id: str) -> PollOutcome:
        # Quote everything: a request id never changes the path it is looked up under.
        answer = self._call("GET", f"/v1/registrations/{quote(request_id, safe='')}")
        if isinstance(answer, Transient):
            return answer
        response, data = answer
        return classify_poll(response.status, data, response.headers.get("Retry-After"))

    def close(self) -> None:
        self._pool.close()
