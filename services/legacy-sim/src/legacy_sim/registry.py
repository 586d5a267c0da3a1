"""The simulator's state: registrations, their outcome over time, and the counters behind /admin/stats.

Pure state, no I/O. Time comes from an injected clock and randomness from an injected RNG, so
the unit tests drive it with a fake clock. It is used from one asyncio event loop only, hence
no locks: a key's look-up and its registration run with no await between them, so two POSTs
with one key never both register.

Idempotency keys are kept `KEY_RETENTION_S` after the registration they name, in an
OrderedDict in the order they came, which is the order they expire in: each look-up drops the
expired ones from its front, so the store holds one day of keys, whatever the uptime. A key
costs about 200 bytes beside the registration it names: 112 for the string of a 63-character
key (`u-000123|mid:<uuid>|ts:<seconds>`) and 91 for its OrderedDict entry (the request id is
the registry's own string), measured with tracemalloc: 20 MB for 100,000 keys.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from legacy_sim.latency import LatencyProfile

Status = Literal["processing", "completed", "failed"]
FAILED_REASON = "rejected by the legacy system"
# The OpenAPI description promises 24 hours; a key is forgotten no sooner.
KEY_RETENTION_S = 24 * 3600.0


def new_request_id(rng: random.Random) -> str:
    """An id shaped like the legacy system's: 6 uppercase hex digits, '-', one uppercase letter."""
    return f"{rng.getrandbits(24):06X}-{chr(65 + rng.randrange(26))}"


@dataclass(slots=True)
class Registration:
    user_id: str | None
    submitted_at: float
    completes_at: float
    outcome: Literal["completed", "failed"]
    detected_at: float | None = None
    polls: int = 0


class Registry:
    def __init__(self, *, clock: Callable[[], float], rng: random.Random,
                 key_retention_s: float = KEY_RETENTION_S) -> None:
        self._clock = clock
        self._rng = rng
        self._key_retention_s = key_retention_s
        self.reset()

    def reset(self) -> None:
        self._requests: dict[str, Registration] = {}
        self._submissions_by_user: dict[str, int] = {}
        self._request_id_by_key: OrderedDict[str, str] = OrderedDict()
        self._replays_total = 0
        self._rejected_total = 0
        self._polls_total = 0
        self._unknown_polls_total = 0
        self._post_503_total = 0
        self._get_503_total = 0
        self._detected_total = 0
        # When each POST arrived, before any delay or fault: what a test of a stop compares
        # with the moment of its signal.
        self._post_arrivals: list[float] = []
        # A running sum keeps the summary O(1) however many registrations there are.
        self._detection_delay_sum_s = 0.0

    def submit(
        self,
        *,
        user_id: str | None,
        name: str,
        latency: LatencyProfile,
        latency_age_s: float,
        fail_prefix: str | None,
        idempotency_key: str | None = None,
    ) -> str:
        """Records an accepted registration and returns its new, unique request id, remembered
        under `idempotency_key` when there is one (see `replay`). Its completion time is drawn
        from `latency`, whose own clock reads `latency_age_s` (which phase of a drift is in force)."""
        request_id = new_request_id(self._rng)
        while request_id in self._requests:
            request_id = new_request_id(self._rng)
        now = self._clock()
        failed = bool(fail_prefix) and name.startswith(fail_prefix or "")
        self._requests[request_id] = Registration(
            user_id=user_id,
            submitted_at=now,
            completes_at=now + latency.sample(self._rng, latency_age_s),
            outcome="failed" if failed else "completed",
        )
        if user_id is not None:
            self._submissions_by_user[user_id] = self._submissions_by_user.get(user_id, 0) + 1
        if idempotency_key is not None:
            # An expired entry under this key may still sit further in: it goes, so that the new
            # one is at the end, in expiry order.
            self._request_id_by_key.pop(idempotency_key, None)
            self._request_id_by_key[idempotency_key] = request_id
        return request_id

    def replay(self, idempotency_key: str) -> str | None:
        """The request id of the registration a POST with this key made in the last
        `KEY_RETENTION_S`, counted as a replay; None when there is none (register it then)."""
        keys = self._request_id_by_key
        expired_before = self._clock() - self._key_retention_s
        while keys:
            oldest_key, oldest_id = next(iter(keys.items()))
            if self._requests[oldest_id].submitted_at > expired_before:
                break
            del keys[oldest_key]
        request_id = keys.get(idempotency_key)
        if request_id is None or self._requests[request_id].submitted_at <= expired_before:
            # The second test: a wall clock set back can leave an expired key behind a live one.
            return None
        self._replays_total += 1
        return request_id

    def poll(self, request_id: str) -> Status | None:
        """The status a GET sees now (None for an unknown id); counts the poll."""
        registration = self._requests.get(request_id)
        if registration is None:
            self._unknown_polls_total += 1
            return None
        self._polls_total += 1
        registration.polls += 1
        now = self._clock()
        if now < registration.completes_at:
            return "processing"
        if registration.detected_at is None:
            registration.detected_at = now
            self._detected_total += 1
            self._detection_delay_sum_s += now - registration.completes_at
        return registration.outcome

    def note_post(self) -> None:
        self._post_arrivals.append(self._clock())

    def count_rejection(self) -> None:
        self._rejected_total += 1

    def count_post_503(self) -> None:
        self._post_503_total += 1

    def count_get_503(self) -> None:
        self._get_503_total += 1

    def summary(self) -> dict[str, Any]:
        """The scalar statistics: cheap, whatever the number of registrations."""
        requests_total = len(self._requests)
        return {
            "submissions_total": requests_total,
            "rejected_total": self._rejected_total,
            "requests_total": requests_total,
            "detected_total": self._detected_total,
            "polls_total": self._polls_total,
            "unknown_polls_total": self._unknown_polls_total,
            "detection_delay_mean_s": (
                self._detection_delay_sum_s / self._detected_total if self._detected_total else None
            ),
            "polls_per_registration": self._polls_total / requests_total if requests_total else None,
            "post_503_total": self._post_503_total,
            "get_503_total": self._get_503_total,
            # POSTs answered with an earlier registration's 201 because of their Idempotency-Key.
            "idempotent_replays_total": self._replays_total,
            "idempotency_keys": len(self._request_id_by_key),
        }

    def stats(self) -> dict[str, Any]:
        """The summary plus per-user and per-request detail. `submissions_by_user` counts
        registrations: a replayed POST adds none."""
        stats = self.summary()
        stats["submissions_by_user"] = dict(self._submissions_by_user)
        stats["polls_by_request"] = {rid: reg.polls for rid, reg in self._requests.items()}
        stats["post_arrivals"] = list(self._post_arrivals)
        stats["requests"] = {
            rid: {
                "user_id": reg.user_id,
                "submitted_at": reg.submitted_at,
                "completes_at": reg.completes_at,
                "outcome": reg.outcome,
                "detected_at": reg.detected_at,
            }
            for rid, reg in self._requests.items()
        }
        return stats
