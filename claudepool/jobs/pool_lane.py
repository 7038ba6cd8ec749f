"""The pool lane: jobs claimed from the store and served by warm workers like any prompt.

Each daemon runs one `PoolLane`. It claims at most ``jobs.max_running`` jobs at a time (so a daemon
takes only what it can serve, and the others take the rest), and serves each through
`PromptService.serve` at the job's priority: the tenant's limits, budget and fair share
apply as to any request, and a ``batch`` job waits for capacity no interactive request wants.

While a job runs its claim is kept alive by heartbeats; when a heartbeat finds the claim gone (the
job was cancelled, or another daemon took it over after this one stalled) the attempt is stopped.
A daemon that dies stops heartbeating and its jobs are delivered again after the visibility
timeout. The attempt's answer is settled by job id, first settle wins (`JobStore.settle`).

Refusals that pass with time (rate limits, full queues) are waited out within the attempt; a
daemon draining leaves its jobs unsettled for the next delivery; any other error fails the job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from claudepool.errors import (
    ClaudepoolError,
    Draining,
    NotFound,
    QueueFull,
    RateLimited,
    StoreError,
    TooManyInFlight,
    WorkerError,
)
from claudepool.jobs.api import request_of
from claudepool.jobs.idle_poll import IdlePoll
from claudepool.jobs.model import JobFailure, JobRecord, Outcome
from claudepool.jobs.ports import Serving
from claudepool.jobs.settings import JobSettings
from claudepool.jobs.store import JobStore
from claudepool.tenancy.tenants import TenantRegistry

log = logging.getLogger(__name__)

# Refusals an attempt waits out (bounded by the job's own timeout) rather than fails on.
_WAIT_OUT = (RateLimited, QueueFull, TooManyInFlight)
_MAX_WAIT_S = 30.0
# A worker that dies under a job gets it again this many times within the attempt.
_WORKER_RETRIES = 2
_STORE_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)

OnSettled = Callable[[JobRecord], Awaitable[None]]


class PoolLane:
    def __init__(self, store: JobStore, service: Serving, tenants: TenantRegistry, settings: JobSettings,
                 *, consumer: str, on_settled: OnSettled, default_timeout_s: float) -> None:
        self._store = store
        self._service = service
        self._tenants = tenants
        self._settings = settings
        self._consumer = consumer
        self._on_settled = on_settled
        self._default_timeout_s = default_timeout_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._poll = IdlePoll(settings.poll_interval_s, settings.poll_max_interval_s)

    @property
    def running(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        """New work was submitted here: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and serve until cancelled; the attempts in flight are stopped with it (unsettled:
        they are delivered again)."""
        failures = 0
        try:
            while True:
                stop_if_cancelled()
                # Cleared before the claim looks: a job stored while it runs wakes the wait below at once.
                self._wake.clear()
                free = self._settings.max_running - len(self._running)
                claimed: list[JobRecord] = []
                ended: list[JobRecord] = []
                if free > 0 and not self._service.draining:
                    try:
                        claimed = await self._store.claim(
                            "pool", self._consumer, visibility_timeout_s=self._settings.visibility_timeout_s,
                            limit=free, ended=ended)
                        failures = 0
                    except ClaudepoolError as exc:
                        delay_s = _STORE_BACKOFF_S[min(failures, len(_STORE_BACKOFF_S) - 1)]
                        failures += 1
                        log.warning("job store unavailable, claiming again in %gs: %s", delay_s, exc)
                        await asyncio.sleep(delay_s)
                        continue
                for job in ended:  # past its deadline, or dead-lettered: its end is told like any
                    await self._on_settled(job)
                for job in claimed:
                    task = asyncio.create_task(self._attempt(job), name=f"job-{job.id}")
                    self._running[job.id] = task
                    task.add_done_callback(functools.partial(self._finished, job.id))
                if claimed:
                    self._poll.reset()
                    if len(self._running) < self._settings.max_running:
                        continue  # there may be more waiting
                await self._poll.wait(self._wake)
        finally:
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=10.0)

    def _finished(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._wake.set()

    async def _attempt(self, job: JobRecord) -> None:
        attempt = asyncio.current_task()
        assert attempt is not None
        keeper = asyncio.create_task(self._keep_claim(job, attempt), name=f"job-heartbeat-{job.id}")
        try:
            outcome = await self.serve(job)
        except Draining:
            return  # the daemon is stopping: the next delivery serves it
        except asyncio.CancelledError:
            if keeper.done() and not keeper.cancelled() and keeper.result() is False:
                log.info("job %s: its claim is gone (cancelled or taken over); attempt stopped", job.id)
                attempt.uncancel()
                return
            raise
        finally:
            keeper.cancel()
            await asyncio.wait({keeper}, timeout=5.0)
        await self.settle(job, outcome)

    async def settle(self, job: JobRecord, outcome: Outcome) -> None:
        """Settle with retries through a store outage (bounded: past them, the next delivery settles)."""
        for delay_s in (*_STORE_BACKOFF_S, None):
            try:
                record, first = await self._store.settle(job.tenant, job.id, outcome)
            except StoreError as exc:
                if delay_s is None:
                    log.error("job %s: could not be settled, it will be delivered again: %s", job.id, exc)
                    return
                await asyncio.sleep(delay_s)
                continue
            if first:
                await self._on_settled(record)
            return

    async def serve(self, job: JobRecord) -> Outcome:
        """One attempt on a pool worker: the outcome to settle, or `Draining` (leave it unsettled)."""
        tenant = self._tenants.get(job.tenant)
        if tenant is None:
            return _failed(NotFound(f"tenant {job.tenant!r} is no longer configured"))
        request = request_of(job)
        worker_retries = 0
        started = time.monotonic()
        timeout_s = request.timeout_s or self._default_timeout_s
        while True:
            try:
                prompt = request.prompt_request()
                result = await self._service.serve(tenant, prompt, f"{job.id}-{job.attempts}")
            except Draining:
                raise
            except _WAIT_OUT as exc:
                wait_s = min(exc.retry_after_s or 1.0, _MAX_WAIT_S)
                if time.monotonic() - started + wait_s > timeout_s:
                    return _failed(exc)
                await asyncio.sleep(wait_s)
                continue
            except WorkerError as exc:
                if exc.retryable and worker_retries < _WORKER_RETRIES:
                    worker_retries += 1
                    continue
                return _failed(exc)
            except ClaudepoolError as exc:
                return _failed(exc)
            return Outcome(status="failed" if result.is_error else "succeeded",
                           result=result.model_dump(mode="json"), usage=result.usage.model_dump(),
                           cost_usd=result.cost_usd,
                           error=JobFailure(code="model_error", message=result.text[:500]) if result.is_error
                           else None)

    async def _keep_claim(self, job: JobRecord, attempt: asyncio.Task[None]) -> bool:
        """Heartbeat until cancelled; when the claim is lost, stop the attempt and return False."""
        every_s = self._settings.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(every_s)
            try:
                held = await self._store.heartbeat(job.tenant, job.id, job.attempt_token or "",
                                                   visibility_timeout_s=self._settings.visibility_timeout_s)
            except ClaudepoolError as exc:
                log.warning("job %s: heartbeat failed (%s); trying again", job.id, exc)
                continue
            if not held:
                attempt.cancel()
                return False


def stop_if_cancelled() -> None:
    """Raise `CancelledError` when this task was asked to stop, even if a library below swallowed the
    request (redis-py can, when it lands mid-command): a lane that missed it would never exit."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _failed(exc: ClaudepoolError) -> Outcome:
    return Outcome(status="failed", error=JobFailure(code=exc.code, message=str(exc)))
