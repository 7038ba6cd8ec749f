"""Reconciliation (issue 12): the comparison's arithmetic, the provider's reports as the client reads
them, and the ledger as read from the daemon and from its file."""

from __future__ import annotations

import asyncio
import doctest
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from claudepool.client import AsyncClient
from claudepool.errors import LedgerUnreadable, ProviderReportUnavailable
from claudepool.reconcile import compare as compare_module
from claudepool.reconcile.compare import (
    NON_TOKEN,
    Reconciliation,
    Tolerance,
    Totals,
    compare,
    ledger_totals,
    provider_totals,
)
from claudepool.reconcile.ledger import LedgerRecord, merged, read_daemon, read_file
from claudepool.reconcile.provider import AdminApi, CostBucket, CostReport, UsageBucket, UsageReport
from claudepool.store.base import UsageRecord
from claudepool.testing.fake_upstream import FakeUpstream
from tests.conftest import REPO
from tests.daemon_fixtures import ADMIN_KEY, RunningDaemon, make_daemon
from tests.helpers import closed_port_url

__all__ = ["make_daemon"]

DAY = date(2026, 12, 2)
NOON = datetime(2026, 12, 2, 12, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 12, 3, tzinfo=UTC).timestamp()
ADMIN = "sk-ant-admin01-test-org"


def call(record_id: str, at: float, *, model: str = "m", kind: str = "call", duration_ms: float | None = 100.0,
         **tokens: Any) -> LedgerRecord:
    return LedgerRecord(record_id=record_id, kind=kind, at=at, model=model, duration_ms=duration_ms, **tokens)


def test_the_module_doctests_pass() -> None:
    assert doctest.testmod(compare_module).failed == 0


def test_the_ledger_counts_each_call_on_the_day_it_began() -> None:
    records = [
        call("a", NOON, input_tokens=10, output_tokens=5, cache_read_input_tokens=7, cache_creation_input_tokens=100,
             cache_write_1h_input_tokens=30, cost_usd=0.25),
        call("b", NOON + 60, output_tokens=1, cost_usd=0.5),
        call("over-midnight", MIDNIGHT + 1.0, duration_ms=2000.0, output_tokens=100, cost_usd=1.0),  # began on the 2nd
        call("next-day", MIDNIGHT + 1.0, duration_ms=500.0, output_tokens=1000),
        call("other-model", NOON, model="n", input_tokens=3),
        call("turn", NOON, kind="turn", input_tokens=999, cost_usd=9.0),  # the CLI's figure: not a provider call
    ]
    totals = ledger_totals(records, DAY, DAY)
    assert set(totals) == {(DAY, "m"), (DAY, "n")}
    m = totals[DAY, "m"]
    assert (m.uncached_input_tokens, m.cache_read_input_tokens, m.cache_write_5m_input_tokens,
            m.cache_write_1h_input_tokens, m.output_tokens, m.calls) == (10, 7, 70, 30, 106, 3)
    assert m.cost_usd == pytest.approx(1.75)
    assert set(ledger_totals(records, DAY, DAY + timedelta(days=1))) == {
        (DAY, "m"), (DAY, "n"), (DAY + timedelta(days=1), "m")}


