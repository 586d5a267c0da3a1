"""Several brokers of one cluster in one setting, and the order in which to try them.

`RABBITMQ_URL` holds one URL or several, separated by commas. A comma that is not followed by a
scheme (`amqp://`) belongs to the URL it is in, so that a password may hold one. A client that
knows every node survives the loss of the one it is on by connecting to another; the order is
shuffled so that the replicas of a service spread over the cluster instead of all piling onto
the first node listed.

Pure: the runtime's link and the operator's command both draw their next address from here.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from enum import StrEnum
from urllib.parse import urlsplit

# A comma, then the next URL's scheme: where one broker's URL ends and the next one's begins.
_NEXT_URL = re.compile(r"\s*,\s*(?=[a-zA-Z][a-zA-Z0-9+.-]*://)")
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}


class Order(StrEnum):
    SHUFFLED = "shuffled"  # every replica in its own order: connections spread over the nodes
    LISTED = "listed"  # the first URL is the preferred node, the others are its stand-ins


def split_urls(value: str) -> list[str]:
    """The URLs in a setting that holds one or several."""
    return [part for part in _NEXT_URL.split(value.strip()) if part]


def node_of(url: str) -> str:
    """`host:port` of a broker URL: how the logs and `/readyz` name the node a client is on.
    Never the user-info: only what follows the last '@' is looked at."""
    scheme, _, rest = url.partition("://")
    netloc = rest.rpartition("@")[2].split("/", 1)[0].split("?", 1)[0]
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or netloc
    return f"{host}:{port or _DEFAULT_PORTS.get(scheme.lower(), 5672)}"


class Rotation:
    """The next broker to try. After a failure the next address comes at once until every one
    has been tried since the last success (a round); only a failed round calls for a backoff.
    A connection that was lost moves on to the next node too: the one just lost is tried last.
    """

    def __init__(self, urls: Sequence[str], order: Order = Order.SHUFFLED,
                 rng: random.Random | None = None) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self._urls = list(urls)
        self._order = order
        self._rng = rng or random.Random()
        self._queue = self._arranged(last=None)
        self._position = 0
        self._tried = 0

    def _arranged(self, last: str | None) -> list[str]:
        urls = list(self._urls)
        if self._order is Order.SHUFFLED:
            self._rng.shuffle(urls)
            if len(urls) > 1 and urls[0] == last:
                # The address just tried does not open the next round: another node goes first.
                urls.append(urls.pop(0))
        return urls

    def next(self) -> str:
        if self._position == len(self._queue):
            self._queue = self._arranged(last=self._queue[-1])
            self._position = 0
        url = self._queue[self._position]
        self._position += 1
        self._tried += 1
        return url

    @property
    def round_failed(self) -> bool:
        """Every address has been tried since the last success: wait before the next round."""
        return self._tried >= len(self._urls)

    def start_round(self) -> None:
        """Count the tries afresh: after a connection succeeded, or after a backoff."""
        self._tried = 0
