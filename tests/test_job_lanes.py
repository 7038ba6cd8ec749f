"""The lanes stop when they are cancelled, even when the store below swallows the cancellation (as
redis-py can when it lands mid-command, turning it into a connection error): a lane that missed it
would hold the daemon's shutdown forever."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from claudepool.errors import StoreError
from claudepool.jobs.model import JobRecord, Lane
from claudepool.jobs.pool_lane import PoolLane
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.sqlite_store import SqliteJobStore
from claudepool.protocol.wire import PromptRequest, PromptResult
from claudepool.tenancy.tenants import Tenant, TenantRegistry


class SwallowingStore(SqliteJobStore):
    """A claim cancelled while it waits answers a store error instead of the cancellation."""

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise StoreError("Connection closed by server.") from None
        return await super().claim(lane, consumer, visibility_timeout_s=visibility_timeout_s, limit=limit,
                                   now=now, ended=ended)


class Idle:
    draining = False

    async def serve(self, tenant: Tenant, request: PromptRequest, request_id: str) -> PromptResult:
        raise AssertionError("no job was submitted")


async def noop(_: JobRecord) -> None:
    return None


@pytest.mark.parametrize("swallowed", [True, False])
async def test_a_cancelled_pool_lane_stops_even_if_its_store_swallowed_the_cancel(
        tmp_path: Path, swallowed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SwallowingStore(tmp_path / "jobs.db")
    await store.start()
    lane = PoolLane(store, Idle(), TenantRegistry([]), JobSettings(poll_interval_s=0.01), consumer="c",
                    on_settled=noop, default_timeout_s=1.0)
    if not swallowed:  # the negative control: without the check, the lane goes on after its cancel
        monkeypatch.setattr("claudepool.jobs.pool_lane.stop_if_cancelled", lambda: None)
    try:
        task = asyncio.create_task(lane.run())
        await asyncio.sleep(0.02)  # inside its first claim
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert bool(done) is swallowed
        monkeypatch.undo()  # the control's lane stops now, at its next turn of the loop
        async with asyncio.timeout(5):
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
    finally:
        await store.close()


