"""Idle workers frozen (``pool.freeze_idle_after_s``, issue 16 goal 5), on the real CLI.

A frozen worker's processes are stopped (state T in /proc), a lease continues it before its prompt,
and a pool closing with frozen workers leaves no process and waits out no SIGTERM deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import Worker
from tests.helpers import collect, until

pytestmark = pytest.mark.real_cli

# Short turn deadline: a lease that wrote its prompt to a stopped worker fails in seconds, not minutes.
TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=5, reset_timeout_s=10)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 1, "max_workers": 1, "lease_timeout_s": 30, "timeouts": TIMEOUTS}


def tree(worker: Worker) -> list[psutil.Process]:
    assert worker.pid is not None
    leader = psutil.Process(worker.pid)
    return [leader, *leader.children(recursive=True)]


def stopped(worker: Worker) -> bool:
    try:
        return all(p.status() == psutil.STATUS_STOPPED for p in tree(worker))
    except psutil.NoSuchProcess:
        return False


async def test_a_frozen_idle_worker_is_stopped_and_a_lease_thaws_it(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile(), freeze_idle_after_s=0.3)
    await pool.start()
    await pool.wait_ready(60)
    [worker] = pool.workers()
    await until(lambda: worker.frozen, timeout_s=10)  # the pool's own timer: no event steps it
    assert stopped(worker), [p.status() for p in tree(worker)]
    cpu_s = sum(sum(p.cpu_times()[:2]) for p in tree(worker))
    await asyncio.sleep(1.5)  # a running idle CLI takes CPU every second
    assert sum(sum(p.cpu_times()[:2]) for p in tree(worker)) == cpu_s

    for i in range(2):  # the same worker, frozen again after each lease
        async with pool.lease("acme") as lease:
            assert lease.worker is worker and not worker.frozen and not stopped(worker)
            _, result = await collect(lease.run_turn(f"q{i} [[reply:answer {i}]]"), timeout_s=30)
        assert result.text == f"answer {i}" and not result.is_error
        await until(lambda: worker.frozen and stopped(worker), timeout_s=10)
    assert pool.stats.spawned == 1 and pool.stats.resets == 2


async def test_closing_a_pool_of_frozen_workers_leaves_no_process(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile(), min_idle=2, max_workers=2, freeze_idle_after_s=0.2)
    await pool.start()
    await pool.wait_ready(60)
    workers = pool.workers()
    await until(lambda: all(stopped(w) for w in workers), timeout_s=10)
    procs = [p for w in workers for p in tree(w)]
    started = time.monotonic()
    async with asyncio.timeout(30):
        await pool.close()
    # Thawed first, each CLI exits on EOF: no SIGTERM deadline (2 s) is waited out.
    assert time.monotonic() - started < TIMEOUTS.close_eof_timeout_s
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive
    assert all(w.returncode == 0 for w in workers), [w.returncode for w in workers]


async def test_without_the_knob_idle_workers_are_never_stopped(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile]
) -> None:
    pool = make_pool(real_profile(), freeze_idle_after_s=0)
    await pool.start()
    await pool.wait_ready(60)
    [worker] = pool.workers()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert not worker.frozen and not any(p.status() == psutil.STATUS_STOPPED for p in tree(worker))
        await asyncio.sleep(0.1)
