"""Jobs over HTTP on an in-process daemon with the fake CLI: submit, read, list, follow, cancel;
idempotency, tenant isolation, refusals at submission, and a restart that keeps the jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError
from claudepool.jobs.client import JobsClient
from claudepool.jobs.webhooks import verify
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import serving, spend, until

__all__ = ["make_daemon"]

Make = Callable[..., Awaitable[RunningDaemon]]
ACME = KEYS["acme"]
BETA = KEYS["beta"]


async def call(d: RunningDaemon, method: str, path: str, body: Any = None, key: str = ACME,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(
            method, f"{d.url}{path}", data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", **(headers or {})}) as resp:
        return resp.status, await resp.json()


async def finished(d: RunningDaemon, job_id: str, key: str = ACME, timeout_s: float = 20) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            status, job = await call(d, "GET", f"/v1/jobs/{job_id}", key=key)
            assert status == 200, job
            if job["status"] in ("succeeded", "failed", "cancelled", "dead"):
                return dict(job)
            await asyncio.sleep(0.05)


async def test_a_job_runs_on_a_pool_worker_and_keeps_its_result(make_daemon: Make) -> None:
    d = await make_daemon()
    status, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:done]]", "metadata": {"doc": "7"}})
    assert status == 202 and entry["status"] == "queued" and entry["lane"] == "pool" and entry["created"]
    job = await finished(d, entry["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["text"] == "done" and job["metadata"] == {"doc": "7"}
    assert job["usage"]["output_tokens"] > 0 and job["cost_usd"] > 0 and job["attempts"] == 1
    assert "attempt_token" not in job and "claimed_by" not in job  # the claim's internals stay inside
    assert d.sample("claudepool_jobs_submitted_total", lane="pool") == 1
    assert d.sample("claudepool_jobs_ended_total", lane="pool", status="succeeded") == 1
    assert d.sample("claudepool_jobs_ended_total", lane="batch_api", status="failed") == 0


async def test_jobs_are_each_tenants_own(make_daemon: Make) -> None:
    d = await make_daemon()
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:mine]]"})
    await finished(d, entry["id"])
    status, body = await call(d, "GET", f"/v1/jobs/{entry['id']}", key=BETA)
    assert status == 404 and body["error"]["code"] == "job_not_found"
    status, body = await call(d, "DELETE", f"/v1/jobs/{entry['id']}", key=BETA)
    assert status == 404
    _, listed = await call(d, "GET", "/v1/jobs", key=BETA)
    assert listed["jobs"] == []
    _, listed = await call(d, "GET", "/v1/jobs")
    assert [j["id"] for j in listed["jobs"]] == [entry["id"]]
    status, body = await call(d, "GET", f"/v1/jobs/{entry['id']}?tenant=acme", key=ADMIN_KEY)
    assert status == 200 and body["id"] == entry["id"]


async def test_an_idempotency_key_makes_a_retried_submission_safe(make_daemon: Make) -> None:
    d = await make_daemon()
    headers = {"Idempotency-Key": "order-42"}
    _, first = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:once]]"}, headers=headers)
    _, again = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:once]]"}, headers=headers)
    assert again["id"] == first["id"] and first["created"] and not again["created"]
    # The same key is another tenant's own.
    _, other = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:once]]"}, key=BETA, headers=headers)
    assert other["id"] != first["id"] and other["created"]
    _, listed = await call(d, "GET", "/v1/jobs")
    assert len(listed["jobs"]) == 1


async def test_bulk_submission_and_listing_by_status(make_daemon: Make) -> None:
    d = await make_daemon()
    jobs = [{"prompt": f"[[reply:n{i}]]"} for i in range(30)]
    status, body = await call(d, "POST", "/v1/jobs/bulk", {"jobs": jobs}, headers={"Idempotency-Key": "b1"})
    assert status == 202 and len(body["jobs"]) == 30
    _, again = await call(d, "POST", "/v1/jobs/bulk", {"jobs": jobs}, headers={"Idempotency-Key": "b1"})
    assert [j["id"] for j in again["jobs"]] == [j["id"] for j in body["jobs"]]
    assert not any(j["created"] for j in again["jobs"])
    done = [await finished(d, j["id"]) for j in body["jobs"]]
    assert [j["result"]["text"] for j in done] == [f"n{i}" for i in range(30)]
    _, listed = await call(d, "GET", "/v1/jobs?status=succeeded&limit=1000")
    assert len(listed["jobs"]) == 30


@pytest.mark.parametrize(("body", "code"), [
    ({"prompt": "x", "profile": "nope"}, "not_found"),
    ({"prompt": "x", "profile": "other"}, "forbidden"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "bad_request"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "bad_request"),
    ({"prompt": "x", "lane": "nowhere"}, "bad_request"),
    ({"prompt": "x", "surprise": 1}, "bad_request"),
    ("not an object", "bad_request"),
])
async def test_a_bad_job_is_refused_when_submitted(make_daemon: Make, body: Any, code: str) -> None:
    d = await make_daemon()
    status, answer = await call(d, "POST", "/v1/jobs", body)
    assert status in (400, 403, 404) and answer["error"]["code"] == code, answer
    _, listed = await call(d, "GET", "/v1/jobs")
    assert listed["jobs"] == []


async def test_a_bad_key_is_refused(make_daemon: Make) -> None:
    d = await make_daemon()
    status, answer = await call(d, "POST", "/v1/jobs", {"prompt": "x"}, key="wrong")
    assert status == 401 and answer["error"]["code"] == "unauthorized"
    status, answer = await call(d, "POST", "/v1/jobs", {"prompt": "x"}, key=ADMIN_KEY)
    assert status == 401  # the admin key is no tenant's: a job is always some tenant's


async def test_a_chat_history_is_one_prompt_on_the_pool(make_daemon: Make) -> None:
    d = await make_daemon()
    _, entry = await call(d, "POST", "/v1/jobs", {"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "[[echo]]"}]})
    job = await finished(d, entry["id"])
    assert "[assistant]\nhi" in job["result"]["text"]


async def test_cancelling_a_running_job_stops_its_turn(make_daemon: Make) -> None:
    d = await make_daemon(jobs={"visibility_timeout_s": 0.6})
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[hang]]"})
    async with asyncio.timeout(10):
        while (await call(d, "GET", f"/v1/jobs/{entry['id']}"))[1]["status"] != "running":
            await asyncio.sleep(0.05)
    status, job = await call(d, "DELETE", f"/v1/jobs/{entry['id']}")
    assert status == 200 and job["status"] == "cancelled"
    # The worker is interrupted and reset (the heartbeat found the claim gone), then serves others.
    _, other = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:next]]"})
    assert (await finished(d, other["id"]))["result"]["text"] == "next"
    assert (await finished(d, entry["id"]))["status"] == "cancelled"


async def test_events_follow_a_job_until_it_ends(make_daemon: Make) -> None:
    d = await make_daemon()
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[sleep:0.3]][[reply:late]]"})
    seen: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s, s.get(
            f"{d.url}/v1/jobs/{entry['id']}/events", headers={"Authorization": f"Bearer {ACME}"}) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                seen.append(orjson.loads(line[5:]))
    assert seen[-1]["status"] == "succeeded" and seen[-1]["result"]["text"] == "late"
    assert len({j["status"] for j in seen}) == len(seen)  # one event per change
    async with aiohttp.ClientSession() as s, s.get(
            f"{d.url}/v1/jobs/{entry['id']}/events", headers={"Authorization": f"Bearer {BETA}"}) as resp:
        assert resp.status == 404


async def test_jobs_outlive_a_restart_of_the_embedded_daemon(make_daemon: Make, tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.sqlite3")
    d = await make_daemon(jobs={"path": path})
    _, done = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:kept]]"})
    await finished(d, done["id"])
    d.daemon.request_stop()
    assert await d.task == 0
    again = await make_daemon(jobs={"path": path}, server={"socket": str(tmp_path / "cp2.sock")})
    _, job = await call(again, "GET", f"/v1/jobs/{done['id']}")
    assert job["status"] == "succeeded" and job["result"]["text"] == "kept"


@pytest.mark.parametrize("transport", ["http", "socket"])
async def test_the_client_submits_follows_and_cancels_jobs(make_daemon: Make, transport: str) -> None:
    d = await make_daemon()
    where: dict[str, Any] = {"url": d.url} if transport == "http" else {"socket_path": d.socket}
    async with AsyncClient(key=ACME, **where) as client:
        jobs = JobsClient(client)
        entry = await jobs.submit("[[reply:from the client]]", idempotency_key="c-1")
        assert (await jobs.submit("[[reply:from the client]]", idempotency_key="c-1"))["id"] == entry["id"]
        done = await jobs.wait(entry["id"], timeout_s=20)
        assert done["status"] == "succeeded" and done["result"]["text"] == "from the client"
        bulk = await jobs.submit_bulk([{"prompt": "[[reply:a]]"}, {"prompt": "[[reply:b]]"}])
        texts = [(await jobs.wait(j["id"], timeout_s=20))["result"]["text"] for j in bulk]
        assert texts == ["a", "b"]
        assert {j["id"] for j in await jobs.list(status="succeeded")} == {entry["id"], *(j["id"] for j in bulk)}
        hung = await jobs.submit("[[hang]]")
        assert (await jobs.cancel(hung["id"]))["status"] == "cancelled"
        with pytest.raises(RemoteError) as refused:
            await jobs.get("job_unknown")
        assert refused.value.remote_code == "job_not_found"
        with pytest.raises(RemoteError) as bad:
            await jobs.submit(None)
        assert bad.value.remote_code == "bad_request"
    async with AsyncClient(key=BETA, **where) as client:
        with pytest.raises(RemoteError) as other:
            await JobsClient(client).get(entry["id"])
        assert other.value.remote_code == "job_not_found"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serving(app) as url:
        yield f"{url}/hook", got


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_job_end_is_posted_to_the_tenants_webhook_signed(
        make_daemon: Make, receiver: tuple[str, list[tuple[dict[str, str], bytes]]], allowed: bool) -> None:
    url, got = receiver
    secret = "whsec-acme-0123"
    d = await make_daemon(tenants={"acme": {"webhook_url": url, "webhook_secret": secret}},
                          webhooks={"allowed_hosts": ["127.0.0.1"] if allowed else ["example.invalid"]})
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:hooked]]"})
    await finished(d, entry["id"])
    async with asyncio.timeout(10):
        while ((job := (await call(d, "GET", f"/v1/jobs/{entry['id']}"))[1]).get("webhook") or {}).get(
                "state") in (None, "pending"):
            await asyncio.sleep(0.05)
    if not allowed:  # the negative control: a host off the allow-list is never called
        assert job["webhook"]["state"] == "failed" and got == []
        await until(lambda: d.sample("claudepool_job_webhooks_total", state="failed") == 1, 5)
        return
    await until(lambda: d.sample("claudepool_job_webhooks_total", state="delivered") == 1, 5)
    assert job["webhook"]["state"] == "delivered" and job["webhook"]["attempts"] == 1
    [(headers, body)] = got
    assert verify(secret.encode(), headers["Claudepool-Signature"], body)
    assert not verify(b"another tenant's secret", headers["Claudepool-Signature"], body)
    event = orjson.loads(body)
    assert headers["Claudepool-Event-Id"] == entry["id"] and event["type"] == "job.ended"
    assert event["job"]["result"]["text"] == "hooked" and "attempt_token" not in event["job"]


@pytest.mark.parametrize("priority", ["batch", "interactive"])
async def test_batch_jobs_use_only_what_interactive_requests_leave_free(make_daemon: Make, priority: str) -> None:
    # One worker; twelve jobs of 0.3 s each are waiting. An interactive prompt then waits at most for
    # the job running now, not for the rest. The negative control: jobs at interactive priority
    # queue like requests, so the prompt waits behind those already waiting.
    d = await make_daemon(pool={"min_idle": 1, "max_workers": 1}, jobs={"max_running": 12})
    _, bulk = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [
        {"prompt": f"[[sleep:0.3]][[reply:j{i}]]", "priority": priority} for i in range(12)]})
    async with asyncio.timeout(10):
        while d.daemon.service.queued < 10:
            await asyncio.sleep(0.02)
    async with AsyncClient(key=ACME, url=d.url) as client:
        answer = await client.prompt("[[reply:interactive]]", timeout_s=30)
    ended_before = sum([(await call(d, "GET", f"/v1/jobs/{j['id']}"))[1]["status"] == "succeeded"
                        for j in bulk["jobs"]])
    if priority == "batch":
        assert answer.queue_ms < 1000 and ended_before <= 3, (answer.queue_ms, ended_before)
    else:
        assert ended_before >= 8, (answer.queue_ms, ended_before)
    for j in bulk["jobs"]:
        await finished(d, j["id"], timeout_s=30)


async def test_a_job_of_a_tenant_whose_budget_is_spent_fails_budget_exhausted(make_daemon: Make) -> None:
    d = await make_daemon(tenants={"acme": {"daily_budget_usd": 0.0001}})
    await spend(d.daemon.store, "acme", 1.0)
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:never]]"})
    job = await finished(d, entry["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "budget_exhausted", job


async def test_a_tenants_open_jobs_are_bounded(make_daemon: Make) -> None:
    d = await make_daemon(jobs={"max_open_jobs_per_tenant": 3})
    _, first = await call(d, "POST", "/v1/jobs/bulk", {"jobs": [{"prompt": "[[hang]]"}] * 3})
    status, body = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:one too many]]"})
    assert status == 429 and body["error"]["code"] == "too_many_jobs"
    status, _ = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:another tenant's own]]"}, key=BETA)
    assert status == 202
    await call(d, "DELETE", f"/v1/jobs/{first['jobs'][0]['id']}")
    status, _ = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:room again]]"})
    assert status == 202
    for j in first["jobs"][1:]:
        await call(d, "DELETE", f"/v1/jobs/{j['id']}")


async def test_a_job_past_its_deadline_fails_and_its_tenant_is_told(
        make_daemon: Make, receiver: tuple[str, list[tuple[dict[str, str], bytes]]]) -> None:
    url, got = receiver
    d = await make_daemon(tenants={"acme": {"webhook_url": url, "webhook_secret": "whsec-0123"}},
                          webhooks={"allowed_hosts": ["127.0.0.1"]}, jobs={"max_running": 1})
    _, busy = await call(d, "POST", "/v1/jobs", {"prompt": "[[sleep:1]][[reply:slow]]"})
    _, late = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:too late]]", "deadline_s": 0.2})
    job = await finished(d, late["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "deadline_exceeded"
    await finished(d, busy["id"])
    async with asyncio.timeout(10):
        while len(got) < 2:
            await asyncio.sleep(0.05)
    told = {orjson.loads(body)["job"]["id"]: orjson.loads(body)["job"]["status"] for _, body in got}
    assert told == {late["id"]: "failed", busy["id"]: "succeeded"}


async def test_a_restart_resumes_a_webhook_delivery_left_pending(make_daemon: Make, tmp_path: Path) -> None:
    statuses = [503]
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(status=statuses[0])

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with serving(app) as url:
        config: dict[str, Any] = {
            "tenants": {"acme": {"webhook_url": f"{url}/hook", "webhook_secret": "whsec-0123"}},
            "webhooks": {"allowed_hosts": ["127.0.0.1"], "first_retry_s": 3600.0, "max_retry_s": 3600.0},
            "jobs": {"path": str(tmp_path / "jobs.sqlite3")}}
        d = await make_daemon(**config)
        _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[reply:told later]]"})
        async with asyncio.timeout(10):
            while ((await call(d, "GET", f"/v1/jobs/{entry['id']}"))[1].get("webhook") or {}).get("attempts") != 1:
                await asyncio.sleep(0.05)
        d.daemon.request_stop()  # its next attempt was an hour away: the delivery is left pending
        assert await d.task == 0
        statuses[0] = 204
        again = await make_daemon(**config, server={"socket": str(tmp_path / "cp2.sock")})
        async with asyncio.timeout(10):
            while (job := (await call(again, "GET", f"/v1/jobs/{entry['id']}"))[1])["webhook"]["state"] != (
                    "delivered"):
                await asyncio.sleep(0.05)
    assert len(got) == 2 and orjson.loads(got[-1])["job"]["id"] == entry["id"] and job["status"] == "succeeded"


async def test_followers_that_leave_keep_nothing_in_the_daemon(make_daemon: Make) -> None:
    # A client may follow its jobs and hang up, again and again: what a follower holds goes with it.
    d = await make_daemon()
    _, entry = await call(d, "POST", "/v1/jobs", {"prompt": "[[hang]]"})
    jobs = d.daemon.jobs
    assert jobs is not None
    for _ in range(5):
        async with aiohttp.ClientSession() as s, s.get(
                f"{d.url}/v1/jobs/{entry['id']}/events", headers={"Authorization": f"Bearer {ACME}"}) as resp:
            await resp.content.readline()  # the first event: it is followed now
            await until(lambda: entry["id"] in jobs.service._followers, 5)
    await until(lambda: not jobs.service._followers and not jobs.service._changed, 5)
    await call(d, "DELETE", f"/v1/jobs/{entry['id']}")
