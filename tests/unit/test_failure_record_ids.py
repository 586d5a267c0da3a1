"""The failure record's id (its `x-record-id` header, and its index entry's `_id`): one per
record, whatever copies a crash makes, and never one for two users' records."""

from __future__ import annotations

import hashlib

from regbridge.messages import Registration
from regbridge.plans import SHORTSTR_BYTES, Subject


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_id_names_the_attempt_not_the_inbound_message_id() -> None:
    subject = Subject(original={}, user_id="u-1", attempt_key="u-1|mid:m-1", message_id="m-1")
    assert subject.record_id(b"anything") == "u-1|mid:m-1"


def test_two_users_messages_that_reuse_one_message_id_are_two_records() -> None:
    def record_id(user: str, mark: str | None = None) -> str:
        body = b'{"user_id": "%s"}' % user.encode()
        key = Registration.decode(body, message_id="dup", max_bytes=1000, publish_mark=mark).attempt_key
        return Subject(original={}, user_id=user, attempt_key=key, message_id="dup").record_id(body)

    assert record_id("u-A") == "u-A|mid:dup" and record_id("u-B") == "u-B|mid:dup"
    # A replay of the same message is a new publish (its mark): its record is another record.
    assert record_id("u-A", "r-1") == "u-A|mid:dup|r-1" != record_id("u-A", "r-2")


def test_without_a_message_id_the_attempt_key_names_the_record_on_every_redelivery() -> None:
    body = b'{"user_id": "u-2", "name": "Maria"}'
    key = Registration.decode(body, message_id=None, max_bytes=1000).attempt_key
    assert key == f"u-2|sha256:{sha(body)}"
    first = Subject(original={}, user_id="u-2", attempt_key=key)
    again = Subject(original={}, user_id="u-2", attempt_key=key, attempts=3)  # a later delivery
    assert first.record_id(body) == again.record_id(body) == key


def test_a_message_no_user_could_be_read_from_is_named_by_its_body() -> None:
    assert Subject(original="{not json").record_id(b"{not json") == f"sha256:{sha(b'{not json')}"
    assert Subject(original="a").record_id(b"a") != Subject(original="b").record_id(b"b")


def test_invalid_messages_that_share_a_body_are_each_their_own_record() -> None:
    # Invalid bodies repeat (the same malformed text from one publisher): their message ids, and
    # else their publish marks, tell them apart; a copy of one delivery still shares its id.
    body = b"{not json"

    def record_id(message_id: str | None, mark: str | None = None) -> str:
        return Subject(original="{not json", message_id=message_id, publish_mark=mark).record_id(body)

    assert record_id("m-1") == f"mid:m-1|sha256:{sha(body)}" != record_id("m-2")
    assert record_id("m-1") == record_id("m-1")
    assert record_id("m-1", "replay:r-1") == f"mid:m-1|sha256:{sha(body)}|replay:r-1" != record_id("m-1")
    assert record_id(None, "ts:1") != record_id(None, "ts:2") != record_id(None)


def test_a_key_too_long_for_an_amqp_short_string_is_digested() -> None:
    long_key = "u" * 128 + "|sha256:" + "0" * 64 + "|" + "é" * 60  # 320 bytes in UTF-8
    record_id = Subject(original={}, attempt_key=long_key).record_id(b"")
    assert record_id == f"sha256:{sha(long_key.encode())}"
    assert len(record_id.encode()) <= SHORTSTR_BYTES
    fits = "u-3|sha256:" + "0" * 64
    assert Subject(original={}, attempt_key=fits).record_id(b"") == fits
