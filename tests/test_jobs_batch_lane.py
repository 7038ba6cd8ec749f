"""The batch lane end to end: jobs sent to the fake upstream's Message Batches API through the
daemon's upstream settings, settled from its results, metered once at the batch price; expired and
errored requests fail with the provider's reason or fall back to the pool; a daemon stopped while a
batch runs resumes that batch after its restart instead of sending the jobs again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from claudepool.reconcile.command import Plan, reconcile
from claudepool.reconcile.compare import Tolerance
from claudepool.tenancy.budgets import Price, PricingTable
from claudepool.testing.fake_batches import BATCHES_PATH
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.helpers import running
from tests.test_jobs_http import call, finished
from tests.test_tenancy import FAKE_PRICING

__all__ = ["make_daemon"]

Make = Callable[..., Awaitable[RunningDaemon]]
ADMIN = "sk-ant-admin01-jobs-org"
PROVIDER_PRICES = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75)})  # = FAKE_PRICING, batch at 0.5
FAST = {"batch_window_s": 0.2, "batch_poll_first_s": 0.05, "batch_poll_max_s": 0.2, "poll_interval_s": 0.1}


async def batch_daemon(make_daemon: Make, upstream: FakeUpstream, **jobs: Any) -> RunningDaemon:
    return await make_daemon(upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
                             pricing=FAKE_PRICING, jobs={**FAST, **jobs})


def created_batches(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.method == "POST" and r.path == BATCHES_PATH)


async def test_batch_lane_jobs_are_answered_by_the_batches_api_at_half_price(
        make_daemon: Make, upstream: FakeUpstream) -> None:
    d = await batch_daemon(make_daemon, upstream)
    _, bulk = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [
        {"prompt": f"[[reply:summary {i}]]", "lane": "batch_api"} for i in range(5)]})
    assert {j["lane"] for j in bulk["jobs"]} == {"batch_api"}
    done = [await finished(d, j["id"]) for j in bulk["jobs"]]
    assert [j["result"]["text"] for j in done] == [f"summary {i}" for i in range(5)]
    assert len({j["result"]["batch_id"] for j in done}) == 1  # gathered into one batch
    assert created_batches(upstream) == 1 and upstream.message_requests() == []  # no worker made a call
    for job in done:
        usage = job["usage"]
        list_price = FAKE_PRICING["default"]
        full = (usage["input_tokens"] * list_price["input_per_mtok"]
                + usage["output_tokens"] * list_price["output_per_mtok"]) / 1e6
        assert job["cost_usd"] == pytest.approx(full * 0.5)
    await d.daemon.meter.flush(5)
    ledger = await d.daemon.store.ledger("acme")
    assert sorted(r.request_id for r in ledger) == sorted(j["id"] for j in done)
    assert {(r.kind, r.service_tier) for r in ledger} == {("call", "batch")}
    assert sum(r.cost_usd for r in ledger) == pytest.approx(sum(j["cost_usd"] for j in done))
    assert (await d.daemon.store.budget("acme")).day_spent_usd == pytest.approx(sum(j["cost_usd"] for j in done))


async def test_the_batch_ledger_reconciles_with_the_providers_report(make_daemon: Make, tmp_path: Path) -> None:
    async with running(FakeUpstream(admin_key=ADMIN, pricing=PROVIDER_PRICES)) as org:
        ledger_file = tmp_path / "ledger.jsonl"
        d = await make_daemon(upstream={"base_url": org.base_url, "api_key": "sk-ant-test", "admin_key": ADMIN},
                              pricing=FAKE_PRICING, jobs=FAST, metering={"ledger_file": str(ledger_file)})
        _, bulk = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [
            {"prompt": f"[[tokens:{500 + i}]] doc {i}", "lane": "batch_api"} for i in range(4)]})
        for j in bulk["jobs"]:
            await finished(d, j["id"])
        await d.daemon.meter.flush(5)
        today = datetime.now(UTC).date()
        plan = Plan(today, today, org.base_url, ADMIN, None, None, ledger_file, Tolerance(usd=1e-6, tokens=0), 1.0)
        rows = {r.model: r for r in (await reconcile(plan)).rows}
        assert set(rows) == {"claude-sonnet-4-5 (batch)"}, rows
        row = rows["claude-sonnet-4-5 (batch)"]
        assert row.within(plan.tolerance) and row.ledger.calls == 4, row.difference()


@pytest.mark.parametrize("fallback", [True, False])
async def test_an_expired_batch_request_fails_its_job_or_runs_on_the_pool(
        make_daemon: Make, upstream: FakeUpstream, fallback: bool) -> None:
    d = await batch_daemon(make_daemon, upstream)
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[expired]] [[reply:from a worker]]",
                                                  "lane": "batch_api", "fallback_to_pool": fallback})
    job = await finished(d, entry["id"])
    if fallback:
        assert job["status"] == "succeeded" and job["result"]["text"] == "from a worker"
    else:
        assert job["status"] == "failed" and job["error"]["code"] == "batch_expired"
    _, errored = await call(d, "POST", "/v1/jobs", {"prompt": "[[batch_error]]", "lane": "batch_api",
                                                    "fallback_to_pool": False})
    job = await finished(d, errored["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "batch_errored" and job["error"]["message"]


async def test_auto_picks_the_batch_lane_only_for_jobs_that_can_wait(make_daemon: Make,
                                                                     upstream: FakeUpstream) -> None:
    d = await batch_daemon(make_daemon, upstream)
    _, waits = await call(d, "POST", "/v1/jobs", {"prompt": "x", "deadline_s": 7200})
    _, urgent = await call(d, "POST", "/v1/jobs", {"prompt": "x", "deadline_s": 60})
    _, plain = await call(d, "POST", "/v1/jobs", {"prompt": "x"})
    assert (waits["lane"], urgent["lane"], plain["lane"]) == ("batch_api", "pool", "pool")


async def test_without_the_batch_lane_a_batch_job_is_refused(make_daemon: Make, upstream: FakeUpstream) -> None:
    d = await batch_daemon(make_daemon, upstream, batch_lane=False)
    status, body = await call(d, "POST", "/v1/jobs", {"prompt": "x", "lane": "batch_api"})
    assert status == 400 and "batch lane" in body["error"]["message"]
    _, auto = await call(d, "POST", "/v1/jobs", {"prompt": "x", "deadline_s": 7200})
    assert auto["lane"] == "pool"


async def test_a_restarted_daemon_resumes_the_batch_it_had_sent(make_daemon: Make, upstream: FakeUpstream,
                                                               tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite3")
    upstream.batch_delay_s = 3.0
    d = await batch_daemon(make_daemon, upstream, path=path, visibility_timeout_s=0.6)
    _, bulk = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [
        {"prompt": f"[[reply:r{i}]]", "lane": "batch_api"} for i in range(3)]})
    ids = [j["id"] for j in bulk["jobs"]]
    async with asyncio.timeout(10):
        while created_batches(upstream) == 0 or not all([
                (await call(d, "GET", f"/v1/jobs/{i}"))[1].get("batch_id") for i in ids]):
            await asyncio.sleep(0.05)
    d.daemon.request_stop()
    assert await d.task == 0
    again = await batch_daemon(make_daemon, upstream, path=path, visibility_timeout_s=0.6)
    done = [await finished(again, i) for i in ids]
    assert [j["result"]["text"] for j in done] == ["r0", "r1", "r2"]
    assert created_batches(upstream) == 1  # resumed, not sent again
    assert {j["attempts"] for j in done} == {2}


async def test_cancelling_every_job_of_a_batch_cancels_the_providers_batch(make_daemon: Make,
                                                                           upstream: FakeUpstream) -> None:
    upstream.batch_delay_s = 5.0
    d = await batch_daemon(make_daemon, upstream, visibility_timeout_s=0.6)
    _, bulk = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [
        {"prompt": f"[[reply:r{i}]]", "lane": "batch_api"} for i in range(2)]})
    ids = [j["id"] for j in bulk["jobs"]]
    async with asyncio.timeout(10):
        while not all([(await call(d, "GET", f"/v1/jobs/{i}"))[1].get("batch_id") for i in ids]):
            await asyncio.sleep(0.05)
    await call(d, "DELETE", f"/v1/jobs/{ids[0]}")
    await asyncio.sleep(1.0)  # one job still held: the batch runs on
    assert not [r for r in upstream.requests if r.path.endswith("/cancel")]
    await call(d, "DELETE", f"/v1/jobs/{ids[1]}")
    async with asyncio.timeout(10):
        while not [r for r in upstream.requests if r.path.endswith("/cancel")]:
            await asyncio.sleep(0.05)
    assert {(await call(d, "GET", f"/v1/jobs/{i}"))[1]["status"] for i in ids} == {"cancelled"}
