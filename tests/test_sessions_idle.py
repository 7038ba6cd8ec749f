"""Session maintenance sleeps while no session holds a worker (goal 5 of issue 16: a quiet idle
daemon): parking only ever moves a bound session, so an idle daemon wakes for the sweep alone. That
bound sessions are still parked on time is `tests/test_sessions.py` (idle and waited-for parking)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from claudepool.pool.pool import Pool
from claudepool.sessions.manager import SessionManager
from claudepool.sessions.settings import SessionOptions, SessionSettings
from claudepool.store.memory import MemoryStore


class NoPools:
    @property
    def configured_sessions(self) -> Mapping[str, Pool]:
        return {}

    def pool_for(self, profile: str, system_prompt: str | None, *, sessions: bool = False) -> Pool:
        raise AssertionError("no session runs here")

    def session_pools(self) -> list[Pool]:
        return []


async def test_maintenance_with_no_bound_session_wakes_only_for_the_sweep(tmp_path: Path) -> None:
    settings = SessionSettings(maintenance_interval_s=0.02, sweep_interval_s=0.5)
    manager = SessionManager(MemoryStore(), NoPools(), SessionOptions(settings=settings, dir=tmp_path))
    rounds: list[str] = []

    async def park_some() -> None:
        rounds.append("park")

    async def sweep() -> None:
        rounds.append("sweep")

    manager.park_some = park_some  # type: ignore[method-assign]
    manager.sweep = sweep  # type: ignore[method-assign]
    task = asyncio.create_task(manager.maintain())
    try:
        await asyncio.sleep(1.2)
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    # Every 0.02 s would be ~60 rounds; waking for the sweep alone (due every 0.5 s) is 3.
    assert rounds.count("park") <= 4, rounds
    assert 2 <= rounds.count("sweep") <= 4, rounds
