"""Bounded per-tenant state (issue item 8): what one tenant, or one client, can make the daemon hold.

Open sessions per tenant, queued requests under concurrency (stateless and session turns), ledger
reads, and prompts in flight on one socket connection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.store.base import UsageRecord
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import until
from tests.test_unix_api import TERMINAL, connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


# -- prompts in flight on one socket connection ---------------------------------------------------------


async def test_a_connection_holds_at_most_max_requests_per_connection_prompts(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_requests_per_connection": 3}, pool={"max_workers": 4})
    async with connect(d) as c, connect(d) as other:
        # One write, so all five are read before any of them runs.
        await c.send(*(prompt(f"r{i}", "[[hang]]", timeout_s=20) for i in range(5)))
        refused = [await c.next(), await c.next()]
        assert [(f["id"], f["event"], f["code"]) for f in refused] == [
            ("r3", "error", "too_many_in_flight"), ("r4", "error", "too_many_in_flight")]
        assert "3 requests are in flight on this connection" in refused[0]["message"]
        # The bound is per connection: another one is served meanwhile.
        await other.send(prompt("o1", "[[reply:elsewhere]]", tenant="beta"))
        assert (await other.next())["text"] == "elsewhere"
        # Room again once one of the three has ended.
        await c.send({"id": "c1", "op": "cancel", "target": "r0"})
        await c.until_terminals("r0")
        await c.send(prompt("r5", "[[reply:room again]]"))
        await c.read_until(lambda f: f["id"] == "r5" and f["event"] in TERMINAL)
        assert c.frames[-1]["text"] == "room again"
        for frame_id in ("r1", "r2"):
            await c.send({"id": f"c-{frame_id}", "op": "cancel", "target": frame_id})
        await c.until_terminals("r1", "r2")
    await until(lambda: d.daemon.service.in_flight == 0, 10)
    assert d.requests_by_outcome()["cancelled"] == 3
    assert d.requests_by_outcome()["too_many_in_flight"] == 2  # refusals are counted too


# -- open sessions per tenant ---------------------------------------------------------------------------


async def create_session(d: RunningDaemon, tenant: str = "acme") -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(
        f"{d.url}/v1/sessions", data=b"{}", headers={"Authorization": f"Bearer {KEYS[tenant]}"}
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def delete_session(d: RunningDaemon, session_id: str) -> int:
    async with aiohttp.ClientSession() as s, s.delete(
        f"{d.url}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {KEYS['acme']}"}
    ) as resp:
        return resp.status


async def test_five_hundred_session_creates_at_once_keep_the_default_hundred(make_daemon: MakeDaemon) -> None:
    """The report: 500 POST /v1/sessions from one tenant in 0.1 s kept 500 sessions for a day."""
    d = await make_daemon(pool={"min_idle": 0})
    answers = await asyncio.gather(*(create_session(d) for _ in range(500)))
    statuses = Counter(status for status, _, _ in answers)
    assert statuses == {201: 100, 429: 400}
    refused = next(body for status, body, _ in answers if status == 429)
    assert refused["error"]["code"] == "too_many_sessions"
    assert "100 open sessions" in refused["error"]["message"]
    assert all("Retry-After" not in headers for status, _, headers in answers if status == 429)
    assert len(await d.daemon.store.session_list("acme")) == 100
    # Another tenant has its own bound.
    assert (await create_session(d, "beta"))[0] == 201


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_fifty_concurrent_creates_never_overshoot_max_sessions(
    make_daemon: MakeDaemon, request: pytest.FixtureRequest, backend: str
) -> None:
    store = {"url": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    d = await make_daemon(pool={"min_idle": 0}, store=store, tenants={"acme": {"max_sessions": 10}})
    answers = await asyncio.gather(*(create_session(d) for _ in range(50)))
    assert Counter(status for status, _, _ in answers) == {201: 10, 429: 40}
    kept = await d.daemon.store.session_list("acme")
    assert {r.id for r in kept} == {body["id"] for status, body, _ in answers if status == 201}


async def test_a_closed_or_deleted_session_makes_room_and_the_socket_says_too_many_sessions(
    make_daemon: MakeDaemon
) -> None:
    d = await make_daemon(pool={"min_idle": 0}, sessions={"max_sessions": 5, "min_idle": 0, "max_workers": 1,
                                                          "ttl_s": 0.3, "sweep_interval_s": 0.05,
                                                          "maintenance_interval_s": 0.05},
                          tenants={"acme": {"max_sessions": 2}})
    first, second = [(await create_session(d))[1]["id"] for _ in range(2)]
    status, body, _ = await create_session(d)
    assert (status, body["error"]["code"]) == (429, "too_many_sessions")  # the tenant's 2, not [sessions]' 5
    async with connect(d) as c:
        await c.send({"id": "n1", "op": "session.create", "key": KEYS["acme"]})
        refused = await c.next()
        assert (refused["id"], refused["event"], refused["code"]) == ("n1", "error", "too_many_sessions")
        assert await delete_session(d, first) == 204
        await c.send({"id": "n2", "op": "session.create", "key": KEYS["acme"]})
        made = await c.next()
        assert (made["id"], made["event"]) == ("n2", "session")
    # Unused, both expire (ttl_s): closed sessions stay until retention_s but no longer count.
    await until(lambda: d.daemon.sessions.events["expired"] >= 2, 10)
    closed = {r.id for r in await d.daemon.store.session_list("acme") if r.state == "closed"}
    assert {second, made["session"]["id"]} <= closed
    assert [(await create_session(d))[0] for _ in range(3)] == [201, 201, 429]


# -- queued requests under concurrency --------------------------------------------------------------------


async def post_prompt(d: RunningDaemon, body: dict[str, Any], tenant: str = "acme") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(
        f"{d.url}/v1/prompt", data=orjson.dumps(body), headers={"Authorization": f"Bearer {KEYS[tenant]}"}
    ) as resp:
        answer = await resp.json()
        return resp.status, answer["error"]["code"] if "error" in answer else "ok"


def awaiting_admission(redis_url: str) -> dict[str, Any]:
    """A daemon where admission really waits (a budget reserved on Redis) before a request queues:
    the window in which concurrent requests could all pass the queue bound."""
    return {"store": {"url": redis_url}, "pool": {"max_workers": 1, "min_idle": 1},
            "sessions": {"min_idle": 0, "max_workers": 1},
            "tenants": {"acme": {"max_queued": 5, "daily_budget_usd": 1000, "max_queue_wait_s": 1.5}}}


async def test_fifty_concurrent_requests_never_overshoot_max_queued(make_daemon: MakeDaemon, redis_url: str) -> None:
    d = await make_daemon(**awaiting_admission(redis_url))
    # Held well past the queued requests' 1.5 s wait, however slowly a loaded machine admits them.
    busy = asyncio.create_task(post_prompt(d, {"prompt": "[[hang]]", "timeout_s": 6}, tenant="beta"))
    await until(lambda: d.pool().counts()["leased"] == 1)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, d.daemon.service.queued)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(post_prompt(d, {"prompt": "[[reply:x]]"}) for _ in range(50)))
    watcher.cancel()
    assert Counter(answers) == {(503, "queue_full"): 45, (503, "pool_timeout"): 5}, Counter(answers)
    assert peak <= 5
    assert await busy == (504, "timeout")
    await until(lambda: d.daemon.service.queued == 0 and d.daemon.service.in_flight == 0, 10)
    assert (await d.daemon.store.budget("acme")).reserved_usd == 0  # every refused request gave its back


async def test_turns_waiting_on_one_session_count_against_max_queued(make_daemon: MakeDaemon, redis_url: str) -> None:
    d = await make_daemon(**awaiting_admission(redis_url))
    async with aiohttp.ClientSession() as s, s.post(
        f"{d.url}/v1/sessions", data=b"{}", headers={"Authorization": f"Bearer {KEYS['acme']}"}
    ) as resp:
        sid = (await resp.json())["id"]
    busy = asyncio.create_task(post_prompt(d, {"prompt": "[[hang]]", "session": sid, "timeout_s": 3}))
    await until(lambda: d.daemon.session_pools["default"].counts()["leased"] == 1, 10)
    answers = await asyncio.gather(*(post_prompt(d, {"prompt": "[[reply:x]]", "session": sid, "timeout_s": 1})
                                     for _ in range(20)))
    # Five wait for the session (until their deadline); the rest are refused at once.
    assert Counter(answers) == {(503, "queue_full"): 15, (504, "timeout"): 5}, Counter(answers)
    assert await busy == (504, "timeout")
    await until(lambda: d.daemon.service.queued == 0 and d.daemon.service.in_flight == 0, 10)


# -- ledger reads ------------------------------------------------------------------------------------------


async def settle_records(d: RunningDaemon, tenant: str, count: int) -> None:
    now = time.time()
    for i in range(count):
        await d.daemon.store.settle(UsageRecord(record_id=f"{tenant}-{i}", request_id=f"req-{tenant}-{i}",
                                                tenant=tenant, profile="default", model="m", outcome="ok",
                                                at=now - 100 + i, output_tokens=i))


async def read_ledger(d: RunningDaemon, query: str, tenant: str = "acme") -> tuple[int, list[Any], dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(
        f"{d.url}/v1/ledger?{query}", headers={"Authorization": f"Bearer {KEYS[tenant]}"}
    ) as resp:
        raw = await resp.read()
        if resp.status != 200:
            return resp.status, [orjson.loads(raw)], dict(resp.headers)
        return resp.status, [orjson.loads(line) for line in raw.splitlines()], dict(resp.headers)


async def test_one_ledger_answer_carries_at_most_ledger_page_records(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"min_idle": 0}, server={"ledger_page_records": 5})
    await settle_records(d, "acme", 8)
    status, records, headers = await read_ledger(d, "limit=100000")
    assert (status, headers["X-Ledger-Limit"]) == (200, "5")
    assert [r["output_tokens"] for r in records] == [0, 1, 2, 3, 4]
    # The next page starts where this one ended.
    status, records, _ = await read_ledger(d, f"since={records[-1]['at']}&limit=3")
    assert [r["output_tokens"] for r in records] == [4, 5, 6]
    assert set(records[0]) == set(UsageRecord.__dataclass_fields__)  # the same fields as before


async def test_a_tenant_has_at_most_max_ledger_reads_per_tenant_in_flight(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"min_idle": 0}, server={"max_ledger_reads_per_tenant": 2})
    await settle_records(d, "acme", 3)
    await settle_records(d, "beta", 1)
    memory = d.daemon.store.inner
    real_ledger = memory.ledger
    gate = asyncio.Event()
    reading: Counter[str | None] = Counter()

    async def slow_ledger(tenant: str | None = None, **kwargs: Any) -> list[UsageRecord]:
        reading[tenant] += 1
        await gate.wait()  # a slow store (a large Redis stream, a congested link)
        return await real_ledger(tenant, **kwargs)

    memory.ledger = slow_ledger  # type: ignore[method-assign]  # a slow real store
    slow = [asyncio.create_task(read_ledger(d, "")) for _ in range(2)]
    other = asyncio.create_task(read_ledger(d, "", tenant="beta"))  # its own bound
    await until(lambda: reading == {"acme": 2, "beta": 1})
    async with asyncio.timeout(5):  # refused at once, or it would wait on the gate with the others
        status, (body,), headers = await read_ledger(d, "")
    assert (status, body["error"]["code"], headers["Retry-After"]) == (429, "too_many_in_flight", "1")
    assert reading["acme"] == 2  # refused before it reached the store
    gate.set()
    answers = await asyncio.gather(*slow, other)
    assert [(status, len(records)) for status, records, _ in answers] == [(200, 3), (200, 3), (200, 1)]
    assert (await read_ledger(d, ""))[0] == 200  # room again once they ended
