"""The Message Batches client (issue 15, `claudepool.gateway.batches`) against the fake upstream and
against servers that answer wrong; the batch price multiplier; and batch calls reconciled with the
provider's reports at 0.5x (at 1x they are a difference: the negative control)."""

from __future__ import annotations

import doctest
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pydantic
import pytest
from aiohttp import web

from claudepool.errors import BatchApiError, BatchWaitTimeout, UpstreamUnreachable
from claudepool.gateway.batches import BatchApi, BatchResult
from claudepool.gateway.settings import Upstream, UpstreamSettings
from claudepool.reconcile.command import Plan, reconcile
from claudepool.reconcile.compare import Tolerance
from claudepool.store.base import UsageRecord
from claudepool.tenancy import budgets
from claudepool.tenancy.budgets import Price, PricingTable
from claudepool.tenancy.settings import PriceSettings
from claudepool.testing.fake_upstream import FakeUpstream
from tests.helpers import closed_port_url, running

KEY = "sk-ant-api03-batch-client"
ADMIN = "sk-ant-admin01-batch-org"
LIST = Price(3.0, 15.0, 0.3, 3.75)  # batch_multiplier: 0.5, the default
PROVIDER_PRICES = PricingTable({"default": LIST})


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running(FakeUpstream(admin_key=ADMIN, pricing=PROVIDER_PRICES)) as server:
        yield server


def upstream_at(base_url: str) -> Upstream:
    return UpstreamSettings(base_url=base_url, api_key=KEY).resolve("default", {})


def params(prompt: str, max_tokens: int = 100) -> dict[str, Any]:
    return {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}


async def quick_wait(api: BatchApi, batch_id: str) -> None:
    await api.wait_ended(batch_id, first_poll_s=0.01, max_poll_s=0.05, timeout_s=10)


async def test_a_batch_is_created_waited_for_and_read_with_the_upstreams_credential(fake: FakeUpstream) -> None:
    async with BatchApi(upstream_at(fake.base_url)) as api:
        batch = await api.create([("ok", params("[[reply:from the batch]]")), ("late", params("[[expired]]")),
                                  ("bad", params("[[batch_error]]"))])
        assert (batch.processing_status, batch.request_counts.processing, batch.results_url) == ("in_progress", 3,
                                                                                                 None)
        await quick_wait(api, batch.id)
        info = await api.retrieve(batch.id)
        assert info.ended and info.results_url is not None and info.request_counts.succeeded == 1
        results = {r.custom_id: r async for r in api.results(batch.id)}
    assert set(results) == {"ok", "late", "bad"}
    ok = results["ok"]
    assert ok.type == "succeeded" and ok.message is not None
    assert ok.message["content"] == [{"type": "text", "text": "from the batch"}]
    usage = ok.usage()
    (billed,) = [r for r in fake.billable_requests() if r.usage]
    assert billed.usage is not None
    assert usage.complete and usage.model == "m" and usage.output_tokens == billed.usage["output_tokens"] > 0
    assert (results["late"].type, results["late"].message, results["late"].usage().complete) == ("expired", None,
                                                                                                  False)
    assert (results["bad"].type, results["bad"].error_type) == ("errored", "invalid_request_error")
    calls = [r for r in fake.requests if r.path.startswith("/v1/messages/batches")]
    assert calls and all(r.headers.get("x-api-key") == KEY and r.headers.get("anthropic-version") for r in calls)


async def test_a_cancel_ends_the_batch_with_its_requests_canceled(fake: FakeUpstream) -> None:
    fake.batch_delay_s = 600.0
    async with BatchApi(upstream_at(fake.base_url)) as api:
        batch = await api.create([(f"r{i}", params("hello")) for i in range(3)])
        assert (await api.cancel(batch.id)).processing_status == "canceling"
        await quick_wait(api, batch.id)
        assert {r.type async for r in api.results(batch.id)} == {"canceled"}


