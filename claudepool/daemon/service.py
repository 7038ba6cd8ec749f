"""The one path every prompt takes, whichever front end it came through.

admit (profile, session, size, draining) → lease a worker (queue wait) → run one turn, streaming text
deltas to the caller → settle → exactly one `PromptResult`, or a `ClaudepoolError` the front end turns
into its error response. The request deadline covers the queue wait and the turn; when it passes, the
turn is abandoned and the pool interrupts and resets the worker.

Draining: set ``draining`` to stop admitting, `wait_idle` for requests in flight up to a deadline,
then `stop_in_flight`: each remaining request answers `Draining` rather than vanishing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from claudepool.errors import Draining, Forbidden, NotFound, PromptTooLarge, RequestTimeout
from claudepool.pool.pool import Pool
from claudepool.pool.worker import TurnResult
from claudepool.protocol.cli_events import StreamEvent
from claudepool.protocol.wire import PromptRequest, PromptResult, UsageOut
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ServiceLimits:
    max_prompt_bytes: int
    default_timeout_s: float
    max_timeout_s: float


@dataclass(frozen=True)
class Admission:
    """A request that passed every check and may queue for a worker."""

    request_id: str
    tenant: Tenant
    request: PromptRequest
    pool: Pool
    timeout_s: float


def new_request_id() -> str:
    return uuid.uuid4().hex


class PromptService:
    def __init__(self, pools: dict[str, Pool], limits: ServiceLimits) -> None:
        self.pools = pools
        self.limits = limits
        self.draining = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._stopped_by_drain: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.requests_by_outcome: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def admit(self, tenant: Tenant, request: PromptRequest, request_id: str | None = None) -> Admission:
        """Every check that needs no worker. Raises the error the caller must answer with."""
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
        timeout_s = min(request.timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
        return Admission(request_id or new_request_id(), tenant, request, self.pools[profile], timeout_s)

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
            self.requests_by_outcome[outcome] = self.requests_by_outcome.get(outcome, 0) + 1

    async def _serve(self, admission: Admission, on_delta: OnDelta | None) -> PromptResult:
        started = time.monotonic()
        result: TurnResult | None = None
        try:
            async with asyncio.timeout(admission.timeout_s) as deadline:
                async with admission.pool.lease(admission.tenant.name) as lease:
                    queue_ms = (time.monotonic() - started) * 1000
                    async for item in lease.run_turn(admission.request.prompt):
                        if isinstance(item, TurnResult):
                            result = item
                        elif on_delta is not None and isinstance(item, StreamEvent):
                            text = item.text_delta()
                            if text:
                                await on_delta(text)
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(f"no complete answer within {admission.timeout_s:g}s") from None
            raise
        assert result is not None
        return PromptResult(
            id=admission.request_id,
            tenant=admission.tenant.name,
            session=None,
            text=result.text,
            is_error=result.is_error,
            stop_reason=result.stop_reason,
            usage=UsageOut.of(result.usage),
            cost_usd=result.cost_usd,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            queue_ms=round(queue_ms, 3),
        )

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
