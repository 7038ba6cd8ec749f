"""The jobs part of a daemon, composed: its store, its service and door, its lanes and loops.

Without ``store.url`` jobs live in a SQLite file under the state directory and survive a restart of
the one daemon; with it they live in Redis, and every daemon sharing it takes jobs from the same
streams. The consumer name (what a claim is held under) is unique per daemon process.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from claudepool.daemon.service import PromptService
from claudepool.jobs.door import JobDoor
from claudepool.jobs.model import JobRecord
from claudepool.jobs.pool_lane import PoolLane
from claudepool.jobs.service import JobService
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.store import JobStore
from claudepool.tenancy.tenants import TenantRegistry

log = logging.getLogger(__name__)

Loop = tuple[str, Callable[[], Coroutine[Any, Any, None]]]


def state_directory(workdir: Path | None) -> Path:
    """Where the daemon keeps what must outlive it: systemd's StateDirectory, else the pool's
    workdir, else the temp directory."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return workdir or Path(os.environ.get("TMPDIR", "/tmp"))


def build_job_store(settings: JobSettings, *, store_url: str, key_prefix: str, socket_timeout_s: float,
                    workdir: Path | None) -> JobStore:
    if store_url:
        import redis.asyncio as redis  # only deployments with Redis pay for the import

        from claudepool.jobs.redis_store import RedisJobStore

        client = redis.Redis.from_url(store_url, socket_timeout=socket_timeout_s,
                                      socket_connect_timeout=socket_timeout_s)
        return RedisJobStore(client, prefix=f"{key_prefix}:jobs:")
    from claudepool.jobs.sqlite_store import SqliteJobStore

    path = Path(settings.path) if settings.path else state_directory(workdir) / "claudepool-jobs.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SqliteJobStore(path)


class Jobs:
    def __init__(self, store: JobStore, service: PromptService, tenants: TenantRegistry, settings: JobSettings, *,
                 batch_lane: bool, has_tools: Callable[[str], bool]) -> None:
        self.store = store
        self.settings = settings
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.service = JobService(store, service.gate, settings, batch_lane=batch_lane, has_tools=has_tools)
        self.door = JobDoor(tenants, self.service)
        self.pool_lane = PoolLane(store, service, tenants, settings, consumer=self.consumer,
                                  on_settled=self.service.ended)
        self.service.on_submitted(lambda lane: self.pool_lane.wake() if lane == "pool" else None)

    async def start(self) -> None:
        await self.store.start()

    def loops(self) -> list[Loop]:
        return [("jobs-pool-lane", self.pool_lane.run), ("jobs-purge", self.service.purge_forever)]

    async def close(self) -> None:
        await self.store.close()

    async def ended(self, record: JobRecord) -> None:
        await self.service.ended(record)
