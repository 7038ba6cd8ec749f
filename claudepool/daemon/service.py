"""The one path every prompt takes, whichever front end it came through.

admit: profile, session, size, queue bounds, rate limits, budget reservation → run: wait for a
worker in the pool's fair queue → one turn, streaming text deltas to the caller → one `PromptResult`,
or a `ClaudepoolError` the front end turns into its error response. The request deadline covers the
queue wait and the turn; when it passes, the turn is abandoned and the pool interrupts and resets the
worker. Usage is metered from the pool's callbacks (see `claudepool.tenancy.metering`), so a turn is
billed even when its client is gone.

Draining: set ``draining`` to stop admitting, `wait_idle` for requests in flight up to a deadline,
then `stop_in_flight`: each remaining request answers `Draining` rather than vanishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from claudepool.config import MeteringSettings
from claudepool.errors import (
    Draining,
    Forbidden,
    NotFound,
    PromptTooLarge,
    QueueFull,
    RequestTimeout,
    TenancyError,
)
from claudepool.pool.pool import Lease, Pool
from claudepool.pool.worker import TurnResult
from claudepool.protocol.cli_events import StreamEvent
from claudepool.protocol.wire import PromptRequest, PromptResult, UsageOut
from claudepool.store.base import Store
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.scheduler import Priority, TenantShare
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ServiceLimits:
    max_prompt_bytes: int
    default_timeout_s: float
    max_timeout_s: float
    max_queued: int
    reservation_ttl_s: float


@dataclass(frozen=True)
class Admission:
    """A request that passed every check, holds its budget reservation, and may queue for a worker."""

    request_id: str
    tenant: Tenant
    request: PromptRequest
    pool: Pool
    timeout_s: float
    context: RequestContext


def new_request_id() -> str:
    return uuid.uuid4().hex


class PromptService:
    def __init__(self, pools: dict[str, Pool], limits: ServiceLimits, *, store: Store, limiter: RateLimiter,
                 meter: Meter, pricing: PricingTable, metering: MeteringSettings) -> None:
        self.pools = pools
        self.limits = limits
        self.store = store
        self.limiter = limiter
        self.meter = meter
        self.pricing = pricing
        self.metering = metering
        self.draining = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._stopped_by_drain: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._queued: Counter[str] = Counter()
        self.requests_by_outcome: Counter[str] = Counter()
        self.rejections: Counter[tuple[str, str]] = Counter()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        return self._queued.total()

    async def admit(self, tenant: Tenant, request: PromptRequest, request_id: str | None = None) -> Admission:
        """Every check that needs no worker, and the budget reservation. Raises the error to answer."""
        if self.draining:
            raise Draining("the daemon is shutting down; retry on another instance")
        profile = request.profile or tenant.profile
        if profile not in self.pools:
            raise NotFound(f"unknown profile {profile!r}")
        if profile not in tenant.profiles:
            raise Forbidden(f"profile {profile!r} is not allowed for this tenant")
        if request.session is not None:
            # Conversations are not served yet: no session id exists, so any id is unknown.
            raise NotFound("unknown session")
        size = len(request.prompt.encode())
        if size > self.limits.max_prompt_bytes:
            raise PromptTooLarge(f"prompt of {size} bytes exceeds the limit of {self.limits.max_prompt_bytes}")
        try:
            if self.queued >= self.limits.max_queued:
                raise QueueFull(f"the daemon has {self.queued} requests waiting for a worker")
            if tenant.max_queued and self._queued[tenant.name] >= tenant.max_queued:
                raise QueueFull(f"this tenant has {self._queued[tenant.name]} requests waiting, its limit")
            await self.limiter.check(tenant.name, requests_per_minute=tenant.requests_per_minute,
                                     tokens_per_minute=tenant.tokens_per_minute)
            request_id = request_id or new_request_id()
            pool = self.pools[profile]
            model = pool.profile.model or "default"
            reservation_id = None
            if tenant.has_budget:
                amount = self.pricing.reservation_usd(model, size, self.metering)
                await self.store.reserve(tenant.name, request_id, amount, daily_limit_usd=tenant.daily_budget_usd,
                                         monthly_limit_usd=tenant.monthly_budget_usd,
                                         ttl_s=self.limits.reservation_ttl_s)
                reservation_id = request_id
        except TenancyError as exc:
            self.rejections[(tenant.name, exc.code)] += 1
            raise
        timeout_s = min(request.timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
        context = RequestContext(request_id=request_id, tenant=tenant.name, profile=profile, model=model,
                                 reservation_id=reservation_id, session=request.session)
        return Admission(request_id, tenant, request, pool, timeout_s, context)

    async def run(self, admission: Admission, on_delta: OnDelta | None = None) -> PromptResult:
        """Serve an admitted request. ``on_delta`` receives text as it streams (if given)."""
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        outcome = "error"
        try:
            result = await self._serve(admission, on_delta)
            outcome = "model_error" if result.is_error else "ok"
            return result
        except asyncio.CancelledError:
            if task in self._stopped_by_drain and task.uncancel() == 0:
                outcome = "draining"
                raise Draining("the daemon stopped this request at its drain deadline") from None
            outcome = "cancelled"
            raise
        finally:
            self._in_flight.discard(task)
            self._stopped_by_drain.discard(task)
            if not self._in_flight:
                self._idle.set()
            self.requests_by_outcome[outcome] += 1

    async def _serve(self, admission: Admission, on_delta: OnDelta | None) -> PromptResult:
        started = time.monotonic()
        tenant = admission.tenant
        result: TurnResult | None = None
        try:
            async with asyncio.timeout(admission.timeout_s) as deadline:
                lease = await self._acquire(admission)
                queue_ms = (time.monotonic() - started) * 1000
                try:
                    async for item in lease.run_turn(admission.request.prompt):
                        if isinstance(item, TurnResult):
                            result = item
                        elif on_delta is not None and isinstance(item, StreamEvent):
                            text = item.text_delta()
                            if text:
                                await on_delta(text)
                finally:
                    lease.release()
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(f"no complete answer within {admission.timeout_s:g}s") from None
            raise
        assert result is not None
        return PromptResult(
            id=admission.request_id,
            tenant=tenant.name,
            session=None,
            text=result.text,
            is_error=result.is_error,
            stop_reason=result.stop_reason,
            usage=UsageOut.of(result.usage),
            cost_usd=result.cost_usd,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            queue_ms=round(queue_ms, 3),
        )

    async def _acquire(self, admission: Admission) -> Lease:
        """Wait in the pool's fair queue. Until a worker is leased, the reservation is ours to return."""
        tenant = admission.tenant
        pool = admission.pool
        wait_s = tenant.max_queue_wait_s or pool.config.lease_timeout_s
        self._queued[tenant.name] += 1
        try:
            lease = await pool.acquire(
                tenant.name, timeout_s=wait_s, share=TenantShare(tenant.weight, tenant.max_concurrency),
                priority=Priority(admission.request.priority),
            )
        except BaseException:
            self.meter.release(admission.context)
            raise
        finally:
            self._queued[tenant.name] -= 1
            if self._queued[tenant.name] <= 0:
                del self._queued[tenant.name]
        lease.context = admission.context
        return lease

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop_in_flight(self) -> int:
        """Stop every request still running; each answers `Draining`. Returns how many there were."""
        stragglers = list(self._in_flight)
        for task in stragglers:
            self._stopped_by_drain.add(task)
            task.cancel()
        if stragglers:
            log.warning("stopping %d requests still in flight", len(stragglers))
            await self.wait_idle(10.0)
        return len(stragglers)
