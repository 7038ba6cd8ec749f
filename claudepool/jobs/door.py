"""Who may do what with jobs: the one door the HTTP and socket front ends call with the caller's key.

A tenant key submits jobs and reads, follows and cancels its own; another tenant's job is not found
(never forbidden: that would tell it the id exists). The admin key reads any tenant's with
``tenant=`` (and may cancel them), and submits none: a job is always some tenant's.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from claudepool.errors import BadRequest
from claudepool.jobs.api import parse_bulk, parse_job
from claudepool.jobs.model import JobStatus
from claudepool.jobs.service import JobService
from claudepool.tenancy.tenants import TenantRegistry


class JobDoor:
    def __init__(self, tenants: TenantRegistry, jobs: JobService) -> None:
        self._tenants = tenants
        self._jobs = jobs

    def authenticate(self, key: str | None) -> None:
        """Refuse a bad key (the admin's is good) before anything else is read."""
        if not self._tenants.is_admin(key):
            self._tenants.authenticate(key)

    def _owner(self, key: str | None, tenant: str | None) -> str:
        if self._tenants.is_admin(key):
            if not tenant:
                raise BadRequest("the admin key needs tenant= to name whose jobs")
            return tenant
        return self._tenants.authenticate(key).name

    async def submit(self, key: str | None, body: Any, idempotency_key: str | None) -> dict[str, Any]:
        tenant = self._tenants.authenticate(key)
        (entry,) = await self._jobs.submit(tenant, [parse_job(body)], idempotency_key)
        return entry

    async def submit_bulk(self, key: str | None, body: Any, idempotency_key: str | None) -> dict[str, Any]:
        tenant = self._tenants.authenticate(key)
        jobs = parse_bulk(body, self._jobs.settings.max_bulk_jobs)
        return {"jobs": await self._jobs.submit(tenant, jobs, idempotency_key, bulk=True)}

    async def get(self, key: str | None, job_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return (await self._jobs.get(self._owner(key, tenant), job_id)).view()

    async def list(self, key: str | None, *, tenant: str | None = None, status: JobStatus | None = None,
                   since: float | None = None, limit: int = 100) -> dict[str, Any]:
        found = await self._jobs.list(self._owner(key, tenant), status=status, since=since, limit=limit)
        return {"jobs": [job.view() for job in found]}

    async def cancel(self, key: str | None, job_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        return (await self._jobs.cancel(self._owner(key, tenant), job_id)).view()

    async def follow(self, key: str | None, job_id: str, *, tenant: str | None = None
                     ) -> AsyncGenerator[dict[str, Any]]:
        owner = self._owner(key, tenant)
        async for record in self._jobs.follow(owner, job_id):
            yield record.view()
