"""Tenancy end to end on an in-process daemon: fair scheduling, limits, budgets, exact metering."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from claudepool.config import MeteringSettings, Settings
from claudepool.store.base import UsageRecord
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import spend, until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
# The fake CLI prices tokens at $3/$15 per million (input/output), as this table does.
FAKE_PRICING = {"default": {"input_per_mtok": 3, "output_per_mtok": 15, "cache_read_per_mtok": 0.3,
                            "cache_write_per_mtok": 3.75}}


async def post(d: RunningDaemon, body: dict[str, Any], tenant: str = "acme") -> tuple[int, dict[str, Any],
                                                                                      dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.url}/v1/prompt", data=orjson.dumps(body), headers={"Authorization": f"Bearer {KEYS[tenant]}"}
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def get(d: RunningDaemon, path: str, key: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(
        f"{d.url}{path}", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        raw = await resp.read()
        if resp.content_type == "application/x-ndjson":
            return resp.status, [orjson.loads(line) for line in raw.splitlines()]
        return resp.status, orjson.loads(raw)


async def settled(d: RunningDaemon) -> None:
    """Wait until every turn's record has reached the store. A turn whose worker died is recorded
    when the pool has closed that worker, which may come after the answer (its directories are
    removed in a thread): wait for no worker closing, too."""
    pools = list(d.daemon.pools.values())
    await until(lambda: d.daemon.meter.backlog == 0 and d.daemon.service.in_flight == 0
                and all(pool.counts()["closing"] == 0 for pool in pools), 10)
    await d.idle()


# -- rate limits -----------------------------------------------------------------------------------


async def test_requests_per_minute_limit_is_429_with_retry_after(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(tenants={"acme": {"requests_per_minute": 3}})
    for _ in range(3):
        assert (await post(d, {"prompt": "ok"}))[0] == 200
    status, body, headers = await post(d, {"prompt": "one too many"})
    assert status == 429
    assert body["error"]["code"] == "rate_limited"
    # Room frees when the first request's one-second bucket leaves the window: 60-61 s after it.
    assert 59 <= int(headers["Retry-After"]) <= 61
    assert (await post(d, {"prompt": "another tenant"}, tenant="beta"))[0] == 200
    assert d.sample("claudepool_rejections_total", tenant="acme", kind="requests_per_minute") == 1


async def test_tokens_per_minute_are_counted_from_real_usage(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(tenants={"acme": {"tokens_per_minute": 100}})
    status, first, _ = await post(d, {"prompt": "[[reply:" + "x" * 600 + "]]"})
    assert status == 200
    used = sum(first["usage"].values())
    assert used > 100
    await settled(d)  # the turn's tokens are recorded after it, and checked before the next one
    status, body, headers = await post(d, {"prompt": "next"})
    assert status == 429
    assert f"{used} of 100 tokens per minute" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    rejected = d.daemon.registry.get_sample_value
    assert rejected("claudepool_rejections_total", {"tenant": "acme", "kind": "tokens_per_minute"}) == 1
    assert rejected("claudepool_rejections_total", {"tenant": "acme", "kind": "requests_per_minute"}) == 0


# -- budgets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["soft", "strict"])
async def test_a_spent_budget_is_402_before_any_worker_is_used(make_daemon: MakeDaemon, mode: str) -> None:
    # Soft stops admitting at 0.9 of the budget, strict at all of it: $0.95 spent of $1 is each side.
    d = await make_daemon(tenants={"acme": {"daily_budget_usd": 1.0, "budget_mode": mode}})
    await spend(d.daemon.store, "acme", 0.95)
    leases = d.pool().stats.leases
    status, body, headers = await post(d, {"prompt": "one more"})
    if mode == "strict":
        assert status == 200  # $0.05 is left: the request may try; its calls hold what they may cost
        await spend(d.daemon.store, "acme", 0.05)
        status, body, headers = await post(d, {"prompt": "one more"})
    assert status == 402
    assert body["error"]["code"] == "budget_exhausted"
    assert "daily budget of $1 is spent" in body["error"]["message"]
    assert "Retry-After" not in headers
    assert d.pool().stats.leases == leases + (1 if mode == "strict" else 0)


async def test_a_budget_of_a_few_requests_admits_that_many(make_daemon: MakeDaemon) -> None:
    # The request-level check holds nothing (the calls hold their own budget), so what is left of a
    # budget admits as many requests as it pays for: here 2.5 requests' cost below the soft stop.
    d = await make_daemon(tenants={"acme": {"daily_budget_usd": 1.0}}, pricing=FAKE_PRICING)
    prompt = {"prompt": "[[reply:" + "y" * 400 + "]]"}
    status, measured, _ = await post(d, prompt, tenant="beta")
    assert status == 200
    cost = measured["cost_usd"]
    await spend(d.daemon.store, "acme", 0.9 - 2.5 * cost)
    statuses = []
    for _ in range(5):
        statuses.append((await post(d, prompt))[0])
        await settled(d)
    assert statuses == [200, 200, 200, 402, 402]  # the third starts below 0.9 of $1 and ends above it


async def test_max_budget_usd_is_passed_to_the_cli(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(profiles={"default": {"max_budget_usd": 0.25}, "lean": {}, "other": {}})
    worker = d.pool().workers()[0]
    assert worker.pid is not None
    cmdline = psutil.Process(worker.pid).cmdline()
    assert cmdline[cmdline.index("--max-budget-usd") + 1] == "0.25"


# -- metering ----------------------------------------------------------------------------------------


async def test_every_turn_is_metered_including_failures(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    ledger_file = tmp_path / "usage.jsonl"
    d = await make_daemon(metering={"ledger_file": str(ledger_file)})
    ok = await post(d, {"prompt": "fine"})
    model_error = await post(d, {"prompt": "[[api_error:529]]"})
    timed_out = await post(d, {"prompt": "[[hang]] long", "timeout_s": 0.5})
    crashed = await post(d, {"prompt": "[[crash]]"})
    assert [r[0] for r in (ok, model_error, timed_out, crashed)] == [200, 200, 504, 502]
    await settled(d)
    records = await d.daemon.store.ledger("acme")
    assert sorted(r.outcome for r in records) == ["failed", "interrupted", "model_error", "ok"]
    assert len({r.request_id for r in records}) == 4
    by_outcome = {r.outcome: r for r in records}
    assert by_outcome["ok"].cost_usd == pytest.approx(ok[1]["cost_usd"])
    assert by_outcome["ok"].output_tokens == ok[1]["usage"]["output_tokens"]
    assert by_outcome["interrupted"].cost_usd > 0  # the fake bills what the upstream sent before
    assert by_outcome["failed"].cost_usd == 0
    file_records = [orjson.loads(line) for line in ledger_file.read_bytes().splitlines()]
    assert sorted(r["record_id"] for r in file_records) == sorted(r.record_id for r in records)
    _, report = await get(d, "/v1/usage", KEYS["acme"])
    total = report["tenants"]["acme"]["total"]
    assert total["requests"] == 4
    assert total["cost_usd"] == pytest.approx(sum(r.cost_usd for r in records), rel=1e-9)


async def test_usage_and_ledger_are_scoped_to_the_caller(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    await post(d, {"prompt": "acme's"})
    await post(d, {"prompt": "beta's"}, tenant="beta")
    await settled(d)
    status, own = await get(d, "/v1/usage", KEYS["acme"])
    assert status == 200
    assert list(own["tenants"]) == ["acme"]
    assert own["window"]["kind"] == "day"
    status, denied = await get(d, "/v1/usage?tenant=beta", KEYS["acme"])
    assert (status, denied["error"]["code"]) == (403, "forbidden")
    status, everyone = await get(d, "/v1/usage?window=month", ADMIN_KEY)
    assert status == 200
    assert set(everyone["tenants"]) == {"acme", "beta"}
    assert everyone["tenants"]["beta"]["budget"]["daily_limit_usd"] == 0
    status, one = await get(d, "/v1/usage?tenant=beta", ADMIN_KEY)
    assert list(one["tenants"]) == ["beta"]
    assert (await get(d, "/v1/usage?window=week", ADMIN_KEY))[0] == 400
    assert (await get(d, "/v1/usage?date=yesterday", ADMIN_KEY))[0] == 400
    assert (await get(d, "/v1/usage", "nobody"))[0] == 401
    status, ledger = await get(d, "/v1/ledger", KEYS["beta"])
    assert status == 200
    assert [r["tenant"] for r in ledger] == ["beta"]
    status, ledger = await get(d, "/v1/ledger", ADMIN_KEY)
    assert sorted(r["tenant"] for r in ledger) == ["acme", "beta"]
    assert (await get(d, "/v1/ledger?tenant=acme", KEYS["beta"]))[0] == 403


async def test_usage_command(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    await post(d, {"prompt": "count me"})
    await settled(d)
    for args in (["--url", d.url], ["--socket", d.socket]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "claudepool", "usage", *args, "--key", ADMIN_KEY,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        table = out.decode()
        assert "TENANT" in table
        assert "acme" in table
        assert "budget: today $" in table
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "claudepool", "usage", "--url", d.url, "--key", KEYS["acme"], "--ledger",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [r["tenant"] for r in lines] == ["acme"]
    assert lines[0]["outcome"] == "ok"


# -- scheduling ------------------------------------------------------------------------------------


async def test_a_flooding_tenant_does_not_delay_a_quiet_one(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 2, "min_idle": 2, "lease_timeout_s": 60},
                          tenants={"acme": {"max_queued": 200}})
    flood = [asyncio.create_task(post(d, {"prompt": "[[sleep:0.3]] flood", "timeout_s": 60})) for _ in range(30)]
    await until(lambda: d.daemon.service.queued >= 25, 10)
    quiet = []
    for i in range(3):
        status, body, _ = await post(d, {"prompt": f"quiet {i}", "timeout_s": 60}, tenant="beta")
        assert status == 200
        quiet.append(body["queue_ms"])
    flooded = [body["queue_ms"] for status, body, _ in await asyncio.gather(*flood)]
    # First come first served would make each quiet request wait behind ~25 flood turns of 0.3 s on
    # two workers (~4 s). Fair queuing serves it next: at most one turn in progress ahead of it.
    assert max(quiet) < 800, quiet
    assert statistics.median(flooded) > 1500


async def test_max_concurrency_serialises_a_tenant(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 3, "min_idle": 3}, tenants={"acme": {"max_concurrency": 1}})
    results = await asyncio.gather(*(post(d, {"prompt": "[[sleep:0.3]] one at a time"}) for _ in range(3)))
    waits = sorted(body["queue_ms"] for _, body, _ in results)
    assert waits[1] >= 250  # idle workers existed, yet the second waited for the first to finish
    assert waits[2] >= 550
    other = await post(d, {"prompt": "not capped"}, tenant="beta")
    assert other[1]["queue_ms"] < 250


async def test_queue_bounds_answer_503_queue_full(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 1, "lease_timeout_s": 10}, tenants={"acme": {"max_queued": 2}},
                          server={"max_queued": 3})
    running = asyncio.create_task(post(d, {"prompt": "[[sleep:1]] busy"}, tenant="beta"))
    await until(lambda: d.pool().counts()["leased"] == 1)
    waiting = [asyncio.create_task(post(d, {"prompt": "[[sleep:0.1]] wait"})) for _ in range(2)]
    await until(lambda: d.daemon.service.queued == 2)
    status, body, headers = await post(d, {"prompt": "third of acme"})
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "queue_full", "1")
    third = asyncio.create_task(post(d, {"prompt": "[[sleep:0.1]] beta waits"}, tenant="beta"))
    await until(lambda: d.daemon.service.queued == 3)
    status, body, _ = await post(d, {"prompt": "over the global bound"}, tenant="beta")
    assert (status, body["error"]["code"]) == (503, "queue_full")
    assert all(r[0] == 200 for r in await asyncio.gather(running, third, *waiting))


async def test_batch_runs_only_on_spare_capacity(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 2, "min_idle": 2, "batch_max_share": 0.5})
    batch = [asyncio.create_task(post(d, {"prompt": "[[sleep:0.3]] batch", "priority": "batch"}))
             for _ in range(4)]
    await until(lambda: d.daemon.service.queued == 3)  # one batch runs; the share allows no second
    assert d.pool().counts()["leased"] == 1
    status, body, _ = await post(d, {"prompt": "interactive"}, tenant="beta")
    assert status == 200
    assert body["queue_ms"] < 250  # it took the spare worker, ahead of three queued batch requests
    assert all(r[0] == 200 for r in await asyncio.gather(*batch))


async def test_a_full_usage_buffer_drops_the_oldest_waiting_record_never_the_one_being_settled() -> None:
    class GatedStore(MemoryStore):
        """A real memory store whose settles wait for a gate: the store is slow to come back."""

        gate = asyncio.Event()
        settling = asyncio.Event()

        async def settle(self, record: UsageRecord) -> bool:
            self.settling.set()
            await self.gate.wait()
            return await super().settle(record)

    store = GatedStore()
    meter = Meter(store, RateLimiter(), PricingTable.of(Settings().pricing), MeteringSettings(max_buffered_records=2))
    flusher = asyncio.create_task(meter.run())
    try:
        def record(n: int) -> UsageRecord:
            return UsageRecord(record_id=f"r{n}", request_id=f"q{n}", tenant="acme", profile="default",
                               model="m", outcome="ok", at=time.time(), output_tokens=n)

        meter.submit(record(1))
        await asyncio.wait_for(store.settling.wait(), 5)  # r1 is on its way to the store
        for n in (2, 3, 4):
            meter.submit(record(n))  # r2 is the oldest waiting when r4 arrives: it is the one dropped
        store.gate.set()
        assert await meter.flush(5)
        assert [r.record_id for r in await store.ledger("acme")] == ["r1", "r3", "r4"]
        assert meter.dropped == 1  # claudepool_metering_dropped_records_total
    finally:
        flusher.cancel()


async def test_a_drain_sees_a_request_still_being_admitted_and_answers_it(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(tenants={"acme": {"daily_budget_usd": 1.0}}, pricing=FAKE_PRICING,
                          server={"drain_timeout_s": 0.5})
    memory = d.daemon.store.inner
    reserving = asyncio.Event()

    async def slow_budget(*args: Any, **kwargs: Any) -> None:
        reserving.set()
        await asyncio.Event().wait()  # the store never answers

    memory.budget = slow_budget  # type: ignore[method-assign,assignment]  # a fault in a real store
    client = asyncio.create_task(post(d, {"prompt": "hello"}))
    await asyncio.wait_for(reserving.wait(), 5)
    assert d.daemon.service.in_flight == 1  # counted while it is admitted, not only once it runs
    d.daemon.request_stop()
    status, body, _ = await asyncio.wait_for(client, 10)
    assert (status, body["error"]["code"]) == (503, "draining")
