"""RabbitMQ's management HTTP API, read only: per queue, the counts and rates that
rabbitmqadmin and the management UI show. Standard library HTTP: one GET per call."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from regbridge.redact import redact_url

from .settings import CliSettings

# The rates shown, by the names of the API's message_stats fields (`<name>_details.rate`).
RATES = ("publish", "deliver_get", "ack", "redeliver")
COLUMNS = ("name", "messages_ready", "messages_unacknowledged", "consumers",
           *(f"message_stats.{rate}_details.rate" for rate in RATES))


class Unavailable(Exception):
    """The API did not answer, or not with the queues: the text says why, without credentials."""


@dataclass(frozen=True)
class Target:
    base: str  # scheme://host:port, no credentials
    vhost: str
    user: str
    password: str
    configured: bool  # from RABBITMQ_MANAGEMENT_URL, rather than derived from RABBITMQ_URL

    @property
    def shown(self) -> str:
        return f"{self.base} (vhost {self.vhost!r})"


@dataclass(frozen=True)
class QueueStats:
    name: str
    ready: int
    unacked: int
    consumers: int
    rates: dict[str, float]  # per second, averaged by the broker over its last sample window


def target(settings: CliSettings) -> Target:
    """RABBITMQ_MANAGEMENT_URL when set (its path, when there is one, is the vhost, as KEDA reads
    it); else RABBITMQ_URL's first node, over http on 15672 (amqps: https on 15671), with its
    credentials and vhost."""
    amqp = urlsplit(settings.rabbitmq_urls[0])
    amqp_vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    configured = settings.rabbitmq_management_url
    if configured:
        parts = urlsplit(configured)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else amqp_vhost
        return Target(_base(parts.scheme, parts.hostname or "", parts.port), vhost,
                      unquote(parts.username or ""), unquote(parts.password or ""), True)
    secure = amqp.scheme.lower() == "amqps"
    return Target(_base("https" if secure else "http", amqp.hostname or "", 15671 if secure else 15672), amqp_vhost,
                  unquote(amqp.username or "guest"), unquote(amqp.password or "guest"), False)


def _base(scheme: str, host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def queues(where: Target, timeout_s: float = 5.0) -> dict[str, QueueStats]:
    """Every queue of the vhost, by name."""
    url = f"{where.base}/api/queues/{quote(where.vhost, safe='')}?columns={','.join(COLUMNS)}"
    token = base64.b64encode(f"{where.user}:{where.password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            listed = json.load(response)
    except urllib.error.HTTPError as exc:
        raise Unavailable(_http_problem(exc.code, where)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise Unavailable(redact_url(text)[:200]) from None
    except (OSError, ValueError) as exc:
        raise Unavailable(redact_url(str(exc) or type(exc).__name__)[:200]) from None
    if not isinstance(listed, list):
        raise Unavailable("the answer is not a list of queues (is this the management API?)")
    return {str(q["name"]): _stats(q) for q in listed if isinstance(q, dict) and "name" in q}


def _http_problem(code: int, where: Target) -> str:
    if code == 401:
        return "HTTP 401: it refused the credentials"
    if code == 403:
        return "HTTP 403: the user may not read queues (it needs the monitoring or management tag)"
    if code == 404:
        return f"HTTP 404: no vhost {where.vhost!r} there (or no management API at that address)"
    return f"HTTP {code}"


def _stats(queue: dict[str, Any]) -> QueueStats:
    message_stats = queue.get("message_stats") or {}
    # A queue that never saw a message has no message_stats at all: its rates are zero.
    rates = {rate: float((message_stats.get(f"{rate}_details") or {}).get("rate", 0.0)) for rate in RATES}
    return QueueStats(str(queue["name"]), int(queue.get("messages_ready") or 0),
                      int(queue.get("messages_unacknowledged") or 0), int(queue.get("consumers") or 0), rates)
