"""How late the event loop runs what it was asked to run: ``claudepool_event_loop_lag_seconds``.

Everything the daemon does (every socket frame, SSE chunk, worker line, planner step) shares one
event loop, so a callback that blocks it (a slow regex, a big JSON body, a synchronous file read)
delays every request at once. The monitor sleeps ``interval_s`` (``idle_interval_s`` while nothing
is served) and records how much later than asked it woke: ~0 on a healthy loop, the length of the
block on a blocked one. It runs in the
daemon's one supervision tree (`claudepool.daemon.app.Daemon`) and holds nothing to clean up.

>>> registry = CollectorRegistry()
>>> monitor = LoopLagMonitor(registry)
>>> monitor.observe(0.25)
>>> registry.get_sample_value("claudepool_event_loop_lag_seconds_bucket", {"le": "0.25"})
1.0
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

# Fine at the low end (a healthy loop wakes within a millisecond or two), up to seconds (a blocked one).
_LAG_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Often enough to catch a 100 ms stall, rarely enough to cost nothing (~10 wake-ups a second).
DEFAULT_INTERVAL_S = 0.1


# While the daemon serves nothing: a loop with no request has none to delay, and ten wake-ups a
# second were the largest part of an idle daemon's CPU (~0.0017 CPU-s/s of ~0.005, issue 16 goal 5).
DEFAULT_IDLE_INTERVAL_S = 1.0


class LoopLagMonitor:
    """Samples the running loop's lag every ``interval_s`` into a histogram on ``registry``, or every
    ``idle_interval_s`` while ``busy()`` says nothing is being served (the first sample after a
    request arrives comes at most ``idle_interval_s`` late)."""

    def __init__(self, registry: CollectorRegistry, *, interval_s: float = DEFAULT_INTERVAL_S,
                 idle_interval_s: float = DEFAULT_IDLE_INTERVAL_S, busy: Callable[[], bool] = lambda: True) -> None:
        self.interval_s = interval_s
        self.idle_interval_s = max(interval_s, idle_interval_s)
        self._busy = busy
        self.lag_seconds = Histogram("claudepool_event_loop_lag_seconds",
                                     "How much later than scheduled the event loop woke a timer.",
                                     buckets=_LAG_SECONDS, registry=registry)

    def observe(self, lag_s: float) -> None:
        self.lag_seconds.observe(max(lag_s, 0.0))

    async def run(self) -> None:
        """Forever (until cancelled: cancellation passes through, nothing to release)."""
        while True:
            asked = time.monotonic()
            interval_s = self.interval_s if self._busy() else self.idle_interval_s
            await asyncio.sleep(interval_s)
            self.observe(time.monotonic() - asked - interval_s)
