"""Admission: every check a prompt passes before it may wait for a worker.

In order: the route (the request's ``kind`` and its tenant's tier choose a profile, model and
effort where the request names none: `claudepool.tenancy.routing`), the session (if any) and its
profile, the profile, the model, the request's own budget against its tenant's cap, the system
prompt (the request's, else the tenant's persona, else the profile's: it picks the pool, see
`claudepool.daemon.pools`), the prompt's size, the daemon's and the tenant's queue bounds, the rate
limits, the budget. The first that fails raises the error to answer; a place taken in the queue
bounds is given back. An `Admission` holds what passed.

The budget check holds nothing: each model call holds its own budget at the gateway
(`claudepool.gateway.budget`). A request is admitted while the tenant's spend is under its budget
(strict) or under ``soft_stop_fraction`` of it (soft), so a budget of a few requests admits a few,
and one that is spent is refused before any worker is used. What calls in flight hold does not
refuse a request: its calls wait for them at the gateway.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from claudepool.errors import (
    BadRequest,
    BudgetExhausted,
    Forbidden,
    NotFound,
    PromptTooLarge,
    QueueFull,
    SessionClosed,
    WorkspaceFilesTooLarge,
)
from claudepool.pool.pool import Pool
from claudepool.pool.workspace_files import FileBounds, InputFile, check_path, check_pattern
from claudepool.protocol.wire import PromptRequest
from claudepool.sessions.manager import SessionManager
from claudepool.sessions.pools import system_prompt_of
from claudepool.store.base import Store
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import RequestContext
from claudepool.tenancy.models import ModelCatalog, ProfileModel
from claudepool.tenancy.routing import Effort, Router
from claudepool.tenancy.tenants import Tenant


@dataclass(frozen=True)
class ServiceLimits:
    max_prompt_bytes: int
    default_timeout_s: float
    max_timeout_s: float
    max_queued: int
    files: FileBounds = field(default_factory=FileBounds)
    max_system_prompt_bytes: int = 64 * 1024


class PoolSource(Protocol):
    """The pools a request may run on (`claudepool.daemon.pools.PoolRegistry`)."""

    @property
    def configured(self) -> Mapping[str, Pool]: ...

    def pool_for(self, profile: str, system_prompt: str | None, *, sessions: bool = False) -> Pool: ...

    def pin(self, pool: Pool) -> Callable[[], None]: ...


def _nothing() -> None:
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


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
    """A request that passed every check, holds its place in the queue bounds, and may queue for a
    worker."""

    request_id: str
    tenant: Tenant
    request: PromptRequest
    pool: Pool
    timeout_s: float
    context: RequestContext
    queue_slot: QueueSlot
    # The request's ``files``, decoded and checked: written into the workspace before the prompt.
    files: tuple[InputFile, ...] = ()
    # The model to switch the worker to for this request (None: the profile's own).
    model_switch: str | None = None
    # The effort to switch the worker to for this request (None: the profile's own).
    effort_switch: Effort | None = None
    # Keeps an on-demand pool open until the request has its worker or ends (`PoolSource.pin`).
    unpin: Callable[[], None] = _nothing

    def release(self) -> None:
        """Give back what admission holds: the place in the queue bounds, the pool's pin. Idempotent."""
        self.queue_slot.release()
        self.unpin()


