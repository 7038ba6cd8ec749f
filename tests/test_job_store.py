"""The job conformance suite (claudepool/testing/job_conformance.py) against the SQLite store and a
real Redis; the SQLite store across a restart and a SIGKILL; and the suite itself: it must reject
stores that break the contract."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio

from claudepool.errors import TooManyJobs
from claudepool.jobs import model
from claudepool.jobs.model import JobRecord, Lane, Outcome
from claudepool.jobs.redis_store import RedisJobStore
from claudepool.jobs.sqlite_store import SqliteJobStore
from claudepool.jobs.store import JobStore
from claudepool.testing import job_conformance as conformance
from claudepool.testing import job_conformance_bounds, job_conformance_claims, job_conformance_kit
from claudepool.testing.job_conformance_kit import job, ok, submit_one
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


class RedisJobStoreOwningItsClient(RedisJobStore):
    """Closes its client with it: each check gets a fresh one."""

    async def close(self) -> None:
        await super().close()
        await self._redis.aclose()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> conformance.JobStoreFactory:
    if request.param == "sqlite":
        return _factory(SqliteJobStore, tmp_path)
    url = request.getfixturevalue("redis_url")  # emptied for this test

    async def redis_store() -> JobStore:
        return RedisJobStoreOwningItsClient(redis.asyncio.Redis.from_url(url, decode_responses=True))

    return redis_store


@pytest.mark.parametrize("check", conformance.CHECKS, ids=str)
async def test_conformance(check: conformance.JobCheck, make_store: conformance.JobStoreFactory) -> None:
    await conformance.run(check, make_store)


def test_every_check_written_is_registered() -> None:
    # A coroutine function taking a store but missing its @check would silently never run.
    written = {name for module in (conformance, job_conformance_claims, job_conformance_bounds)
               for name, value in vars(module).items()
               if inspect.iscoroutinefunction(value) and list(inspect.signature(value).parameters) == ["store"]}
    assert written == {one.name for one in conformance.CHECKS}
    assert len(conformance.CHECKS) == len(written) > 20


# -- the SQLite store across restarts --------------------------------------------------------------


async def test_a_new_store_on_the_same_file_sees_every_committed_move(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    first = SqliteJobStore(path)
    await first.start()
    done, running, queued = job(idempotency_key="k"), job(), job()
    await first.submit([done, running, queued])
    claimed = await first.claim("pool", "c1", visibility_timeout_s=60, limit=2)
    assert [j.id for j in claimed] == [done.id, running.id]
    settled, _ = await first.settle("acme", done.id, ok())
    await first.close()

    second = SqliteJobStore(path)
    await second.start()
    try:
        assert await second.get("acme", done.id) == settled
        assert await second.get("acme", running.id) == claimed[1]
        assert await second.submit([job(idempotency_key="k")]) == [(settled, False)]
        assert [j.id for j in await second.claim("pool", "c2", visibility_timeout_s=60, limit=5)] == [queued.id]
    finally:
        await second.close()


_WRITER = """
import asyncio, sys
from claudepool.jobs.sqlite_store import SqliteJobStore
from claudepool.testing.job_conformance_kit import job, ok, submit_one
from tests.redis_server import RedisServer

async def main() -> None:
    store = SqliteJobStore(sys.argv[1])
    await store.start()
    while True:
        record = job(metadata={"pad": "x" * 4096})
        await store.submit([record])
        [claimed] = await store.claim("pool", "writer", visibility_timeout_s=60)
        await store.settle("acme", claimed.id, ok())
        print(record.id, flush=True)

