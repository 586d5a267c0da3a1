"""Messages: decoding never raises anything but DecodeError, and a failure keeps what the record needs."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from recursion_limit import low_recursion_limit

from regbridge.messages import (
    MAX_NESTING,
    TRUNCATED_ORIGINAL_CHARS,
    USER_ID_MAX_CHARS,
    DecodeError,
    FailureError,
    FailureRecord,
    PendingMessage,
    Registration,
    nested_deeper_than,
    valid_user_id,
)

MAX = 64 * 1024
# Deterministic and quick: the same examples every run, no example database left behind.
FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)
# Building nested JSON values is the slow part: fewer of them keeps the tier quick.
FAST_JSON = settings(max_examples=60, deadline=None, derandomize=True, database=None)

REGISTRATION = {"user_id": "u-000123", "name": "Maria da Silva", "email": "maria@example.com", "cpf": "12345678909"}


def _decode(body: bytes, message_id: str | None = None, max_bytes: int = MAX) -> Registration:
    return Registration.decode(body, message_id=message_id, max_bytes=max_bytes)


def _decode_error(body: bytes, max_bytes: int = MAX) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        _decode(body, max_bytes=max_bytes)
    return info.value


def _strict_json(body: bytes) -> Any:
    """Parse as RFC 8259 JSON: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


# ---- Registration ------------------------------------------------------------------------------


def test_valid_registration() -> None:
    body = json.dumps(REGISTRATION).encode()
    reg = _decode(body, message_id="m-1")
    assert reg.user_id == "u-000123"
    assert dict(reg.payload) == REGISTRATION
    assert reg.body == body
    assert reg.message_id == "m-1"


def test_minimal_registration_and_extra_fields_kept() -> None:
    reg = _decode(b'{"user_id":"x","nested":{"a":[1,2,null]},"flag":true}')
    assert reg.user_id == "x"
    assert dict(reg.payload) == {"user_id": "x", "nested": {"a": [1, 2, None]}, "flag": True}
    assert reg.message_id is None


def test_user_id_of_exactly_128_characters_is_valid() -> None:
    uid = "u" * USER_ID_MAX_CHARS
    assert USER_ID_MAX_CHARS == 128
    assert _decode(json.dumps({"user_id": uid}).encode()).user_id == uid


def test_attempt_key_is_the_message_id_when_there_is_one() -> None:
    body = b'{"user_id":"u-1"}'
    assert _decode(body, message_id="abc-123").attempt_key == "u-1|mid:abc-123"


@pytest.mark.parametrize("message_id", [None, ""])
def test_attempt_key_is_a_digest_of_the_body_without_message_id(message_id: str | None) -> None:
    body = b'{"user_id":"u-1","name":"A"}'
    reg = _decode(body, message_id=message_id)
    assert reg.message_id is None
    assert reg.attempt_key == "u-1|sha256:" + hashlib.sha256(body).hexdigest()
    # Another body, another key; the same body, the same key.
    assert _decode(b'{"user_id":"u-1","name":"B"}').attempt_key != reg.attempt_key
    assert _decode(body).attempt_key == reg.attempt_key


def test_not_utf8() -> None:
    err = _decode_error(b'{"user_id": "u-1", "name": "Jo\xe3o"}')
    assert "UTF-8" in err.reason
    assert err.user_id is None
    assert err.original == '{"user_id": "u-1", "name": "Jo\ufffdo"}'


@pytest.mark.parametrize("body", [b"not json", b"{", b'{"user_id": "u-1",}', b"", b"   "])
def test_not_json_keeps_the_raw_text(body: bytes) -> None:
    err = _decode_error(body)
    assert "not JSON" in err.reason
    assert err.original == body.decode()
    assert err.user_id is None


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        (b'[{"user_id": "u-1"}]', [{"user_id": "u-1"}]),
        (b"42", 42),
        (b"3.5", 3.5),
        (b'"u-1"', "u-1"),
        (b"null", None),
        (b"true", True),
    ],
)
def test_json_but_not_an_object_keeps_the_parsed_value(body: bytes, parsed: object) -> None:
    err = _decode_error(body)
    assert "not an object" in err.reason
    assert err.original == parsed
    assert type(err.original) is type(parsed)
    assert err.user_id is None


