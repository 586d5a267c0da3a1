"""Credentials never leave the process: every URL's user-info is replaced, nothing else is touched."""

from __future__ import annotations

import pytest

from regbridge.redact import redact_url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://***@localhost:5672/%2F"),
        ("mongodb://alice:s3cret@mongo:27017/?authSource=admin", "mongodb://***@mongo:27017/?authSource=admin"),
        ("mongodb+srv://alice:s3cret@cluster.example.net", "mongodb+srv://***@cluster.example.net"),
        ("https://token@legacy:8443/v1", "https://***@legacy:8443/v1"),
        ("amqps://:onlypassword@rabbit", "amqps://***@rabbit"),
        ("AMQP://Bob:PW@rabbit", "AMQP://***@rabbit"),
    ],
)
def test_user_info_is_replaced(text: str, expected: str) -> None:
    assert redact_url(text) == expected


def test_urls_inside_longer_text() -> None:
    text = "cannot connect to amqp://bob:pw-one@rabbit:5672/%2F (timeout)"
    assert redact_url(text) == "cannot connect to amqp://***@rabbit:5672/%2F (timeout)"


def test_several_urls_in_one_text() -> None:
    text = ("primary amqp://u1:pw-one@r1/vh, fallback amqps://u2:pw-two@r2:5671/ "
            "and store mongodb://u3:pw-three@m1:27017,m2:27017/db")
    redacted = redact_url(text)
    assert redacted == ("primary amqp://***@r1/vh, fallback amqps://***@r2:5671/ "
                        "and store mongodb://***@m1:27017,m2:27017/db")
    for secret in ("pw-one", "pw-two", "pw-three", "u1", "u2", "u3"):
        assert secret not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain text with no url",
        "http://localhost:8080/v1/registrations",
        "amqp://localhost:5672/%2F",
        "mongodb://mongo:27017/?w=majority",
        "write to maria@example.com about http://legacy/v1",
        "http://legacy/v1/registrations?contact=a@b",
    ],
)
def test_text_without_credentials_is_untouched(text: str) -> None:
    assert redact_url(text) == text


def test_password_with_an_unescaped_at_sign() -> None:
    # pika (urllib) splits user-info at the LAST '@' of the authority, so this is a password
    # "p@ss-word" that really works: none of it may remain.
    redacted = redact_url("amqp://bob:p@ss-word@rabbit:5672/%2F")
    assert "ss-word" not in redacted
    assert redacted == "amqp://***@rabbit:5672/%2F"


def test_redacting_twice_changes_nothing_more() -> None:
    once = redact_url("amqp://bob:pw@rabbit/")
    assert redact_url(once) == once == "amqp://***@rabbit/"
