"""The Idempotency-Key's value: the attempt key where a header can carry it, else its digest."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regbridge.legacy_http import idempotency_header
from regbridge.messages import Registration


def test_a_plain_attempt_key_is_sent_as_it_is() -> None:
    key = Registration.decode(b'{"user_id": "u-000123"}', message_id="m-1", max_bytes=4096,
                              publish_mark="ts:1764230400").attempt_key
    assert idempotency_header(key) == "u-000123|mid:m-1|ts:1764230400"


@pytest.mark.parametrize(
    "key",
    [
        "usuário-1|mid:m-1",  # beyond ASCII
        "u-1\r\nX-Injected: 1|mid:m-1",  # would end the header
        "u 1|mid:m-1",  # a space may be trimmed on the way
        "u-1|mid:" + "m" * 300,  # over the 255 characters the API takes
    ],
)
def test_a_key_a_header_cannot_carry_is_sent_as_its_digest(key: str) -> None:
    value = idempotency_header(key)
    assert value == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@given(st.text(min_size=1, max_size=400))
def test_every_value_is_header_safe_and_the_same_for_the_same_key(key: str) -> None:
    value = idempotency_header(key)
    assert 0 < len(value) <= 255 and all("!" <= c <= "~" for c in value)
    assert idempotency_header(key) == value
    # A key sent as it is never looks like another key's digest.
    assert value == key or "|" not in value