def test_missing_user_id() -> None:
    err = _decode_error(b'{"name": "Maria"}')
    assert err.reason == "message has no user_id"
    assert err.original == {"name": "Maria"}
    assert err.user_id is None


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "u" * 129,
        0,
        123,
        12.5,
        True,
        None,
        ["u-1"],
        {"$gt": ""},
        {"$ne": None},
    ],
    ids=["empty", "129-chars", "zero", "int", "float", "bool", "null", "list", "gt-operator", "ne-operator"],
)
def test_invalid_user_id(user_id: object) -> None:
    body = json.dumps({"user_id": user_id, "name": "Maria"}).encode()
    err = _decode_error(body)
    assert "user_id must be" in err.reason
    assert err.original == {"user_id": user_id, "name": "Maria"}
    # Never an operator object (or anything but a valid string) as the user id.
    assert err.user_id is None


def test_operator_object_never_becomes_a_user_id() -> None:
    assert valid_user_id({"$gt": ""}) is None
    assert valid_user_id(["a"]) is None
    assert valid_user_id("a") == "a"


def test_body_over_max_bytes_gives_a_truncated_original() -> None:
    body = json.dumps({"user_id": "u-1", "pad": "x" * 20_000}).encode()
    err = _decode_error(body, max_bytes=1000)
    assert str(len(body)) in err.reason and "1000" in err.reason
    assert isinstance(err.original, str)
    assert err.original.startswith('{"user_id": "u-1", "pad": "xxx')
    assert err.original.endswith(f"... [truncated, {len(body)} bytes in all]")
    assert len(err.original) < TRUNCATED_ORIGINAL_CHARS + 100
    assert err.user_id is None


def test_body_of_exactly_max_bytes_is_accepted() -> None:
    body = b'{"user_id":"u-1"}'
    assert _decode(body, max_bytes=len(body)).user_id == "u-1"
    with pytest.raises(DecodeError):
        _decode(body, max_bytes=len(body) - 1)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"user_id":"u",' + b'"a":' * 1 + b"[" * 100_000])
def test_deeply_nested_json_is_a_decode_error_not_a_crash(body: bytes) -> None:
    err = _decode_error(body, max_bytes=10**6)
    assert isinstance(err.original, str)
    assert err.user_id is None


def test_deep_but_complete_nesting_is_a_decode_error_with_text_original() -> None:
    body = b'{"user_id":"u-1","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    err = _decode_error(body, max_bytes=10**6)
    assert isinstance(err.original, str)
    # Whatever the original is, the failure record carrying it can be written.
    record = FailureRecord(err.original, err.user_id, None, FailureError("validation", err.reason), 0,
                           datetime(2026, 1, 1, tzinfo=UTC))
    assert FailureRecord.decode(record.encode()).original == err.original


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(constant: bytes) -> None:
    # RFC 8259 has no NaN/Infinity; a body carrying them is not JSON (contract §3 → stage validation),
    # and must never end up in a failure record that strict JSON readers cannot parse.
    err = _decode_error(b'{"user_id": "u-1", "score": ' + constant + b"}")
    record = FailureRecord(err.original, err.user_id, None, FailureError("validation", err.reason), 0,
                           datetime(2026, 1, 1, tzinfo=UTC))
    _strict_json(record.encode())


def test_lone_surrogate_user_id_is_rejected() -> None:
    # "\ud800" is valid JSON syntax but not a Unicode character: the user id could never be
    # written to MongoDB (BSON strings are UTF-8), so it must be a validation failure rather than
    # an exception that requeues the message forever.
    err = _decode_error(b'{"user_id": "\\ud800"}')
    assert err.user_id is None


# ---- properties: decoding raises DecodeError or returns a usable message -------------------------

JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**1024, max_value=2**1400)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)


def _check_registration(body: bytes) -> None:
    try:
        reg = Registration.decode(body, message_id=None, max_bytes=MAX)
    except DecodeError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        assert exc.user_id is None
        json.dumps(exc.original)  # a failure record can carry it
        return
    assert isinstance(reg.user_id, str)
    assert 1 <= len(reg.user_id) <= USER_ID_MAX_CHARS
    reg.user_id.encode("utf-8")  # storable


