"""The warm floor follows demand (``pool.min_idle_max``) with real processes: the fake CLI, the pool's
own clock and maintenance. A burst of concurrent leases warms enough idle workers to take the next
burst at once, and keeps them through the window; once it has passed the pool shrinks back to
``min_idle`` and the processes it retired are gone. With the setting off (the control) nothing is
spawned past what the burst made, and its workers go after ``max_idle_s``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from tests.helpers import pid_gone, until
from tests.test_pool import TIMEOUTS

BURST = 3


def live_pids(pool: Pool) -> set[int]:
    return {w.pid for w in pool.workers() if w.pid is not None and w.is_alive()}


@pytest.mark.parametrize("min_idle_max", [BURST + 1, 0])
async def test_a_burst_warms_its_peak_plus_one_then_the_floor_falls_back(
        make_pool: Callable[..., Pool], fake_profile: Profile, min_idle_max: int) -> None:
    window_s = 4.0
    pool = make_pool(fake_profile, min_idle=0, min_idle_max=min_idle_max, min_idle_window_s=window_s,
                     max_idle_s=0.5, max_workers=BURST + 2, max_turns_jitter=0, maintenance_interval_s=0.1,
                     timeouts=TIMEOUTS, freeze_idle_after_s=0)
    await pool.start()
    await asyncio.sleep(0.5)
    assert pool.counts()["idle"] + pool.counts()["starting"] == 0  # no demand seen: the floor is min_idle

    async with contextlib.AsyncExitStack() as stack:
        for _ in range(BURST):  # BURST leases held at once: the pool spawns for the waiters
            await stack.enter_async_context(pool.lease("acme"))
        assert pool.counts()["leased"] == BURST
        lent_at = asyncio.get_running_loop().time()
    if min_idle_max:
        # The window's peak is BURST: BURST + 1 warm and idle, one more than the burst left behind,
        # and kept through the window, though each is idle past max_idle_s.
        await until(lambda: pool.counts()["idle"] == BURST + 1, timeout_s=10)
        await asyncio.sleep(max(0.0, lent_at + window_s - 1.0 - asyncio.get_running_loop().time()))
        assert pool.counts()["idle"] == BURST + 1
        warm = live_pids(pool)
    else:
        # Off: nothing is spawned past what the burst made, and idle past max_idle_s it goes.
        await until(lambda: pool.counts()["idle"] == BURST, timeout_s=10)
        warm = live_pids(pool)
        await asyncio.sleep(0.3)
        assert pool.counts()["idle"] + pool.counts()["starting"] <= BURST

    # The window and max_idle_s past: every surplus worker is retired, down to min_idle (0), and gone.
    await until(lambda: sum(pool.counts().values()) == 0, timeout_s=15)
    assert warm and not live_pids(pool)
    await until(lambda: all(pid_gone(pid) for pid in warm), timeout_s=10)
