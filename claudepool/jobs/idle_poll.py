"""How long an idle lane sleeps before it looks in the store again.

Jobs submitted to this daemon wake its lane at once (`PoolLane.wake`); the poll is only for jobs
another daemon put in a shared store, or a restart left behind. A lane that keeps finding nothing
doubles its sleep from ``jobs.poll_interval_s`` up to ``jobs.poll_max_interval_s``, so an idle
daemon wakes a few times a minute rather than twice a second; any activity (a wake, a claim)
resets it to the short interval.
"""

from __future__ import annotations

import asyncio
import contextlib


class IdlePoll:
    """The sleep of a lane between empty claims: doubling from ``first_s`` up to ``max_s``.

    >>> poll = IdlePoll(0.5, 2.0)
    >>> [poll.next_s() for _ in range(4)]
    [0.5, 1.0, 2.0, 2.0]
    """

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max(first_s, max_s)
        self._next_s = first_s

    def next_s(self) -> float:
        wait_s = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return wait_s

    def reset(self) -> None:
        self._next_s = self.first_s

    async def wait(self, wake: asyncio.Event) -> None:
        """Sleep the next interval or until ``wake`` is set; a wake resets the back-off (the caller
        clears ``wake`` before it last looked, so a wake-up in between is not lost)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.next_s()):
                await wake.wait()
        if wake.is_set():
            self.reset()