@FAST
@given(st.binary(max_size=300))
def test_registration_decode_of_arbitrary_bytes(body: bytes) -> None:
    _check_registration(body)


@FAST_JSON
@given(st.dictionaries(st.text(max_size=10), JSON_VALUE, max_size=5), st.one_of(st.just("absent"), JSON_VALUE))
def test_registration_decode_of_arbitrary_json_objects(obj: dict[str, Any], user_id: object) -> None:
    if user_id != "absent":
        obj = {**obj, "user_id": user_id}
    body = json.dumps(obj).encode()
    expected = valid_user_id(obj.get("user_id"))
    if expected is None:
        with pytest.raises(DecodeError) as info:
            _decode(body)
        assert info.value.original == obj
        assert info.value.user_id is None
    else:
        reg = _decode(body)
        assert reg.user_id == expected
        assert dict(reg.payload) == obj


@FAST
@given(st.text(min_size=1, max_size=USER_ID_MAX_CHARS))
def test_any_non_empty_short_string_is_a_user_id(user_id: str) -> None:
    assert _decode(json.dumps({"user_id": user_id}).encode()).user_id == user_id


def _pending(**overrides: Any) -> PendingMessage:
    fields: dict[str, Any] = {
        "request_id": "AB583C-X",
        "user_id": "u-000123",
        "payload": REGISTRATION,
        "attempt_key": "mid:m-1",
        "submitted_at": 1_700_000_000.25,
        "message_id": "m-1",
        "received_at": 1_699_999_999.5,
        "submit_attempts": 2,
        "polls": 3,
    }
    fields.update(overrides)
    return PendingMessage(**fields)


PENDING_FIELDS = ["request_id", "user_id", "payload", "attempt_key", "submitted_at", "message_id", "received_at",
                  "submit_attempts", "polls", "waited_s", "processing_age_s"]


def _check_pending(body: bytes) -> None:
    try:
        msg = PendingMessage.decode(body)
    except DecodeError as exc:
        assert exc.reason
        assert exc.user_id is None or valid_user_id(exc.user_id) == exc.user_id
        json.dumps(exc.original)
        return
    assert valid_user_id(msg.user_id) == msg.user_id
    assert isinstance(msg.request_id, str)
    assert isinstance(msg.submitted_at, float)
    assert isinstance(msg.polls, int)


@FAST
@given(st.binary(max_size=300))
def test_pending_decode_of_arbitrary_bytes(body: bytes) -> None:
    _check_pending(body)


@FAST_JSON
@given(st.sampled_from(PENDING_FIELDS), st.one_of(st.just("absent"), JSON_VALUE))
def test_pending_decode_with_any_field_of_any_value(field: str, value: object) -> None:
    data = json.loads(_pending().encode())
    if value == "absent":
        del data[field]
    else:
        data[field] = value
    _check_pending(json.dumps(data).encode())


@FAST_JSON
@given(st.dictionaries(st.text(max_size=10), JSON_VALUE, max_size=5))
def test_pending_decode_of_arbitrary_json_objects(obj: dict[str, Any]) -> None:
    _check_pending(json.dumps(obj).encode())


def test_pending_decode_of_a_huge_number_is_a_decode_error() -> None:
    data = json.loads(_pending().encode())
    data["submitted_at"] = 10**400
    with pytest.raises(DecodeError):
        PendingMessage.decode(json.dumps(data).encode())


# ---- PendingMessage ---------------------------------------------------------------------------


def test_pending_round_trip() -> None:
    msg = _pending()
    assert PendingMessage.decode(msg.encode()) == msg


def test_pending_round_trip_with_nulls() -> None:
    msg = _pending(message_id=None, received_at=None, submitted_at=5)
    back = PendingMessage.decode(msg.encode())
    assert back == msg
    assert back.message_id is None and back.received_at is None
    assert back.submitted_at == 5.0 and isinstance(back.submitted_at, float)


def test_pending_encoding_is_compact_json_with_every_field() -> None:
    data = json.loads(_pending().encode())
    assert sorted(data) == sorted(PENDING_FIELDS)
    assert data["payload"] == REGISTRATION


