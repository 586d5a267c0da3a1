"""Keep credentials out of logs, errors, failure records and metrics."""

from __future__ import annotations

import re

from regbridge.brokers import split_urls

# scheme://user:password@host  →  scheme://***@host ; also catches URLs inside longer text.
# Greedy up to the last '@' before the path: clients split user-info there, so a password may
# itself hold an '@'.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")


def redact_url(text: str) -> str:
    """Replace the user-info part of every URL in `text` with `***`."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)


def redact_url_value(value: str) -> str:
    """A whole setting that is a URL, or several separated by commas: in each, everything between
    '://' and its last '@' is user-info, whatever characters the password holds."""
    return ",".join(_redact_one(url) for url in split_urls(value)) if value.strip() else value


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return redact_url(url)
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
