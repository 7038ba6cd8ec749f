"""A worker's reset runs at a background priority and the worker is lent back at its own.

The reset (``/clear`` and the settings check) is work no caller waits for; at normal priority it
competes with the turn a caller is waiting on. These tests read each thread's nice value from the
kernel while the real CLI is being cleaned and once it is lent again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from claudepool.pool import priority
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from tests.helpers import collect, until

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=30, interrupt_timeout_s=5, reset_timeout_s=10)


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    return {"min_idle": 1, "max_workers": 1, "lease_timeout_s": 30, "timeouts": TIMEOUTS}


def nices(pid: int | None) -> set[int]:
    assert pid is not None
    values = set(priority.thread_nices([pid]).values())
    assert values, "the worker has no threads to read"
    return values


@pytest.mark.real_cli
@pytest.mark.parametrize("reset_nice", [19, 0])
async def test_the_real_cli_is_cleaned_at_the_background_priority_and_lent_at_its_own(
    make_pool: Callable[..., Pool], real_profile: Callable[..., Profile], reset_nice: int
) -> None:
    assert priority.can_restore(), "the test machine must allow restoring a nice value (root or RLIMIT_NICE)"
    baseline = priority.own_nice()
    pool = make_pool(real_profile(), reset_nice=reset_nice)
    async with pool.lease("a") as lease:
        pid = lease.worker.pid
        assert nices(pid) == {baseline}
        await collect(lease.run_turn("first [[reply:one]]"), timeout_s=60)
    await asyncio.sleep(0)  # the clean's task starts: its priority is set before its first await
    assert pool.counts()["cleaning"] == 1
    during = nices(pid)
    await until(lambda: pool.counts()["idle"] == 1, timeout_s=20)
    after = nices(pid)
    async with pool.lease("b") as lease:
        assert lease.worker.pid == pid
        lent = nices(pid)
        _, result = await collect(lease.run_turn("second [[reply:two]]"), timeout_s=60)
    assert result.text == "two"
    # Control: with reset_nice 0 the clean runs at the daemon's priority, so `during` is the baseline.
    assert during == {max(reset_nice, baseline)}
    assert after == lent == {baseline}
    assert pool.stats.resets == 1


async def test_a_worker_whose_priority_cannot_be_restored_is_retired_not_lent(
    make_pool: Callable[..., Pool], fake_profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    baseline = priority.own_nice()
    real_set_nice = priority.set_nice

    def refuse_restore(pids: list[int], nice: int) -> int:
        if nice == baseline:
            raise PermissionError(1, "Operation not permitted")
        return real_set_nice(pids, nice)

    pool = make_pool(fake_profile, reset_nice=19)
    async with pool.lease("a") as lease:
        pid = lease.worker.pid
        await collect(lease.run_turn("hi"), timeout_s=20)
        monkeypatch.setattr(priority, "set_nice", refuse_restore)
    await until(lambda: pool.stats.reset_failures == 1, timeout_s=20)
    monkeypatch.setattr(priority, "set_nice", real_set_nice)
    async with pool.lease("b") as lease:
        assert lease.worker.pid != pid
    assert pool.stats.retired["failed"] == 1


def test_set_nice_reaches_every_thread_and_can_be_put_back() -> None:
    threads = "import threading, time\n" \
              "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(3)]\n" \
              "print('up', flush=True); time.sleep(30)"
    with subprocess.Popen([sys.executable, "-c", threads], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"up\n"
            baseline = priority.own_nice()
            assert priority.set_nice([child.pid], 19) == 4
            assert set(priority.thread_nices([child.pid]).values()) == {19}
            priority.set_nice([child.pid], baseline)
            assert set(priority.thread_nices([child.pid]).values()) == {baseline}
        finally:
            child.kill()


def test_without_the_privilege_restoring_is_known_to_be_impossible() -> None:
    # In a child, since dropping root cannot be undone.
    probe = ("import os, resource\n"
             "from claudepool.pool import priority\n"
             "resource.setrlimit(resource.RLIMIT_NICE, (0, 0))\n"
             "if os.geteuid() == 0:\n"
             "    os.setgid(65534); os.setuid(65534)\n"
             "print(priority.can_restore(19), priority.can_restore(0))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    # RLIMIT_NICE 0 lets no thread go back down, and without CAP_SYS_NICE nothing else does.
    assert out.stdout.split() == ["False", "False"]