def test_waited_adds_up_what_the_broker_held_it_for_and_bounds_its_age() -> None:
    msg = _pending().waited(10.0).waited(2.0)
    assert msg.waited_s == 12.0
    assert msg.age_s(msg.submitted_at + 5.0) == 12.0  # a clock behind: the broker's count wins
    assert msg.age_s(msg.submitted_at + 30.0) == 30.0


def test_a_pending_message_without_waited_s_reads_as_never_waited() -> None:
    data = json.loads(_pending().encode())
    del data["waited_s"]
    assert PendingMessage.decode(json.dumps(data).encode()).waited_s == 0.0


def test_polled_keeps_the_age_of_the_last_poll_that_said_processing() -> None:
    msg = _pending()
    assert msg.processing_age_s is None
    seen = msg.polled(processing_at_s=12.5)
    assert seen.processing_age_s == 12.5
    assert seen.polled().processing_age_s == 12.5  # a poll that said nothing of the kind (a 503)
    assert PendingMessage.decode(seen.encode()) == seen
    data = json.loads(msg.encode())
    del data["processing_age_s"]  # a message from before the field: no such poll known
    assert PendingMessage.decode(json.dumps(data).encode()).processing_age_s is None


def test_polled_counts_one_more_poll_and_keeps_the_rest() -> None:
    msg = _pending(polls=3)
    polled = msg.polled()
    assert polled.polls == 4
    assert msg.polls == 3
    assert polled == _pending(polls=4)
    assert polled.polled().polls == 5


@pytest.mark.parametrize(
    ("field", "value"),
    [("polls", True), ("polls", "3"), ("submit_attempts", 1.5), ("submitted_at", "now"), ("payload", []),
     ("request_id", 7), ("message_id", 5), ("received_at", "x")],
)
def test_pending_wrong_field_types(field: str, value: object) -> None:
    data = json.loads(_pending().encode())
    data[field] = value
    with pytest.raises(DecodeError) as info:
        PendingMessage.decode(json.dumps(data).encode())
    assert field in info.value.reason
    # The record can still name the user and carry the registration (or what stands in its place).
    assert info.value.user_id == "u-000123"
    assert info.value.original == (value if field == "payload" else REGISTRATION)


def test_pending_with_an_operator_user_id() -> None:
    data = json.loads(_pending().encode())
    data["user_id"] = {"$gt": ""}
    with pytest.raises(DecodeError) as info:
        PendingMessage.decode(json.dumps(data).encode())
    assert info.value.user_id is None


def test_pending_with_a_too_long_user_id() -> None:
    data = json.loads(_pending().encode())
    data["user_id"] = "u" * 129
    with pytest.raises(DecodeError) as info:
        PendingMessage.decode(json.dumps(data).encode())
    assert info.value.user_id is None
    assert info.value.original == REGISTRATION


@pytest.mark.parametrize(("body", "original"), [(b"garbage", "garbage"), (b"[1, 2]", [1, 2]), (b"\xff", "\ufffd")])
def test_pending_not_an_object(body: bytes, original: object) -> None:
    with pytest.raises(DecodeError) as info:
        PendingMessage.decode(body)
    assert info.value.original == original
    assert info.value.user_id is None


# ---- FailureRecord ----------------------------------------------------------------------------

FAILED_AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _record(**overrides: Any) -> FailureRecord:
    fields: dict[str, Any] = {
        "original": REGISTRATION,
        "user_id": "u-000123",
        "legacy_request_id": "AB583C-X",
        "error": FailureError("legacy", "rejected by the legacy system", 200),
        "attempts": 4,
        "failed_at": FAILED_AT,
    }
    fields.update(overrides)
    return FailureRecord(**fields)


def test_failure_record_matches_the_contract_example() -> None:
    data = json.loads(_record().encode())
    assert data == {
        "original": REGISTRATION,
        "user_id": "u-000123",
        "legacy_request_id": "AB583C-X",
        "error": {"stage": "legacy", "reason": "rejected by the legacy system", "http_status": 200},
        "attempts": 4,
        "failed_at": "2026-11-27T12:00:00+00:00",
    }


