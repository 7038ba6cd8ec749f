"""The meter billing model calls as the gateway measured them (issue 12, part B), with a real memory
store: one ledger record per call, the request counted once, the CLI's figure a cross-check only,
and a turn result that arrives while a call is still being relayed waiting for it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

from claudepool.pool.lease import Lease
from claudepool.pool.worker import TurnResult
from claudepool.protocol.cli_events import Usage
from claudepool.store.base import UsageRecord, Window
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.settings import MeteringSettings, default_prices
from tests.helpers import until


def meter_and_store() -> tuple[Meter, MemoryStore]:
    store = MemoryStore()
    return Meter(store, RateLimiter(), PricingTable.of(default_prices()), MeteringSettings()), store


def context() -> RequestContext:
    return RequestContext(request_id="req-1", tenant="acme", profile="default", model="m")


def call(n: int, *, output_tokens: int, cost_usd: float) -> UsageRecord:
    return UsageRecord(record_id=f"req-1:gwc_{n}", request_id="req-1", tenant="acme", profile="default", model="m",
                       outcome="ok", at=time.time(), input_tokens=10, output_tokens=output_tokens, cost_usd=cost_usd,
                       kind="call", call_id=f"gwc_{n}")


def turn(output_tokens: int, cost_usd: float, input_tokens: int = 20) -> TurnResult:
    return TurnResult(text="ok", is_error=False, subtype="success", terminal_reason=None, stop_reason="end_turn",
                      api_error_status=None, usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
                      cost_usd=cost_usd, session_id="s", duration_ms=1.0, context_tokens=20)


def lease_of(ctx: RequestContext) -> Lease:
    return cast(Lease, SimpleNamespace(context=ctx, turns_started=1))


async def settled(meter: Meter, store: MemoryStore, records: int) -> list[UsageRecord]:
    runner = asyncio.create_task(meter.run())
    try:
        await until(lambda: meter.backlog == 0)
        ledger = await store.ledger("acme")
        assert len(ledger) == records
        return ledger
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_tool_loops_calls_are_billed_each_and_the_request_counted_once() -> None:
    meter, store = meter_and_store()
    ctx = context()
    for n in (1, 2):
        meter.call_started(ctx)
        meter.call_finished(ctx, call(n, output_tokens=5, cost_usd=0.01))
    meter.on_turn_result(lease_of(ctx), turn(output_tokens=10, cost_usd=0.5))  # the CLI's own figure
    meter.on_lease_done(lease_of(ctx))
    ledger = await settled(meter, store, 2)
    assert [(r.kind, r.requests) for r in ledger] == [("call", 1), ("call", 0)]
    totals = (await store.usage(Window.current("day"), ["acme"]))["acme"]["m"]
    assert (totals.requests, totals.output_tokens, round(totals.cost_usd, 9)) == (1, 10, 0.02)
    assert ctx.billed_cost_usd(0.5) == 0.02 and meter.call_mismatches == 0


async def test_a_turn_result_while_a_call_is_relayed_waits_for_it_and_nothing_is_billed_twice() -> None:
    meter, store = meter_and_store()
    ctx = context()
    meter.call_started(ctx)
    meter.on_turn_result(lease_of(ctx), turn(output_tokens=5, cost_usd=0.5, input_tokens=10))  # before it ended
    meter.on_lease_done(lease_of(ctx))
    assert not ctx.finished  # waits for the call
    meter.call_finished(ctx, call(1, output_tokens=5, cost_usd=0.01))
    assert ctx.finished
    ledger = await settled(meter, store, 1)
    assert [r.kind for r in ledger] == ["call"]  # not also the CLI's turn record
    assert meter.call_mismatches == 0  # compared with the call once it was measured, not before


async def test_a_turn_the_gateway_saw_no_call_of_is_billed_with_the_clis_figure() -> None:
    meter, store = meter_and_store()
    ctx = context()
    meter.on_turn_result(lease_of(ctx), turn(output_tokens=7, cost_usd=0.03))
    meter.on_lease_done(lease_of(ctx))
    ledger = await settled(meter, store, 1)
    assert [(r.kind, r.requests, r.cost_usd) for r in ledger] == [("turn", 1, 0.03)]


async def test_the_clis_disagreement_is_counted_and_the_calls_reservation_is_settled() -> None:
    meter, store = meter_and_store()
    await store.reserve("acme", "res-1", 1.0, daily_limit_usd=10.0, monthly_limit_usd=0.0, ttl_s=60)
    ctx = context()
    meter.call_started(ctx)
    meter.call_finished(ctx, replace(call(1, output_tokens=5, cost_usd=0.01), reservation_id="res-1"))
    meter.on_turn_result(lease_of(ctx), turn(output_tokens=99, cost_usd=0.5))
    meter.on_lease_done(lease_of(ctx))
    await settled(meter, store, 1)
    assert meter.call_mismatches == 1
    budget = await store.budget("acme")
    assert (budget.reserved_usd, round(budget.day_spent_usd, 9)) == (0.0, 0.01)
