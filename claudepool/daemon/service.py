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
from claudepool.daemon.metrics import RequestMetrics, outcome_of
from claudepool.errors import (
    BadRequest,
    BudgetExhausted,
    Cancelled,
    Draining,
    Forbidden,
    NotFound,
    PromptTooLarge,
    QueueFull,
    RateLimited,
    RequestTimeout,
    SessionClosed,
    TenancyError,
)
from claudepool.pool.pool import Lease, Pool
from claudepool.pool.worker import TurnResult
from claudepool.protocol.cli_events import StreamEvent, SystemApiRetry
from claudepool.protocol.wire import PromptRequest, PromptResult, UsageOut
from claudepool.sessions.manager import SessionManager
from claudepool.store.base import SessionRecord, Store
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.scheduler import Priority, TenantShare
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)
request_log = logging.getLogger("claudepool.request")

OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ServiceLimits:
    max_prompt_bytes: int
    default_timeout_s: float
    max_timeout_s: float
    max_queued: int
    reservation_ttl_s: float


class QueueSlot:
    """One place under the daemon's and the tenant's queue bounds (``server.max_queued``,
    ``tenants.NAME.max_queued``), held from admission until the request has a worker or ends.

    It is taken in the same step as the bounds are checked, with no await between, so concurrent
    requests cannot all pass the check while they are still checking limits or reserving budget."""

    def __init__(self, counts: Counter[str], tenant: str) -> None:
        self._counts = counts
        self._tenant = tenant
        self._held = True
        counts[tenant] += 1

    def release(self) -> None:
        """Give the place back; idempotent."""
        if self._held:
            self._held = False
            self._counts[self._tenant] -= 1
            if self._counts[self._tenant] <= 0:
                del self._counts[self._tenant]


@dataclass(frozen=True)
class Admission:
    """A request that passed every check, holds its budget reservation and its place in the queue
    bounds, and may queue for a worker."""

    request_id: str
    tenant: Tenant
    request: PromptRequest
    pool: Pool
    timeout_s: float
    context: RequestContext
    queue_slot: QueueSlot


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class _Trace:
    """What one request went through, for its metrics and its log line."""

    started: float
    queue_s: float | None = None
    first_text_s: float | None = None
    slot: int | None = None
    result: TurnResult | None = None


def _rejection_kind(exc: TenancyError) -> str:
    if isinstance(exc, RateLimited):
        return exc.kind
    if isinstance(exc, BudgetExhausted):
        return "budget"
    return "queue_full"