def test_failure_record_has_every_field_with_nulls_where_unknown() -> None:
    record = _record(original="not json", user_id=None, legacy_request_id=None,
                     error=FailureError("validation", "message body is not JSON"), attempts=0)
    data = json.loads(record.encode())
    assert set(data) == {"original", "user_id", "legacy_request_id", "error", "attempts", "failed_at"}
    assert set(data["error"]) == {"stage", "reason", "http_status"}
    assert data["user_id"] is None
    assert data["legacy_request_id"] is None
    assert data["error"]["http_status"] is None
    assert data["original"] == "not json"


def test_failure_record_round_trip() -> None:
    record = _record()
    back = FailureRecord.decode(record.encode())
    assert back == record
    assert back.failed_at.tzinfo is not None
    assert back.failed_at.utcoffset() == timedelta(0)


def test_failed_at_is_written_in_utc() -> None:
    local = datetime(2026, 11, 27, 9, 0, tzinfo=timezone(timedelta(hours=-3)))
    data = json.loads(_record(failed_at=local).encode())
    assert data["failed_at"] == "2026-11-27T12:00:00+00:00"
    assert datetime.fromisoformat(data["failed_at"]) == local


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"null", b'{"original": 1}', b'{"error": {}}', b'{"original": 1, "error": 5}',
     b'{"original": 1, "error": []}', b'{"original": 1, "error": "boom"}'],
)
def test_failure_record_decode_errors(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        FailureRecord.decode(body)
    assert info.value.original == body.decode()


RECORD_FIELDS = ["original", "user_id", "legacy_request_id", "error", "attempts", "failed_at"]


def _check_record(body: bytes) -> None:
    try:
        record = FailureRecord.decode(body)
    except DecodeError as exc:
        assert exc.reason
        return
    assert isinstance(record.error, FailureError)
    assert isinstance(record.failed_at, datetime)


@FAST
@given(st.binary(max_size=300))
def test_failure_record_decode_of_arbitrary_bytes(body: bytes) -> None:
    _check_record(body)


@FAST_JSON
@given(st.sampled_from([*RECORD_FIELDS, "error.stage", "error.reason", "error.http_status"]),
       st.one_of(st.just("absent"), JSON_VALUE))
def test_failure_record_decode_with_any_field_of_any_value(field: str, value: object) -> None:
    data = json.loads(_record().encode())
    target, _, key = field.rpartition(".")
    holder = data[target] if target else data
    if value == "absent":
        del holder[key]
    else:
        holder[key] = value
    _check_record(json.dumps(data).encode())


@FAST_JSON
@given(st.dictionaries(st.text(max_size=10), JSON_VALUE, max_size=5))
def test_failure_record_decode_of_arbitrary_json_objects(obj: dict[str, Any]) -> None:
    _check_record(json.dumps(obj).encode())


# ---- bounded input: nesting, duplicate keys ---------------------------------------------------



def nested_in(levels: int, *, closed: bool = True, user_id: str = "u-1") -> bytes:
    """A valid registration whose field `x` holds arrays nested `levels` deep (so that the body
    nests `levels` + 1 deep), or, with `closed` False, only their opening brackets."""
    inner = b"[" * levels + (b"]" * levels + b"}" if closed else b"")
    return b'{"user_id":"' + user_id.encode() + b'","name":"Maria","x":' + inner


def test_low_recursion_limit_stops_a_recursive_walk() -> None:
    """The helper proves something: json's own parser, which recurses, fails under it at 990."""
    with low_recursion_limit(), pytest.raises(RecursionError):
        json.loads(nested_in(990))


@pytest.mark.parametrize("depth", [2, MAX_NESTING - 1, MAX_NESTING])
def test_nesting_up_to_the_limit_is_accepted(depth: int) -> None:
    with low_recursion_limit():
        reg = _decode(nested_in(depth - 1))
    value: Any = reg.payload["x"]
    for _ in range(depth - 2):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 990, 100_000])
@pytest.mark.parametrize("closed", [True, False], ids=["complete", "unclosed"])
def test_nesting_past_the_limit_is_refused_before_parsing(depth: int, closed: bool) -> None:
    body = nested_in(depth - 1, closed=closed)
    with low_recursion_limit():
        err = _decode_error(body, max_bytes=10**6)
    assert err.reason == f"message body is nested more than {MAX_NESTING} levels deep"
    assert err.user_id is None
    assert isinstance(err.original, str) and body.decode().startswith(err.original[:TRUNCATED_ORIGINAL_CHARS])
    assert len(err.original) <= TRUNCATED_ORIGINAL_CHARS + 50


