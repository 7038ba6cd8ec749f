"""Budgets held per model call at the gateway (issue 12, part C), over real sockets: workers on the
fake CLI, the loopback fake upstream as the provider, and the test playing the worker's CLI with
its own credential (as `tests.test_gateway` does). Each test holds a budget the call must respect
and reads what reached the upstream, so removing the hold, the clamp or a release fails it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from claudepool.daemon.metrics import TenantLabels
from claudepool.errors import BudgetExhausted
from claudepool.gateway.budget import CallBudget
from claudepool.gateway.call_usage import CallUsageMeter
from claudepool.gateway.settings import Caps
from claudepool.pool.profile import Profile
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.settings import MeteringSettings, PriceSettings, TenantSettings
from claudepool.tenancy.tenants import TenantRegistry
from claudepool.testing.fake_upstream import FakeUpstream
from tests.gateway_fixtures import TENANTS, MakeStack, Stack, make_stack
from tests.helpers import eventually, spend, until
from tests.test_gateway import KEY, call, in_turn

__all__ = ["make_stack"]

# $1 / $50 per million input / output tokens (output dear, so that it decides); cache writes at
# 1.25x, reads at 0.1x.
PRICES = PricingTable.of({"default": PriceSettings(input_per_mtok=1, output_per_mtok=50, cache_read_per_mtok=0.1,
                                                   cache_write_per_mtok=1.25)})
METERING = MeteringSettings(call_input_overhead_tokens=1000, min_call_output_tokens=1024)


def body(max_tokens: int | None = 100_000, text: str = "hello", **extra: Any) -> bytes:
    request: dict[str, Any] = {"model": "m", "stream": True, "messages": [{"role": "user", "content": text}], **extra}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    return orjson.dumps(request)


def input_bound_usd(raw: bytes) -> float:
    return (len(raw) + METERING.call_input_overhead_tokens) * 1.25 / 1e6


@dataclass
class Budgeted:
    stack: Stack
    store: MemoryStore
    meter: Meter
    budget: CallBudget

    async def settled(self, calls: int) -> None:
        """Until ``calls`` calls have ended at the gateway and their records reached the store."""
        await until(lambda: len(self.stack.recorder.calls) >= calls and self.meter.backlog == 0, 10)



MakeBudgeted = Callable[..., Any]


@pytest.fixture
def budgeted(make_stack: MakeStack, make_fake_profile: Callable[..., Profile],
             upstream: FakeUpstream) -> Iterator[MakeBudgeted]:
    async def make(mode: str, daily_usd: float, *, caps: Caps | None = None,
                   store: MemoryStore | None = None, pool: dict[str, Any] | None = None, **tenant: Any) -> Budgeted:
        store = store or MemoryStore()
        meter = Meter(store, RateLimiter(), PRICES, METERING)
        tenants = TenantRegistry.of({"acme": TenantSettings.model_validate(
            {"key": "k-acme", "daily_budget_usd": daily_usd, "budget_mode": mode, **tenant})})
        budget = CallBudget(store, tenants, PRICES, METERING, meter, reservation_ttl_s=60)
        stack = await make_stack(make_fake_profile(name="default"), upstream.base_url, key=KEY, caps=caps,
                                 gateway_options={"budget": budget}, **(pool or {}))
        assert stack.gateway is not None
        stack.gateway.hooks.add(CallUsageMeter(PRICES, stack.registry, TenantLabels(TENANTS, max_labels=10),
                                               meter=meter))
        stack.gateway.hooks.add(budget)
        flusher = asyncio.get_running_loop().create_task(meter.run())
        running.append(flusher)
        return Budgeted(stack, store, meter, budget)

    running: list[asyncio.Task[None]] = []
    yield make
    for task in running:
        task.cancel()


async def test_a_strict_budget_lowers_max_tokens_to_what_is_left_and_holds_the_spend(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("strict", 0.1)
    lease, url, credential = await in_turn(b.stack)
    raw = body(text="[[reply:" + "x" * 12_000 + "]]")  # 3000 tokens of answer asked for: $0.15
    status, _, relayed = await call(url, credential, body=raw)
    assert status == 200
    sent = upstream.message_requests()[-1].json()
    expected = int((0.1 - input_bound_usd(raw)) / 50e-6)
    assert sent["max_tokens"] in (expected, expected - 1)  # floor, and never a token over
    assert b'"stop_reason":"max_tokens"' in relayed  # the answer stopped where the budget ends
    await b.settled(1)
    state = await b.store.budget("acme")
    assert state.reserved_usd == 0.0
    assert 0.06 < state.day_spent_usd <= 0.1
    assert b.budget.clamped == 1
    lease.release()


async def test_a_soft_budget_lowers_nothing_and_may_overshoot(budgeted: MakeBudgeted, upstream: FakeUpstream) -> None:
    # The negative control of the test above: the same call under a soft budget goes out as it is.
    b = await budgeted("soft", 0.1)
    lease, url, credential = await in_turn(b.stack)
    status, _, relayed = await call(url, credential, body=body(text="[[reply:" + "x" * 12_000 + "]]"))
    assert status == 200
    assert upstream.message_requests()[-1].json()["max_tokens"] == 100_000
    assert b'"stop_reason":"end_turn"' in relayed
    await b.settled(1)
    assert (await b.store.budget("acme")).day_spent_usd > 0.15  # 3000 output tokens: half as much again as the budget
    lease.release()


async def test_a_call_that_cannot_get_its_least_output_is_refused_and_the_request_answers_402(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("strict", 0.05)  # the input bound and 1024 output tokens need ~$0.053
    lease, url, credential = await in_turn(b.stack)
    status, headers, answer = await call(url, credential, body=body())
    assert status == 402
    assert orjson.loads(answer)["error"]["type"] == "billing_error"
    assert headers["x-should-retry"] == "false"  # the CLI does not retry it: the turn ends
    assert upstream.message_requests() == []
    assert isinstance(lease.context.refusal, BudgetExhausted)
    assert b.stack.sample("claudepool_gateway_refusals_total", reason="budget") == 1
    assert (await b.store.budget("acme")).reserved_usd == 0.0
    lease.release()


async def test_a_thinking_budget_stays_below_the_lowered_max_tokens(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("strict", 0.2)
    lease, url, credential = await in_turn(b.stack)
    raw = body(thinking={"type": "enabled", "budget_tokens": 50_000})
    assert (await call(url, credential, body=raw))[0] == 200
    sent = upstream.message_requests()[-1].json()
    assert 1024 < sent["max_tokens"] < 100_000
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": sent["max_tokens"] - 1}
    lease.release()


async def test_a_strict_budget_refuses_a_call_it_cannot_bound(budgeted: MakeBudgeted, upstream: FakeUpstream) -> None:
    b = await budgeted("strict", 1.0)
    lease, url, credential = await in_turn(b.stack)
    for raw in (body(max_tokens=None), body(max_tokens=0), b"not json", body(max_tokens=True)):
        status, _, answer = await call(url, credential, body=raw)
        assert (status, orjson.loads(answer)["error"]["type"]) == (400, "invalid_request_error")
    assert upstream.message_requests() == []
    # A duplicate key is forwarded as the request the bound was computed from, never the raw bytes.
    twice = b'{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}],' \
            b'"max_tokens":2000}'
    assert (await call(url, credential, body=twice))[0] == 200
    assert upstream.message_requests()[-1].body.count(b'"max_tokens"') == 1
    lease.release()


async def test_a_soft_budget_stops_at_its_fraction(budgeted: MakeBudgeted) -> None:
    b = await budgeted("soft", 1.0, soft_stop_fraction=0.5)
    await spend(b.store, "acme", 0.49)
    lease, url, credential = await in_turn(b.stack)
    assert (await call(url, credential, body=body()))[0] == 200  # below half of $1: admitted
    await b.settled(1)
    await spend(b.store, "acme", 0.02)
    assert (await call(url, credential, body=body()))[0] == 402  # half is spent: no further call
    lease.release()


async def test_a_soft_budget_holds_the_mean_of_the_profiles_recent_calls(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("soft", 10.0)
    lease, url, credential = await in_turn(b.stack)
    for reply in ("a" * 400, "b" * 4000):
        assert (await call(url, credential, body=body(text=f"[[reply:{reply}]]")))[0] == 200
    await b.settled(2)
    ledger = await b.store.ledger("acme")
    mean = sum(r.cost_usd for r in ledger) / 2
    assert b.budget.estimates.estimate("default") == pytest.approx(mean)
    stalled = asyncio.create_task(call(url, credential, body=body(text="[[stall]]")))
    await until(lambda: len(upstream.message_requests()) == 3)
    assert (await b.store.budget("acme")).reserved_usd == pytest.approx(mean)  # what the call in flight holds
    stalled.cancel()
    await b.settled(3)
    assert (await b.store.budget("acme")).reserved_usd == 0.0  # the cut call's record settled it
    lease.release()


async def test_a_call_the_account_caps_refuse_gives_its_budget_back(budgeted: MakeBudgeted) -> None:
    b = await budgeted("soft", 1.0, caps=Caps(requests_per_minute=1))
    lease, url, credential = await in_turn(b.stack)
    assert (await call(url, credential, body=body()))[0] == 200
    assert (await call(url, credential, body=body()))[0] == 429  # held, then refused by the cap
    await b.settled(1)
    assert (await b.store.budget("acme")).reserved_usd == 0.0
    lease.release()


async def test_a_hold_cut_off_mid_reserve_gives_its_budget_back(budgeted: MakeBudgeted) -> None:
    store = MemoryStore()
    made = asyncio.Event()
    real_reserve = store.reserve

    async def reserve_then_lose_the_reply(*args: Any, **kwargs: Any) -> float:
        await real_reserve(*args, **kwargs)  # the store made it, as a remote store would ...
        made.set()
        await asyncio.Event().wait()  # ... but its reply never comes
        raise AssertionError

    store.reserve = reserve_then_lose_the_reply  # type: ignore[method-assign]  # a fault in a real store
    b = await budgeted("strict", 1.0, store=store)
    lease, url, credential = await in_turn(b.stack)
    worker_call = asyncio.create_task(call(url, credential, body=body()))
    await asyncio.wait_for(made.wait(), 5)
    assert (await store.budget("acme")).reserved_usd > 0
    worker_call.cancel()  # the worker goes away: the gateway's handler is cancelled mid-reserve

    async def given_back() -> bool:
        return b.meter.backlog == 0 and (await store.budget("acme")).reserved_usd == 0

    await eventually(given_back, 10)
    lease.release()


async def test_a_call_waits_for_what_calls_in_flight_hold_rather_than_refusing(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    # Each call's bound is over the budget: the first holds it all.
    b = await budgeted("strict", 0.2, pool={"max_workers": 2, "min_idle": 2})
    first, url_1, credential_1 = await in_turn(b.stack)
    holding = asyncio.create_task(call(url_1, credential_1, body=body(text="[[stall]]")))
    await until(lambda: len(upstream.message_requests()) == 1)
    assert (await b.store.budget("acme")).reserved_usd == pytest.approx(0.2)
    second, url_2, credential_2 = await in_turn(b.stack, request_id="req-2")
    waiting = asyncio.create_task(call(url_2, credential_2, body=body()))
    await until(lambda: b.budget.waits > 0)
    assert not waiting.done() and len(upstream.message_requests()) == 1
    holding.cancel()  # the first call ends: its record settles what it spent, the rest is free
    status, _, _ = await waiting
    assert status == 200
    assert len(upstream.message_requests()) == 2
    first.release()
    second.release()