asyncio.run(main())
"""


async def test_a_sigkill_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env)
    assert writer.stdout is not None
    committed: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while len(committed) < 40:  # it keeps writing while we read: the kill lands mid-transaction
            assert time.monotonic() < deadline, "the writer did not commit 40 jobs in 30 s"
            line = writer.stdout.readline()
            assert line, f"the writer exited {writer.wait()}"
            committed.append(line.decode().strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL
    store = SqliteJobStore(path)
    await store.start()
    try:
        for job_id in committed:
            assert (await store.get("acme", job_id)).status == "succeeded", job_id
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_a_closed_or_unstarted_store_refuses_work(tmp_path: Path) -> None:
    from claudepool.errors import StoreError
    store = SqliteJobStore(tmp_path / "jobs.db")
    with pytest.raises(StoreError, match="not started"):
        await store.get("acme", "x")
    await store.start()
    await store.close()
    with pytest.raises(StoreError, match="not started"):
        await store.get("acme", "x")


# -- the Redis store: many daemons, its keys, a crash of Redis ----------------------------------------


async def test_another_daemon_takes_over_the_jobs_of_one_that_died(redis_url: str) -> None:
    dying_client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    survivor_client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        dying, survivor = RedisJobStore(dying_client), RedisJobStore(survivor_client)
        records = [job() for _ in range(3)]
        await dying.submit(records)
        held = await dying.claim("pool", "daemon-a", visibility_timeout_s=0.2, limit=3)
        assert len(held) == 3
        await dying_client.aclose()  # daemon-a is gone, its claims pending in the group
        taken: list[JobRecord] = []
        deadline = time.monotonic() + 10
        while len(taken) < 3:
            assert time.monotonic() < deadline, f"only {len(taken)} of 3 taken over"
            taken += await survivor.claim("pool", "daemon-b", visibility_timeout_s=0.2, limit=3)
            await asyncio.sleep(0.02)
        assert sorted(j.id for j in taken) == sorted(r.id for r in records)
        assert all(j.claimed_by == "daemon-b" and j.attempts == 2 for j in taken)
        for claimed in taken:
            assert (await survivor.settle("acme", claimed.id, ok()))[1]
    finally:
        await dying_client.aclose()
        await survivor_client.aclose()


async def test_a_heartbeat_restarts_the_idle_time_of_its_entry(redis_client: redis.asyncio.Redis) -> None:
    # The two clocks of a claim move together: the record's visible_at and the entry's idle time,
    # which is what XAUTOCLAIM takes over by.
    store = RedisJobStore(redis_client)
    record = await submit_one(store, job())
    [held] = await store.claim("pool", "c1", visibility_timeout_s=60)
    assert held.attempt_token is not None

    async def idle_ms() -> int:
        [entry] = await redis_client.xpending_range("cp:jobs:q:pool:interactive", "claudepool", "-", "+", 10)
        assert entry["consumer"] == "c1"
        return int(entry["time_since_delivered"])

    started = time.monotonic()
    while await idle_ms() < 300:
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.05)
    assert await store.heartbeat("acme", record.id, held.attempt_token, visibility_timeout_s=60)
    assert await idle_ms() < 300


async def test_purge_leaves_only_the_empty_queues(redis_client: redis.asyncio.Redis) -> None:
    store = RedisJobStore(redis_client)
    records = [job(idempotency_key="k1"), job(tenant="beta"), job(max_attempts=0), job(lane="batch_api")]
    await store.submit(records)
    assert await redis_client.exists(f"cp:jobs:{{acme}}:job:{records[0].id}", "cp:jobs:{acme}:idem:k1",
                                     "cp:jobs:{acme}:list", "cp:jobs:{beta}:list") == 4
    for lane in ("pool", "batch_api"):
        for claimed in await store.claim(lane, "c1", visibility_timeout_s=60, limit=5):
            await store.settle(claimed.tenant, claimed.id, ok())
    assert [j.id for j in await store.dead_letters()] == [records[2].id]
    assert await store.purge(time.time() + 1) == 4
    left = sorted(await redis_client.keys("*"))
    queues = [f"cp:jobs:q:{lane}:{priority}" for lane in model.LANES for priority in model.PRIORITIES]
    # An emptied stream stays (Redis keeps it, with its group): the queues and the dead letters.
    assert left == sorted([*queues, "cp:jobs:dead"])
    for stream in left:
        assert await redis_client.xlen(stream) == 0
    for stream in queues:
        [group] = await redis_client.xinfo_groups(stream)
        assert group["pending"] == 0


async def test_a_redis_crash_loses_no_acknowledged_move() -> None:
    with RedisServer(persistent=True) as server:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        try:
            store = RedisJobStore(client)
            done, running, queued = job(), job(), job()
            await store.submit([done, running, queued])
            claimed = await store.claim("pool", "c1", visibility_timeout_s=60, limit=2)
            settled, _ = await store.settle("acme", done.id, ok())
        finally:
            await client.aclose()
        server.kill()
        server.start()
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        try:
            store = RedisJobStore(client)
            assert await store.get("acme", done.id) == settled
            assert await store.get("acme", running.id) == claimed[1]
            assert [j.id for j in await store.claim("pool", "c2", visibility_timeout_s=60, limit=5)] == [queued.id]
        finally:
            await client.aclose()


# -- the suite rejects broken stores ---------------------------------------------------------------


class OverwritingSettle(SqliteJobStore):
    """Every settle writes its outcome, even over an ended job's."""

    async def settle(self, tenant: str, job_id: str, outcome: Outcome) -> tuple[JobRecord, bool]:
        job_now = await self.get(tenant, job_id)
        if job_now.status == "queued":
            return job_now, False
        forced = job_now.model_copy(update={"status": outcome.status, "result": outcome.result,
                                            "error": outcome.error, "cost_usd": outcome.cost_usd,
                                            "finished_at": time.time(), "attempt_token": None})
        await self._transaction(lambda db: self._write(db, forced))
        return forced, True


