"""Jobs shared by daemon processes through one real Redis, on the real CLI against the loopback fake
upstream: 300 jobs submitted through three daemons, one killed with SIGKILL mid-run and restarted.
Every job ends exactly once (one result, one settle), none is lost, no model call is billed twice
(the ledger's calls are the upstream's, each once), and the budget is the ledger's sum. The same on
the embedded default (SQLite): one daemon killed and restarted loses no job.

What a SIGKILL cannot keep: the calls in flight in the killed daemon at that instant reached the
provider, but the daemon died before it could write their records. They are bounded by its workers,
and counted here rather than hidden."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.store.redis import RedisStore
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEY, DaemonProcess, start_daemon
from tests.test_tenancy import FAKE_PRICING
from tests.test_tenancy_redis import start_daemons

pytestmark = pytest.mark.real_cli
__all__ = ["start_daemon"]

Start = Callable[..., Awaitable[DaemonProcess]]
_ENDED = {"succeeded", "failed", "cancelled", "dead"}
# One warm worker per daemon: three real CLIs in all (the suite runs beside other tests).
WORKERS = 1


def extra_config(upstream: FakeUpstream, *, store: str, jobs: str = "") -> str:
    pricing = "\n".join(f"{k} = {v}" for k, v in FAKE_PRICING["default"].items())
    return f"""daily_budget_usd = 1000
max_queued = 1000

{store}

[upstream]
base_url = "{upstream.base_url}"
api_key = "sk-ant-test"

[profiles.default]
upstream_max_retries = 0
min_idle = {WORKERS}
max_workers = {WORKERS}

[jobs]
visibility_timeout_s = 3
max_running = {WORKERS}
poll_interval_s = 0.2
max_attempts = 5
{jobs}

[pricing.default]
{pricing}
"""


async def submit(url: str, prompts: list[str], key_prefix: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.post(
            f"{url}/v1/jobs/bulk", data=orjson.dumps({"jobs": [{"prompt": p} for p in prompts]}),
            headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": key_prefix}) as resp:
        assert resp.status == 202, await resp.text()
        return [j["id"] for j in (await resp.json())["jobs"]]


async def jobs_of(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as s:
        for job_id in ids:
            async with s.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}) as resp:
                assert resp.status == 200, await resp.text()
                found[job_id] = await resp.json()
    return found


async def wait_ended(url: str, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    async with asyncio.timeout(timeout_s):
        while True:
            found = await jobs_of(url, ids)
            if all(j["status"] in _ENDED for j in found.values()):
                return found
            await asyncio.sleep(0.5)


async def count_settled(url: str, ids: list[str]) -> int:
    return sum(j["status"] in _ENDED for j in (await jobs_of(url, ids)).values())


@pytest.mark.parametrize("shared", ["redis", "sqlite"])
async def test_jobs_survive_a_daemon_killed_mid_run(
    tmp_path: Path, real_claude: str, upstream: FakeUpstream, start_daemon: Start, shared: str,
    request: pytest.FixtureRequest,
) -> None:
    if shared == "redis":
        redis_url = request.getfixturevalue("redis_url")
        names: tuple[str, ...] = ("a", "b", "c")
        extra = extra_config(upstream, store=f'[store]\nurl = "{redis_url}"')
        total = 300
    else:
        names = ("solo",)
        extra = extra_config(upstream, store="", jobs=f'path = "{tmp_path / "jobs.sqlite3"}"')
        total = 100
    daemons = await start_daemons(start_daemon, tmp_path, extra, names=names, claude_bin=real_claude)
    per = total // len(daemons)
    ids: list[str] = []
    for i, d in enumerate(daemons):
        ids += await submit(d.url, [f"job {i}-{n}: answer briefly" for n in range(per)], f"batch-{i}")
    victim = daemons[-1]
    # Killed once work is under way everywhere (a tenth of the jobs settled), while it runs a job.
    async with asyncio.timeout(120):
        while await count_settled(daemons[0].url, ids) < total // 10:
            await asyncio.sleep(0.2)
        while (await victim.status())["in_flight"] < 1:
            await asyncio.sleep(0.005)
    victim.proc.send_signal(signal.SIGKILL)
    assert await victim.wait_exit() == -signal.SIGKILL
    config = tmp_path / names[-1] / "claudepool.toml"
    revived = await start_daemon("--config", str(config))
    alive = [*daemons[:-1], revived]
    found = await wait_ended(alive[0].url, ids, timeout_s=300)

    # Every job ended once, succeeded, with one result; a retried submission changes nothing.
    assert {j["status"] for j in found.values()} == {"succeeded"}, {
        j["id"]: (j["status"], j.get("error")) for j in found.values() if j["status"] != "succeeded"}
    assert sorted(await submit(alive[0].url, [f"job 0-{n}: answer briefly" for n in range(per)], "batch-0")) \
        == sorted(ids[:per])
    redelivered = [j for j in found.values() if j["attempts"] > 1]
    assert redelivered  # the killed daemon held jobs: they were delivered again, and ended once

    for d in alive:
        d.proc.send_signal(signal.SIGTERM)
        assert await d.wait_exit() == 0  # each flushed its records before it exited
    if shared != "redis":
        return  # the embedded ledger lived in the killed process: only the jobs outlive it
    store = RedisStore(redis_url)
    try:
        ledger = await store.ledger("acme", limit=100_000)
        spent = (await store.budget("acme")).day_spent_usd
    finally:
        await store.close()
    calls = {r.request_id for r in upstream.message_requests()}
    billed = [r.upstream_request_id for r in ledger if r.kind == "call"]
    # No call billed twice, and none billed that the provider did not answer.
    assert len(billed) == len(set(billed)) and set(billed) <= calls
    # Only the killed daemon's calls in flight went unrecorded (at most a couple per worker).
    unbilled = calls - set(billed)
    assert len(unbilled) <= 3 * WORKERS, len(unbilled)
    # The budget is the ledger's sum, and each job's cost is its settled attempt's calls.
    assert spent == pytest.approx(sum(r.cost_usd for r in ledger), rel=1e-9)
    by_request: dict[str, float] = {}
    for r in ledger:
        by_request[r.request_id] = by_request.get(r.request_id, 0.0) + r.cost_usd
    for job in found.values():
        assert by_request[job["result"]["id"]] == pytest.approx(job["cost_usd"], rel=1e-9)
    print(f"{total} jobs on {len(names)} daemons, one killed: {len(redelivered)} redelivered, "
          f"{len(calls)} upstream calls, {len(billed)} billed, {len(unbilled)} cut by the kill")
