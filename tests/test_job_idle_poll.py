"""An idle pool lane backs off its store polls (goal 5 of issue 16: a quiet idle daemon) without
reacting later: a job submitted here wakes it at once, and one another daemon stored is claimed
within ``jobs.poll_max_interval_s``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from claudepool.jobs.idle_poll import IdlePoll
from claudepool.jobs.model import JobRecord, Lane
from claudepool.jobs.pool_lane import PoolLane
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.sqlite_store import SqliteJobStore
from claudepool.tenancy.tenants import TenantRegistry
from claudepool.testing.job_conformance_kit import job, submit_one
from tests.test_job_lanes import Idle, noop

FIRST_S, MAX_S = 0.05, 0.4


class CountingStore(SqliteJobStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claims = 0
        self.claimed_at: dict[str, float] = {}

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        self.claims += 1
        got = await super().claim(lane, consumer, visibility_timeout_s=visibility_timeout_s, limit=limit,
                                  now=now, ended=ended)
        for record in got:
            self.claimed_at[record.id] = time.monotonic()
        return got


@pytest.fixture
async def lane(tmp_path: Path) -> AsyncIterator[tuple[PoolLane, CountingStore]]:
    store = CountingStore(tmp_path / "jobs.db")
    await store.start()
    pool_lane = PoolLane(store, Idle(), TenantRegistry([]),
                         JobSettings(poll_interval_s=FIRST_S, poll_max_interval_s=MAX_S),
                         consumer="c", on_settled=noop, default_timeout_s=1.0)
    task = asyncio.create_task(pool_lane.run())
    try:
        yield pool_lane, store
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
        await store.close()


def test_the_sleep_doubles_up_to_its_bound_and_resets() -> None:
    poll = IdlePoll(0.5, 5.0)
    assert [poll.next_s() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    poll.reset()
    assert poll.next_s() == 0.5
    assert IdlePoll(2.0, 1.0).max_s == 2.0  # a bound below the first interval is the first interval


@pytest.mark.parametrize("backoff", [True, False])
async def test_an_idle_lane_polls_ever_less_often(lane: tuple[PoolLane, CountingStore], backoff: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, store = lane
    if not backoff:  # the negative control: a fixed interval polls ~2 s / 0.05 s = 40 times
        monkeypatch.setattr(IdlePoll, "next_s", lambda self: self.first_s)
    await asyncio.sleep(2.0)
    # With back-off: 0.05 + 0.1 + 0.2 + 0.4 + 0.4 ... ≈ 7 looks in 2 s.
    assert (store.claims <= 10) is backoff, store.claims


async def test_a_job_submitted_here_starts_at_once_though_the_lane_backed_off(
        lane: tuple[PoolLane, CountingStore]) -> None:
    pool_lane, store = lane
    await asyncio.sleep(1.5)  # the lane now sleeps MAX_S between looks
    record = await submit_one(store, job())
    submitted = time.monotonic()
    pool_lane.wake()  # what `Jobs` does on every submission here
    async with asyncio.timeout(5):
        while record.id not in store.claimed_at:
            await asyncio.sleep(0.005)
    assert store.claimed_at[record.id] - submitted < 0.1


async def test_a_job_stored_elsewhere_is_claimed_within_the_bound(lane: tuple[PoolLane, CountingStore]) -> None:
    _, store = lane
    await asyncio.sleep(1.5)
    record = await submit_one(store, job())  # no wake: another daemon stored it
    submitted = time.monotonic()
    async with asyncio.timeout(5):
        while record.id not in store.claimed_at:
            await asyncio.sleep(0.005)
    assert store.claimed_at[record.id] - submitted <= MAX_S + 0.15
    # and the next looks are short again (the claim reset the back-off)
    claims = store.claims
    await asyncio.sleep(FIRST_S * 4)
    assert store.claims > claims
