"""A hostile fake of the legacy adapter, for tests: the two endpoints of the legacy API, each
answer chosen per user, some of them attacks on the bridge's client.

- `Answer.ok()`: a well-formed 201 (POST) or `completed` (GET), optionally padded with spaces to
  an exact size, optionally chunked;
- `Answer.drip(every_s)`: the same well-formed answer, its body sent one byte every `every_s`
  seconds (a client that waits for it all is held for `every_s` times its length); a client
  that hangs up ends the call at once, so its `ended` is when the client let go;
  `Answer.drip(every_s, head=True)` drips the status line and headers too;
- `Answer.huge(size)`: a 200/201 whose body of `size` bytes (400 MB by default) has no
  Content-Length (chunked), generated on the fly from one 64 KiB block, never held in memory;
- `Answer.declared(size)`: the same body behind a `Content-Length` that announces it;
- `Answer.bomb(size)`: `Content-Encoding: gzip`, chunked: `size` bytes once decompressed, about
  a thousandth of that on the wire, compressed on the fly.

The request id the adapter gives a user is `R-<user_id>`, so a status answer is chosen by user
too. It runs in a thread of the test process (`ThreadingHTTPServer`), over TLS when given a
server context; every call is recorded with how much of its answer went out and whether the
client hung up before the end.
"""

from __future__ import annotations

import json
import select
import ssl
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import IPPROTO_TCP, TCP_NODELAY
from typing import Any, Literal

BLOCK = b"x" * 65536
MB = 1024 * 1024


@dataclass(frozen=True)
class Answer:
    kind: Literal["ok", "drip", "huge", "declared", "bomb"]
    every_s: float = 0.75
    size: int = 400 * MB
    pad_to: int = 0
    chunked: bool = False
    head: bool = False

    @classmethod
    def ok(cls, pad_to: int = 0, chunked: bool = False) -> Answer:
        return cls("ok", pad_to=pad_to, chunked=chunked)

    @classmethod
    def drip(cls, every_s: float = 0.75, head: bool = False) -> Answer:
        return cls("drip", every_s=every_s, head=head)

    @classmethod
    def huge(cls, size: int = 400 * MB) -> Answer:
        return cls("huge", size=size)

    @classmethod
    def declared(cls, size: int = 400 * MB) -> Answer:
        return cls("declared", size=size)

    @classmethod
    def bomb(cls, size: int = 400 * MB) -> Answer:
        return cls("bomb", size=size)


@dataclass
class Call:
    """One request as the adapter saw it."""

    method: str
    user_id: str
    kind: str
    connection: int
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    sent: int = 0  # body bytes the adapter wrote, as sent (with the head, for a dripped head)
    hung_up: bool = False  # the client closed before the whole body went out

    @property
    def held_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class HostileAdapter:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._posts: dict[str, Answer] = {}
        self._statuses: dict[str, Answer] = {}
        self._calls: list[Call] = []
        self._connections = 0
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hostile-adapter", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def on_post(self, user_id: str, answer: Answer) -> None:
        with self._lock:
            self._posts[user_id] = answer

    def on_status(self, user_id: str, answer: Answer) -> None:
        with self._lock:
            self._statuses[user_id] = answer

    def calls(self, user_id: str | None = None) -> list[Call]:
        with self._lock:
            return [c for c in self._calls if user_id is None or c.user_id == user_id]

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HostileAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- used by the handler ------------------------------------------------------------------

    def _connected(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _begin(self, method: str, user_id: str, connection: int) -> tuple[Answer, Call]:
        with self._lock:
            answers = self._posts if method == "POST" else self._statuses
            answer = answers.get(user_id, Answer.ok())
            call = Call(method, user_id, answer.kind, connection)
            self._calls.append(call)
            return answer, call


def _well_formed(method: str, user_id: str, pad_to: int) -> bytes:
    request_id = f"R-{user_id}"
    value: dict[str, Any] = {"request_id": request_id}
    if method == "GET":
        value["status"] = "completed"
    body = json.dumps(value).encode()
    return body + b" " * max(0, pad_to - len(body))


def _blocks(size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        block = BLOCK if left >= len(BLOCK) else BLOCK[:left]
        left -= len(block)
        yield block


def _handler(adapter: HostileAdapter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real adapter would

        def setup(self) -> None:
            super().setup()
            # Headers and body leave in separate writes: without this, each answer waits for the
            # client's delayed ACK.
            self.connection.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
            self.connection_number = adapter._connected()

        def handle(self) -> None:
            try:
                super().handle()
            except OSError:  # a client that hung up mid-request: nothing to answer
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            try:
                user_id = str(json.loads(body)["user_id"])
            except (ValueError, KeyError, TypeError):
                self._send_simple(400, b'{"error": "no user_id"}')
                return
            self._answer("POST", user_id)

        def do_GET(self) -> None:
            prefix = "/v1/registrations/R-"
            if not self.path.startswith(prefix):
                self._send_simple(404, b'{"error": "unknown request id"}')
                return
            self._answer("GET", self.path[len(prefix):])

        def _send_simple(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _answer(self, method: str, user_id: str) -> None:
            answer, call = adapter._begin(method, user_id, self.connection_number)
            status = 201 if method == "POST" else 200
            try:
                self._write(method, user_id, answer, status, call)
            except OSError:  # the client hung up: a broken pipe, a reset
                call.hung_up = True
                self.close_connection = True
            finally:
                call.ended = time.monotonic()

        def _write(self, method: str, user_id: str, answer: Answer, status: int, call: Call) -> None:
            if answer.kind == "drip" and answer.head:
                body = _well_formed(method, user_id, answer.pad_to)
                head = b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                self._drip(head % (status, len(body)) + body, answer.every_s, call)
                return
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if answer.kind == "ok" and answer.chunked:
                body = _well_formed(method, user_id, answer.pad_to)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
                call.sent = len(body)
                return
            if answer.kind in ("ok", "drip"):
                body = _well_formed(method, user_id, answer.pad_to)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if answer.kind == "ok":
                    self.wfile.write(body)
                    call.sent = len(body)
                else:
                    self._drip(body, answer.every_s, call)
                return
            chunked = answer.kind in ("huge", "bomb")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(answer.size))
            if answer.kind == "bomb":
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            gzip = zlib.compressobj(9, zlib.DEFLATED, 31) if answer.kind == "bomb" else None
            for raw in _blocks(answer.size):
                if adapter.stopping.is_set():
                    raise BrokenPipeError
                block = raw if gzip is None else gzip.compress(raw)
                if chunked and block:
                    self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")
                elif block:
                    self.wfile.write(block)
                call.sent += len(block)
            if gzip is not None:
                tail = gzip.flush()
                self.wfile.write(b"%x\r\n" % len(tail) + tail + b"\r\n")
                call.sent += len(tail)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")

        def _drip(self, data: bytes, every_s: float, call: Call) -> None:
            self.wfile.flush()
            for byte in data:
                self._wait_for_hang_up(every_s)
                self.wfile.write(bytes([byte]))
                call.sent += 1

        def _wait_for_hang_up(self, seconds: float) -> None:
            """Wait `seconds` between two bytes, but raise as soon as the client hangs up: a
            client sends nothing while it waits for an answer, so anything to read (its FIN, a
            TLS close) means it gave up. A write alone would notice only a byte or two later,
            and the call's `ended` must say when the client let go."""
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0:
                if adapter.stopping.is_set():
                    raise BrokenPipeError
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
                if readable:
                    raise BrokenPipeError

    return Handler
