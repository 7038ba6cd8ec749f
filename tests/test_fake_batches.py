"""The fake upstream's Message Batches API (issue 15), driven by the official `anthropic` SDK: the
batch's life (in progress, ended, canceled), its results of every kind, pagination, refusals, and
the billing of what it answered in the fake's Admin API (service tier batch, half the list price)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from anthropic.types.messages import MessageBatch
from anthropic.types.messages.batch_create_params import Request

from claudepool.tenancy.budgets import Price, PricingTable
from claudepool.testing.fake_admin_api import BATCH_PRICE_FACTOR, COST_PATH, USAGE_PATH
from claudepool.testing.fake_upstream import FakeUpstream
from tests.helpers import eventually, running

ADMIN = "sk-ant-admin01-fake-org"
KEY = "sk-ant-api03-batches"
PRICES = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75, 6.0)})


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running(FakeUpstream(admin_key=ADMIN, pricing=PRICES)) as server:
        yield server


@pytest.fixture
async def sdk(fake: FakeUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=KEY, max_retries=0, timeout=10) as client:
        yield client


def params(prompt: str, model: str = "claude-batch-model") -> MessageCreateParamsNonStreaming:
    return {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": prompt}]}


def req(custom_id: str, prompt: str) -> Request:
    return {"custom_id": custom_id, "params": params(prompt)}


async def ended(sdk: anthropic.AsyncAnthropic, batch_id: str) -> MessageBatch:
    latest: list[MessageBatch] = []

    async def check() -> bool:
        latest[:] = [await sdk.messages.batches.retrieve(batch_id)]
        return latest[0].processing_status == "ended"

    await eventually(check, timeout_s=10)
    return latest[0]


async def test_a_batch_is_in_progress_then_ends_with_a_result_of_each_kind(
    fake: FakeUpstream, sdk: anthropic.AsyncAnthropic
) -> None:
    batch = await sdk.messages.batches.create(requests=[
        req("ok-1", "[[reply:batched hello]]"),
        req("late", "[[expired]] too slow"),
        req("bad", "[[batch_error]]"),
        req("busy", "[[status:529]]"),
    ])
    assert (batch.type, batch.processing_status, batch.results_url, batch.ended_at) == (
        "message_batch", "in_progress", None, None)
    assert batch.id.startswith("msgbatch_")
    assert batch.request_counts.model_dump() == {"processing": 4, "succeeded": 0, "errored": 0, "canceled": 0,
                                                 "expired": 0}
    assert batch.expires_at - batch.created_at == timedelta(hours=24)
    done = await ended(sdk, batch.id)
    assert done.request_counts.model_dump() == {"processing": 0, "succeeded": 1, "errored": 2, "canceled": 0,
                                                "expired": 1}
    assert done.results_url == f"{fake.base_url}/v1/messages/batches/{batch.id}/results"
    assert done.ended_at is not None and done.ended_at >= done.created_at
    results = [r async for r in await sdk.messages.batches.results(batch.id)]
    # Not in the requests' order (the provider does not promise it): matched by custom_id.
    assert [r.custom_id for r in results] == ["busy", "bad", "late", "ok-1"]
    by_id = {r.custom_id: r.result for r in results}
    ok = by_id["ok-1"]
    assert ok.type == "succeeded"
    assert [b.model_dump() for b in ok.message.content] == [{"type": "text", "text": "batched hello",
                                                             "citations": None}]
    assert ok.message.model == "claude-batch-model" and ok.message.stop_reason == "end_turn"
    assert by_id["late"].type == "expired"
    bad, busy = by_id["bad"], by_id["busy"]
    assert bad.type == "errored" and bad.error.error.type == "invalid_request_error"
    assert busy.type == "errored" and busy.error.error.type == "overloaded_error"
    # The same request to /v1/messages answers the same message: one code path.
    direct = await sdk.messages.create(**params("[[reply:batched hello]]"))
    assert (direct.content, direct.stop_reason, direct.usage) == (ok.message.content, ok.message.stop_reason,
                                                                  ok.message.usage)
    # Every call of the batch went out with the key, and is in the fake's log.
    calls = [r for r in fake.requests if r.path.startswith("/v1/messages/batches")]
    assert calls and all(r.status == 200 and (r.contains(f"Bearer {KEY}") or r.headers.get("x-api-key") == KEY)
                         for r in calls)


async def test_a_canceled_batch_is_canceling_then_ends_with_its_unfinished_requests_canceled(
    fake: FakeUpstream, sdk: anthropic.AsyncAnthropic
) -> None:
    fake.batch_delay_s = 600.0  # nothing finishes before the cancel
    batch = await sdk.messages.batches.create(requests=[
        req(f"r{i}", f"[[reply:{i}]]") for i in range(3)])
    with pytest.raises(anthropic.BadRequestError, match="has not ended"):
        await sdk.messages.batches.delete(batch.id)
    canceling = await sdk.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    done = await ended(sdk, batch.id)
    assert done.request_counts.canceled == 3 and done.request_counts.succeeded == 0
    assert {r.result.type async for r in await sdk.messages.batches.results(batch.id)} == {"canceled"}
    assert (await sdk.messages.batches.cancel(batch.id)).processing_status == "ended"  # no change now
    deleted = await sdk.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.batches.retrieve(batch.id)
    assert [r for r in fake.billable_requests() if r.usage] == []  # a canceled request is not billed


async def test_a_cancel_keeps_what_had_finished_before_it(fake: FakeUpstream, sdk: anthropic.AsyncAnthropic) -> None:
    clock = [1_000_000.0]
    fake.batches.clock = lambda: clock[0]
    fake.batch_delay_s = 4.0  # four requests: one finishes each second
    batch = await sdk.messages.batches.create(requests=[
        req(f"r{i}", f"[[reply:{i}]]") for i in range(4)])
    clock[0] += 2.5
    assert (await sdk.messages.batches.retrieve(batch.id)).request_counts.processing == 4  # counted at the end
    await sdk.messages.batches.cancel(batch.id)
    clock[0] += 1.0
    results = {r.custom_id: r.result.type async for r in await sdk.messages.batches.results(batch.id)}
    assert results == {"r0": "succeeded", "r1": "succeeded", "r2": "canceled", "r3": "canceled"}


async def test_the_list_pages_newest_first_after_and_before_a_cursor(sdk: anthropic.AsyncAnthropic) -> None:
    ids = [(await sdk.messages.batches.create(requests=[
        req("only", f"batch {i}")])).id for i in range(5)]
    newest_first = ids[::-1]
    first = await sdk.messages.batches.list(limit=2)
    assert ([b.id for b in first.data], first.has_more, first.first_id, first.last_id) == (
        newest_first[:2], True, newest_first[0], newest_first[1])
    assert [b.id async for b in await sdk.messages.batches.list(limit=2)] == newest_first  # every page
    after = await sdk.messages.batches.list(limit=10, after_id=newest_first[2])
    assert ([b.id for b in after.data], after.has_more) == (newest_first[3:], False)
    before = await sdk.messages.batches.list(limit=2, before_id=newest_first[3])
    assert ([b.id for b in before.data], before.has_more) == (newest_first[1:3], True)
    assert [b.id for b in (await sdk.messages.batches.list()).data] == newest_first  # 20 by default
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_id": "msgbatch_nope"}):
        with pytest.raises(anthropic.BadRequestError):
            await sdk.messages.batches.list(**bad)


@pytest.mark.parametrize(("requests", "problem"), [
    ([], "requests: expected a non-empty list"),
    ([req("same", "a"), req("same", "b")],
     "'same' is used by another request"),
    ([req("has space", "a")], "custom_id: expected 1-64"),
    ([{"custom_id": "x" * 65, "params": params("a")}], "custom_id: expected 1-64"),
    ([{"custom_id": "a", "params": {"model": "m", "messages": []}}], "max_tokens"),
    ([{"custom_id": "a", "params": {**params("a"), "stream": True}}], "may not stream"),
])
async def test_a_body_that_is_not_a_batch_is_refused_and_makes_none(
    fake: FakeUpstream, sdk: anthropic.AsyncAnthropic, requests: list[Any], problem: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        await sdk.messages.batches.create(requests=requests)
    assert refused.value.status_code == 400 and problem in refused.value.message
    assert isinstance(refused.value.body, dict) and refused.value.body["error"]["type"] == "invalid_request_error"
    assert fake.batches.batches == {}


async def test_a_call_without_a_credential_and_results_before_the_end_are_refused(fake: FakeUpstream) -> None:
    fake.batch_delay_s = 600.0
    body = orjson.dumps({"requests": [req("a", "a")]})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{fake.base_url}/v1/messages/batches", data=body) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["type"] == "authentication_error"
        async with http.post(f"{fake.base_url}/v1/messages/batches", data=body,
                             headers={"authorization": "Bearer some-token"}) as resp:
            assert resp.status == 200
            batch_id = (await resp.json())["id"]
        async with http.get(f"{fake.base_url}/v1/messages/batches/{batch_id}/results",
                            headers={"x-api-key": KEY}) as resp:
            assert resp.status == 400 and "has not ended" in (await resp.json())["error"]["message"]
        async with http.get(f"{fake.base_url}/v1/messages/batches/msgbatch_unknown", headers={"x-api-key": KEY}) as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"


async def report(fake: FakeUpstream, path: str, group_by: str) -> list[dict[str, Any]]:
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    query = [("starting_at", day.strftime("%Y-%m-%dT%H:%M:%SZ")), ("group_by[]", group_by)]
    async with aiohttp.ClientSession() as http, http.get(f"{fake.base_url}{path}", params=query,
                                                         headers={"x-api-key": ADMIN}) as resp:
        assert resp.status == 200
        rows: list[dict[str, Any]] = (await resp.json())["data"][-1]["results"]
        return rows


async def test_what_a_batch_answered_is_billed_as_batch_tier_at_half_the_list_price(
    fake: FakeUpstream, sdk: anthropic.AsyncAnthropic
) -> None:
    await sdk.messages.create(**params("[[tokens:40]] interactive"))
    batch = await sdk.messages.batches.create(requests=[
        req("a", "[[tokens:40]] batched"),
        req("gone", "[[expired]]"), req("bad", "[[batch_error]]")])
    assert not [r for r in fake.billable_requests() if r.service_tier == "batch" and r.usage]  # not before it ends
    await ended(sdk, batch.id)
    (standard,) = [r for r in fake.billable_requests() if r.service_tier == "standard"]
    (billed,) = [r for r in fake.billable_requests() if r.service_tier == "batch" and r.usage]  # expired, errored: not
    assert standard.usage is not None and billed.usage is not None
    tiers = {row["service_tier"]: row for row in await report(fake, USAGE_PATH, "service_tier")}
    assert set(tiers) == {"standard", "batch"}
    assert tiers["batch"]["output_tokens"] == billed.usage["output_tokens"] == standard.usage["output_tokens"] > 1
    assert tiers["batch"]["uncached_input_tokens"] == billed.usage["input_tokens"]
    cost = await report(fake, COST_PATH, "description")
    usd = {tier: sum(float(r["amount"]) for r in cost if r["service_tier"] == tier) / 100
           for tier in ("standard", "batch")}
    list_price = PRICES.cost("claude-batch-model", input_tokens=billed.usage["input_tokens"],
                             output_tokens=billed.usage["output_tokens"])
    assert usd["batch"] == pytest.approx(BATCH_PRICE_FACTOR * list_price) == pytest.approx(list_price / 2)
    assert usd["standard"] == pytest.approx(PRICES.cost("claude-batch-model", input_tokens=standard.usage[
        "input_tokens"], output_tokens=standard.usage["output_tokens"]))
    assert all(r["description"].endswith("(Batch)") for r in cost if r["service_tier"] == "batch")