async def test_the_wait_backs_off_exponentially_and_gives_up_at_its_bound(fake: FakeUpstream) -> None:
    fake.batch_delay_s = 600.0
    async with BatchApi(upstream_at(fake.base_url)) as api:
        batch = await api.create([("r", params("hello"))])
        with pytest.raises(BatchWaitTimeout, match=r"did not end within 0\.6 s"):
            await api.wait_ended(batch.id, first_poll_s=0.02, max_poll_s=0.08, timeout_s=0.6)
    polls = [r.received_at for r in fake.requests if r.method == "GET" and r.path.endswith(batch.id)]
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(gaps) >= 4
    # Each wait at least the schedule's (0.02, 0.04, 0.08, 0.08, ...); a fixed interval fails this.
    for i, gap in enumerate(gaps):
        assert gap >= min(0.08, 0.02 * 2**i) - 0.005, gaps


async def test_the_providers_refusals_are_typed_errors_with_its_status_and_type(fake: FakeUpstream) -> None:
    fake.batch_delay_s = 600.0
    async with BatchApi(upstream_at(fake.base_url)) as api:
        with pytest.raises(BatchApiError) as empty:
            await api.create([])
        assert (empty.value.provider_status, empty.value.provider_type, empty.value.transient) == (
            400, "invalid_request_error", False)
        assert "requests: expected a non-empty list" in str(empty.value)
        with pytest.raises(BatchApiError, match="HTTP 404: not_found_error"):
            await api.retrieve("msgbatch_none")
        batch = await api.create([("r", params("hello"))])
        with pytest.raises(BatchApiError, match="has not ended"):
            [r async for r in api.results(batch.id)]
    assert KEY not in str(empty.value)
    with closed_port_url() as nowhere:
        async with BatchApi(upstream_at(nowhere), connect_timeout_s=1) as api:
            with pytest.raises(UpstreamUnreachable, match="could not be reached"):
                await api.retrieve("msgbatch_x")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


ENDED = {"id": "msgbatch_1", "type": "message_batch", "processing_status": "ended",
         "request_counts": {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 0},
         "created_at": "2026-12-03T10:00:00Z", "expires_at": "2026-12-04T10:00:00Z", "ended_at": "2026-12-03T10:01:00Z",
         "results_url": "x"}


async def test_a_5xx_or_an_answer_that_is_not_a_batch_is_a_typed_error(
    serve: Callable[[Handler], Awaitable[str]]
) -> None:
    answers: list[web.Response] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        return answers.pop(0)

    api = BatchApi(upstream_at(await serve(handler)))
    try:
        answers.append(web.json_response({"type": "error", "error": {"type": "api_error", "message": "boom"}},
                                         status=500))
        with pytest.raises(BatchApiError) as failed:
            await api.retrieve("msgbatch_1")
        assert (failed.value.provider_status, failed.value.provider_type, failed.value.transient) == (
            500, "api_error", True)
        answers.append(web.Response(status=502, text="<html>bad gateway</html>"))
        with pytest.raises(BatchApiError, match=r"HTTP 502$"):
            await api.retrieve("msgbatch_1")
        for garbage, problem in [(b"not json", "not a BatchInfo"),
                                 (orjson.dumps({**ENDED, "processing_status": "done"}), "processing_status"),
                                 (orjson.dumps({**ENDED, "request_counts": {"processing": "1"}}), "request_counts")]:
            answers.append(web.Response(body=garbage, content_type="application/json"))
            with pytest.raises(BatchApiError, match=problem):
                await api.retrieve("msgbatch_1")
        # A transient error of one poll is waited out; the batch's end is then seen.
        answers.extend([web.Response(status=529, text="overloaded"), web.json_response(ENDED)])
        info = await api.wait_ended("msgbatch_1", first_poll_s=0.01, max_poll_s=0.01, timeout_s=5)
        assert info.ended and info.request_counts.succeeded == 1
        # Anything else is not: a 401 ends the wait at once.
        answers.append(web.Response(status=401, text="no"))
        with pytest.raises(BatchApiError, match="HTTP 401"):
            await api.wait_ended("msgbatch_1", first_poll_s=0.01, max_poll_s=0.01, timeout_s=5)
    finally:
        await api.close()