@pytest.mark.parametrize("body", [b"[" * 100_000, b"{" * 100_000, b'{"a":' * 100_000, b"[{" * 50_000 + b"]"])
def test_a_nesting_bomb_is_refused_on_its_depth(body: bytes) -> None:
    with low_recursion_limit():
        err = _decode_error(body, max_bytes=10**6)
    assert "nested more than" in err.reason


def test_brackets_inside_strings_do_not_count() -> None:
    brackets = "[{" * 500 + '\\"' + "]}" * 3 + "\\\\"
    body = ('{"user_id":"u-1","x":"' + brackets + '","y":[["ok"]]}').encode()
    with low_recursion_limit():
        reg = _decode(body)
    assert reg.payload["x"] == json.loads('"' + brackets + '"')
    assert nested_deeper_than(body.decode(), 3) is False  # the object, and "y"'s two arrays
    assert nested_deeper_than(body.decode(), 2) is True


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@FAST_JSON
@given(JSON_VALUE, st.integers(min_value=0, max_value=8))
def test_the_scan_agrees_with_the_parsed_depth(value: Any, limit: int) -> None:
    text = json.dumps(value)
    assert nested_deeper_than(text, limit) == (_depth(value) > limit)
    assert nested_deeper_than(json.dumps(value, ensure_ascii=False, indent=1), limit) == (_depth(value) > limit)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"user_id": "victim", "name": "Maria", "user_id": "attacker"}', "user_id"),
        (b'{"user_id": "u-1", "name": "A", "name": "B"}', "name"),
        (b'{"user_id": "u-1", "address": {"city": "Recife", "zip": "1", "city": "Olinda"}}', "city"),
        (b'{"user_id": "u-1", "phones": [{"kind": "home"}, {"kind": "work", "kind": "home"}]}', "kind"),
        (b'{"user_id": "u-1", "a": 1, "\\u0061": 2}', "a"),  # the same key, spelt with an escape
        (b'{"user_id": "u-1", "\\u001b[2J": 1, "\\u001b[2J": 2}', "\x1b[2J"),
    ],
    ids=["user_id", "top-level", "nested", "in-a-list", "escaped", "control-chars"],
)
def test_a_key_twice_in_one_object_is_refused_at_any_depth(body: bytes, key: str) -> None:
    err = _decode_error(body)
    assert err.reason == f"message body is refused: the key {key!r} appears twice in one object"
    assert "\x1b" not in err.reason  # the key is shown escaped
    assert err.user_id is None  # neither of two user ids is taken
    assert err.original == body.decode()  # the raw text, not one parser's reading of it


def test_the_same_key_in_different_objects_or_cases_is_no_duplicate() -> None:
    body = b'{"user_id": "u-1", "a": {"k": 1}, "b": {"k": 2}, "K": 3, "k": 4, "l": [{"k": 1}, {"k": 2}]}'
    assert _decode(body).payload["a"] == {"k": 1}


def test_a_very_long_duplicate_key_is_named_cut_short() -> None:
    key = "k" * 10_000
    err = _decode_error(json.dumps({"user_id": "u-1"}).encode()[:-1] + f', "{key}": 1, "{key}": 2}}'.encode())
    assert len(err.reason) < 200 and "kkk'..." in err.reason


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" + b"0" * 400 + b".0"])
def test_a_number_too_large_for_a_float_is_refused(number: bytes) -> None:
    err = _decode_error(b'{"user_id": "u-1", "score": ' + number + b"}")
    assert "out of range" in err.reason
    assert err.original == b'{"user_id": "u-1", "score": '.decode() + number.decode() + "}"


# A value nested exactly `depth` deep: a leaf in `depth` arrays and objects, built without recursion.
def _nested_value(depth: int, leaf: Any, kinds: list[bool]) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if kinds[i % len(kinds)] else {f"k{i}": value}
    return value


@FAST
@given(st.integers(min_value=0, max_value=MAX_NESTING - 1), JSON_LEAF, st.lists(st.booleans(), min_size=1, max_size=5),
       st.text(min_size=1, max_size=USER_ID_MAX_CHARS))
