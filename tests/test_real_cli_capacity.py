"""The shared capacity on the real CLI: two profiles (different system prompts) on one place. A
request to the cold profile evicts the warm one's idle worker and is answered; never two `claude`
processes at once (counted on every step of either pool)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from claudepool.pool.capacity import Capacity
from claudepool.pool.config import CapacityConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.testing.fake_upstream import FakeUpstream
from tests.helpers import collect, until

pytestmark = pytest.mark.real_cli

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=30, interrupt_timeout_s=5, reset_timeout_s=10)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 0, "lease_timeout_s": 60, "timeouts": TIMEOUTS, "maintenance_interval_s": 3600.0}


def claude_processes(pools: list[Pool]) -> int:
    pids = {w.pid for p in pools for w in p.workers() if w.pid is not None}
    alive = 0
    for pid in pids:
        try:
            alive += psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
    return alive


async def test_two_profiles_on_one_place_evict_each_other_and_answer(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], upstream: FakeUpstream
) -> None:
    cap = Capacity(CapacityConfig(max_workers=1))
    warm = make_pool(real_profile("warm", system_prompt="You are terse."), min_idle=1, capacity=cap)
    cold = make_pool(real_profile("cold", system_prompt="You are verbose."), capacity=cap)
    pools = [warm, cold]
    most = 0
    for pool in pools:
        step = pool._step

        def sampled(step: Callable[[], None] = step) -> None:
            nonlocal most
            step()
            most = max(most, claude_processes(pools), cap.live)

        pool._step = sampled  # type: ignore[method-assign]
    await warm.start()
    await warm.wait_ready(60)
    (warm_pid,) = [w.pid for w in warm.workers()]

    started = time.monotonic()
    async with cold.lease("acme") as lease:
        result = (await collect(lease.run_turn("hi [[reply:COLD]]"), timeout_s=60))[1]
    cold_s = time.monotonic() - started
    assert result.text == "COLD" and not result.is_error
    assert warm.stats.retired["evicted"] == 1 and cap.evictions == {"warm": 1}
    assert warm_pid is not None
    assert not psutil.pid_exists(warm_pid) or psutil.Process(warm_pid).status() == psutil.STATUS_ZOMBIE
    # The warm profile's floor comes back once the cold one's worker is idle (floors evict
    # workers outside floors), and its next request is answered by its own system prompt.
    await until(lambda: warm.idle_count == 1, 60)
    assert cold.stats.retired["evicted"] == 1
    async with warm.lease("acme") as lease:
        assert (await collect(lease.run_turn("hi [[reply:WARM]]"), timeout_s=60))[1].text == "WARM"
    assert most == 1
    assert any(r.contains("verbose") for r in upstream.requests)
    assert any(r.contains("terse") for r in upstream.requests)
    print(f"cold request with an eviction answered in {cold_s * 1000:.0f} ms")
