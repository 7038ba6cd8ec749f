"""Issue 14's test, end to end through the daemon: 200 distinct system prompts from 50 tenants on a
budget of 8 workers. Every request runs on a pool made on demand for its prompt (the fake CLI's
``[[system]]`` answers the ``--system-prompt`` its worker started with), the live workers of all
pools never pass the shared ceiling, the live pools never pass ``pool.max_on_demand_pools``, and
the two busiest prompts keep their pools and their warm workers while 198 others come and go.

The ceiling is sampled each time any pool adds a worker (`Seat.added`), in the same step, and the
real fake-CLI processes with it, so a moment over the ceiling cannot slip between two samples.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from claudepool.pool.capacity import Seat
from tests.daemon_fixtures import RunningDaemon, make_daemon, post
from tests.test_capacity_pool import fake_processes

__all__ = ["make_daemon"]

CEILING = 8
MAX_POOLS = 48
TENANTS = {f"t{i:02d}": f"tenant-{i:02d}-key-0123" for i in range(50)}
BUSY = ["You are the support desk of a bank. Prompt BUSY-A.", "You review pull requests. Prompt BUSY-B."]
ONCE = [f"You are persona number {i}. Prompt ONCE-{i:03d}." for i in range(198)]


async def test_200_system_prompts_from_50_tenants_on_8_workers(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = await make_daemon(
        capacity={"max_workers": CEILING},
        pool={"min_idle": 0, "max_on_demand_pools": MAX_POOLS, "on_demand_idle_s": 3600, "lease_timeout_s": 60},
        tenants={name: {"key": key, "allow_custom_system_prompt": True} for name, key in TENANTS.items()})
    capacity, registry = d.daemon.capacity, d.daemon.pool_registry
    peak = {"live": 0, "processes": 0, "pools": 0}
    added = Seat.added

    def sampled(seat: Seat) -> None:
        added(seat)
        peak["live"] = max(peak["live"], capacity.live)
        peak["processes"] = max(peak["processes"], fake_processes())
        peak["pools"] = max(peak["pools"], len(registry.on_demand))

    busy_seats: list[Seat] = []
    went_cold: list[str] = []
    removed = Seat.removed

    def watched(seat: Seat, worker: Any) -> None:
        removed(seat, worker)
        if seat in busy_seats and seat.live == 0:
            went_cold.append(seat.name)

    monkeypatch.setattr(Seat, "added", sampled)
    monkeypatch.setattr(Seat, "removed", watched)
    keys = itertools.cycle(TENANTS.values())

    async def ask(system: str) -> None:
        status, body = await post(d.url, {"prompt": "[[system]]", "system": system}, key=next(keys))
        assert status == 200, body
        assert body["text"] == system  # it ran on the pool of its own prompt

    once = iter(ONCE)
    requests = 0
    async with asyncio.timeout(300):
        await asyncio.gather(*(ask(s) for s in BUSY))
        busy_pools = [registry.pool_for("default", s) for s in BUSY]
        busy_seats.extend(p._state.seat for p in busy_pools)
        # Rounds of two waves: 8 at once (2 to each busy prompt, 4 newcomers), then 6 newcomers
        # alone while the busy pools sit idle: the pools used once must give way, not the busy ones.
        for _ in range(18):
            for wave in ([*BUSY, *BUSY, *(next(once) for _ in range(4))], [next(once) for _ in range(6)]):
                await asyncio.gather(*(ask(s) for s in wave))
                requests += len(wave)
        warm_phase_cold = list(went_cold)
        # Then an overload: the last 18 newcomers and 4 busy requests at once, 22 on 8 places.
        await asyncio.gather(*(ask(s) for s in [*BUSY, *BUSY, *once]))
        requests += 22
    assert requests == 18 * 4 + 198 + 4 and next(once, None) is None

    assert peak["live"] <= CEILING and peak["processes"] <= CEILING, peak
    assert peak["pools"] <= MAX_POOLS and registry.evicted >= 200 - MAX_POOLS, (peak, registry.evicted)
    # The busiest prompts kept their pools (never closed for room: the same objects) and, while the
    # load fit the ceiling, stayed warm: never without a worker (a second one may give way).
    assert [registry.pool_for("default", s) for s in BUSY] == busy_pools
    assert warm_phase_cold == [], [(p.stats.spawned, dict(p.stats.retired)) for p in busy_pools]
    assert sum(p.stats.leases for p in busy_pools) == 2 + 19 * 4
    # The request log counted every one as served.
    served: dict[str, Any] = dict(d.requests_by_outcome())
    assert served.get("ok", 0) >= requests + 2, served
