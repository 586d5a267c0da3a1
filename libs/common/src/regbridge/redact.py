"""Keep credentials out of logs, errors, failure records and metrics.

Two layers. A URL setting is shown only through `redact_url_value`, which knows the value is one
URL (or a comma list of them) and so can cut the user-info at its last '@' whatever characters
the password holds. `redact_url` is the net under everything else: it finds URLs inside free
text (an exception's message, a log line), where it cannot know where a URL ends, so it stops
at whitespace. `Secrets` closes the gap between the two: it holds the passwords of the URL
settings themselves and masks them wherever they appear, whatever text they are in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

from regbridge.brokers import split_urls

# scheme://user:password@host  →  scheme://***@host ; also catches URLs inside longer text.
# Greedy up to the last '@' before the path: clients split user-info there, so a password may
# itself hold an '@'.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")
MASK = "***"
# Shorter fragments would mask ordinary words and numbers of a log line.
MIN_SECRET_CHARS = 4


def redact_url(text: str) -> str:
    """Replace the user-info part of every URL in `text` with `***`."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def redact_url_value(value: str) -> str:
    """A whole setting that is a URL, or several separated by commas: in each, everything between
    '://' and its last '@' is user-info, whatever characters the password holds."""
    return ",".join(_redact_one(url) for url in _urls_of(value)) if value.strip() else value


def _urls_of(value: str) -> list[str]:
    urls = split_urls(value)
    if len({"@" in url.partition("://")[2] for url in urls}) > 1:
        # Some with user-info, some without: the nodes of one cluster share their users, so this
        # is one URL whose password holds ",amqp://" (settings refuse it): cut at its last '@'.
        return [value.strip()]
    return urls


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return redact_url(url)
    return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"


def passwords_of(value: str) -> list[str]:
    """The passwords in a URL setting (one URL or a comma list), as written and percent-decoded."""
    found: list[str] = []
    for url in _urls_of(value):
        _, sep, rest = url.partition("://")
        userinfo = rest.rpartition("@")[0] if sep else ""
        _, colon, password = userinfo.partition(":")
        if colon and password:
            found += [password, unquote(password)]
    return found


class Secrets:
    """Known secret strings, masked wherever they appear in a text: the net for a password that
    reaches a message some other way than as its URL (a library's error, a repr)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        kept = {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
        # Longest first: a secret that holds another is masked whole.
        ordered = sorted(kept, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def of_urls(cls, values: Iterable[str]) -> Secrets:
        return cls(p for value in values for p in passwords_of(value))

    def mask(self, text: str) -> str:
        """`text` with every known secret masked, then every URL's user-info."""
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return redact_url(text)
