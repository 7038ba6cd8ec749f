"""Pool on the fake CLI: warming, leasing, eager reset, recycling, memory, breaker, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from claudepool.errors import PoolClosed, PoolTimeout, PoolUnhealthy, TurnStalled, WorkerDied, WorkerStartError
from claudepool.pool.breaker import BreakerState
from claudepool.pool.config import PoolConfig
from claudepool.pool.lease import Lease
from claudepool.pool.memory import MiB
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.shares import Priority, TenantSlots
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult
from tests.helpers import collect, pid_gone, until

TIMEOUTS = WorkerTimeouts(
    ready_timeout_s=5.0, turn_idle_timeout_s=5.0, interrupt_timeout_s=2.0, reset_timeout_s=2.0,
    close_eof_timeout_s=1.0, close_term_timeout_s=1.0, close_kill_timeout_s=2.0,
)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 1, "max_workers": 2, "max_turns_jitter": 0, "lease_timeout_s": 5.0,
            "maintenance_interval_s": 0.1, "timeouts": TIMEOUTS}


async def turn(lease: Lease, prompt: str, **kw: float) -> TurnResult:
    return (await collect(lease.run_turn(prompt, **kw)))[1]


async def test_warms_min_idle_and_reports_in_repr(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=2, max_workers=3)
    await pool.start()
    await pool.wait_ready(10)
    assert pool.counts() == {"starting": 0, "idle": 2, "leased": 0, "cleaning": 0, "closing": 0, "waiting": 0}
    assert repr(pool) == (
        "<Pool fake: 0 leased, 2 idle, 0 starting, 0 cleaning, 0 closing | 0 waiting | max 3 | breaker closed>"
    )
    assert pool.healthy


async def test_lease_turn_release_resets_eagerly_off_the_critical_path(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    await pool.start()
    await pool.wait_ready(10)
    async with pool.lease("acme") as lease:
        pid = lease.worker.pid
        result = await turn(lease, "hello [[reply:HI]]")
        assert result.text == "HI"
        assert pool.counts()["leased"] == 1
    # Release is synchronous; the reset runs in the background and the worker comes back clean.
    assert pool.counts()["cleaning"] == 1
    await until(lambda: pool.counts()["idle"] == 1)
    assert pool.stats.resets == 1
    assert pool.workers()[0].pid == pid
    assert not pool.workers()[0].dirty


async def test_next_tenant_never_sees_the_previous_conversation(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("tenant-a") as lease:
        pid_a = lease.worker.pid
        await turn(lease, "my password is HUNTER2-A")
        same = await turn(lease, "[[echo]]")
        assert "HUNTER2-A" in same.text  # within one lease the conversation continues
    async with pool.lease("tenant-b") as lease:
        assert lease.worker.pid == pid_a  # the same process, so only the reset protects tenant A
        seen = await turn(lease, "[[echo]]")
    assert "HUNTER2-A" not in seen.text


async def test_error_results_are_reset_too(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("tenant-a") as lease:
        failed = await turn(lease, "SECRET-IN-FAILED-PROMPT [[api_error:529]]")
        assert failed.is_error
    async with pool.lease("tenant-b") as lease:
        seen = await turn(lease, "[[echo]]")
    assert "SECRET-IN-FAILED-PROMPT" not in seen.text


async def test_lease_timeout_is_a_clear_error(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("a"):
        with pytest.raises(PoolTimeout, match=r"within 0.2s .*1 leased"):
            await pool.acquire("b", timeout_s=0.2)
    assert pool.stats.lease_timeouts == 1
    assert pool.waiting == 0


async def test_cancelled_waiter_does_not_swallow_a_worker(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    first = await pool.acquire("a")
    waiter = asyncio.create_task(pool.acquire("b"))
    await until(lambda: pool.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    first.release()
    await until(lambda: pool.counts()["idle"] == 1)
    async with pool.lease("c", timeout_s=2):
        pass


async def test_cancel_racing_with_assignment_returns_the_worker(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=0, max_workers=1)
    first = await pool.acquire("a")
    waiter = asyncio.create_task(pool.acquire("b"))
    await until(lambda: pool.waiting == 1)
    first.release()  # the worker is clean (no turn ran), so it is assigned to "b" right here...
    waiter.cancel()  # ...and "b" is cancelled before it could resume
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.counts()["leased"] == 0
    await until(lambda: pool.counts()["idle"] == 1)


async def test_abandoned_turn_is_interrupted_settled_and_billed(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    settled: list[tuple[str, TurnResult]] = []
    pool = make_pool(fake_profile, min_idle=1, max_workers=1,
                     on_turn_result=lambda lease, r: settled.append((lease.tenant, r)))
    async with pool.lease("acme") as lease:
        async for _event in lease.run_turn("[[hang]] long job"):
            break  # the client disconnected
    await until(lambda: pool.counts()["idle"] == 1)
    assert pool.stats.abandoned_turns == 1
    assert len(settled) == 1
    tenant, result = settled[0]
    assert tenant == "acme"
    assert result.interrupted
    assert result.cost_usd > 0
    async with pool.lease("next") as lease:
        seen = await turn(lease, "[[echo]]")
    assert "long job" not in seen.text


async def test_failed_reset_kills_the_worker_and_replaces_it(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(make_fake_profile("clear_hangs"), min_idle=1, max_workers=1)
    async with pool.lease("a") as lease:
        pid = lease.worker.pid
        await turn(lease, "SECRET-A")
    await until(lambda: pool.stats.reset_failures == 1 and pool.counts()["idle"] == 1 and pid_gone(pid))
    assert pool.stats.retired["failed"] == 1
    async with pool.lease("b") as lease:
        assert lease.worker.pid != pid
        seen = await turn(lease, "[[echo]]")
    assert "SECRET-A" not in seen.text


async def test_recycle_by_turns(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, max_turns=2)
    pids = []
    for i in range(3):
        async with pool.lease(f"t{i}") as lease:
            pids.append(lease.worker.pid)
            await turn(lease, "hi")
            if i == 1:
                await turn(lease, "hi again")
    assert pids[0] == pids[1]
    assert pids[2] != pids[1]
    assert pool.stats.retired["turns"] == 1


async def test_turn_limit_jitter_spreads_recycling(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=4, max_workers=4, max_turns=10, max_turns_jitter=1000)
    await pool.start()
    await pool.wait_ready(10)
    limits = {cast(int, row["turn_limit"]) for row in pool.snapshot()}
    assert all(10 <= n <= 1010 for n in limits)
    assert len(limits) > 1


async def test_recycle_by_age(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, max_age_s=1.0)
    await pool.start()
    await pool.wait_ready(10)

    def idle_pids() -> list[object]:
        return [row["pid"] for row in pool.snapshot() if row["state"] == "idle"]

    first, retired = idle_pids(), pool.stats.retired["age"]
    assert len(first) == 1
    await until(lambda: len(idle_pids()) == 1 and idle_pids() != first, 10)
    assert pool.stats.retired["age"] > retired


async def test_recycle_by_memory(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, max_worker_pss_bytes=60 * MiB)
    async with pool.lease("a") as lease:
        pid = lease.worker.pid
        await turn(lease, "[[grow:100]]")
    await until(lambda: pool.stats.retired["memory"] == 1 and pid_gone(pid), timeout_s=5)


async def test_recycle_by_context_size(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, max_context_tokens=100)
    async with pool.lease("a") as lease:
        result = await turn(lease, "x" * 1000)
        assert result.context_tokens > 100
    await until(lambda: pool.stats.retired["context"] == 1)


async def test_a_held_worker_reports_when_it_is_due_for_recycling(make_pool: Callable[..., Pool],
                                                                   fake_profile: Profile) -> None:
    # A conversation keeps its lease between turns and asks; context never counts (a resume keeps it).
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, max_turns=2, max_turns_jitter=0,
                     max_context_tokens=100)
    async with pool.lease("a") as lease:
        await turn(lease, "x" * 1000)
        assert lease.worker.context_tokens > 100
        assert pool.recycle_due(lease.worker) is None
        await turn(lease, "second")
        assert pool.recycle_due(lease.worker) == "turns"


async def test_watchdog_through_a_lease(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("a") as lease:
        with pytest.raises(TurnStalled):
            await turn(lease, "[[hang]]", idle_timeout_s=0.3)
    await until(lambda: pool.counts()["idle"] == 1)
    assert pool.stats.resets == 1


async def test_idle_worker_killed_externally_is_replaced(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    await pool.start()
    await pool.wait_ready(10)
    victim = pool.workers()[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    await until(lambda: pool.stats.retired["failed"] == 1 and pool.counts()["idle"] == 1
                and pool.counts()["closing"] == 0)
    assert pool.workers()[0] is not victim


async def test_crash_mid_turn_fails_only_that_request(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("a") as lease:
        with pytest.raises(WorkerDied):
            await turn(lease, "[[crash]]")
    async with pool.lease("b") as lease:
        ok = await turn(lease, "[[reply:fine]]")
    assert ok.text == "fine"
    assert pool.stats.retired["failed"] == 1


async def test_breaker_opens_pauses_and_recovers(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile], tmp_path: Path
) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    pool = make_pool(make_fake_profile(f"exit_at_start_if={flag}"), min_idle=1, max_workers=2,
                     boot_failure_threshold=3, breaker_cooldown_s=0.6, max_concurrent_spawns=1)
    await pool.start()
    await until(lambda: pool.breaker_state is BreakerState.OPEN)
    assert pool.stats.boot_failures == 3
    assert not pool.healthy
    with pytest.raises(PoolUnhealthy):
        await pool.acquire("a")
    with pytest.raises(PoolUnhealthy):
        await pool.wait_ready(1)
    await asyncio.sleep(0.3)
    assert pool.stats.boot_failures == 3  # no respawn storm while open
    # Half-open after the cooldown: one probe, which fails and re-opens for twice as long.
    await until(lambda: pool.stats.boot_failures == 4)
    assert pool.breaker_state is BreakerState.OPEN
    assert pool.stats.breaker_trips == 2
    flag.unlink()
    await until(lambda: pool.counts()["idle"] == 1, timeout_s=5)
    assert str(pool.breaker_state) == "closed"  # (a fresh read: the state changed under us)
    assert pool.healthy


async def test_spawns_are_limited_to_max_concurrent_spawns(
    make_pool: Callable[..., Pool], make_fake_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(make_fake_profile("slow_start=0.3"), min_idle=3, max_workers=3, max_concurrent_spawns=1)
    seen_starting = []
    await pool.start()
    async with asyncio.timeout(10):
        while pool.counts()["idle"] < 3:
            seen_starting.append(pool.counts()["starting"])
            await asyncio.sleep(0.02)
    assert max(seen_starting) == 1


async def test_max_workers_derived_from_ram_and_remeasured(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=0, memory_fraction=0.5,
                     worker_pss_estimate_bytes=250 * MiB, memory_probe=lambda: 1000 * MiB)
    assert pool.max_workers == 2  # 1000 MiB × 0.5 ÷ 250 MiB before anything is measured
    await pool.start()
    await pool.wait_ready(10)
    plan = pool.refresh_memory()
    # The fake weighs ~10-30 MiB, so the measured size lets far more workers fit.
    assert plan.per_worker_bytes < 100 * MiB
    assert pool.max_workers > 2


async def test_soft_memory_limit_stops_spawning(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=4, memory_soft_limit_bytes=1,
                     memory_hard_limit_bytes=10**12)
    await pool.start()
    await pool.wait_ready(10)
    pool.refresh_memory()
    async with pool.lease("a"):
        await asyncio.sleep(0.3)
        # Over the soft limit: the idle worker just leased is not replaced.
        assert pool.counts()["starting"] == 0
        assert pool.counts()["idle"] == 0


async def test_hard_memory_limit_sheds_idle_and_recycles_busy_down_to_one_worker(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    # A 1-byte limit: every worker is over it from its first measurement, taken when it is ready.
    pool = make_pool(fake_profile, min_idle=2, max_workers=3, memory_hard_limit_bytes=1,
                     memory_soft_limit_bytes=1, maintenance_interval_s=60)
    await pool.start()

    def settled_at_one() -> bool:
        counts = pool.counts()
        return (counts["idle"], counts["starting"], counts["closing"]) == (1, 0, 0) and all(
            w.pss_bytes for w in pool.workers())

    await until(settled_at_one, 10)
    assert pool.stats.retired["memory_pressure"] >= 1  # idle workers were shed...
    spawned, shed = pool.stats.spawned, pool.stats.retired["memory_pressure"]
    pool.refresh_memory()  # measures, re-plans and acts, as a maintenance pass does
    # ...down to one, which stays: shedding it would only start another (min_idle), over and over.
    assert (pool.stats.spawned, pool.stats.retired["memory_pressure"]) == (spawned, shed)
    assert settled_at_one()

    busy = make_pool(fake_profile, min_idle=0, max_workers=2, memory_hard_limit_bytes=1,
                     memory_soft_limit_bytes=1, maintenance_interval_s=60)
    leases = await asyncio.gather(busy.acquire("a"), busy.acquire("b"))
    await until(lambda: all(w.pss_bytes for w in busy.workers()))
    busy.refresh_memory()
    assert busy.stats.retired["memory_pressure"] == 0  # leased workers are recycled on release only
    for lease in leases:
        lease.release()
    await until(lambda: busy.counts() == {**busy.counts(), "idle": 1, "leased": 0, "cleaning": 0, "closing": 0})
    assert busy.stats.retired["memory_pressure"] == 1  # one of the two; the last stays


async def test_idle_surplus_shrinks_to_min_idle(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=3, max_idle_s=0.4)
    leases = [await pool.acquire(f"t{i}") for i in range(3)]
    for lease in leases:
        lease.release()
    # No turn ran, so all three are idle at once; the two beyond min_idle close after 0.4 s idle.
    assert pool.counts()["idle"] == 3
    await until(lambda: pool.stats.retired["idle"] == 2 and pool.counts()["closing"] == 0, 10)
    assert pool.counts()["idle"] == 1


async def test_close_with_a_turn_in_flight_fails_it_and_kills_all(
    make_pool: Callable[..., Pool], fake_profile: Profile
) -> None:
    pool = make_pool(fake_profile, min_idle=2, max_workers=2)
    await pool.start()
    await pool.wait_ready(10)
    pids = [w.pid for w in pool.workers()]
    lease = await pool.acquire("a")

    async def consume() -> None:
        await turn(lease, "[[hang]]")

    task = asyncio.create_task(consume())
    await until(lambda: lease.turns_started == 1 and lease.worker.in_turn())
    await pool.close()
    with pytest.raises(WorkerDied):
        await task
    lease.release()
    assert all(pid_gone(pid) for pid in pids)
    with pytest.raises(PoolClosed):
        await pool.acquire("b")
    assert pool.workers() == []


async def test_waiters_are_failed_when_the_pool_closes(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    lease = await pool.acquire("a")
    waiter = asyncio.create_task(pool.acquire("b"))
    await until(lambda: pool.waiting == 1)
    await pool.close()
    with pytest.raises(PoolClosed):
        await waiter
    lease.release()


async def test_many_concurrent_requests_are_all_served(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=2, max_workers=3, lease_timeout_s=20)

    async def one(i: int) -> str:
        async with pool.lease(f"tenant-{i % 4}") as lease:
            return (await turn(lease, f"req-{i} [[reply:ans-{i}]]")).text

    async with asyncio.timeout(60):
        answers = await asyncio.gather(*(one(i) for i in range(24)))
    assert answers == [f"ans-{i}" for i in range(24)]
    assert pool.stats.leases == 24
    assert len({w.pid for w in pool.workers()}) <= 3


async def test_cancelled_close_still_closes_everything(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=2, max_workers=2)
    await pool.start()
    await pool.wait_ready(10)
    pids = [w.pid for w in pool.workers()]
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await pool.close()  # joins the shutdown that kept going
    assert all(pid_gone(pid) for pid in pids)
    assert pool.workers() == []


async def test_a_resume_after_the_pool_closed_starts_no_process(make_pool: Callable[..., Pool],
                                                                fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    lease = await pool.acquire("a")
    await pool.close()  # shutdown stops every worker it knows of, the leased one included
    with pytest.raises(PoolClosed):
        await pool.respawn_leased(lease, extra_args=("--resume", "s1"))
    assert pool.workers() == []  # nothing was started that nobody would stop


async def test_the_batch_share_is_of_each_pool_not_of_every_pool_sharing_the_tenant_slots(
        fake_profile: Profile, tmp_path: Path, pool_defaults: dict[str, Any]) -> None:
    # As the daemon builds them: a profile's stateless pool and its session pool share the slots.
    slots = TenantSlots()
    config = PoolConfig(**{**pool_defaults, "min_idle": 2, "max_workers": 2, "batch_max_share": 0.5,
                           "workdir": tmp_path / "w"})
    stateless, sessions = Pool(fake_profile, config, slots=slots), Pool(fake_profile, config, slots=slots)
    try:
        await asyncio.gather(stateless.start(), sessions.start())
        await asyncio.gather(stateless.wait_ready(10), sessions.wait_ready(10))
        held = await sessions.acquire("a", priority=Priority.BATCH)  # the session pool's one batch lease
        other = await stateless.acquire("b", timeout_s=2, priority=Priority.BATCH)  # this pool's own
        with pytest.raises(PoolTimeout):  # and its share is still one: a second waits
            await stateless.acquire("c", timeout_s=0.3, priority=Priority.BATCH)
        held.release()
        other.release()
    finally:
        await asyncio.gather(stateless.close(), sessions.close())


async def test_a_failing_lease_callback_still_gives_the_tenant_its_slot_back(
        fake_profile: Profile, tmp_path: Path, pool_defaults: dict[str, Any]) -> None:
    def broken_meter(lease: Lease) -> None:
        raise RuntimeError("a bug in a callback")

    slots = TenantSlots()
    pool = Pool(fake_profile, PoolConfig(**{**pool_defaults, "min_idle": 1, "max_workers": 1,
                                            "workdir": tmp_path / "w"}), slots=slots, on_lease_done=broken_meter)
    try:
        await pool.start()
        lease = await pool.acquire("a", timeout_s=5)
        with pytest.raises(RuntimeError, match="a bug in a callback"):
            lease.release()
        assert slots.running("a") == 0  # not capped for good
    finally:
        await pool.close()


async def test_a_worker_that_stops_reading_its_prompt_is_killed_as_stalled(make_pool: Callable[..., Pool],
                                                                          fake_profile: Profile) -> None:
    pool = make_pool(fake_profile, min_idle=1, max_workers=1)
    async with pool.lease("a") as lease:
        assert lease.worker.pid is not None
        os.kill(lease.worker.pid, signal.SIGSTOP)  # alive, but reads nothing: the pipe fills up
        with pytest.raises(TurnStalled, match="did not take its prompt"):
            await turn(lease, "x" * 1_000_000, idle_timeout_s=0.5)
        assert isinstance(lease.worker.failure, TurnStalled)  # counted as the watchdog's, not a crash
        assert pid_gone(lease.worker.pid)


class _Exits:
    """A PoolObserver that records why workers left."""

    def __init__(self) -> None:
        self.exits: list[str] = []

    def worker_spawned(self, profile: str, seconds: float) -> None:
        pass

    def worker_exited(self, profile: str, reason: str) -> None:
        self.exits.append(reason)

    def worker_reset(self, profile: str) -> None:
        pass


async def test_a_resume_waits_for_a_spawn_slot(make_fake_profile: Callable[..., Profile], tmp_path: Path,
                                               pool_defaults: dict[str, Any]) -> None:
    # Issue 10: a resumed conversation's start bypassed max_concurrent_spawns.
    config = PoolConfig(**{**pool_defaults, "min_idle": 1, "max_workers": 3, "max_concurrent_spawns": 1,
                           "workdir": tmp_path / "w"})
    pool = Pool(make_fake_profile("slow_start=0.4"), config)
    try:
        await pool.start()
        await pool.wait_ready(10)
        lease = await pool.acquire("a")  # the pool starts a worker to stay at min_idle: the one slot
        assert pool.counts()["starting"] == 1
        resume = asyncio.create_task(pool.respawn_leased(lease, extra_args=()))
        most = 0
        while not resume.done():
            booting = [w for w in pool.workers() if w.pid is not None and w.state == "starting"]
            most = max(most, len(booting))
            await asyncio.sleep(0.005)
        await resume
        assert most == 1
        lease.release()
    finally:
        await pool.close()


async def test_a_failed_resume_is_a_boot_failure_and_trips_the_breaker(
        fake_profile: Profile, tmp_path: Path, pool_defaults: dict[str, Any]) -> None:
    exits = _Exits()
    config = PoolConfig(**{**pool_defaults, "min_idle": 1, "max_workers": 2, "boot_failure_threshold": 1,
                           "breaker_cooldown_s": 60, "workdir": tmp_path / "w"})
    pool = Pool(fake_profile, config, observer=exits)
    try:
        await pool.start()
        await pool.wait_ready(10)
        lease = await pool.acquire("a")
        await until(lambda: pool.counts()["starting"] == 0)  # a start that succeeds would close the breaker
        with pytest.raises(WorkerStartError, match="No conversation found"):
            await pool.respawn_leased(lease, extra_args=("--resume", "no-such-session"))
        assert pool.breaker_state is BreakerState.OPEN
        lease.release()
        await until(lambda: "boot_failure" in exits.exits)
        assert "crash" not in exits.exits
        second = await pool.acquire("b")
        with pytest.raises(PoolUnhealthy):  # no start while the breaker is open, not even a resume
            await pool.respawn_leased(second, extra_args=("--resume", "other"))
        second.release()
    finally:
        await pool.close()


async def test_a_resumed_worker_is_measured_once_ready(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    # Issue 10 item 9: memory gauges need a sample from the start, not from the next maintenance pass.
    pool = make_pool(fake_profile, min_idle=1, max_workers=1, maintenance_interval_s=3600)
    lease = await pool.acquire("a")
    await pool.respawn_leased(lease, extra_args=())
    await until(lambda: lease.worker.pss_bytes is not None and lease.worker.rss_bytes is not None)
    lease.release()