def test_whatever_decodes_can_be_encoded_as_pending_message_and_failure_record(
        depth: int, leaf: Any, kinds: list[bool], user_id: str) -> None:
    """The encodes after the POST cannot fail: the pending message and the failure record of any
    registration that decoded are written and read back, under a low recursion limit."""
    assume(valid_user_id(user_id) is not None)
    body = json.dumps({"user_id": user_id, "x": _nested_value(depth, leaf, kinds)}).encode()
    with low_recursion_limit():
        reg = _decode(body)
        pending = PendingMessage(request_id="R-1", user_id=reg.user_id, payload=reg.payload,
                                 attempt_key=reg.attempt_key, submitted_at=1.0)
        assert PendingMessage.decode(pending.encode()) == pending
        record = FailureRecord(reg.payload, reg.user_id, "R-1", FailureError("legacy", "refused"), 1,
                               datetime(2026, 1, 1, tzinfo=UTC))
        assert FailureRecord.decode(record.encode()).original == reg.payload


@pytest.mark.parametrize("value", [b'"\\ud800"', b'"\\u001b[2J\\u202e"', b'"\\u0000"', b"-0.0", b"1e308", b"1" * 4300])
def test_values_json_reads_back_oddly_still_encode(value: bytes) -> None:
    """A lone surrogate, control characters, the largest numbers: all pass decode, so all must
    go into a pending message and a failure record and come back the same."""
    reg = _decode(b'{"user_id": "u-1", "v": ' + value + b"}")
    pending = PendingMessage(request_id="R-1", user_id="u-1", payload=reg.payload, attempt_key="k", submitted_at=1.0)
    assert PendingMessage.decode(pending.encode()).payload == reg.payload
    record = FailureRecord(reg.payload, "u-1", None, FailureError("legacy", "x"), 1, datetime(2026, 1, 1, tzinfo=UTC))
    assert FailureRecord.decode(record.encode()).original == reg.payload


def _pending_body(payload: bytes) -> bytes:
    return json.dumps({**json.loads(_pending().encode()), "payload": "@"}).encode().replace(b'"@"', payload)


def test_a_pending_message_holding_a_payload_at_the_limit_is_read() -> None:
    payload = nested_in(MAX_NESTING - 1)
    with low_recursion_limit():
        msg = PendingMessage.decode(_pending_body(payload))
    assert msg.payload == json.loads(payload)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 990, 100_000])
def test_a_pending_message_nested_past_the_limit_is_refused(depth: int) -> None:
    body = _pending_body(nested_in(depth - 1))
    with low_recursion_limit(), pytest.raises(DecodeError) as info:
        PendingMessage.decode(body)
    assert info.value.reason == f"pending message is nested more than {MAX_NESTING + 1} levels deep"
    assert isinstance(info.value.original, str) and len(info.value.original) <= TRUNCATED_ORIGINAL_CHARS + 50
    assert info.value.user_id is None


@pytest.mark.parametrize("body", [
    _pending_body(b'{"user_id": "u-000123", "user_id": "other"}'),
    _pending().encode().replace(b'"polls":3', b'"polls":3,"polls":0'),
])
def test_a_pending_message_with_a_key_twice_is_refused(body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        PendingMessage.decode(body)
    assert "appears twice" in info.value.reason
    assert info.value.original == body.decode()


def _deep_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class _Unshowable:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {"user_id": "u-1"}
    value["self"] = value
    return value


@pytest.mark.parametrize("original", [_deep_list(100_000), _circular(), _Unshowable(), {1: object()}],
                         ids=["deep", "circular", "broken-repr", "not-json"])
def test_a_failure_record_is_written_whatever_its_original(original: Any) -> None:
    record = FailureRecord(original, "u-1", None, FailureError("validation", "poison"), 0,
                           datetime(2026, 1, 1, tzinfo=UTC))
    with low_recursion_limit():
        back = FailureRecord.decode(record.encode())
    assert isinstance(back.original, str) and len(back.original) <= TRUNCATED_ORIGINAL_CHARS + 50
    assert back.error == record.error and back.user_id == "u-1"
