"""Bad input never crashes, loops or leaks through: malformed inbound bodies, and a legacy API that
answers nonsense. Each bad thing ends in exactly one clear outcome, and the services keep working."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest
from conftest import Stack
from harness import Broker, LegacySim, Service
from outcomes import INBOUND, Outcomes, good

pytestmark = pytest.mark.integration


def alive(*services: Service) -> None:
    for service in services:
        assert service.process is not None and service.process.poll() is None, (
            f"{service.name} died:\n{service.log()[-3000:]}")


def records_for(outcomes: Outcomes, message_id: str) -> list[dict[str, Any]]:
    return [r for mid, r in zip(outcomes.failure_ids, outcomes.failures, strict=True) if mid == message_id]


# ---- malformed inbound bodies -----------------------------------------------------------------

MAX_BYTES = 150_000  # room for a 100,000-byte nesting bomb, which must fail on its depth, not its size


def obj(user_id: Any, **extra: Any) -> bytes:
    return json.dumps({**good("placeholder"), "user_id": user_id, **extra}).encode()


def deep_value(depth: int) -> bytes:
    nested = "[" * depth + "]" * depth
    return b'{"user_id": "deep-user", "name": "Deep", "email": "d@example.com", "cpf": "12345678909", "x": ' + \
        nested.encode() + b"}"


# message_id -> body; each must become exactly one validation failure with user_id null.
INVALID: dict[str, bytes] = {
    "oversized": obj("big-user", padding="x" * (MAX_BYTES + 50_000)),
    "not-utf8": b'{"user_id": "utf8-user", "name": "Jo\xe3o \xff\xfe", "email": "j@example.com"}',
    "nest-bomb": b"[" * 100_000,
    "array": b'["an", "array"]',
    "string": b'"just a string"',
    "number": b"42",
    "null": b"null",
    "uid-missing": json.dumps({"name": "x", "email": "x@example.com", "cpf": "12345678909"}).encode(),
    "uid-int": obj(12345),
    "uid-null": obj(None),
    "uid-list": obj(["a", "b"]),
    "uid-gt": obj({"$gt": ""}),
    "uid-ne": obj({"$ne": None}),
    "uid-empty": obj(""),
    "uid-129": obj("u" * 129),
    "nan": obj("nan-user").replace(b'"cpf"', b'"score": NaN, "cpf"'),
    "infinity": obj("inf-user").replace(b'"cpf"', b'"score": -Infinity, "cpf"'),
}
# user ids hidden in the invalid bodies above: none may reach MongoDB or the legacy API.
HIDDEN_IDS = {"big-user", "utf8-user", "nan-user", "inf-user", "u" * 129, "deep-user"}


def test_bad_bodies_each_become_one_validation_failure(stack: Stack, broker: Broker, users: Any,
                                                        legacy: LegacySim) -> None:
    stack.env["MAX_MESSAGE_BYTES"] = str(MAX_BYTES)
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    assert len(INVALID["oversized"]) > MAX_BYTES and len(INVALID["nest-bomb"]) < MAX_BYTES
    assert len(deep_value(5000)) < MAX_BYTES
    assert json.loads(INVALID["nan"].replace(b"NaN", b"0"))["user_id"] == "nan-user"  # NaN is the only flaw

    for message_id, body in INVALID.items():
        broker.publish(INBOUND, body, message_id=message_id)
    # The longest ids the contract allows work end to end (characters, not bytes).
    edge_ids = {"uid-128": "u" * 128, "uid-128-multibyte": "ç" * 127 + "x"}
    for message_id, user_id in edge_ids.items():
        broker.publish(INBOUND, good(user_id), message_id=message_id)
    # A valid object with a valid user_id, whose other value is nested 5,000 deep: past the
    # nesting limit, one validation failure (test_hostile_input.py has the cases around the limit).
    broker.publish(INBOUND, deep_value(5000), message_id="deep-value")

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=len(edge_ids), failed=len(INVALID) + 1)  # and deep-value's
    alive(submitter, poller)

    for message_id in INVALID:
        records = records_for(outcomes, message_id)
        assert len(records) == 1, f"{message_id}: {len(records)} failure records"
        record = records[0]
        assert record["error"]["stage"] == "validation", (message_id, record["error"])
        assert record["user_id"] is None, (message_id, record["user_id"])
        assert record["legacy_request_id"] is None and record["error"]["http_status"] is None
        assert record["error"]["reason"], message_id
        assert len(record["error"]["reason"]) < 500, (message_id, record["error"]["reason"][:600])
        assert record["attempts"] == 0

    big = records_for(outcomes, "oversized")[0]
    assert isinstance(big["original"], str), type(big["original"])
    assert len(big["original"]) < len(INVALID["oversized"]) and "truncated" in big["original"]
    assert str(MAX_BYTES) in big["error"]["reason"]
    assert isinstance(records_for(outcomes, "not-utf8")[0]["original"], str)
    assert "utf" in records_for(outcomes, "not-utf8")[0]["error"]["reason"].lower()
    assert "nested" in records_for(outcomes, "nest-bomb")[0]["error"]["reason"]
    assert records_for(outcomes, "array")[0]["original"] == ["an", "array"]
    assert records_for(outcomes, "uid-gt")[0]["original"]["user_id"] == {"$gt": ""}
    for message_id in ("nan", "infinity"):
        assert "JSON" in records_for(outcomes, message_id)[0]["error"]["reason"]

    # The deeply nested value: exactly one outcome, a validation failure naming no user.
    [deep_record] = records_for(outcomes, "deep-value")
    assert deep_record["error"]["stage"] == "validation" and "nested" in deep_record["error"]["reason"]
    assert deep_record["user_id"] is None

    registered = set(edge_ids.values())
    assert outcomes.registered() == registered
    # Nothing at all was written for an invalid message: no user document, no attempt record.
    assert {d["_id"] for d in users.find({}, {"_id": 1})} == registered
    attempts = users.database[users.name + ".attempts"]
    assert {d["user_id"] for d in attempts.find({}, {"user_id": 1})} <= registered
    for user_id in HIDDEN_IDS:
        assert users.count_documents({"_id": user_id}) == 0, user_id
    # Nothing invalid was POSTed to the legacy API; each valid one exactly once.
    submitted = legacy.stats()["submissions_by_user"]
    assert set(submitted) == set(edge_ids.values()), sorted(submitted)
    assert set(submitted.values()) == {1}
    for user_id in edge_ids.values():
        assert users.find_one({"_id": user_id})["registration_status"] == "registered"

    # Still alive and still working after all that.
    broker.publish(INBOUND, good("after-the-storm"), message_id="after")
    outcomes.wait(registered=len(registered) + 1, failed=len(outcomes.failures))
    assert "after-the-storm" in outcomes.registered()
    alive(submitter, poller)
    assert submitter.terminate() == 0
    assert poller.terminate() == 0


# ---- a legacy API that answers nonsense -------------------------------------------------------

Answer = tuple[int, str, bytes]
HTML_PAGE = ("<!DOCTYPE html><html><head><title>Oops</title></head><body><h1>Internal Server Error</h1>"
             + "<p>The server encountered an internal error.</p>" * 100 + "</body></html>").encode()


def json_answer(status: int, value: Any) -> Answer:
    return status, "application/json", json.dumps(value).encode()


# POST, by the registration's `name`: every 201 here is unusable.
BAD_201: dict[str, Answer] = {
    "no-id": json_answer(201, {"status": "accepted"}),
    "not-json": (201, "text/plain", b"Created, thank you"),
    "html": (201, "text/html", HTML_PAGE),
    "id-slash": json_answer(201, {"request_id": "a/b"}),
    "id-dotdot": json_answer(201, {"request_id": ".."}),
    "id-traversal": json_answer(201, {"request_id": "../../admin/stats"}),
    "id-space": json_answer(201, {"request_id": "has space"}),
    "id-number": json_answer(201, {"request_id": 123}),
    "id-empty": json_answer(201, {"request_id": ""}),
    "id-null": json_answer(201, {"request_id": None}),
}
# POST answers a good id; the GET of that id answers this, for ever.
BAD_STATUS: dict[str, tuple[str, Answer]] = {
    "weird": ("WEIRD-1", json_answer(200, {"request_id": "WEIRD-1", "status": "weird"})),
    "html500": ("HTML-500", (500, "text/html", HTML_PAGE)),
    "garbage": ("GARBAGE-1", (200, "text/plain", b"this is not json at all")),
}
CONTROL_ID = "OK.1:a"  # legal, but ':' must be quoted in the path
SINGLE_SEGMENT = re.compile(r"/v1/registrations/([^/?#]+)")


class StubLegacy:
    """A legacy API that answers per the registration's `name` (POST) and the id (GET), and
    records every request it receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.posted_names: list[str] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.record("POST", self.path)
                self.answer(*stub.post(self.path, body))

            def do_GET(self) -> None:
                stub.record("GET", self.path)
                self.answer(*stub.get(self.path))

            def answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="stub-legacy", daemon=True)
        self.thread.start()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.seen.append((method, path))

    def post(self, path: str, body: bytes) -> Answer:
        if path != "/v1/registrations":
            return json_answer(404, {"error": "no such route"})
        name = json.loads(body).get("name")
        with self._lock:
            self.posted_names.append(name)
        if name in BAD_201:
            return BAD_201[name]
        if name in BAD_STATUS:
            request_id = BAD_STATUS[name][0]
            return json_answer(201, {"request_id": request_id})
        if name == "control":
            return json_answer(201, {"request_id": CONTROL_ID})
        return json_answer(400, {"error": "unknown test registration"})

    def get(self, path: str) -> Answer:
        match = SINGLE_SEGMENT.fullmatch(path)
        if match is None:
            return json_answer(404, {"error": "no such route"})
        request_id = unquote(match.group(1))
        if request_id == CONTROL_ID:
            return json_answer(200, {"request_id": CONTROL_ID, "status": "completed"})
        for known, answer in BAD_STATUS.values():
            if request_id == known:
                return answer
        return json_answer(404, {"error": "unknown request id"})

    def gets(self) -> list[str]:
        with self._lock:
            return [path for method, path in self.seen if method == "GET"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_legacy() -> Iterator[StubLegacy]:
    stub = StubLegacy()
    yield stub
    stub.stop()


def test_malformed_legacy_answers_are_classified(stack: Stack, broker: Broker, users: Any,
                                                 stub_legacy: StubLegacy) -> None:
    # The `stack` fixture brings the real legacy-sim along; these services talk to the stub instead.
    stack.env["LEGACY_API_URL"] = stub_legacy.url
    stack.env["POLL_DEADLINE_S"] = "2"
    submitter = stack.start("submitter")
    poller = stack.start("poller")
    names = [*BAD_201, *BAD_STATUS, "control"]
    for name in names:
        broker.publish(INBOUND, good(f"u-{name}", name=name), message_id=name)

    outcomes = Outcomes(broker, users)
    outcomes.wait(registered=1, failed=len(BAD_201) + len(BAD_STATUS), timeout=60)
    alive(submitter, poller)

    assert outcomes.registered() == {"u-control"}
    control = users.find_one({"_id": "u-control"})
    assert control["legacy_request_id"] == CONTROL_ID

    for name in BAD_201:
        records = records_for(outcomes, name)
        assert len(records) == 1, f"{name}: {len(records)} failure records"
        record, error = records[0], records[0]["error"]
        assert error["stage"] == "submit", (name, error)
        assert error["http_status"] == 201, (name, error)
        reason = error["reason"]
        assert "201" in reason and ("request_id" in reason or "JSON" in reason), (name, reason)
        assert len(reason) < 600, (name, len(reason))  # an HTML page is cut short, not pasted whole
        assert record["user_id"] == f"u-{name}" and record["legacy_request_id"] is None
        assert record["attempts"] == 1, (name, record["attempts"])  # not resubmitted: it may have been taken
        doc = users.find_one({"_id": f"u-{name}"})
        assert doc is not None and doc["registration_status"] == "failed", (name, doc)
        assert doc["registration_error"]["stage"] == "submit"
    for name in ("no-id", "id-slash", "id-dotdot", "id-space", "id-number", "id-empty"):
        assert "request_id" in records_for(outcomes, name)[0]["error"]["reason"], name

    problems = {"weird": ("'weird'", 200), "html500": ("HTTP 500", 500), "garbage": ("this is not json", 200)}
    for name, (request_id, _answer) in BAD_STATUS.items():
        records = records_for(outcomes, name)
        assert len(records) == 1, f"{name}: {len(records)} failure records"
        record, error = records[0], records[0]["error"]
        assert error["stage"] == "timeout", (name, error)
        words, status = problems[name]
        assert words in error["reason"], (name, error["reason"])  # names the last problem seen
        assert error["http_status"] == status, (name, error)
        assert len(error["reason"]) < 600, (name, len(error["reason"]))
        assert record["legacy_request_id"] == request_id and record["user_id"] == f"u-{name}"
        assert record["attempts"] >= 2, (name, record["attempts"])  # the POST and at least one poll
        doc = users.find_one({"_id": f"u-{name}"})
        assert doc["registration_status"] == "failed" and doc["registration_error"]["stage"] == "timeout", doc
        assert doc["legacy_request_id"] == request_id

    # Every GET stayed on /v1/registrations/<one segment>, only for ids the stub issued, and the
    # number of polls stayed small.
    gets = stub_legacy.gets()
    issued = {rid for rid, _ in BAD_STATUS.values()} | {CONTROL_ID}
    polled: dict[str, int] = {}
    for path in gets:
        match = SINGLE_SEGMENT.fullmatch(path)
        assert match is not None, f"a GET outside /v1/registrations/<id>: {path!r}"
        segment = unquote(match.group(1))
        assert segment not in (".", ".."), path
        assert segment in issued, f"a GET for an id the legacy API never issued: {path!r}"
        polled[segment] = polled.get(segment, 0) + 1
    assert f"/v1/registrations/{CONTROL_ID.replace(':', '%3A')}" in gets, gets  # quoted, not raw
    assert set(polled) == issued, polled
    assert max(polled.values()) <= 15, polled  # deadline 2 s, interval 0.2 s
    # Each registration was POSTed once: an unusable 201 is not retried (it may have been taken).
    assert sorted(stub_legacy.posted_names) == sorted(names)

    alive(submitter, poller)
    assert submitter.terminate() == 0
    assert poller.terminate() == 0
