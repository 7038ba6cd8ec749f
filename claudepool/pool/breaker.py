"""The boot breaker: after a run of failed starts, spawning pauses, with a growing cooldown.

CLOSED spawns freely; OPEN spawns nothing until the cooldown ends; HALF_OPEN lets one probe start,
whose success closes the breaker and whose failure opens it again for twice as long (capped).
Time is passed in (`now`), so the planner and its tests decide on one clock.

>>> breaker = Breaker(threshold=2, cooldown_s=10.0, max_cooldown_s=15.0)
>>> breaker.record_failure(now=0.0), breaker.record_failure(now=1.0)
(None, 10.0)
>>> breaker.state(5.0), breaker.state(11.0)
(<BreakerState.OPEN: 'open'>, <BreakerState.HALF_OPEN: 'half_open'>)
>>> breaker.record_failure(now=12.0)  # the probe failed: open again, for twice as long but capped
15.0
>>> breaker.record_success(); breaker.state(12.0)
<BreakerState.CLOSED: 'closed'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    threshold: int
    cooldown_s: float
    max_cooldown_s: float
    consecutive_failures: int = 0
    open_until: float | None = None
    _trips_in_row: int = 0

    def state(self, now: float) -> BreakerState:
        if self.open_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now < self.open_until else BreakerState.HALF_OPEN

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._trips_in_row = 0
        self.open_until = None

    def record_failure(self, now: float) -> float | None:
        """Count a failed start; returns the cooldown in seconds if this failure opened the breaker."""
        self.consecutive_failures += 1
        if self.consecutive_failures < self.threshold:
            return None
        cooldown_s = min(self.cooldown_s * 2.0**self._trips_in_row, self.max_cooldown_s)
        self._trips_in_row += 1
        self.open_until = now + cooldown_s
        return cooldown_s