def usage_bucket(day: date, *results: dict[str, Any]) -> UsageBucket:
    start = datetime.combine(day, datetime.min.time(), UTC)
    return UsageBucket.model_validate({"starting_at": start, "ending_at": start + timedelta(days=1), "results": [
        {"uncached_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0,
         "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}, **r} for r in results]})


def cost_bucket(day: date, *results: dict[str, Any]) -> CostBucket:
    start = datetime.combine(day, datetime.min.time(), UTC)
    return CostBucket.model_validate({"starting_at": start, "ending_at": start + timedelta(days=1),
                                      "results": [{"currency": "USD", **r} for r in results]})


def test_the_provider_side_is_tokens_from_the_usage_report_and_dollars_from_the_cost_report() -> None:
    usage = [usage_bucket(DAY, {"model": "m", "uncached_input_tokens": 10, "output_tokens": 106,
                                "cache_read_input_tokens": 7,
                                "cache_creation": {"ephemeral_5m_input_tokens": 70, "ephemeral_1h_input_tokens": 30}}),
             usage_bucket(DAY + timedelta(days=1))]
    cost = [cost_bucket(DAY, {"amount": "150.5", "model": "m", "cost_type": "tokens", "token_type": "output_tokens"},
                        {"amount": "24.5", "model": "m", "cost_type": "tokens", "token_type": "uncached_input_tokens"},
                        {"amount": "1.00", "model": None, "cost_type": "web_search"})]
    totals = provider_totals(usage, cost)
    assert set(totals) == {(DAY, "m"), (DAY, NON_TOKEN)}
    m = totals[DAY, "m"]
    assert (m.uncached_input_tokens, m.cache_read_input_tokens, m.cache_write_5m_input_tokens,
            m.cache_write_1h_input_tokens, m.output_tokens) == (10, 7, 70, 30, 106)
    assert m.cost_usd == pytest.approx(1.75)  # 175 cents
    assert totals[DAY, NON_TOKEN].cost_usd == pytest.approx(0.01)


def test_a_difference_is_the_providers_figure_less_the_ledgers_and_the_tolerance_bounds_each_row() -> None:
    ledger = {(DAY, "m"): Totals(uncached_input_tokens=10, output_tokens=5, cost_usd=1.0, calls=2),
              (DAY, "ledger-only"): Totals(output_tokens=1, cost_usd=0.001, calls=1)}
    provider = {(DAY, "m"): Totals(uncached_input_tokens=10, output_tokens=5, cost_usd=1.01),
                (DAY + timedelta(days=1), "provider-only"): Totals(cache_write_1h_input_tokens=4, cost_usd=0.02)}
    rows = compare(ledger, provider)
    assert [(r.day, r.model) for r in rows] == [(DAY, "ledger-only"), (DAY, "m"), (DAY + timedelta(days=1),
                                                                                   "provider-only")]
    only_ledger, m, only_provider = rows
    assert only_ledger.difference().output_tokens == -1
    assert only_provider.difference().cache_write_1h_input_tokens == 4
    assert m.difference().cost_usd == pytest.approx(0.01)
    assert m.within(Tolerance(usd=0.01)) and not m.within(Tolerance(usd=0.009))  # the bound is inclusive
    assert not only_ledger.within(Tolerance()) and only_ledger.within(Tolerance(tokens=1))
    assert not only_provider.within(Tolerance(usd=0.05, tokens=3)) and only_provider.within(Tolerance(0.05, 4))
    result = Reconciliation(DAY, DAY + timedelta(days=1), rows, Tolerance(), "ledger.jsonl", "https://provider")
    assert [r.model for r in result.beyond] == ["ledger-only", "provider-only"] and not result.within_tolerance
    text = result.as_text()
    assert "3 calls from ledger.jsonl" in text and "2 of 3 rows beyond the tolerance" in text
    assert [line.split()[-1] for line in text.splitlines()[4:7]] == ["DIFF", "ok", "DIFF"]
    body = result.as_json()
    assert body["within_tolerance"] is False and body["ledger"]["calls"] == 3
    assert body["rows"][2]["difference"] == {
        "uncached_input_tokens": 0, "cache_read_input_tokens": 0, "cache_write_5m_input_tokens": 0,
        "cache_write_1h_input_tokens": 4, "output_tokens": 0, "cost_usd": 0.02}
    same = Reconciliation(DAY, DAY, compare(ledger, ledger), Tolerance(), "x", "y")
    assert same.within_tolerance and "0 of 2 rows beyond" in same.as_text()


# -- the provider's reports, as the client reads them -----------------------------------------------


@pytest.fixture
async def org() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(admin_key=ADMIN)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def message(base_url: str, model: str) -> None:
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "[[reply:hello there]]"}]}
    async with aiohttp.ClientSession() as http, http.post(f"{base_url}/v1/messages", data=orjson.dumps(body)) as r:
        await r.read()


async def test_the_client_follows_every_page_of_both_reports(org: FakeUpstream) -> None:
    await message(org.base_url, "m")
    await message(org.base_url, "n")
    org.message_requests()[1].received_unix -= 86400  # yesterday
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with AdminApi(org.base_url, ADMIN, days_per_page=1) as api:
        usage = await api.usage(today - timedelta(days=2), today + timedelta(days=1))
        cost = await api.cost(today - timedelta(days=2), today + timedelta(days=1))
    assert [b.starting_at for b in usage] == [b.starting_at for b in cost] == [
        today - timedelta(days=2), today - timedelta(days=1), today]
    totals = provider_totals(usage, cost)
    assert set(totals) == {(today.date(), "m"), ((today - timedelta(days=1)).date(), "n")}
    for (_, model), t in totals.items():
        (rec,) = [r for r in org.message_requests() if r.model == model]
        assert rec.usage is not None and t.output_tokens == rec.usage["output_tokens"] > 0
        counts: dict[str, Any] = dict(rec.usage)  # Any: mypy cannot tell a count from ``batch``
        assert t.cost_usd == pytest.approx(org.pricing.cost(model, **counts))


async def test_a_refused_key_an_unreachable_provider_and_a_non_report_are_errors(org: FakeUpstream) -> None:
    now = datetime.now(UTC)
    async with AdminApi(org.base_url, "sk-ant-admin01-wrong-key") as api:
        with pytest.raises(ProviderReportUnavailable) as refused:
            await api.usage(now - timedelta(days=1), now)
    assert "HTTP 401: authentication_error: invalid x-api-key" in str(refused.value)
    assert "wrong-key" not in str(refused.value)
    with closed_port_url() as url:
        async with AdminApi(url, ADMIN) as api:
            with pytest.raises(ProviderReportUnavailable, match="cannot reach"):
                await api.cost(now - timedelta(days=1), now)


@pytest.mark.parametrize(("answer", "problem"), [
    ({"data": []}, "not a UsageReport (has_more: Field required)"),
    ({"data": [{"starting_at": "2026-12-02T00:00:00Z", "ending_at": "2026-12-03T00:00:00Z", "results": [
        {"model": "m", "uncached_input_tokens": "10", "cache_read_input_tokens": 0, "output_tokens": 0,
         "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}}]}], "has_more": False},
     "data.0.results.0.uncached_input_tokens: Input should be a valid integer"),
    ({"data": [{"starting_at": "2026-12-02T00:00:00Z", "ending_at": "2026-12-03T00:00:00Z", "results": [
        {"model": "m", "uncached_input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 0}]}],
      "has_more": False}, "data.0.results.0.cache_creation: Field required"),
    ({"data": [], "has_more": True, "next_page": None}, "has_more without a new next_page"),
])
async def test_an_answer_that_is_not_a_report_is_an_error_never_a_zero(answer: dict[str, Any], problem: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/v1/organizations/usage_report/messages", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        now = datetime.now(UTC)
        async with AdminApi(f"http://127.0.0.1:{port}", ADMIN) as api:
            with pytest.raises(ProviderReportUnavailable) as failed:
                await api.usage(now - timedelta(days=1), now)
        assert problem in str(failed.value)
    finally:
        await runner.cleanup()


def test_a_cost_that_is_not_a_decimal_or_not_in_dollars_is_refused() -> None:
    bucket = {"starting_at": "2026-12-02T00:00:00Z", "ending_at": "2026-12-03T00:00:00Z"}
    for result in ({"amount": "12,5", "currency": "USD"}, {"amount": "NaN", "currency": "USD"},
                   {"amount": "12.5", "currency": "EUR"}, {"amount": 12.5, "currency": "USD"}):
        with pytest.raises(ValueError, match="validation error"):
            CostReport.model_validate_json(orjson.dumps({"data": [{**bucket, "results": [result]}],
                                                         "has_more": False}))
    assert UsageReport.model_validate_json(b'{"data": [], "has_more": false, "later_field": 1}').data == []


# -- the ledger, from its file and from the daemon ----------------------------------------------------


def record_line(record_id: str, at: float, **extra: Any) -> bytes:
    return orjson.dumps(UsageRecord(record_id, "q", "acme", "default", "m", "ok", at, kind="call",
                                    **extra).to_dict())


def test_the_ledger_file_is_read_whole_and_a_write_cut_short_at_its_end_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(record_line("a", NOON, output_tokens=3) + b"\n" + record_line("b", NOON + 1) + b"\n"
                     + record_line("c", NOON + 2)[:40])
    assert [r.record_id for r in read_file(path)] == ["a", "b"]
    assert read_file(path)[0].output_tokens == 3
    noon = orjson.dumps({**orjson.loads(record_line("x", NOON)), "at": "noon"})
    path.write_bytes(record_line("a", NOON) + b"\n" + noon + b"\n" + record_line("b", NOON))
    with pytest.raises(LedgerUnreadable, match=r"ledger.jsonl:2: not a ledger record \(at: Input should be a valid"):
        read_file(path)
    with pytest.raises(LedgerUnreadable, match="cannot read the ledger file"):
        read_file(tmp_path / "missing.jsonl")


def test_merged_sources_count_each_record_once() -> None:
    a, b, c = call("a", NOON), call("b", NOON), call("c", NOON)
    assert [r.record_id for r in merged([a, b], [b, c], [a])] == ["a", "b", "c"]


async def test_paging_the_daemons_ledger_finds_each_record_once_across_equal_and_late_instants(
    make_daemon: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    d = await make_daemon(server={"ledger_page_records": 3})
    # In settle order: records that share an instant, and one that settles late (its call ended
    # before the two settled ahead of it), a little over a page apart from each other.
    ats = [100.0, 100.0, 106.0, 112.0, 112.0, 110.0, 120.0, 126.0, 140.0]
    for i, at in enumerate(ats):
        assert await d.daemon.store.settle(UsageRecord(f"r{i}", f"q{i}", "acme", "default", "m", "ok", at,
                                                       kind="call", output_tokens=i))
    async with AsyncClient(key=ADMIN_KEY, url=d.url) as client:
        records = await read_daemon(client, 90.0, page_records=1000)  # the daemon applies its own limit: 3
        assert sorted(r.record_id for r in records) == [f"r{i}" for i in range(len(ats))]
        # Without the overlap, the late record falls behind a page boundary: what the overlap is for.
        without = await read_daemon(client, 90.0, overlap_s=0.0)
        assert sorted(r.record_id for r in without) == sorted(f"r{i}" for i in range(len(ats)) if i != 5)
        assert [r.record_id for r in await read_daemon(client, 125.0)] == ["r7", "r8"]
    for i in range(3):  # a page's worth of records at one instant: no `since` pages past them
        await d.daemon.store.settle(UsageRecord(f"s{i}", "q", "acme", "default", "m", "ok", 200.0, kind="call"))
    async with AsyncClient(key=ADMIN_KEY, url=d.url) as client:
        with pytest.raises(LedgerUnreadable, match=r"3 or more records at the instant 200\.0"):
            await read_daemon(client, 150.0)
    async with AsyncClient(key="not-the-admin-key", url=d.url) as client:
        with pytest.raises(LedgerUnreadable, match="unauthorized"):
            await read_daemon(client, 0.0)


# -- the command -------------------------------------------------------------------------------------


async def reconcile_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m claudepool reconcile ARGS`` as a process of its own: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "claudepool", "reconcile", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def ledger_of(org: FakeUpstream) -> list[UsageRecord]:
    """The records a gateway would have billed for the fake's log: the usage it sent, priced alike."""
    out = []
    for i, r in enumerate(org.message_requests()):
        usage = r.usage or {}
        tokens: dict[str, Any] = {k: usage.get(k, 0) for k in (
            "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")}
        out.append(UsageRecord.from_dict({
            "record_id": f"q{i}:c{i}", "request_id": f"q{i}", "tenant": "acme", "profile": "default",
            "model": r.model, "outcome": "ok", "at": r.received_unix + 0.05, "kind": "call", "duration_ms": 50.0,
            "cost_usd": org.pricing.cost(r.model, **tokens), **tokens}))
    return out


def write_ledger(path: Path, records: list[UsageRecord]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in records))
    return path


async def test_the_command_exits_0_within_the_tolerance_1_beyond_it_and_2_when_it_compared_nothing(
    org: FakeUpstream, tmp_path: Path
) -> None:
    await message(org.base_url, "m")
    await message(org.base_url, "m")
    await message(org.base_url, "n")
    config = tmp_path / "claudepool.toml"
    config.write_text(f'[upstream]\nbase_url = "{org.base_url}"\nadmin_key = "{ADMIN}"\n')
    today = datetime.now(UTC).date().isoformat()
    records = ledger_of(org)
    ledger = write_ledger(tmp_path / "ledger.jsonl", records)
    days = ("--since", today, "--until", today, "--config", str(config))
    code, out, err = await reconcile_command(*days, "--ledger-file", str(ledger))
    assert code == 0, out + err
    assert "ledger: 3 calls from" in out and "0 of 2 rows beyond the tolerance" in out
    code, out, _ = await reconcile_command(*days, "--ledger-file", str(ledger), "--json")
    body = json.loads(out)
    assert (code, body["within_tolerance"], [r["model"] for r in body["rows"]]) == (0, True, ["m", "n"])
    assert all(r["provider"]["output_tokens"] == r["ledger"]["output_tokens"] > 0 for r in body["rows"])
    # One call billed two output tokens short: beyond the default tolerance, within a looser one.
    short = records[1]
    records[1] = UsageRecord(**{**short.to_dict(), "output_tokens": short.output_tokens - 2,
                                "cost_usd": short.cost_usd - 2 * 75 / 1e6})
    write_ledger(ledger, records)
    code, out, _ = await reconcile_command(*days, "--ledger-file", str(ledger), "--json")
    (m_row, n_row) = json.loads(out)["rows"]
    assert code == 1 and m_row["within_tolerance"] is False and n_row["within_tolerance"] is True
    assert m_row["difference"]["output_tokens"] == 2 and m_row["difference"]["cost_usd"] == pytest.approx(150e-6)
    assert (await reconcile_command(*days, "--ledger-file", str(ledger), "--tolerance-tokens", "2"))[0] == 0
    code, out, _ = await reconcile_command(*days, "--ledger-file", str(ledger), "--tolerance-usd", "0.0001",
                                           "--tolerance-tokens", "2")
    assert code == 1 and "DIFF" in out
    # Nothing compared: each is exit 2, with the reason, never with the admin key.
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[upstream]\nbase_url = "{org.base_url}"\n')
    with closed_port_url() as nowhere:
        for args, env, reason in [
            (("--config", str(bare), "--ledger-file", str(ledger)), {}, "need the organisation's Admin API key"),
            (("--since", "12/02/2026", "--ledger-file", str(ledger)), {}, "--since: expected a UTC day YYYY-MM-DD"),
            (("--until", "2020-01-01", "--ledger-file", str(ledger)), {}, "is before --since"),
            (("--ledger-file", str(tmp_path / "none.jsonl")), {}, "cannot read the ledger file"),
            (("--url", nowhere, "--key", "k", "--connect-timeout", "0.2"), {}, "the daemon's ledger: unavailable"),
            (("--ledger-file", str(ledger)), {"CLAUDEPOOL_UPSTREAM__ADMIN_KEY": "sk-ant-admin01-wrong"},
             "HTTP 401: authentication_error"),
        ]:
            argv = [*days, *args] if args[0] != "--config" else ["--since", today, *args]
            code, out, err = await reconcile_command(*argv, env=env)
            assert (code, out) == (2, ""), (args, out, err)
            assert reason in err, (args, err)
            assert "sk-ant-admin01" not in err and ADMIN not in err
