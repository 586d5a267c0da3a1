"""Bounds the failure queue with a RabbitMQ policy, through the management API, then exits.

The setup step of docs/operations.md ("Bounding the failure queue"): docker-compose.yml runs it
before the services start, and the poller chart's `failureQueueLimit` Job when enabled. A policy rather than a
queue argument, because a policy applies to the queue that exists and changes in place, where a
changed argument makes every service stop on a 406. The overflow is always `reject-publish`: with
RabbitMQ's default (`drop-head`) a full queue would delete its oldest records.

Settings (environment):
- RABBITMQ_MANAGEMENT_URL: http[s]://user:password@host:15672/<vhost> (the vhost URL-encoded,
  %2F for /), the form the charts' Secret holds; when it is empty, derived from RABBITMQ_URL as
  the operator's command derives it (registrations_cli.management): the first node's host, over
  http on 15672 (https on 15671 for amqps), with its credentials and vhost (a URL without
  credentials is refused: the broker's default user may only connect from its own host). The
  user then needs the management API (a `policymaker` or `administrator` tag) to set a policy;
- FAILED_QUEUE (default registrations.failed);
- FAILED_QUEUE_MAX_LENGTH and/or FAILED_QUEUE_MAX_LENGTH_BYTES: positive integers, at least one;
- FAILED_QUEUE_POLICY (default registrations-failed-limit), FAILED_QUEUE_POLICY_PRIORITY
  (default 10): only one policy applies to a queue, the one of highest priority;
- FAILED_QUEUE_POLICY_EXTRA: a JSON object of further keys for the same policy, such as
  {"delivery-limit": 1000000} when a broader policy sets one (this policy replaces it here).

Once set, it checks that the failure queue (if it exists) is governed by this policy and not by
another of higher priority. Exit codes: 0 done, 2 a setting is wrong, 1 the broker refused or the
queue is governed by another policy. The URL's credentials are never printed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

DEFAULT_QUEUE = "registrations.failed"
DEFAULT_POLICY = "registrations-failed-limit"
DEFAULT_PRIORITY = 10
# Where a comma list of broker URLs starts its next URL (as regbridge.brokers reads it).
_NEXT_URL = re.compile(r"\s*,\s*(?=[a-zA-Z][a-zA-Z0-9+.-]*://)")
APPLIED_WAIT_S = 10.0  # the broker applies a policy to its queues shortly after accepting it


class Refused(Exception):
    """A setting is wrong (exit 2)."""


class Broker:
    """The management API of one vhost, with the URL's credentials as basic auth."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused("RABBITMQ_MANAGEMENT_URL must be an http:// or https:// URL with a host")
        self.where = f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        self.vhost = unquote(parts.path.lstrip("/")) or "/"
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.where}/api/{path}", data=data, method=method,
                                         headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                text = answer.read().decode() or "null"
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET":
                return None
            reason = exc.read().decode(errors="replace")[:300]
            raise RuntimeError(f"the management API at {self.where} answered {exc.code} to {method} "
                               f"/api/{path}: {reason}") from None
        except OSError as exc:
            raise RuntimeError(f"cannot reach the management API at {self.where}: {exc}") from None
        return json.loads(text)

    def path(self, *parts: str) -> str:
        return "/".join(quote(p, safe="") for p in parts)