async def collect(results: AsyncIterator[BatchResult], into: list[BatchResult]) -> None:
    async for r in results:
        into.append(r)


async def test_a_results_line_that_is_not_a_result_or_is_over_the_bound_is_an_error(
    serve: Callable[[Handler], Awaitable[str]]
) -> None:
    body: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body[0])

    api = BatchApi(upstream_at(await serve(handler)), max_line_bytes=4096)
    good = orjson.dumps({"custom_id": "a", "result": {"type": "expired"}})
    try:
        for lines, problem in [
            ([good, b"{not json"], "not a batch result line"),
            ([orjson.dumps({"custom_id": "a", "result": {"type": "succeeded"}})], "without its message"),
            ([orjson.dumps({"custom_id": "a", "result": {"type": "errored", "error": {"type": "x"}}})],
             "not a batch result line"),
            ([orjson.dumps({"custom_id": "a", "result": {"type": "gone"}})], "result.type"),
            ([good, b"x" * 5000], "over 4096 bytes"),
        ]:
            body[:] = [b"\n".join(lines)]
            seen: list[BatchResult] = []
            with pytest.raises(BatchApiError, match=problem):
                await collect(api.results("msgbatch_1"), seen)
            assert all(r.custom_id == "a" for r in seen)  # the good lines before the bad one came through
        body[:] = [good + b"\n\n" + good]  # blank lines and no final newline are fine
        assert [r.type async for r in api.results("msgbatch_1")] == ["expired", "expired"]
    finally:
        await api.close()


# -- the price ---------------------------------------------------------------------------------------


def test_the_batch_multiplier_is_a_share_of_the_price_half_by_default() -> None:
    assert doctest.testmod(budgets).failed == 0
    prices = {"input_per_mtok": 3, "output_per_mtok": 15, "cache_read_per_mtok": 0.3, "cache_write_per_mtok": 3.75}
    assert PriceSettings(**prices).batch_multiplier == 0.5
    for bad in (-0.1, 1.5):
        with pytest.raises(pydantic.ValidationError, match="batch_multiplier"):
            PriceSettings(**prices, batch_multiplier=bad)
    table = PricingTable.of({"default": PriceSettings(**prices), "cheap": PriceSettings(**prices,
                                                                                         batch_multiplier=0.25)})
    tokens: dict[str, Any] = {"input_tokens": 1000, "output_tokens": 2000, "cache_read_input_tokens": 300,
              "cache_creation_input_tokens": 400, "cache_write_1h_input_tokens": 50}
    full = table.cost("m", **tokens)
    assert full > 0
    assert table.cost("m", **tokens, batch=True) == pytest.approx(full * 0.5)
    assert table.cost("cheap", **tokens, batch=True) == pytest.approx(full * 0.25)
    assert table.cost("cheap", **tokens) == pytest.approx(full)  # only a batch call is discounted


# -- reconciling batch calls -------------------------------------------------------------------------


async def ledger_of_a_batch(fake: FakeUpstream) -> tuple[list[UsageRecord], list[tuple[BatchResult, str]]]:
    """An interactive call and a batch, run against the fake; the records of the interactive one as
    the gateway bills it, and the batch's results with their model."""
    body = orjson.dumps(params("[[tokens:1500]] now", max_tokens=4000))
    async with aiohttp.ClientSession() as http, http.post(f"{fake.base_url}/v1/messages", data=body,
                                                          headers={"x-api-key": KEY}) as resp:
        assert resp.status == 200
    (interactive,) = fake.message_requests()
    assert interactive.usage is not None
    records = [UsageRecord("q0:c0", "q0", "acme", "default", "m", "ok", interactive.received_unix + 0.05, kind="call",
                           duration_ms=50.0, input_tokens=interactive.usage["input_tokens"],
                           output_tokens=interactive.usage["output_tokens"],
                           cost_usd=PROVIDER_PRICES.cost("m", input_tokens=interactive.usage["input_tokens"],
                                                         output_tokens=interactive.usage["output_tokens"]))]
    async with BatchApi(upstream_at(fake.base_url)) as api:
        batch = await api.create([("b1", params("[[tokens:2000]] later", 4000)),
                                  ("b2", params("[[tokens:1000]] later", 4000)), ("b3", params("[[expired]]"))])
        await quick_wait(api, batch.id)
        info = await api.retrieve(batch.id)
        results = [(r, "m") async for r in api.results(batch.id)]
    assert info.ended_at is not None
    return records, results