class PromptService:
    def __init__(self, pools: dict[str, Pool], limits: ServiceLimits, *, store: Store, limiter: RateLimiter,
                 meter: Meter, pricing: PricingTable, metering: MeteringSettings,
                 metrics: RequestMetrics | None = None, sessions: SessionManager | None = None) -> None:
        self.pools = pools
        self.limits = limits
        self.store = store
        self.limiter = limiter
        self.meter = meter
        self.pricing = pricing
        self.metering = metering
        self.metrics = metrics
        self.sessions = sessions
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
        """Requests admitted (or being admitted) that have no worker yet: what the queue bounds count."""
        return self._queued.total()

    async def admit(self, tenant: Tenant, request: PromptRequest, request_id: str | None = None) -> Admission:
        """Every check that needs no worker, and the budget reservation. Raises the error to answer.

        The request counts as in flight from here (a drain waits for it, or stops it); `run`, which
        the caller awaits straight after, ends that. A refusal is counted and logged here, once."""
        started = time.monotonic()
        request_id = request_id or new_request_id()
        try:
            return await self._admit_in_flight(tenant, request, request_id)
        except asyncio.CancelledError:
            self.refused(Cancelled("the client went away"), tenant=tenant, request=request, request_id=request_id,
                         started=started)
            raise
        except BaseException as exc:
            self.refused(exc, tenant=tenant, request=request, request_id=request_id, started=started)
            raise

    def refused(self, exc: BaseException, *, tenant: Tenant | None = None, request: PromptRequest | None = None,
                request_id: str | None = None, started: float | None = None) -> None:
        """Count a request that ends before admission and write its one canonical log line.

        `admit` calls it for its own refusals; a front end calls it for what it refuses before
        `admit` (no or a wrong key, a body or frame it cannot read). Never the prompt or the key."""
        outcome = outcome_of(exc)
        self.requests_by_outcome[outcome] += 1
        if tenant is not None and isinstance(exc, TenancyError):
            self.rejections[(tenant.name, exc.code)] += 1
        if self.metrics is not None:
            if tenant is not None and isinstance(exc, TenancyError):
                self.metrics.rejected(tenant.name, _rejection_kind(exc))
            self.metrics.request_done(tenant.name if tenant is not None else None, outcome, None, None)
        request_log.info("request", extra={"fields": {
            "request_id": request_id or new_request_id(), "tenant": tenant.name if tenant is not None else None,
            "session": request.session if request is not None else None,
            "profile": (request.profile if request is not None else None) or (tenant.profile if tenant else None),
            "priority": request.priority if request is not None else None, "worker_slot": None,
            "outcome": outcome, "queue_ms": None,
            "duration_ms": round((time.monotonic() - started) * 1000, 1) if started is not None else 0.0,
            "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
            "cost_usd": 0.0,
        }})

    async def _admit_in_flight(self, tenant: Tenant, request: PromptRequest, request_id: str) -> Admission:
        if self.draining:
            raise Draining("the daemon is shutting down; retry on another instance")
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            return await self._admit(tenant, request, request_id)
        except BaseException as exc:
            self._in_flight.discard(task)
            stopped = task in self._stopped_by_drain
            self._stopped_by_drain.discard(task)
            if not self._in_flight:
                self._idle.set()
            if isinstance(exc, asyncio.CancelledError) and stopped and task.uncancel() == 0:
                raise Draining("the daemon stopped this request at its drain deadline") from None
            raise

    async def _admit(self, tenant: Tenant, request: PromptRequest, request_id: str) -> Admission:
        profile = request.profile or tenant.profile
        pools = self.pools
        if request.session is not None:
            if self.sessions is None:
                raise NotFound("unknown session")
            record = await self.sessions.get(tenant.name, request.session)
            if record.state == "closed":
                raise SessionClosed(f"session {record.id} is closed ({record.close_reason})")
            if request.profile is not None and request.profile != record.profile:
                raise BadRequest(f"session {record.id} runs on profile {record.profile!r}")
            profile, pools = record.profile, self.sessions.pools
        if profile not in pools:
            raise NotFound(f"unknown profile {profile!r}")
        if profile not in tenant.profiles:
            raise Forbidden(f"profile {profile!r} is not allowed for this tenant")
        size = len(request.prompt.encode())
        if size > self.limits.max_prompt_bytes:
            raise PromptTooLarge(f"prompt of {size} bytes exceeds the limit of {self.limits.max_prompt_bytes}")
        if self.queued >= self.limits.max_queued:
            raise QueueFull(f"the daemon has {self.queued} requests waiting for a worker")
        if tenant.max_queued and self._queued[tenant.name] >= tenant.max_queued:
            raise QueueFull(f"this tenant has {self._queued[tenant.name]} requests waiting, its limit")
        slot = QueueSlot(self._queued, tenant.name)  # no await since the check
        try:
            await self.limiter.check(tenant.name, requests_per_minute=tenant.requests_per_minute,
                                     tokens_per_minute=tenant.tokens_per_minute)
            pool = pools[profile]
            model = pool.profile.model or "default"
            timeout_s = min(request.timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
            reservation_id = None
            if tenant.has_budget:
                amount = self.pricing.reservation_usd(model, size, self.metering)
                # It must outlive the request (queue wait and turn), or others could spend it meanwhile.
                wait_s = tenant.max_queue_wait_s or pool.config.lease_timeout_s
                ttl_s = max(self.limits.reservation_ttl_s, wait_s + timeout_s + 60)
                try:
                    await self.store.reserve(tenant.name, request_id, amount, daily_limit_usd=tenant.daily_budget_usd,
                                             monthly_limit_usd=tenant.monthly_budget_usd, ttl_s=ttl_s)
                except BudgetExhausted:
                    raise
                except BaseException:
                    # Cancelled or failed mid-call, the reservation may exist: give it back (idempotent).
                    self.meter.release(RequestContext(request_id=request_id, tenant=tenant.name, profile=profile,
                                                      model=model, reservation_id=request_id))
                    raise
                reservation_id = request_id
        except BaseException:
            slot.release()
            raise
        context = RequestContext(request_id=request_id, tenant=tenant.name, profile=profile, model=model,
                                 reservation_id=reservation_id, session=request.session)
        return Admission(request_id, tenant, request, pool, timeout_s, context, slot)

    async def run(self, admission: Admission, on_delta: OnDelta | None = None) -> PromptResult:
        """Serve an admitted request. ``on_delta`` receives text as it streams (if given)."""
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        trace = _Trace(started=time.monotonic())
        error: BaseException | None = None
        try:
            return await self._serve(admission, on_delta, trace)
        except asyncio.CancelledError:
            if task in self._stopped_by_drain and task.uncancel() == 0:
                error = Draining("the daemon stopped this request at its drain deadline")
                raise error from None
            error = Cancelled("the client went away")
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            admission.queue_slot.release()  # if it never reached the queue's end (a deadline, a cancel)
            self._in_flight.discard(task)
            self._stopped_by_drain.discard(task)
            if not self._in_flight:
                self._idle.set()
            self._finished(admission, trace, error)

    async def _serve(self, admission: Admission, on_delta: OnDelta | None, trace: _Trace) -> PromptResult:
        started = trace.started
        session: str | None = None
        try:
            async with asyncio.timeout(admission.timeout_s) as deadline:
                if admission.request.session is None:
                    lease = await self._acquire(admission)
                    try:
                        await self._drive(lease, admission, on_delta, trace)
                    finally:
                        lease.release()
                else:
                    session = await self._serve_session(admission, on_delta, trace)
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(f"no complete answer within {admission.timeout_s:g}s") from None
            raise
        result = trace.result
        assert result is not None
        return PromptResult(
            id=admission.request_id,
            tenant=admission.tenant.name,
            session=session,
            text=result.text,
            is_error=result.is_error,
            stop_reason=result.stop_reason,
            usage=UsageOut.of(result.usage),
            cost_usd=result.cost_usd,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            queue_ms=round((trace.queue_s or 0.0) * 1000, 3),
        )

    async def _serve_session(self, admission: Admission, on_delta: OnDelta | None, trace: _Trace) -> str:
        """One turn of a conversation, on the worker that holds it (or resumed on a new one)."""
        assert self.sessions is not None and admission.request.session is not None
        tenant = admission.tenant
        ctx = admission.context

        async def drive(lease: Lease, record: SessionRecord) -> TurnResult:
            admission.queue_slot.release()  # it waited for the session and its worker: it has one now
            ctx.session = record.id
            lease.context = ctx
            try:
                return await self._drive(lease, admission, on_delta, trace)
            except BaseException:
                if not lease.worker.in_turn():
                    # The worker died mid-turn (an abandoned turn is still draining and will bill itself).
                    self.meter.finish(ctx, turn_started=lease.turns_started > 0)
                raise

        try:
            record, _ = await self.sessions.run_turn(
                tenant, admission.request.session,
                share=TenantShare(tenant.weight, tenant.max_concurrency), priority=Priority(admission.request.priority),
                wait_s=tenant.max_queue_wait_s or admission.pool.config.lease_timeout_s, drive=drive,
            )
        except BaseException:
            if trace.slot is None:
                self.meter.release(ctx)  # it never reached a worker: give the reservation back
            raise
        finally:
            admission.queue_slot.release()
        return record.id

    async def _drive(self, lease: Lease, admission: Admission, on_delta: OnDelta | None, trace: _Trace) -> TurnResult:
        """Run the admitted prompt on ``lease``'s worker, streaming text and noting what happened."""
        trace.queue_s = time.monotonic() - trace.started
        trace.slot = lease.worker.slot
        async for item in lease.run_turn(admission.request.prompt):
            if isinstance(item, TurnResult):
                trace.result = item
            elif isinstance(item, StreamEvent):
                text = item.text_delta()
                if text:
                    if trace.first_text_s is None:
                        trace.first_text_s = time.monotonic() - trace.started
                    if on_delta is not None:
                        await on_delta(text)
            elif isinstance(item, SystemApiRetry) and self.metrics is not None:
                self.metrics.upstream_retry(item.error_status)
        assert trace.result is not None
        return trace.result

    def _finished(self, admission: Admission, trace: _Trace, error: BaseException | None) -> None:
        """Count the request and write its one canonical log line (never the prompt or the answer)."""
        result = trace.result
        outcome = outcome_of(error, is_error=result.is_error if result else False)
        self.requests_by_outcome[outcome] += 1
        duration_s = time.monotonic() - trace.started
        if self.metrics is not None:
            self.metrics.request_done(admission.tenant.name, outcome, duration_s, trace.queue_s)
            if trace.first_text_s is not None:
                self.metrics.first_text(trace.first_text_s)
            if result is not None and (result.api_error_status is not None or result.terminal_reason == "api_error"):
                self.metrics.upstream_error(result.api_error_status)
        usage = result.usage if result is not None else None
        request_log.info("request", extra={"fields": {
            "request_id": admission.request_id, "tenant": admission.tenant.name,
            "session": admission.request.session, "profile": admission.context.profile,
            "priority": admission.request.priority, "worker_slot": trace.slot, "outcome": outcome,
            "queue_ms": round(trace.queue_s * 1000, 1) if trace.queue_s is not None else None,
            "duration_ms": round(duration_s * 1000, 1),
            "input_tokens": usage.input_tokens if usage else 0, "output_tokens": usage.output_tokens if usage else 0,
            "cache_read_input_tokens": usage.cache_read_input_tokens if usage else 0,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens if usage else 0,
            "cost_usd": result.cost_usd if result else 0.0,
        }})

    async def _acquire(self, admission: Admission) -> Lease:
        """Wait in the pool's fair queue. Until a worker is leased, the reservation is ours to return."""
        tenant = admission.tenant
        pool = admission.pool
        wait_s = tenant.max_queue_wait_s or pool.config.lease_timeout_s
        try:
            lease = await pool.acquire(
                tenant.name, timeout_s=wait_s, share=TenantShare(tenant.weight, tenant.max_concurrency),
                priority=Priority(admission.request.priority),
            )
        except BaseException:
            self.meter.release(admission.context)
            raise
        finally:
            admission.queue_slot.release()
        lease.context = admission.context
        return lease

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
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