def positive(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise Refused(f"{name} must be a positive integer")
    return int(raw)


def definition(environ: Mapping[str, str]) -> dict[str, Any]:
    """The policy's keys: the limits, reject-publish, and the extra keys (which cannot override those)."""
    limits = {"max-length": positive(environ, "FAILED_QUEUE_MAX_LENGTH"),
              "max-length-bytes": positive(environ, "FAILED_QUEUE_MAX_LENGTH_BYTES")}
    found = {k: v for k, v in limits.items() if v is not None}
    if not found:
        raise Refused("set FAILED_QUEUE_MAX_LENGTH or FAILED_QUEUE_MAX_LENGTH_BYTES (or both)")
    try:
        extra = json.loads(environ.get("FAILED_QUEUE_POLICY_EXTRA", "").strip() or "{}")
    except json.JSONDecodeError:
        raise Refused("FAILED_QUEUE_POLICY_EXTRA must be a JSON object") from None
    if not isinstance(extra, dict):
        raise Refused("FAILED_QUEUE_POLICY_EXTRA must be a JSON object")
    clash = sorted(set(extra) & {"max-length", "max-length-bytes", "overflow"})
    if clash:
        raise Refused(f"FAILED_QUEUE_POLICY_EXTRA must not set {', '.join(clash)}: the limits have their own "
                      "settings, and the overflow is always reject-publish")
    return {**extra, **found, "overflow": "reject-publish"}


def management_url(environ: Mapping[str, str]) -> str:
    """RABBITMQ_MANAGEMENT_URL, or the management API of RABBITMQ_URL's first node."""
    url = environ.get("RABBITMQ_MANAGEMENT_URL", "").strip()
    if url:
        return url
    amqp_urls = [u for u in _NEXT_URL.split(environ.get("RABBITMQ_URL", "").strip()) if u]
    if not amqp_urls:
        raise Refused("set RABBITMQ_MANAGEMENT_URL, or RABBITMQ_URL to derive it from")
    scheme, sep, rest = amqp_urls[0].partition("://")
    if not sep or scheme.lower() not in ("amqp", "amqps"):
        raise Refused("RABBITMQ_URL must be an amqp:// or amqps:// URL to derive the management API from")
    # User-info up to the last '@', as the services read it: a password may hold one.
    userinfo, at, location = rest.rpartition("@")
    netloc, _, path = location.partition("/")
    host = urlsplit(f"//{netloc}").hostname
    if not host:
        raise Refused("RABBITMQ_URL names no host to derive the management API from")
    host = f"[{host}]" if ":" in host else host
    secure = scheme.lower() == "amqps"
    vhost = path.split("?", 1)[0] or "%2F"
    if not (at and userinfo):
        raise Refused("RABBITMQ_URL carries no user to derive the management API's credentials from: "
                      "add them, or set RABBITMQ_MANAGEMENT_URL")
    return f"{'https' if secure else 'http'}://{userinfo}@{host}:{15671 if secure else 15672}/{vhost}"


def apply(environ: Mapping[str, str]) -> str:
    """Set the policy and check that it governs the failure queue; returns what was done."""
    url = management_url(environ)
    queue = environ.get("FAILED_QUEUE", "").strip() or DEFAULT_QUEUE
    name = environ.get("FAILED_QUEUE_POLICY", "").strip() or DEFAULT_POLICY
    raw_priority = environ.get("FAILED_QUEUE_POLICY_PRIORITY", "").strip() or str(DEFAULT_PRIORITY)
    if not re.fullmatch(r"-?[0-9]+", raw_priority):
        raise Refused("FAILED_QUEUE_POLICY_PRIORITY must be an integer")
    keys = definition(environ)
    broker = Broker(url)
    broker.call("PUT", f"policies/{broker.path(broker.vhost, name)}",
                {"pattern": f"^{re.escape(queue)}$", "definition": keys, "priority": int(raw_priority),
                 "apply-to": "queues"})
    done = f"policy {name} on {queue} in vhost {broker.vhost}: {json.dumps(keys, sort_keys=True)}"
    deadline = time.monotonic() + APPLIED_WAIT_S
    while True:
        found = broker.call("GET", f"queues/{broker.path(broker.vhost, queue)}")
        if found is None:
            return f"{done} (the queue does not exist yet: the policy applies once a service declares it)"
        if found.get("policy") == name:
            return done
        if time.monotonic() > deadline:
            raise RuntimeError(f"{done}, but {queue} is governed by policy {found.get('policy')!r}: only one policy "
                               f"applies to a queue (the highest priority); raise FAILED_QUEUE_POLICY_PRIORITY above "
                               "it and copy its keys into FAILED_QUEUE_POLICY_EXTRA")
        time.sleep(0.5)


def main() -> int:
    try:
        print(apply(os.environ), flush=True)
    except Refused as exc:
        print(f"failure_queue_limit: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"failure_queue_limit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
