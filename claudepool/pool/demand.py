"""A warm floor that follows demand (``pool.min_idle_max``): the pool keeps enough idle workers to
absorb the last minute's peak of concurrent leases at once, between ``min_idle`` and
``min_idle_max``, so a daily rhythm of bursts finds warm workers without a large fixed floor that
would stay warm (and hold its RAM) through the quiet hours.

The planner records the number of leased workers each time it lends one (`DemandWindow.leased`) and
reads the floor in the same step (`warm_floor`); both are synchronous and take the clock as an
argument, like the rest of the planner. The RAM budget still bounds every start: the floor is only a
wish that `planner.spawn_count` meets within the pool's cap, the soft memory limit and the shared
ceiling.
"""

from __future__ import annotations

import collections
import math

from claudepool.pool.config import PoolConfig

# Workers beyond the peak: the next request of a burst larger than the last finds one warm too.
MARGIN = 1


class DemandWindow:
    """The peak of concurrent leases over the last ``window_s``, in one-second buckets (at most
    ``window_s`` entries however many leases there are).

    >>> window = DemandWindow(60.0)
    >>> window.leased(3, now=10.0); window.leased(1, now=30.0)
    >>> window.peak(now=40.0), window.peak(now=71.0)
    (3, 1)
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._buckets: collections.deque[tuple[int, int]] = collections.deque()  # (second, peak in it)

    def leased(self, count: int, *, now: float) -> None:
        second = math.floor(now)
        if self._buckets and self._buckets[-1][0] == second:
            if count > self._buckets[-1][1]:
                self._buckets[-1] = (second, count)
        else:
            self._buckets.append((second, count))
        self._prune(now)

    def peak(self, *, now: float) -> int:
        self._prune(now)
        return max((count for _, count in self._buckets), default=0)

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - self.window_s:
            self._buckets.popleft()


def warm_floor(config: PoolConfig, demand: DemandWindow, leased_now: int, now: float) -> int:
    """Idle workers to keep warm now: ``min_idle``, or (with ``min_idle_max`` above it) enough that
    the leased ones and the idle ones together cover the window's peak plus `MARGIN`, at most
    ``min_idle_max``."""
    if config.min_idle_max <= config.min_idle:
        return config.min_idle
    peak = demand.peak(now=now)
    wanted = peak + MARGIN - leased_now if peak else 0
    return max(config.min_idle, min(config.min_idle_max, wanted))
