"""A request's own budget held per model call at the gateway (issue 14), over real sockets as in
tests/test_gateway_budget.py: the test plays the worker's CLI. The tenant has no budget of its
own, so only the request's ``max_budget_usd`` (on its context, as admission puts it) holds the
calls; removing the hold lets every call below through."""

from __future__ import annotations

import asyncio

import orjson

from claudepool.errors import RequestBudgetExhausted
from claudepool.testing.fake_upstream import FakeUpstream
from tests.gateway_fixtures import make_stack
from tests.test_gateway import call, in_turn
from tests.test_gateway_budget import METERING, MakeBudgeted, body, budgeted, input_bound_usd

__all__ = ["budgeted", "make_stack"]


async def test_a_strict_request_budget_lowers_max_tokens_to_what_the_request_has_left(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("strict", 0)
    lease, url, credential = await in_turn(b.stack)
    lease.context.max_budget_usd = 0.1
    raw = body(text="[[reply:" + "x" * 12_000 + "]]")  # 3000 tokens of answer asked for: $0.15
    status, _, relayed = await call(url, credential, body=raw)
    assert status == 200
    expected = int((0.1 - input_bound_usd(raw)) / 50e-6)
    assert upstream.message_requests()[-1].json()["max_tokens"] in (expected, expected - 1)
    assert b'"stop_reason":"max_tokens"' in relayed
    await b.settled(1)
    assert lease.context.held_usd == 0.0  # given back at the call's end
    assert 0.06 < lease.context.call_cost_usd <= 0.1
    # What is left cannot hold the least output of another call: refused, the request answers 402.
    status, _, answer = await call(url, credential, body=body())
    assert status == 402 and orjson.loads(answer)["error"]["type"] == "billing_error"
    assert isinstance(lease.context.refusal, RequestBudgetExhausted)
    assert len(upstream.message_requests()) == 1
    lease.release()


async def test_a_soft_request_budget_refuses_the_call_whose_estimate_no_longer_fits(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("soft", 0)
    lease, url, credential = await in_turn(b.stack)
    lease.context.max_budget_usd = 0.01
    for _ in range(3):  # ~$0.0025 each (50 tokens of answer): three fit
        status, _, _ = await call(url, credential, body=body(text="[[tokens:50]]"))
        assert status == 200
        await b.settled(len(upstream.message_requests()))
    spent = lease.context.call_cost_usd
    while status == 200:
        status, _, _ = await call(url, credential, body=body(text="[[tokens:50]]"))
        await b.settled(len(upstream.message_requests()))
    assert status == 402 and isinstance(lease.context.refusal, RequestBudgetExhausted)
    assert spent <= lease.context.call_cost_usd < 0.01 + 0.003  # at most the last call over its estimate
    assert 3 <= len(upstream.message_requests()) <= 4
    lease.release()


async def test_two_calls_of_one_request_cannot_both_take_its_last_cents(
    budgeted: MakeBudgeted, upstream: FakeUpstream
) -> None:
    b = await budgeted("strict", 0)
    lease, url, credential = await in_turn(b.stack)
    raw = body(max_tokens=METERING.min_call_output_tokens, text="[[delay_s:0.3]] hi")
    one_call = input_bound_usd(raw) + METERING.min_call_output_tokens * 50e-6
    lease.context.max_budget_usd = 1.5 * one_call  # one call's bound fits, two do not
    results = await asyncio.gather(call(url, credential, body=raw), call(url, credential, body=raw))
    assert sorted(status for status, _, _ in results) == [200, 402]
    assert len(upstream.message_requests()) == 1
    lease.release()


async def test_without_a_request_budget_the_same_calls_go_out(budgeted: MakeBudgeted, upstream: FakeUpstream) -> None:
    # The negative control: no budget of the tenant's, none of the request's: nothing is held.
    b = await budgeted("strict", 0)
    lease, url, credential = await in_turn(b.stack)
    raw = body(max_tokens=METERING.min_call_output_tokens, text="[[delay_s:0.3]] hi")
    results = await asyncio.gather(call(url, credential, body=raw), call(url, credential, body=raw))
    assert [status for status, _, _ in results] == [200, 200]
    assert upstream.message_requests()[-1].json()["max_tokens"] == METERING.min_call_output_tokens
    lease.release()
