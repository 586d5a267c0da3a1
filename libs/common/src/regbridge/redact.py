"""Keep credentials out of logs, errors, failure records and metrics."""

from __future__ import annotations

import re

# scheme://user:password@host  →  scheme://***@host ; also catches URLs inside longer text.
# Greedy up to the last '@' before the path: clients split user-info there, so a password may
# itself hold an '@'.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")


def redact_url(text: str) -> str:
    """Replace the user-info part of every URL in `text` with `***`."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)