class NonExclusiveClaim(SqliteJobStore):
    """Reads the candidates, then writes its claims without looking again: two consumers both win."""

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        at = time.time() if now is None else now
        rows = await self._transaction(lambda db: db.execute(
            "SELECT record FROM jobs WHERE lane = ? AND status = 'queued' ORDER BY priority, created_at LIMIT ?",
            (lane, limit)).fetchall())
        await asyncio.sleep(0.001)
        out = [model.claimed(JobRecord.model_validate_json(raw), consumer, at, visibility_timeout_s)
               for (raw,) in rows]
        for moved in out:
            await self._transaction(functools.partial(self._write, job=moved))
        return out


class TokenBlindHeartbeat(SqliteJobStore):
    """A heartbeat that extends whichever claim is live, whoever sends it."""

    async def heartbeat(self, tenant: str, job_id: str, token: str, *, visibility_timeout_s: float) -> bool:
        current = (await self.get(tenant, job_id)).attempt_token
        return current is not None and await super().heartbeat(tenant, job_id, current,
                                                              visibility_timeout_s=visibility_timeout_s)


class CountBeforeWrite(SqliteJobStore):
    """Counts the tenant's open jobs in one step and stores them in another: concurrent submissions
    each see room, and together pass the bound."""

    async def submit(self, jobs: Sequence[JobRecord], *, max_open_per_tenant: int = 0
                     ) -> list[tuple[JobRecord, bool]]:
        if max_open_per_tenant:
            tenants = {j.tenant for j in jobs}
            for tenant in tenants:
                open_now = [j for j in await self.list_jobs(tenant, limit=100_000) if not j.terminal]
                if len(open_now) + sum(j.tenant == tenant for j in jobs) > max_open_per_tenant:
                    raise TooManyJobs("over the bound")
        return await super().submit(jobs)


def _factory(kind: type[SqliteJobStore], tmp_path: Path) -> conformance.JobStoreFactory:
    counter = iter(range(1_000_000))

    async def make() -> JobStore:
        store = kind(tmp_path / f"{kind.__name__}-{next(counter)}.db")
        await store.start()
        return store

    return make


async def _failing(make: conformance.JobStoreFactory, names: Sequence[str]) -> set[str]:
    failed = set()
    for name in names:
        [one] = [c for c in conformance.CHECKS if c.name == name]
        try:
            await conformance.run(one, make)
        except AssertionError:
            failed.add(name)
    return failed


@pytest.mark.parametrize(("broken", "caught_by"), [
    (OverwritingSettle, ["the_first_settle_wins", "a_settle_after_a_cancel_changes_nothing"]),
    (NonExclusiveClaim, ["two_consumers_never_claim_the_same_job", "many_consumers_settle_each_job_exactly_once"]),
    (TokenBlindHeartbeat, ["an_expired_claim_is_taken_over_and_the_old_token_is_refused"]),
    (CountBeforeWrite, ["concurrent_submissions_never_pass_the_bound"]),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
async def test_the_suite_rejects_a_broken_store(broken: type[SqliteJobStore], caught_by: list[str],
                                                tmp_path: Path) -> None:
    assert await _failing(_factory(broken, tmp_path), caught_by) == set(caught_by)
    # The same checks pass on the store they were broken from.
    assert await _failing(_factory(SqliteJobStore, tmp_path), caught_by) == set()


async def test_the_whole_suite_passes_in_one_call(tmp_path: Path) -> None:
    await conformance.run_all(_factory(SqliteJobStore, tmp_path))


# -- throughput, printed (not asserted) ------------------------------------------------------------


async def _throughput(store: JobStore, n: int = 500) -> float:
    await store.submit([job() for _ in range(n)])
    start = time.perf_counter()
    for _ in range(n):
        [claimed] = await store.claim("pool", "bench", visibility_timeout_s=60)
        await store.settle(claimed.tenant, claimed.id, ok())
    return n / (time.perf_counter() - start)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_claim_and_settle_throughput_is_printed(tmp_path: Path, redis_client: redis.asyncio.Redis,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sqlite_store = SqliteJobStore(tmp_path / "bench.db")
    await sqlite_store.start()
    try:
        sqlite_rate = await _throughput(sqlite_store)
    finally:
        await sqlite_store.close()
    redis_rate = await _throughput(RedisJobStore(redis_client))
    with capsys.disabled():
        print(f"\nclaim+settle: sqlite {sqlite_rate:.0f}/s, redis {redis_rate:.0f}/s")
    assert job_conformance_kit.SHORT_VT_S > 0  # measured, not asserted: see the printed line
