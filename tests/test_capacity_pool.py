"""Several pools on the fake CLI sharing one `Capacity`: the ceiling holds over real processes,
waiters are served by evicting other pools' idle workers (least recently leased first, warm floors
last), and nobody starves; one daemon's two profiles share its ceiling.

The live count is sampled on every step of every pool (and the real `claude` processes, children
of this test, on every step too), so a moment over the ceiling cannot slip between two samples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil
import pytest

from claudepool.pool.capacity import Capacity
from claudepool.pool.config import CapacityConfig
from claudepool.pool.lease import Lease
from claudepool.pool.memory import MiB
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult
from tests.conftest import FAKE_CLAUDE
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon, post
from tests.helpers import collect, until

__all__ = ["make_daemon"]

TIMEOUTS = WorkerTimeouts(
    ready_timeout_s=5.0, turn_idle_timeout_s=5.0, interrupt_timeout_s=2.0, reset_timeout_s=2.0,
    close_eof_timeout_s=1.0, close_term_timeout_s=1.0, close_kill_timeout_s=2.0,
)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    # No maintenance pass steps a pool during a test (one would poll for room): a waiter is served
    # only because the capacity wakes its pool when a place frees.
    return {"min_idle": 0, "max_turns_jitter": 0, "lease_timeout_s": 20.0, "maintenance_interval_s": 3600.0,
            "timeouts": TIMEOUTS}


def fake_processes() -> int:
    """The fake `claude` processes alive now (children of this test process, not zombies)."""
    count = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and any(str(FAKE_CLAUDE) in part for part in child.cmdline()):
                count += 1
        except psutil.Error:
            continue
    return count


class Sampler:
    """Records the live workers of all ``pools`` (their records) and the real processes after every
    step of any of them."""

    def __init__(self, pools: list[Pool]) -> None:
        self.pools = pools
        self.max_records = 0
        self.max_processes = 0
        for pool in pools:
            self._wrap(pool)

    def _wrap(self, pool: Pool) -> None:
        step = pool._step

        def sampled() -> None:
            step()
            self.sample()

        pool._step = sampled  # type: ignore[method-assign]

    def sample(self) -> None:
        self.max_records = max(self.max_records, sum(len(p.workers()) for p in self.pools))
        self.max_processes = max(self.max_processes, fake_processes())


async def turn(lease: Lease, prompt: str = "hi [[reply:OK]]") -> TurnResult:
    return (await collect(lease.run_turn(prompt)))[1]


async def served(pool: Pool, tenant: str = "t") -> None:
    async with pool.lease(tenant) as lease:
        assert (await turn(lease)).text == "OK"


def profiles(make_fake_profile: Callable[..., Profile], *names: str) -> list[Profile]:
    return [make_fake_profile(name=name) for name in names]


async def settled(*pools: Pool) -> None:
    await until(lambda: all(p.counts()["cleaning"] == 0 and p.counts()["closing"] == 0
                            and p.counts()["starting"] == 0 for p in pools), 10)


async def test_pools_sharing_a_capacity_never_run_more_workers_than_its_ceiling(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    cap = Capacity(CapacityConfig(max_workers=3))
    pools = [make_pool(p, min_idle=1, capacity=cap) for p in profiles(make_fake_profile, "a", "b", "c", "d")]
    sampler = Sampler(pools)
    for pool in pools:
        await pool.start()
    # Twelve requests over four pools, all at once: every one is served, never on more than 3 workers.
    await asyncio.gather(*(served(pool, f"t{i}") for i in range(3) for pool in pools))
    await settled(*pools)
    sampler.sample()
    assert sampler.max_records <= 3 and sampler.max_processes <= 3
    assert sampler.max_records == 3  # (the ceiling was reached: the test tested something)
    assert sum(p.stats.retired["evicted"] for p in pools) > 0
    assert cap.live == sum(len(p.workers()) for p in pools) <= 3


async def test_without_a_shared_capacity_the_same_traffic_runs_more_workers(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    # The negative control of the test above: each pool sized alone (3 each) exceeds 3 together.
    pools = [make_pool(p, min_idle=1, max_workers=3) for p in profiles(make_fake_profile, "a", "b", "c", "d")]
    sampler = Sampler(pools)
    for pool in pools:
        await pool.start()
    await asyncio.gather(*(served(pool, f"t{i}") for i in range(3) for pool in pools))
    assert sampler.max_records > 3 and sampler.max_processes > 3


async def test_a_waiter_is_served_by_evicting_the_idle_worker_of_the_least_recently_leased_pool(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    cap = Capacity(CapacityConfig(max_workers=2))
    old, recent, newcomer = (make_pool(p, capacity=cap) for p in profiles(make_fake_profile, "old", "recent", "new"))
    await served(old)
    await served(recent)
    await settled(old, recent)
    assert old.idle_count == recent.idle_count == 1 and old.last_lease_at < recent.last_lease_at
    (old_pid,) = [w.pid for w in old.workers()]
    await served(newcomer)
    await settled(old, recent, newcomer)
    assert old.stats.retired["evicted"] == 1 and recent.stats.retired["evicted"] == 0
    assert old.workers() == [] and recent.idle_count == 1 and newcomer.idle_count == 1
    assert old_pid is not None
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert cap.evictions == {"old": 1}


async def test_warm_floors_are_evicted_last(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    cap = Capacity(CapacityConfig(max_workers=2))
    floored_profile, spare_profile, needy_profile = profiles(make_fake_profile, "floored", "spare", "needy")
    floored = make_pool(floored_profile, min_idle=1, capacity=cap)
    await floored.start()
    await floored.wait_ready(10)  # warm, never leased: the least recently used pool
    spare = make_pool(spare_profile, capacity=cap)
    await served(spare)
    await settled(spare)
    needy = make_pool(needy_profile, capacity=cap)
    await served(needy)
    assert spare.stats.retired["evicted"] == 1 and floored.stats.retired["evicted"] == 0
    # Only the floor is left idle: the next waiter may take it (waiters beat floors).
    async with needy.lease("a"), needy.lease("b") as second:
        assert (await turn(second)).text == "OK"
        assert floored.stats.retired["evicted"] == 1
    assert cap.live <= 2


async def test_no_pool_starves_while_a_floor_wants_its_workers_back(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    cap = Capacity(CapacityConfig(max_workers=2))
    floored_profile, d_profile, e_profile = profiles(make_fake_profile, "floored", "d", "e")
    floored = make_pool(floored_profile, min_idle=2, capacity=cap, maintenance_interval_s=0.1)
    await floored.start()
    await floored.wait_ready(10)
    d, e = make_pool(d_profile, capacity=cap), make_pool(e_profile, capacity=cap)
    sampler = Sampler([floored, d, e])
    # The floor's maintenance steps every 0.1 s and would refill it at once: the waiters still win.
    async with asyncio.timeout(30):
        await asyncio.gather(*(served(pool, f"t{i}") for i in range(6) for pool in (d, e)))
    assert sampler.max_records <= 2
    # Once the traffic is gone the floor takes its places back from the idle on-demand workers.
    await until(lambda: floored.idle_count == 2, 10)
    assert d.stats.retired["evicted"] + e.stats.retired["evicted"] >= 1


async def test_a_closed_pool_leaves_the_capacity_and_its_places_go_to_a_waiter(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    cap = Capacity(CapacityConfig(max_workers=1))
    first_profile, second_profile = profiles(make_fake_profile, "first", "second")
    first, second = make_pool(first_profile, capacity=cap), make_pool(second_profile, capacity=cap)
    async with first.lease("t"):
        waiting = asyncio.create_task(served(second))
        await until(lambda: second.waiting == 1)
        await asyncio.sleep(0)
        assert second.workers() == []  # the one place is leased: nothing to evict
    await first.close()
    await asyncio.wait_for(waiting, 10)
    assert cap.pools == 1 and cap.live == 1


async def test_a_pool_used_alone_sizes_itself_from_ram_as_before(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, memory_probe=lambda: 2000 * MiB, worker_pss_estimate_bytes=250 * MiB)
    assert pool.max_workers == 4 and not pool.capacity.bounded  # 2000 × 0.5 ÷ 250


async def test_two_profiles_of_a_daemon_share_its_ceiling(make_daemon: Any) -> None:
    d: RunningDaemon = await make_daemon(capacity={"max_workers": 2},
                                         pool={"min_idle": 1, "max_workers": 2})
    cap = d.daemon.capacity
    assert all(pool.capacity is cap for pool in d.daemon.all_pools().values())
    assert d.sample("claudepool_capacity_max_workers") == 2
    for profile in ("default", "lean", "default", "lean"):
        status, body = await post(d.url, {"prompt": "hi [[reply:OK]]", "profile": profile}, KEYS["acme"])
        assert status == 200, body
    assert cap.live <= 2 and d.sample("claudepool_capacity_workers") == cap.live
    assert (d.sample("claudepool_evictions_total", pool="default") or 0) + (
        d.sample("claudepool_evictions_total", pool="lean") or 0) >= 1
    async with aiohttp.ClientSession() as session, session.get(
            f"{d.url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        shown = (await resp.json())["capacity"]
    assert shown["max_workers"] == 2 and shown["workers"] == cap.live and shown["pools"] == 6
    assert sum(shown["evictions"].values()) >= 1


async def test_200_prompts_from_50_tenants_on_a_budget_of_8_every_request_answered_busiest_pools_warm(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    """Issue 14's test: 200 pools (one per system prompt, min_idle 0) and 50 tenants on 8 workers.
    Traffic comes in waves of 8 at once: one request to each of the 2 busiest pools, and 6 to pools
    seen once each (198 of them)."""
    cap = Capacity(CapacityConfig(max_workers=8))
    pools = [make_pool(make_fake_profile(name=f"prompt-{i}"), capacity=cap, max_concurrent_spawns=2)
             for i in range(200)]
    sampler = Sampler(pools)
    busy, once = pools[:2], iter(pools[2:])
    requests = 0
    async with asyncio.timeout(240):
        for wave in range(33):
            targets = [*busy, *(next(once) for _ in range(6))]
            await asyncio.gather(*(served(pool, f"tenant-{(wave * 8 + j) % 50}") for j, pool in enumerate(targets)))
            requests += len(targets)
    await settled(*pools)
    sampler.sample()
    assert sampler.max_records <= 8 and sampler.max_processes <= 8
    assert sum(p.stats.leases for p in pools) == requests == 264  # every request answered
    # The busiest pools kept one warm worker all along: started once, never evicted (the pools used
    # once are the least recently leased, so they are the victims).
    assert [(p.stats.spawned, p.stats.retired["evicted"], p.idle_count) for p in busy] == [(1, 0, 1)] * 2
    assert sum(p.stats.retired["evicted"] for p in pools) == 198 - 6


async def test_a_floor_larger_than_the_shared_ceiling_is_ready_once_the_ceiling_is_full_of_idle_workers(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    cap = Capacity(CapacityConfig(max_workers=1))
    pool = make_pool(fake_profile, min_idle=2, capacity=cap)
    await pool.start()
    await pool.wait_ready(10)  # not 2 (it never could be), and not before the one it has is idle
    assert pool.idle_count == 1 and cap.live == 1


async def test_a_daemon_whose_floors_exceed_its_ceiling_is_ready_and_serves_every_profile(make_daemon: Any) -> None:
    # Two warm floors on one place: one of them stays empty, yet the daemon is ready (make_daemon
    # waits for /readyz's condition) and both profiles answer.
    d: RunningDaemon = await make_daemon(capacity={"max_workers": 1}, profiles={"lean": {"min_idle": 1}})
    assert d.daemon.status.readiness()[0] and d.daemon.capacity.live == 1
    for profile in ("default", "lean"):
        status, body = await post(d.url, {"prompt": "hi [[reply:OK]]", "profile": profile}, KEYS["acme"])
        assert status == 200, body
