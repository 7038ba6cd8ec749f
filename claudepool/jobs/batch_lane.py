"""The batch lane: jobs sent to the provider's Message Batches API, at half the list price.

A loop claims ``batch_api`` jobs, gathering them for ``jobs.batch_window_s`` (or up to
``jobs.max_batch_requests``), and sends each profile's share as one batch through that profile's
upstream (the gateway's provider address and key; workers are not involved: a batch job runs no
tools). The batch id is written on every job before anything else happens to it, so a daemon that
dies while a batch runs leaves jobs that the next claimant resumes, polling the same batch rather
than sending them again. While a batch runs its jobs' claims are kept alive; it is polled with
back-off, then its results settle the jobs one by one.

Each succeeded request is metered once, as one ledger record (``kind="batch"``, record id
``batch:<job id>``: the store counts a record id once, so a result settled twice bills once)
priced with the table's ``batch_multiplier``. An errored or expired request fails its job with the
provider's reason, or runs it on the pool lane when the job allows (``fallback_to_pool``). Budgets:
a job whose tenant's budget is spent when its batch is made fails ``budget_exhausted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from claudepool.errors import BudgetExhausted, ClaudepoolError
from claudepool.gateway.batches import BatchApi, BatchInfo, BatchResult
from claudepool.jobs.api import request_of
from claudepool.jobs.idle_poll import IdlePoll
from claudepool.jobs.model import JobFailure, JobRecord, Outcome
from claudepool.jobs.pool_lane import OnSettled, PoolLane, stop_if_cancelled
from claudepool.jobs.ports import Checks
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.store import JobStore
from claudepool.store.base import UsageRecord
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.models import DEFAULT_MODEL
from claudepool.tenancy.tenants import TenantRegistry

log = logging.getLogger(__name__)

_STORE_BACKOFF_S = 2.0


class BatchLane:
    def __init__(self, store: JobStore, api_for: Callable[[str], BatchApi], *, gate: Checks, tenants: TenantRegistry,
                 meter: Meter, pricing: PricingTable, settings: JobSettings, consumer: str, pool_lane: PoolLane,
                 on_settled: OnSettled) -> None:
        self._store = store
        self._api_for = api_for
        self._gate = gate
        self._tenants = tenants
        self._meter = meter
        self._pricing = pricing
        self._settings = settings
        self._consumer = consumer
        self._pool_lane = pool_lane
        self._on_settled = on_settled
        self._batches: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._poll = IdlePoll(settings.poll_interval_s, settings.poll_max_interval_s)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                jobs = await self._gather()
                resumed: defaultdict[str, list[JobRecord]] = defaultdict(list)
                fresh: defaultdict[str, list[JobRecord]] = defaultdict(list)
                for job in jobs:
                    if job.batch_id is not None:
                        resumed[job.batch_id].append(job)
                    else:
                        fresh[self._profile(job)].append(job)
                for batch_id, held in resumed.items():
                    self._spawn(self._resume(self._profile(held[0]), batch_id, held))
                for profile, held in fresh.items():
                    self._spawn(self._send(profile, held))
        finally:
            tasks = list(self._batches)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=10.0)

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work, name="jobs-batch")
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _claim(self, limit: int) -> list[JobRecord]:
        ended: list[JobRecord] = []
        try:
            claimed = await self._store.claim("batch_api", self._consumer, limit=limit, ended=ended,
                                              visibility_timeout_s=self._settings.visibility_timeout_s)
        except ClaudepoolError as exc:
            log.warning("job store unavailable for the batch lane: %s", exc)
            await asyncio.sleep(_STORE_BACKOFF_S)
            return []
        for job in ended:
            await self._on_settled(job)
        return claimed

    async def _gather(self) -> list[JobRecord]:
        """The next batch's jobs: the first claimed, then whatever arrives within the window."""
        size = self._settings.max_batch_requests
        while True:
            stop_if_cancelled()
            self._wake.clear()  # before the claim looks: a job stored while it runs is not missed
            jobs = await self._claim(size)
            if jobs:
                self._poll.reset()
                break
            await self._poll.wait(self._wake)
        closes = time.monotonic() + self._settings.batch_window_s
        while len(jobs) < size and (left_s := closes - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left_s, self._settings.poll_interval_s)):
                    await self._wake.wait()
            jobs += await self._claim(size - len(jobs))
        return jobs

    def _profile(self, job: JobRecord) -> str:
        request = request_of(job)
        tenant = self._tenants.get(job.tenant)
        routed = self._gate.router.resolve(tier=tenant.tier if tenant else None, kind=request.kind,
                                           profile=request.profile, model=request.model)
        return routed.profile or (tenant.profile if tenant else "default")

    def _params(self, job: JobRecord, profile: str) -> dict[str, Any]:
        request = request_of(job)
        tenant = self._tenants.get(job.tenant)
        if tenant is None:
            raise BudgetExhausted(f"tenant {job.tenant!r} is no longer configured")
        routed = self._gate.router.resolve(tier=tenant.tier, kind=request.kind, profile=request.profile,
                                           model=request.model)
        model = (self._gate.catalog.switch_for(profile, tenant.models, routed.model)
                 or self._gate.catalog.profile_model(profile))
        if model == DEFAULT_MODEL:
            model = self._settings.batch_default_model
        params: dict[str, Any] = {"model": model, "max_tokens": self._settings.batch_max_tokens,
                                  "messages": request.chat()}
        system = tenant.system_prompt_for(self._gate.catalog.system_prompt(profile), request.system)
        if system:
            params["system"] = system
        return params

    async def _send(self, profile: str, jobs: list[JobRecord]) -> None:
        api = self._api_for(profile)
        ready: list[tuple[JobRecord, dict[str, Any]]] = []
        for job in jobs:
            try:
                tenant = self._tenants.get(job.tenant)
                if tenant is not None and tenant.has_budget:
                    await self._gate.check_budget(tenant)
                ready.append((job, self._params(job, profile)))
            except ClaudepoolError as exc:
                await self._settle(job, _failed(exc.code, str(exc)))
        if not ready:
            return
        try:
            info = await api.create([(job.id, params) for job, params in ready])
        except ClaudepoolError as exc:
            log.warning("a batch of %d jobs could not be created (%s); they will be delivered again", len(ready), exc)
            return  # unsettled: the claims lapse and the jobs are delivered again
        held = [job for job, _ in ready
                if await self._store.note_batch(job.tenant, job.id, job.attempt_token or "", info.id)]
        await self._resume(profile, info.id, held)

    async def _resume(self, profile: str, batch_id: str, jobs: Sequence[JobRecord]) -> None:
        api = self._api_for(profile)
        by_id = {job.id: job for job in jobs}
        lost: set[str] = set()
        keeper = asyncio.create_task(self._keep_claims(by_id, lost, lambda: api.cancel(batch_id)),
                                     name=f"jobs-batch-heartbeat-{batch_id}")
        try:
            batch = await api.wait_ended(batch_id, first_poll_s=self._settings.batch_poll_first_s,
                                         max_poll_s=self._settings.batch_poll_max_s,
                                         timeout_s=self._settings.batch_timeout_s)
            async for result in api.results(batch_id):
                job = by_id.pop(result.custom_id, None)
                # A cancelled job's result is still metered (the provider bills it) but settles nothing.
                if job is not None and (result.type == "succeeded" or job.id not in lost):
                    await self._settle(job, await self._outcome(job, profile, batch, result))
        except ClaudepoolError as exc:
            log.warning("batch %s: %s; its unsettled jobs will be delivered again", batch_id, exc)
        finally:
            keeper.cancel()
            await asyncio.wait({keeper}, timeout=5.0)

    async def _outcome(self, job: JobRecord, profile: str, batch: BatchInfo, result: BatchResult) -> Outcome:
        if result.type == "succeeded" and result.message is not None:
            return self._meter_result(job, profile, batch, result)
        reason = result.error_message or f"the provider's batch request was {result.type}"
        code = f"batch_{result.type}"
        if request_of(job).fallback_to_pool and result.type in ("errored", "expired"):
            log.info("job %s: batch request %s, running it on the pool", job.id, result.type)
            try:
                return await self._pool_lane.serve(job)
            except ClaudepoolError as exc:
                return _failed(exc.code, str(exc))
        return _failed(code, reason)

    def _meter_result(self, job: JobRecord, profile: str, batch: BatchInfo, result: BatchResult) -> Outcome:
        """Bill one succeeded request: one call record in the batch tier, at the batch price, dated
        when the batch ended (``record_id`` ``batch:<job>``: the store counts it once)."""
        assert result.message is not None
        usage = result.usage()
        model = usage.model or str(result.message.get("model") or "")
        cost_usd = self._pricing.cost(
            model, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_read_input_tokens=usage.cache_read_tokens, cache_creation_input_tokens=usage.cache_write_5m_tokens,
            cache_write_1h_input_tokens=usage.cache_write_1h_tokens, batch=True)
        ended_at = (batch.ended_at or datetime.now(UTC)).timestamp()
        self._meter.submit(UsageRecord(
            record_id=f"batch:{job.id}", request_id=job.id, tenant=job.tenant, profile=profile, model=model,
            outcome="ok", at=ended_at, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_read_input_tokens=usage.cache_read_tokens, cache_creation_input_tokens=usage.cache_write_tokens,
            cache_write_1h_input_tokens=usage.cache_write_1h_tokens, cost_usd=cost_usd, kind="call",
            service_tier="batch", message_id=usage.message_id,
            duration_ms=round((ended_at - batch.created_at.timestamp()) * 1000, 2)))
        tokens = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                  "cache_read_input_tokens": usage.cache_read_tokens,
                  "cache_creation_input_tokens": usage.cache_write_tokens}
        text = "".join(block.get("text", "") for block in result.message.get("content") or []
                       if isinstance(block, dict) and block.get("type") == "text")
        return Outcome(status="succeeded", usage=tokens, cost_usd=cost_usd, result={
            "id": job.id, "tenant": job.tenant, "session": None, "text": text, "is_error": False,
            "stop_reason": usage.stop_reason, "usage": tokens, "cost_usd": cost_usd, "model": model,
            "batch_id": batch.id})

    async def _settle(self, job: JobRecord, outcome: Outcome) -> None:
        await self._pool_lane.settle(job, outcome)

    async def _keep_claims(self, jobs: dict[str, JobRecord], lost: set[str],
                           cancel: Callable[[], Awaitable[object]]) -> None:
        """Heartbeat every job of the batch; once none is held any more (all cancelled), cancel the
        provider's batch too, so what it has not run yet is not billed."""
        every_s = self._settings.visibility_timeout_s / 3
        cancelled: set[str] = set()
        while True:
            await asyncio.sleep(every_s)
            for job_id, job in list(jobs.items()):
                if job_id in lost:
                    continue
                try:
                    held = await self._store.heartbeat(job.tenant, job.id, job.attempt_token or "",
                                                       visibility_timeout_s=self._settings.visibility_timeout_s)
                except ClaudepoolError:
                    continue
                if not held:
                    lost.add(job_id)  # cancelled, or taken over by another daemon
                    with contextlib.suppress(ClaudepoolError):
                        if (await self._store.get(job.tenant, job_id)).status == "cancelled":
                            cancelled.add(job_id)
            # Only when the tenant cancelled them all: a daemon that took the jobs over resumes this batch.
            if jobs and cancelled >= set(jobs):
                try:
                    await cancel()
                except ClaudepoolError as exc:
                    log.warning("could not cancel a batch none of whose jobs is held any more: %s", exc)
                return


def _failed(code: str, message: str) -> Outcome:
    return Outcome(status="failed", error=JobFailure(code=code, message=message))