class Gate:
    """The checks of admission, over the pools a request may run on and the tenancy components."""

    def __init__(self, pools: PoolSource, limits: ServiceLimits, *, store: Store, limiter: RateLimiter,
                 sessions: SessionManager | None = None, router: Router | None = None) -> None:
        self.pools = pools
        self.router = router or Router()
        self.limits = limits
        self.store = store
        self.limiter = limiter
        self.sessions = sessions
        self.catalog = ModelCatalog({name: ProfileModel(pool.profile.model, pool.profile.system_prompt)
                                     for name, pool in pools.configured.items()})
        self._queued: Counter[str] = Counter()

    @property
    def queued(self) -> int:
        """Requests admitted (or being admitted) that have no worker yet: what the queue bounds count."""
        return self._queued.total()

    @property
    def profile_names(self) -> frozenset[str]:
        return frozenset(self.pools.configured)

    @property
    def default_timeout_s(self) -> float:
        return self.limits.default_timeout_s

    async def admit(self, tenant: Tenant, request: PromptRequest, request_id: str) -> Admission:
        routed = self.router.resolve(tier=tenant.tier, kind=request.kind, profile=request.profile,
                                     model=request.model)
        profile = routed.profile or tenant.profile
        configured = self.pools.configured
        if request.session is not None:
            if self.sessions is None:
                raise NotFound("unknown session")
            record = await self.sessions.get(tenant.name, request.session)
            if record.state == "closed":
                raise SessionClosed(f"session {record.id} is closed ({record.close_reason})")
            if request.profile is not None and request.profile != record.profile:
                raise BadRequest(f"session {record.id} runs on profile {record.profile!r}")
            if request.system is not None and request.system != system_prompt_of(self.sessions.pools, record):
                raise BadRequest(f"session {record.id} keeps the system prompt it was created with: send none")
            profile = record.profile
        if profile not in configured:
            raise NotFound(f"unknown profile {profile!r}")
        if profile not in tenant.profiles:
            raise Forbidden(f"profile {profile!r} is not allowed for this tenant")
        # The routed model passes the same check as one the request names: a route widens nothing.
        model_switch = self.catalog.switch_for(profile, tenant.models, routed.model)
        own_effort = configured[profile].profile.effort
        effort_switch = routed.effort if routed.effort != own_effort else None
        if effort_switch is not None and "max" in (effort_switch, own_effort):
            # Checked at load where a route names its profile; here for the others (the tenant's).
            raise BadRequest(f"effort {effort_switch!r} on profile {profile!r} (effort {own_effort!r}): the CLI "
                             "switches effort at runtime among low, medium, high and xhigh only; route to a profile "
                             "with that effort")
        budget_usd = request_budget(tenant, request)
        system_bytes = len(request.system.encode()) if request.system is not None else 0
        if system_bytes > self.limits.max_system_prompt_bytes:
            raise PromptTooLarge(f"system prompt of {system_bytes} bytes exceeds the limit of "
                                 f"{self.limits.max_system_prompt_bytes}")
        # A session's system prompt is its record's: its pool is found when its worker is bound.
        system = (tenant.system_prompt_for(configured[profile].profile.system_prompt, request.system)
                  if request.session is None else None)
        size = len(request.prompt.encode()) + system_bytes
        if size > self.limits.max_prompt_bytes:
            raise PromptTooLarge(f"prompt of {size} bytes exceeds the limit of {self.limits.max_prompt_bytes}")
        files = input_files(request, self.limits.files)
        if self.queued >= self.limits.max_queued:
            raise QueueFull(f"the daemon has {self.queued} requests waiting for a worker")
        if tenant.max_queued and self._queued[tenant.name] >= tenant.max_queued:
            raise QueueFull(f"this tenant has {self._queued[tenant.name]} requests waiting, its limit")
        slot = QueueSlot(self._queued, tenant.name)  # no await since the check
        try:
            await self.limiter.check(tenant.name, requests_per_minute=tenant.requests_per_minute,
                                     tokens_per_minute=tenant.tokens_per_minute)
            model = model_switch or configured[profile].profile.model or "default"
            timeout_s = min(request.timeout_s or self.limits.default_timeout_s, self.limits.max_timeout_s)
            if tenant.has_budget:
                await self.check_budget(tenant)
            # Found (or made) and pinned in one step after the last await: no eviction between.
            pool = (self.pools.pool_for(profile, system) if request.session is None else
                    # What a session's turn waits for is its own pool's (same config as this one).
                    self.pools.pool_for(profile, configured[profile].profile.system_prompt, sessions=True))
        except BaseException:
            slot.release()
            raise
        unpin = self.pools.pin(pool)
        context = RequestContext(request_id=request_id, tenant=tenant.name, profile=profile, model=model,
                                 session=request.session, max_budget_usd=budget_usd)
        return Admission(request_id, tenant, request, pool, timeout_s, context, slot, files, model_switch,
                         effort_switch, unpin)

    async def check_budget(self, tenant: Tenant) -> None:
        state = await self.store.budget(tenant.name)
        fraction = 1.0 if tenant.budget_mode == "strict" else tenant.soft_stop_fraction
        for name, limit_usd, spent_usd in (("daily", tenant.daily_budget_usd, state.day_spent_usd),
                                           ("monthly", tenant.monthly_budget_usd, state.month_spent_usd)):
            if limit_usd > 0 and spent_usd >= limit_usd * fraction:
                raise BudgetExhausted(f"the {name} budget of ${limit_usd:g} is spent (spent ${spent_usd:.4f}"
                                      + ("" if fraction == 1 else f", stop at {fraction:g} of it") + ")")


def request_budget(tenant: Tenant, request: PromptRequest) -> float | None:
    """What the request may spend (None: no bound of its own): its ``max_budget_usd``, or its
    tenant's ``max_request_budget_usd``. One above the tenant's cap is refused, not lowered: the
    client asked for a bound it cannot have, and would otherwise be stopped earlier than it asked."""
    cap = tenant.max_request_budget_usd
    asked = request.max_budget_usd
    if asked is not None and cap > 0 and asked > cap:
        raise BadRequest(f"max_budget_usd {asked:g} is over this tenant's cap of {cap:g} per request")
    return asked if asked is not None else (cap or None)


def input_files(request: PromptRequest, bounds: FileBounds) -> tuple[InputFile, ...]:
    """The request's ``files`` decoded, each path checked and every bound kept, and its
    ``return_files`` patterns checked; else the typed error, before anything is written."""
    if len(request.return_files) > bounds.max_return_files:
        raise WorkspaceFilesTooLarge(f"{len(request.return_files)} return_files patterns, over the bound of "
                                     f"{bounds.max_return_files}")
    for pattern in request.return_files:
        check_pattern(pattern)
    if len(request.files) > bounds.max_input_files:
        raise WorkspaceFilesTooLarge(f"{len(request.files)} input files, over the bound of {bounds.max_input_files}")
    decoded: list[InputFile] = []
    total = 0
    for index, item in enumerate(request.files):
        check_path(item.path)
        # Checked on the encoded length first: a huge string is never decoded.
        if len(item.content_base64) > (bounds.max_input_file_bytes + 2) // 3 * 4:
            raise WorkspaceFilesTooLarge(f"files.{index}: over the bound of {bounds.max_input_file_bytes} bytes")
        try:
            data = base64.b64decode(item.content_base64, validate=True)
        except binascii.Error:
            raise BadRequest(f"invalid request: files.{index}.content_base64: not valid base64") from None
        if len(data) > bounds.max_input_file_bytes:
            raise WorkspaceFilesTooLarge(f"files.{index}: {len(data)} bytes, over the bound of "
                                         f"{bounds.max_input_file_bytes}")
        total += len(data)
        if total > bounds.max_input_bytes:
            raise WorkspaceFilesTooLarge(f"the input files are over {bounds.max_input_bytes} bytes together")
        decoded.append(InputFile(item.path, data))
    return tuple(decoded)
