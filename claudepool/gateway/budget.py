"""Budgets held per model call, at the gateway, before the call is forwarded.

A turn can make any number of model calls (a tool loop), so no guess made before a turn bounds
what it spends. The gateway sees each call's body before the provider does, and that body bounds
the call's cost: every input token is at least one byte of it (plus the few hundred tokens the
provider adds for tool use, ``metering.call_input_overhead_tokens``), each priced as the dearest
input (a 1-hour cache write when the body asks for one, else the dearer of input and 5-minute
cache write), and the output is at most ``max_tokens`` (thinking included). Each call reserves
budget under an id of its own and its ledger record settles that reservation with the exact cost.

Two policies, per tenant (``budget_mode``):

* ``strict``: the call reserves its bound. When the budget cannot hold it all, it holds what is
  left and the call's ``max_tokens`` is lowered to fit; when not even
  ``metering.min_call_output_tokens`` fit, the call is refused. Every reservation is atomic in the
  store and every call costs at most what it holds, so spend never exceeds the budget, whatever
  the concurrency, on every daemon sharing the store. The price is on the input side: the byte
  bound is about four times a call's real input for text, so the last bound's worth of a budget
  (a few cents for a Claude Code call on Sonnet prices) is never spent.
* ``soft`` (default): the call reserves an estimate, the mean cost of the profile's last
  ``metering.soft_estimate_calls`` calls (a quarter of the input bound before any), within
  ``soft_stop_fraction`` of the budget, and is refused once spend and reservations reach it.
  Nothing is lowered. A call admitted with spend S and reservations R below f·B costs at most its
  bound, so when k calls of the tenant run at once, spend stays under f·B + k·c_max, where c_max is
  the dearest call's bound (its input bound plus ``max_tokens`` at the output price); in practice
  calls cost close to their estimate and the overshoot is about k times the estimate's error.

A call that does not fit only because calls in flight hold the rest (spend alone leaves room) waits
for them to settle, up to ``metering.budget_wait_s``: concurrency slows a tenant near its budget
down, it does not refuse it. A refused call is answered to the CLI as 402 ``billing_error``
(`CallOverBudget`), which it does not retry: the turn ends, and the request's answer becomes
`BudgetExhausted` (the refusal is kept on the request's context). A store that does not answer
fails the call closed (`BudgetStoreDown`).

A request's own budget (``max_budget_usd``, or its tenant's ``max_request_budget_usd``) is held
the same way, on the request's context rather than in the store (one request runs on one daemon):
the call reserves as the tenant's ``budget_mode`` says (strict: its bound, ``max_tokens`` lowered
to fit what the request has left; soft: the estimate), and it goes out only if what the request's
calls cost so far, plus what its calls in flight hold, plus this reservation fit. Else the call is
refused as above and the request is answered `RequestBudgetExhausted` (402). A request budget
holds every call, whether or not the tenant has a budget of its own. The CLI's own
``--max-budget-usd`` counts per process, across every tenant a warm worker serves, so it cannot
bound one request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from claudepool.errors import (
    BudgetExhausted,
    BudgetStoreDown,
    CallOverBudget,
    CallUnpriceable,
    RequestBudgetExhausted,
    StoreError,
)
from claudepool.gateway.calls import Call
from claudepool.store.base import Store
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.settings import MeteringSettings
from claudepool.tenancy.tenants import Tenant, TenantRegistry

_BILLED_PATH = "/v1/messages"
# The provider's least thinking budget: a call that thinks with a budget needs max_tokens above it.
_MIN_THINKING_TOKENS = 1024


@dataclass(frozen=True)
class CallBound:
    """The most a call can cost: its input side, and each output token up to ``max_tokens``."""

    input_usd: float
    output_usd_per_token: float
    max_tokens: int
    thinking_budget: int | None = None

    @property
    def worst_usd(self) -> float:
        return self.input_usd + self.max_tokens * self.output_usd_per_token

    def cost_with(self, max_tokens: int) -> float:
        return self.input_usd + max_tokens * self.output_usd_per_token

    def max_tokens_within(self, usd: float) -> int:
        """The most output tokens whose worst case fits in ``usd``."""
        if self.output_usd_per_token <= 0:
            return self.max_tokens
        tokens = min(self.max_tokens, math.floor((usd - self.input_usd) / self.output_usd_per_token))
        while tokens > 0 and self.cost_with(tokens) > usd:  # float rounding: never a token over
            tokens -= 1
        return tokens


def bound_of(request: dict[str, Any], body_bytes: int, pricing: PricingTable, *, overhead_tokens: int,
             one_hour_writes: bool) -> CallBound | None:
    """The bound of a Messages request, or None when it names no positive integer ``max_tokens``."""
    max_tokens = request.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        return None
    model = request.get("model")
    price = pricing.price(model if isinstance(model, str) else "")
    dearest_per_mtok = max(price.input_per_mtok, price.cache_write_per_mtok,
                           price.cache_write_1h if one_hour_writes else 0.0)
    thinking = request.get("thinking")
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    return CallBound(input_usd=(body_bytes + overhead_tokens) * dearest_per_mtok / 1_000_000,
                     output_usd_per_token=price.output_per_mtok / 1_000_000, max_tokens=max_tokens,
                     thinking_budget=budget if isinstance(budget, int) and not isinstance(budget, bool) else None)


class CallEstimates:
    """The mean cost of each profile's recent calls: what a soft budget reserves for the next one.

    >>> estimates = CallEstimates(calls=2)
    >>> for cost in (1.0, 2.0, 4.0):
    ...     estimates.observe("default", cost)
    >>> estimates.estimate("default"), estimates.estimate("other")
    (3.0, None)
    """

    def __init__(self, calls: int) -> None:
        self._calls = calls
        self._recent: dict[str, deque[float]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, profile: str, cost_usd: float) -> None:
        recent = self._recent.setdefault(profile, deque())
        recent.append(cost_usd)
        if len(recent) > self._calls:
            recent.popleft()
        self._sums[profile] = math.fsum(recent)  # at most `calls` terms: no drift from running sums

    def estimate(self, profile: str) -> float | None:
        recent = self._recent.get(profile)
        return self._sums[profile] / len(recent) if recent else None


class CallBudget:
    """Holds each billed call's budget before it is forwarded (`hold`); a `CallHook` that learns the
    soft estimates from the calls' measured costs. Install it after the hook that prices calls."""

    def __init__(self, store: Store, tenants: TenantRegistry, pricing: PricingTable, metering: MeteringSettings,
                 meter: Meter, *, reservation_ttl_s: float) -> None:
        self._store = store
        self._tenants = tenants
        self._pricing = pricing
        self._metering = metering
        self._meter = meter
        self._ttl_s = reservation_ttl_s
        self.estimates = CallEstimates(metering.soft_estimate_calls)
        # Calls whose max_tokens was lowered to fit a strict budget, and waits for calls in flight.
        self.clamped = 0
        self.waits = 0

    async def hold(self, call: Call, body: bytes) -> bytes:
        """Reserve the call's budget and return the body to forward: ``body`` itself, or the same
        request with ``max_tokens`` lowered to fit. Raises `CallOverBudget`, `CallUnpriceable` or
        `BudgetStoreDown`, holding nothing; the refusal is kept on the request's context."""
        ctx = call.attribution.context
        tenant = self._tenants.get(call.attribution.tenant)
        if ctx is None or tenant is None or call.path != _BILLED_PATH:
            return body
        if not tenant.has_budget and ctx.max_budget_usd is None:
            return body
        try:
            body = await self._hold(call, ctx, tenant, body)
        except BudgetExhausted as exc:
            ctx.refusal = exc
            raise CallOverBudget(str(exc)) from None
        except StoreError as exc:
            ctx.refusal = exc
            raise BudgetStoreDown(f"the budget store did not answer: {exc}") from None
        except CallUnpriceable as exc:
            ctx.refusal = BudgetExhausted(f"a model call gave no bound of its cost: {exc}")
            raise
        ctx.refusal = None  # a later call got through: an earlier refusal did not end the turn
        return body

    def release(self, call: Call) -> None:
        """Give back what the call holds: it was refused after its hold (the account's caps)."""
        self._release_request_hold(call)
        if call.reservation_id is not None:
            self._meter.release(call.attribution.tenant, call.reservation_id)
            call.reservation_id = None

    async def _hold(self, call: Call, ctx: RequestContext, tenant: Tenant, body: bytes) -> bytes:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = None
        bound = bound_of(request, len(body), self._pricing, overhead_tokens=self._metering.call_input_overhead_tokens,
                         one_hour_writes=b'"1h"' in body) if isinstance(request, dict) else None
        strict = tenant.budget_mode == "strict"
        if bound is None:
            if strict or ctx.max_budget_usd is not None:
                raise CallUnpriceable("the request is not a JSON object with a positive integer max_tokens")
            return body  # the provider refuses it, at no cost; a soft budget holds nothing for it
        rid = f"{ctx.request_id}:{call.id}"
        fraction = 1.0 if strict else tenant.soft_stop_fraction
        if strict:
            least_tokens = self._metering.min_call_output_tokens
            if bound.thinking_budget is not None:
                least_tokens = max(least_tokens, _MIN_THINKING_TOKENS + 1)
            amount, least = bound.worst_usd, bound.cost_with(min(least_tokens, bound.max_tokens))
        else:
            estimate = self.estimates.estimate(ctx.profile)
            amount, least = (bound.input_usd / 4 if estimate is None else estimate), 0.0
        wanted = amount
        if ctx.max_budget_usd is not None:
            amount = self._hold_request(call, ctx, amount, least, strict)
        granted = amount
        if tenant.has_budget:
            try:
                granted = await self._reserve(tenant, rid, amount, least, fraction)
            except BaseException:
                self._release_request_hold(call)
                raise
            call.reservation_id = rid
            self._shrink_request_hold(call, ctx, granted)
        if not strict or granted >= wanted:
            return body if body.count(b'"max_tokens"') == 1 else orjson.dumps(request)
        return self._lowered(request, bound, bound.max_tokens_within(granted))

    def _hold_request(self, call: Call, ctx: RequestContext, amount: float, least: float, strict: bool) -> float:
        """Hold ``amount`` (strict: at least ``least``) of what the request has left, at once (no
        await: two calls of one request cannot both take the last of it); raises
        `RequestBudgetExhausted`."""
        assert ctx.max_budget_usd is not None
        left = ctx.max_budget_usd - ctx.call_cost_usd - ctx.held_usd
        if left < amount and not (strict and left >= least and left > 0):
            raise RequestBudgetExhausted(
                f"this request's budget of ${ctx.max_budget_usd:g} cannot hold its next model call (spent "
                f"${ctx.call_cost_usd:.4f}, held by calls in flight ${ctx.held_usd:.4f}, the call needs "
                f"${amount if not strict else least:.4f})")
        held = min(amount, left)
        ctx.held_usd += held
        call.request_held_usd = held
        return held

    @staticmethod
    def _shrink_request_hold(call: Call, ctx: RequestContext, granted: float) -> None:
        """The tenant's budget granted less than the request held: hold only that."""
        if call.request_held_usd > granted:
            ctx.held_usd -= call.request_held_usd - granted
            call.request_held_usd = granted

    @staticmethod
    def _release_request_hold(call: Call) -> None:
        ctx = call.attribution.context
        if ctx is not None and call.request_held_usd:
            ctx.held_usd = max(0.0, ctx.held_usd - call.request_held_usd)
            call.request_held_usd = 0.0

    async def _reserve(self, tenant: Tenant, rid: str, amount: float, least: float, fraction: float) -> float:
        """Reserve; while only what calls in flight hold is in the way (spend alone leaves room),
        wait for them to settle, up to ``metering.budget_wait_s``."""
        deadline = time.monotonic() + self._metering.budget_wait_s
        pause_s = 0.02
        while True:
            try:
                return await self._store.reserve(
                    tenant.name, rid, amount, daily_limit_usd=tenant.daily_budget_usd * fraction,
                    monthly_limit_usd=tenant.monthly_budget_usd * fraction, ttl_s=self._ttl_s, min_usd=least)
            except BudgetExhausted:
                if time.monotonic() + pause_s > deadline or not await self._only_held(tenant, least, fraction):
                    raise
            except BaseException:
                # Cancelled or failed mid-call, the reservation may exist: give it back (idempotent).
                self._meter.release(tenant.name, rid)
                raise
            self.waits += 1
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, 0.5)

    async def _only_held(self, tenant: Tenant, least: float, fraction: float) -> bool:
        """Whether spend alone leaves ``least`` (more than nothing) under every budget: the rest is
        held by calls in flight, which give back what they do not spend."""
        state = await self._store.budget(tenant.name)
        return all(limit * fraction - spent >= least and limit * fraction - spent > 0
                   for limit, spent in ((tenant.daily_budget_usd, state.day_spent_usd),
                                        (tenant.monthly_budget_usd, state.month_spent_usd)) if limit > 0)

    def _lowered(self, request: dict[str, Any], bound: CallBound, max_tokens: int) -> bytes:
        """The request with ``max_tokens`` lowered (and a thinking budget kept below it)."""
        self.clamped += 1
        request["max_tokens"] = max_tokens
        if bound.thinking_budget is not None and bound.thinking_budget >= max_tokens:
            request["thinking"] = {**request["thinking"], "budget_tokens": max_tokens - 1}
        return orjson.dumps(request)

    # -- CallHook: learn what calls of each profile cost ------------------------------------------

    def call_started(self, call: Call, body: bytes) -> None:
        pass

    def response_chunk(self, call: Call, chunk: bytes) -> None:
        pass

    def call_finished(self, call: Call) -> None:
        # Its cost is on the request's context by now (the hook that prices calls runs first).
        self._release_request_hold(call)
        if call.cost_usd is not None and call.status == 200 and call.attribution.context is not None:
            self.estimates.observe(call.attribution.context.profile, call.cost_usd)
