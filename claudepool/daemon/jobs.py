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

from prometheus_client import CollectorRegistry

from claudepool.config import Settings
from claudepool.daemon.metrics import JobMetrics
from claudepool.daemon.service import PromptService
from claudepool.gateway.batches import BatchApi
from claudepool.gateway.settings import Upstream
from claudepool.jobs.batch_lane import BatchLane
from claudepool.jobs.door import JobDoor
from claudepool.jobs.model import JobRecord
from claudepool.jobs.notify import JobWebhooks
from claudepool.jobs.pool_lane import PoolLane
from claudepool.jobs.service import JobService
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.store import JobStore
from claudepool.jobs.webhooks import WebhookSender
from claudepool.tenancy.budgets import PricingTable
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
        return RedisJobStore(client, prefix=f"{key_prefix}:jobs:", owns_client=True)
    from claudepool.jobs.sqlite_store import SqliteJobStore

    path = Path(settings.path) if settings.path else state_directory(workdir) / "claudepool-jobs.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SqliteJobStore(path)


class Jobs:
    def __init__(self, store: JobStore, service: PromptService, tenants: TenantRegistry, settings: JobSettings, *,
                 has_tools: Callable[[str], bool], upstream_for: Callable[[str], Upstream] | None = None,
                 pricing: PricingTable | None = None, webhooks: JobWebhooks | None = None,
                 metrics: JobMetrics | None = None) -> None:
        """``upstream_for`` (a profile's provider address and key) turns the batch lane on."""
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.service = JobService(store, service.gate, settings, batch_lane=upstream_for is not None,
                                  has_tools=has_tools)
        self.door = JobDoor(tenants, self.service)
        self.pool_lane = PoolLane(store, service, tenants, settings, consumer=self.consumer,
                                  on_settled=self.service.ended, default_timeout_s=service.gate.default_timeout_s)
        self._batch_apis: dict[str, BatchApi] = {}
        self.batch_lane: BatchLane | None = None
        if upstream_for is not None:
            def api_for(profile: str) -> BatchApi:
                if profile not in self._batch_apis:
                    self._batch_apis[profile] = BatchApi(upstream_for(profile))
                return self._batch_apis[profile]

            self.batch_lane = BatchLane(store, api_for, gate=service.gate, tenants=tenants, meter=service.meter,
                                        pricing=pricing or service.meter.pricing, settings=settings,
                                        consumer=self.consumer, pool_lane=self.pool_lane, on_settled=self.service.ended)
        self.service.on_submitted(self._wake)
        self.service.on_ended(self._ended)
        self.webhooks = webhooks
        if webhooks is not None:
            self.service.on_ended(webhooks.ended)

    @classmethod
    def build(cls, settings: Settings, service: PromptService, tenants: TenantRegistry,
              registry: CollectorRegistry) -> Jobs:
        metrics = JobMetrics(registry)
        store = build_job_store(settings.jobs, store_url=settings.store.url.get_secret_value(),
                                key_prefix=settings.store.key_prefix, socket_timeout_s=settings.store.socket_timeout_s,
                                workdir=settings.pool.workdir)
        return cls(store, service, tenants, settings.jobs,
                   has_tools=lambda name: bool(settings.profile(name).tools or settings.profile(name).mcp_servers),
                   upstream_for=settings.upstream_for if settings.jobs.batch_lane else None,
                   webhooks=_webhooks(settings, store, metrics), metrics=metrics)

    async def _ended(self, record: JobRecord) -> None:
        if self.metrics is not None:
            self.metrics.ended.labels(record.lane, record.status).inc()

    def _wake(self, lane: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.submitted.labels(lane).inc(count)
        if lane == "pool":
            self.pool_lane.wake()
        elif self.batch_lane is not None:
            self.batch_lane.wake()

    async def start(self) -> None:
        await self.store.start()
        if self.webhooks is not None:
            await self.webhooks.start()

    def loops(self) -> list[Loop]:
        loops: list[Loop] = [("jobs-pool-lane", self.pool_lane.run), ("jobs-purge", self.service.purge_forever)]
        if self.webhooks is not None:
            loops.append(("jobs-webhooks", self.webhooks.run))
        if self.batch_lane is not None:
            loops.append(("jobs-batch-lane", self.batch_lane.run))
        return loops

    async def close(self) -> None:
        """After the loops have stopped: the provider clients, then the store."""
        for api in self._batch_apis.values():
            await api.close()
        await self.store.close()


def _webhooks(settings: Settings, store: JobStore, metrics: JobMetrics) -> JobWebhooks | None:
    """Each tenant's webhook, if any tenant has one."""
    targets = {name: (t.webhook_url, t.webhook_secret.get_secret_value().encode())
               for name, t in settings.tenants.items() if t.webhook_url and t.webhook_secret is not None}
    if not targets:
        return None
    if not settings.webhooks.allowed_hosts:
        log.warning("tenants have webhooks but [webhooks] allowed_hosts is empty: none will be called")
    return JobWebhooks(WebhookSender(settings.webhooks), targets, store,
                       on_delivery=lambda state: metrics.webhooks.labels(state).inc())
