"""What a tenant may do with jobs: submit (one or thousands), read, list, cancel, follow.

A job is checked when it is submitted, as far as that needs no worker: a valid prompt request, a
profile and model the tenant may use, a lane that can serve it. So a bad job is refused with 400 at
once, not failed an hour later. Everything else (rate limits, budget, queue bounds) is checked
when it runs, as for any request.

`JobService.on_settled` is told of each job this daemon settles: it wakes the job's followers here
and sends the tenant's webhook. Followers of a job settled by another daemon see it at their next
read of the store (``jobs.poll_interval_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from claudepool.errors import BadRequest, Forbidden, NotFound
from claudepool.jobs.api import JobRequest, choose_lane, new_record
from claudepool.jobs.model import JobRecord, JobStatus, Lane
from claudepool.jobs.ports import Checks
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.store import JobStore
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

Notify = Callable[[JobRecord], Awaitable[None]]
_MAX_LISTED = 1_000


class JobService:
    def __init__(self, store: JobStore, gate: Checks, settings: JobSettings, *, batch_lane: bool,
                 has_tools: Callable[[str], bool]) -> None:
        self.store = store
        self._gate = gate
        self.settings = settings
        self._batch_lane = batch_lane
        self._has_tools = has_tools
        self._changed: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._followers: Counter[str] = Counter()
        self._listeners: list[Notify] = []
        self._wakers: list[Callable[[str, int], None]] = []

    def on_submitted(self, waker: Callable[[str, int], None]) -> None:
        """``waker(lane, count)`` is called after ``count`` new jobs of that lane are stored (a lane
        here may take them now)."""
        self._wakers.append(waker)

    def on_ended(self, listener: Notify) -> None:
        self._listeners.append(listener)

    async def submit(self, tenant: Tenant, jobs: Sequence[JobRequest], idempotency_key: str | None, *,
                     bulk: bool = False) -> list[dict[str, Any]]:
        """Store the jobs (all or none): ``{id, status, lane, created}`` each; ``created`` False for a
        job this ``Idempotency-Key`` (``<key>.<index>`` in a bulk submission) had submitted before."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise BadRequest("an Idempotency-Key is 1 to 255 characters")
        records = []
        for index, job in enumerate(jobs):
            lane = self._check(tenant, job)
            key = f"{idempotency_key}.{index}" if bulk and idempotency_key is not None else idempotency_key
            records.append(new_record(tenant.name, job, lane, idempotency_key=key,
                                      max_attempts=self.settings.max_attempts))
        stored = await self.store.submit(records, max_open_per_tenant=self.settings.max_open_jobs_per_tenant)
        for lane in {r.lane for r, _ in stored}:
            for wake in self._wakers:
                wake(lane, sum(created and r.lane == lane for r, created in stored))
        return [{"id": r.id, "status": r.status, "lane": r.lane, "created": created} for r, created in stored]

    def _check(self, tenant: Tenant, job: JobRequest) -> Lane:
        routed = self._gate.router.resolve(tier=tenant.tier, kind=job.kind, profile=job.profile, model=job.model)
        profile = routed.profile or tenant.profile
        if profile not in self._gate.profile_names:
            raise NotFound(f"unknown profile {profile!r}")
        if profile not in tenant.profiles:
            raise Forbidden(f"profile {profile!r} is not allowed for this tenant")
        self._gate.catalog.switch_for(profile, tenant.models, routed.model)
        job.prompt_request()  # the checks of a prompt request's own fields
        return choose_lane(job, batch_lane=self._batch_lane, profile_has_tools=self._has_tools(profile))

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        return await self.store.get(tenant, job_id)

    async def list(self, tenant: str, *, status: JobStatus | None, since: float | None, limit: int
                   ) -> list[JobRecord]:
        return await self.store.list_jobs(tenant, status=status, since=since, limit=min(limit, _MAX_LISTED))

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        before = await self.store.get(tenant, job_id)
        record = await self.store.cancel(tenant, job_id)
        if not before.terminal and record.status == "cancelled":
            await self.ended(record)
        return record

    async def ended(self, record: JobRecord) -> None:
        """A job ended here: wake its followers and tell the listeners (webhooks)."""
        self._changed.pop(record.id, asyncio.Event()).set()
        for listener in self._listeners:
            try:
                await listener(record)
            except Exception:
                log.exception("job %s: a listener of its end failed", record.id)

    async def follow(self, tenant: str, job_id: str) -> AsyncGenerator[JobRecord]:
        """The job now, then again each time its status changes, until it has ended."""
        record = await self.store.get(tenant, job_id)
        yield record
        last = record.status
        self._followers[job_id] += 1
        try:
            while not record.terminal:
                changed = self._changed[job_id]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.poll_interval_s):
                        await changed.wait()
                record = await self.store.get(tenant, job_id)
                if record.status != last:
                    last = record.status
                    yield record
        finally:
            # The last follower gone (the job ended, or its client left): nothing of it is kept here.
            self._followers[job_id] -= 1
            if not self._followers[job_id]:
                del self._followers[job_id]
                self._changed.pop(job_id, None)

    async def purge_forever(self) -> None:
        """Delete ended jobs past ``jobs.retention_s`` (every daemon may: purging is idempotent)."""
        while True:
            try:
                purged = await self.store.purge(time.time() - self.settings.retention_s)
                if purged:
                    log.info("purged %d ended jobs past their retention", purged)
            except Exception as exc:  # a store outage: the next pass purges
                log.warning("purging ended jobs failed: %s", exc)
            await asyncio.sleep(min(self.settings.retention_s / 10, 600.0))
