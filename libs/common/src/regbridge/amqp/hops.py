"""How long a refused hop waits before its delivery goes back to its queue.

A queue that refuses a publish (a length limit with `reject-publish`) goes on refusing until it
drains, and a quorum queue near its limit takes some publishes and refuses others. A delivery
handed back at once is redelivered at once, and its handler calls the legacy API again: a tight
loop. So the delivery is held for a pause first. The pause doubles with each refusal by the same
queue (jittered, capped) for as long as that queue's refusals keep coming; a queue quiet for
twice its current step starts over. Confirms in between do not reset it: a queue that refuses
every other publish is still refusing. Held deliveries count against the prefetch, so a queue
that keeps refusing also slows what the service takes in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

HOP_PAUSE_S = 1.0
HOP_PAUSE_MAX_S = 30.0


class RefusedHops:
    """Refusals per queue, on the I/O thread."""

    def __init__(self, *, base_s: float = HOP_PAUSE_S, max_s: float = HOP_PAUSE_MAX_S,
                 rng: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic) -> None:
        self._base_s = base_s
        self._max_s = max_s
        self._rng = rng
        self._clock = clock
        self._streaks: dict[str, tuple[int, float]] = {}  # queue → (refusals in the streak, the last one's time)

    def refused(self, queue: str) -> float:
        """Count a refusal by `queue`; how long its delivery waits before going back."""
        now = self._clock()
        streak, last = self._streaks.get(queue, (0, now))
        if now - last > 2 * self._step(streak):
            streak = 0
        self._streaks[queue] = (streak + 1, now)
        step = self._step(streak + 1)
        # Never less than half the step, so that a herd of refused hops spreads out.
        return step / 2 + step / 2 * self._rng()

    def streak(self, queue: str) -> int:
        return self._streaks.get(queue, (0, 0.0))[0]

    def _step(self, streak: int) -> float:
        return min(self._max_s, self._base_s * 2.0 ** min(max(streak - 1, 0), 32))