def batch_records(results: list[tuple[BatchResult, str]], pricing: PricingTable, created_unix: float,
                  ended_unix: float, *, service_tier: str = "batch") -> list[UsageRecord]:
    """Each succeeded request of a batch as the batch lane must bill it: a call record of tier
    ``batch``, priced at the batch price, lasting from the batch's creation to its end (so it counts
    on the day the provider received it)."""
    out = []
    for i, (r, model) in enumerate(results):
        u = r.usage()
        if not u.complete:
            continue  # expired, errored, canceled: never billed
        out.append(UsageRecord(
            f"batch:{r.custom_id}", f"qb{i}", "acme", "default", u.model or model, "ok", ended_unix, kind="call",
            duration_ms=(ended_unix - created_unix) * 1000, input_tokens=u.input_tokens,
            output_tokens=u.output_tokens, cache_read_input_tokens=u.cache_read_tokens,
            cache_creation_input_tokens=u.cache_write_tokens, cache_write_1h_input_tokens=u.cache_write_1h_tokens,
            message_id=u.message_id, service_tier=service_tier,
            cost_usd=pricing.cost(u.model or model, input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                                  cache_read_input_tokens=u.cache_read_tokens,
                                  cache_creation_input_tokens=u.cache_write_5m_tokens,
                                  cache_write_1h_input_tokens=u.cache_write_1h_tokens, batch=True)))
    return out


async def test_batch_calls_priced_at_half_reconcile_and_at_full_price_do_not(fake: FakeUpstream,
                                                                              tmp_path: Path) -> None:
    interactive, results = await ledger_of_a_batch(fake)
    (batch,) = fake.batches.batches.values()
    assert batch.ended_unix is not None
    today = datetime.now(UTC).date()
    ledger = tmp_path / "ledger.jsonl"
    plan = Plan(today, today, fake.base_url, ADMIN, None, None, ledger, Tolerance(usd=1e-6, tokens=0), 1.0)

    async def rows_for(records: list[UsageRecord]) -> dict[str, Any]:
        ledger.write_bytes(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records))
        result = await reconcile(plan)
        return {r.model: r for r in result.rows}

    half = batch_records(results, PROVIDER_PRICES, batch.created_unix, batch.ended_unix)
    assert len(half) == 2  # the expired request is not billed
    rows = await rows_for(interactive + half)
    assert set(rows) == {"m", "m (batch)"}
    assert all(r.within(plan.tolerance) for r in rows.values()), {k: r.difference() for k, r in rows.items()}
    assert rows["m (batch)"].ledger.calls == 2 and rows["m (batch)"].provider.output_tokens > 2000
    assert rows["m (batch)"].provider.cost_usd == pytest.approx(sum(r.cost_usd for r in half))
    # Negative control: the batch priced at the list price (a multiplier of 1) is a difference of half
    # its cost on the batch row, and on no other.
    full_price = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75, batch_multiplier=1.0)})
    rows = await rows_for(interactive + batch_records(results, full_price, batch.created_unix, batch.ended_unix))
    assert rows["m"].within(plan.tolerance) and not rows["m (batch)"].within(plan.tolerance)
    assert rows["m (batch)"].difference().cost_usd == pytest.approx(-sum(r.cost_usd for r in half))
    assert rows["m (batch)"].difference().tokens() == dict.fromkeys(rows["m"].difference().tokens(), 0)
    # Negative control: batch calls recorded without their tier land on the interactive row: both differ.
    rows = await rows_for(interactive + batch_records(results, PROVIDER_PRICES, batch.created_unix,
                                                      batch.ended_unix, service_tier="standard"))
    assert not rows["m"].within(plan.tolerance) and not rows["m (batch)"].within(plan.tolerance)
