"""The fake upstream's Usage & Cost Admin API (issue 12, "Reconciliation"): the provider's report shapes,
its key, its pages, and billing what the fake sent (a cut stream counts what it had reported)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.tenancy.budgets import Price, PricingTable
from claudepool.testing.fake_admin_api import COST_PATH, USAGE_PATH
from claudepool.testing.fake_upstream import FakeUpstream
from tests.helpers import running, until

ADMIN = "sk-ant-admin01-fake-org"
PRICES = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75, 6.0), "m-b": Price(1.0, 5.0, 0.1, 1.25)})
FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running(FakeUpstream(admin_key=ADMIN, pricing=PRICES)) as server:
        yield server


def tokens_of(usage: dict[str, Any] | None) -> dict[str, Any]:
    """A usage's token counts, as `PricingTable.cost` takes them (Any: mypy cannot tell them from ``batch``)."""
    return {f: (usage or {})[f] for f in FIELDS}


def today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def call(fake: FakeUpstream, prompt: str, *, model: str = "m-a", stream: bool = False) -> None:
    body = {"model": model, "max_tokens": 100, "stream": stream,
            "system": [{"type": "text", "text": "be brief " * 40, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession() as http, http.post(f"{fake.base_url}/v1/messages", data=orjson.dumps(body),
                                                          headers={"x-api-key": "sk-ant-api03-calls"}) as resp:
        await resp.read()


async def report(fake: FakeUpstream, path: str, query: list[tuple[str, str]], key: str | None = ADMIN) -> tuple[
    int, dict[str, Any]
]:
    headers = {"anthropic-version": "2023-06-01", **({"x-api-key": key} if key is not None else {})}
    async with aiohttp.ClientSession() as http, http.get(f"{fake.base_url}{path}", params=query,
                                                         headers=headers) as resp:
        body: dict[str, Any] = await resp.json()
        return resp.status, body


def day_query(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("starting_at", rfc3339(today())), ("ending_at", rfc3339(today() + timedelta(days=1))),
            ("bucket_width", "1d"), *extra]


def logged(fake: FakeUpstream, model: str, field: str) -> int:
    return sum((r.usage or {}).get(field, 0) for r in fake.message_requests() if r.model == model)


@pytest.mark.parametrize("path", [USAGE_PATH, COST_PATH])
async def test_the_reports_answer_only_the_organisations_admin_key(fake: FakeUpstream, path: str) -> None:
    for key in (None, "sk-ant-api03-calls", ADMIN + "x"):
        status, body = await report(fake, path, day_query(), key=key)
        assert (status, body["type"], body["error"]["type"]) == (401, "error", "authentication_error"), key
    status, body = await report(fake, path, day_query())
    assert status == 200 and set(body) == {"data", "has_more", "next_page"}
    fake.admin_key = ""  # a fake given no admin key answers no one
    assert (await report(fake, path, day_query(), key=""))[0] == 401
    assert fake.requests == []  # the reports are not model calls: the log is the Messages API's


async def test_the_usage_report_sums_what_was_sent_per_day_and_model(fake: FakeUpstream) -> None:
    await call(fake, "one [[reply:a short answer]]")
    await call(fake, "two [[reply:a streamed answer, longer]] [[chunks:3]]", stream=True)
    await call(fake, "three [[reply:other]]", model="m-b")
    await call(fake, "fails [[status:529]]")  # an error answer costs nothing
    status, body = await report(fake, USAGE_PATH, day_query(("group_by[]", "model")))
    assert status == 200 and body["has_more"] is False and body["next_page"] is None
    (bucket,) = body["data"]
    assert (bucket["starting_at"], bucket["ending_at"]) == (rfc3339(today()), rfc3339(today() + timedelta(days=1)))
    by_model = {r["model"]: r for r in bucket["results"]}
    assert set(by_model) == {"m-a", "m-b"}
    for model, row in by_model.items():
        assert row["uncached_input_tokens"] == logged(fake, model, "input_tokens")
        assert row["output_tokens"] == logged(fake, model, "output_tokens") > 0
        assert row["cache_read_input_tokens"] == logged(fake, model, "cache_read_input_tokens")
        written = logged(fake, model, "cache_creation_input_tokens")
        assert row["cache_creation"] == {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0}
        assert (row["service_tier"], row["workspace_id"], row["api_key_id"]) == (None, None, None)  # not grouped
    assert by_model["m-a"]["cache_read_input_tokens"] > 0  # the second call read what the first wrote
    # Not grouped: one result for the bucket, with no model.
    _, whole = await report(fake, USAGE_PATH, day_query())
    (total,) = whole["data"][0]["results"]
    assert total["model"] is None
    assert total["output_tokens"] == sum(logged(fake, m, "output_tokens") for m in ("m-a", "m-b"))


async def test_the_cost_report_prices_what_was_sent_in_cents(fake: FakeUpstream) -> None:
    await call(fake, "one [[reply:an answer of a few words]]")
    await call(fake, "two [[reply:another]]", model="m-b", stream=True)
    await call(fake, "fails [[status:500]]", model="m-b")
    status, body = await report(fake, COST_PATH, day_query(("group_by[]", "description")))
    assert status == 200
    results = body["data"][0]["results"]
    assert {r["currency"] for r in results} == {"USD"} and {r["cost_type"] for r in results} == {"tokens"}
    assert {r["token_type"] for r in results} == {
        "uncached_input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation.ephemeral_5m_input_tokens", "cache_creation.ephemeral_1h_input_tokens"}
    for model in ("m-a", "m-b"):
        cents = sum(Decimal(r["amount"]) for r in results if r["model"] == model)
        usd = sum(PRICES.cost(model, **tokens_of(r.usage)) for r in fake.message_requests()
                  if r.model == model and r.usage)
        assert float(cents / 100) == pytest.approx(usd, rel=1e-9, abs=1e-12)
        assert usd > 0
    output_a = next(r for r in results if r["model"] == "m-a" and r["token_type"] == "output_tokens")
    assert Decimal(output_a["amount"]) == Decimal(repr(logged(fake, "m-a", "output_tokens") * 15.0 / 1e6)) * 100
    _, whole = await report(fake, COST_PATH, day_query())
    (total,) = whole["data"][0]["results"]
    assert (total["model"], total["token_type"], total["description"]) == (None, None, None)
    assert Decimal(total["amount"]) == sum(Decimal(r["amount"]) for r in results)


async def test_every_bucket_is_paged_through_in_order(fake: FakeUpstream) -> None:
    await call(fake, "today [[reply:now]]")
    await call(fake, "earlier [[reply:then]]")
    fake.message_requests()[1].received_unix = (today() - timedelta(days=2)).timestamp() + 3600  # two days ago
    query = [("starting_at", rfc3339(today() - timedelta(days=3) + timedelta(hours=5))),  # snapped to its day
             ("ending_at", rfc3339(today() + timedelta(days=1))), ("group_by[]", "model"), ("limit", "1")]
    pages, page = [], None
    while True:
        status, body = await report(fake, USAGE_PATH, [*query, *([("page", page)] if page else [])])
        assert status == 200, body
        pages.append(body)
        if not body["has_more"]:
            break
        page = body["next_page"]
        assert page.startswith("page_")
    assert pages[-1]["next_page"] is None
    starts = [b["starting_at"] for p in pages for b in p["data"]]
    assert starts == [rfc3339(today() - timedelta(days=d)) for d in (3, 2, 1, 0)]
    outputs = [sum(r["output_tokens"] for r in b["results"]) for p in pages for b in p["data"]]
    assert outputs[0] == outputs[2] == 0 and outputs[1] > 0 and outputs[3] > 0
    assert [len(b["results"]) for p in pages for b in p["data"]] == [0, 1, 0, 1]  # empty buckets are listed


@pytest.mark.parametrize(("path", "query", "message"), [
    (USAGE_PATH, [], "starting_at: required"),
    (USAGE_PATH, [("starting_at", "yesterday")], "starting_at: expected an RFC 3339 timestamp"),
    (USAGE_PATH, [("starting_at", "2026-01-01T00:00:00Z"), ("limit", "32")], "limit: expected 1 to 31"),
    (USAGE_PATH, [("starting_at", "2026-01-01T00:00:00Z"), ("group_by[]", "tenant")], "group_by: unknown tenant"),
    (USAGE_PATH, [("starting_at", "2026-01-01T00:00:00Z"), ("page", "page_!!")], "page: not a page"),
    (COST_PATH, [("starting_at", "2026-01-01T00:00:00Z"), ("bucket_width", "1h")], "bucket_width: expected one of 1d"),
    (COST_PATH, [("starting_at", "2026-01-01T00:00:00Z"), ("group_by[]", "model")], "group_by: unknown model"),
])
async def test_a_query_the_provider_would_refuse_is_a_400(
    fake: FakeUpstream, path: str, query: list[tuple[str, str]], message: str
) -> None:
    status, body = await report(fake, path, query)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert body["error"]["message"].startswith(message)


async def test_a_cut_stream_is_billed_with_what_it_had_reported_and_an_error_with_nothing(fake: FakeUpstream) -> None:
    answer = "a long answer that the client never waits for " * 4
    await call(fake, f"[[reply:{answer}]]", model="m-whole", stream=True)
    body = {"model": "m-cut", "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": f"[[reply:{answer}]] [[stall]]"}]}
    async with aiohttp.ClientSession() as http, http.post(f"{fake.base_url}/v1/messages", data=orjson.dumps(body)) as r:
        while b"text_delta" not in await r.content.readline():
            pass  # the stream has begun: message_start was sent, message_delta never will be
    whole, cut = fake.message_requests()
    await until(lambda: cut.cut, 5)
    assert cut.usage is not None and whole.usage is not None
    assert cut.usage["output_tokens"] == 1  # message_start's count: what the stream reported
    assert whole.usage["output_tokens"] > 1  # what it would have reported, had it finished
    assert cut.usage["input_tokens"] > 0  # the input side is all in message_start
    await call(fake, "[[status:529]]", model="m-error")
    _, usage = await report(fake, USAGE_PATH, day_query(("group_by[]", "model")))
    by_model = {r["model"]: r for r in usage["data"][0]["results"]}
    assert set(by_model) == {"m-whole", "m-cut"}  # the error is not in the report
    assert by_model["m-cut"]["output_tokens"] == 1
    assert by_model["m-whole"]["output_tokens"] == whole.usage["output_tokens"]
    _, cost = await report(fake, COST_PATH, day_query(("group_by[]", "description")))
    cut_output = next(r for r in cost["data"][0]["results"]
                      if r["model"] == "m-cut" and r["token_type"] == "output_tokens")
    assert Decimal(cut_output["amount"]) == Decimal(repr(15.0 / 1e6)) * 100  # one output token at $15/MTok


async def test_a_request_counts_in_the_bucket_of_the_time_it_arrived(fake: FakeUpstream) -> None:
    before = time.time()
    await call(fake, "[[reply:x]]")
    (rec,) = fake.message_requests()
    assert before <= rec.received_unix <= time.time()
    rec.received_unix = (today() - timedelta(seconds=1)).timestamp()  # one second before midnight
    _, usage = await report(fake, USAGE_PATH, day_query())
    assert usage["data"][0]["results"] == []
    _, yesterday = await report(fake, USAGE_PATH, [("starting_at", rfc3339(today() - timedelta(days=1))),
                                                   ("ending_at", rfc3339(today()))])
    assert yesterday["data"][0]["results"][0]["output_tokens"] == (rec.usage or {})["output_tokens"]
