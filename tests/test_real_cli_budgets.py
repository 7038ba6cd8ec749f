"""Budgets on the real CLI (issue 12, part C): every model call holds its tenant's budget at the
gateway, so a small budget admits a few requests, a strict one is never exceeded under 50
concurrent requests (memory and Redis), and a tool loop that runs out of budget stops at its next
call. The upstream is the loopback fake; prices are Sonnet-like."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError
from claudepool.store.redis import RedisStore
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEY, KEYS, DaemonProcess, RunningDaemon, make_daemon, start_daemon
from tests.test_tenancy import FAKE_PRICING
from tests.test_tenancy_redis import start_daemons

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon", "start_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
# A strict profile lowers the CLI's own max_tokens (128,000 by default), so a call's bound is near
# what it can really cost and several calls of a tenant fit in its budget at once.
LOW_OUTPUT = {"CLAUDE_CODE_MAX_OUTPUT_TOKENS": "1024"}


async def real_daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, *, tenants: dict[str, Any],
                      workers: int = 2, tools: bool = False, env: dict[str, str] | None = None,
                      **overrides: Any) -> RunningDaemon:
    default: dict[str, Any] = {"upstream_max_retries": 0, "env": env or {}}
    if tools:
        default |= {"tools": ["Bash"], "args": ["--allowedTools", "Bash"]}
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": workers, "max_workers": workers, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"}, pricing=FAKE_PRICING,
        profiles={"default": default, "lean": {"min_idle": 0}, "other": {"min_idle": 0}},
        tenants=tenants, **overrides)


async def settled(d: RunningDaemon) -> None:
    async with asyncio.timeout(20):
        while d.daemon.meter.backlog or d.daemon.service.in_flight:
            await asyncio.sleep(0.02)


async def answers(d: RunningDaemon, prompts: list[str]) -> list[Any]:
    """Each prompt at once from tenant acme: its `PromptResult`, or the `RemoteError` it got."""
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        return await asyncio.gather(*(client.prompt(p, timeout_s=120) for p in prompts), return_exceptions=True)


def over_budget(result: Any) -> bool:
    return isinstance(result, RemoteError) and result.remote_code == "budget_exhausted"


def store_of(store: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """``[store]`` for the memory store or the test's own Redis."""
    return {"url": request.getfixturevalue("redis_url")} if store == "redis" else {}


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_budget_of_three_and_a_half_requests_admits_three_then_402s(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Any, store: str,
    request: pytest.FixtureRequest,
) -> None:
    calibration = await real_daemon(make_daemon, real_claude, upstream, tenants={})
    async with AsyncClient(key=KEYS["beta"], url=calibration.url) as beta:
        costs = [(await beta.prompt(f"beta question {i}")).cost_usd for i in range(4)]
    calibration.daemon.request_stop()
    await calibration.task
    # Once the CLI's system prompt is in the provider's cache; acme asks other questions of the same
    # length, which the cache has not seen either.
    cost = statistics.median(costs[1:])
    budget = 3.5 * cost
    d = await real_daemon(make_daemon, real_claude, upstream, tenants={"acme": {"daily_budget_usd": budget}},
                          server={"socket": str(tmp_path / "second.sock")}, sessions={"dir": str(tmp_path / "s2")},
                          store=store_of(store, request))
    outcomes: list[float | str] = []
    async with AsyncClient(key=KEYS["acme"], url=d.url) as acme:
        for i in range(8):
            try:
                outcomes.append((await acme.prompt(f"acme question {i}")).cost_usd)
            except RemoteError as exc:
                outcomes.append("402" if over_budget(exc) else exc.remote_code)
            await settled(d)
    admitted = outcomes.index("402")
    assert admitted >= 3, outcomes
    assert set(outcomes[admitted:]) == {"402"}  # and then refused, every time
    spent = (await d.daemon.store.budget("acme")).day_spent_usd
    # Soft (the default): admitted below 0.9 of the budget, so at most one request's cost over it.
    assert spent <= 0.9 * budget + cost * 1.5
    print(f"budget ${budget:.5f} (3.5 x ${cost:.5f}): {admitted} requests admitted, ${spent:.5f} spent")


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_strict_budget_is_never_exceeded_by_fifty_concurrent_requests(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, store: str, request: pytest.FixtureRequest
) -> None:
    budget = 0.30
    d = await real_daemon(make_daemon, real_claude, upstream, workers=4, env=LOW_OUTPUT, store=store_of(store, request),
                          tenants={"acme": {"daily_budget_usd": budget, "budget_mode": "strict", "max_queued": 100}})
    # ~$0.03 of answer each: fifty would spend five times the budget if nothing held it.
    results = await answers(d, ["[[tokens:2000]] write at length"] * 50)
    await settled(d)
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if over_budget(r)]
    assert len(served) + len(refused) == 50, [r for r in results if isinstance(r, BaseException)
                                              and not over_budget(r)]
    assert len(served) >= 2 and refused
    state = await d.daemon.store.budget("acme")
    assert state.day_spent_usd <= budget  # not by a cent
    assert state.reserved_usd == pytest.approx(0, abs=1e-12)
    ledger = await d.daemon.store.ledger("acme")
    assert sum(r.cost_usd for r in ledger) == pytest.approx(state.day_spent_usd, rel=1e-9)
    assert all(r.kind == "call" for r in ledger)
    # A request answered is billed its calls; one refused mid-turn (a call lowered to the budget
    # stops at max_tokens, the CLI goes on, and its next call is refused) keeps what it spent.
    by_request: dict[str, float] = {}
    for r in ledger:
        by_request[r.request_id] = by_request.get(r.request_id, 0.0) + r.cost_usd
    assert [pytest.approx(by_request[r.id], rel=1e-9) for r in served] == [r.cost_usd for r in served]
    assert (d.sample("claudepool_gateway_refusals_total", reason="budget") or 0) > 0


async def test_a_soft_budget_overshoots_within_its_bound(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    # The same load as the strict test, soft: nothing is lowered, so calls in flight when the stop
    # is reached run to their end. The bound: spend < f.B + k.c_max, k calls at once (4 workers).
    budget, fraction, workers = 0.30, 0.9, 4
    d = await real_daemon(make_daemon, real_claude, upstream, workers=workers, env=LOW_OUTPUT,
                          tenants={"acme": {"daily_budget_usd": budget, "max_queued": 100}})
    results = await answers(d, ["[[tokens:2000]] write at length"] * 50)
    await settled(d)
    served = [r for r in results if not isinstance(r, BaseException)]
    assert served and any(over_budget(r) for r in results)
    ledger = await d.daemon.store.ledger("acme")
    c_max = max(r.cost_usd for r in ledger)
    spent = (await d.daemon.store.budget("acme")).day_spent_usd
    assert spent < fraction * budget + workers * c_max
    print(f"soft budget ${budget}: spent ${spent:.4f} ({spent / budget:.0%}) in {len(served)} requests, "
          f"dearest call ${c_max:.4f}")


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("mode", ["strict", "soft"])
async def test_a_tool_loop_that_runs_out_of_budget_stops_at_its_next_call(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, mode: str, store: str,
    request: pytest.FixtureRequest,
) -> None:
    # Twenty tool calls asked for in one turn; the budget pays for a handful: the first call writes
    # the CLI's system prompt to the cache (~$0.05), each next one reads it (~$0.005).
    budget = 0.30 if mode == "strict" else 0.08
    d = await real_daemon(make_daemon, real_claude, upstream, workers=1, tools=True, env=LOW_OUTPUT,
                          tenants={"acme": {"daily_budget_usd": budget, "budget_mode": mode}},
                          store=store_of(store, request))
    started = time.monotonic()
    [result] = await answers(d, ["[[loop:20:8000]] run the steps"])
    assert over_budget(result), result
    await settled(d)
    calls = upstream.message_requests()
    assert 2 <= len(calls) < 21  # it ran, then stopped mid-turn: the loop needed 21 calls
    assert d.sample("claudepool_gateway_refusals_total", reason="budget") == 1  # the CLI did not retry it
    spent = (await d.daemon.store.budget("acme")).day_spent_usd
    ledger = await d.daemon.store.ledger("acme")
    assert len(ledger) == len(calls) and sum(r.cost_usd for r in ledger) == pytest.approx(spent, rel=1e-9)
    if mode == "strict":
        assert spent <= budget
    else:
        assert spent < 0.9 * budget + max(r.cost_usd for r in ledger)
    assert time.monotonic() - started < 60


async def test_two_daemons_on_one_redis_hold_one_strict_budget(
    tmp_path: Path, redis_url: str, real_claude: str, upstream: FakeUpstream,
    start_daemon: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    budget = 0.30
    pricing = "\n".join(f"{k} = {v}" for k, v in FAKE_PRICING["default"].items())
    extra = f"""daily_budget_usd = {budget}
budget_mode = "strict"

[store]
url = "{redis_url}"

[upstream]
base_url = "{upstream.base_url}"
api_key = "sk-ant-test"

[profiles.default]
upstream_max_retries = 0
env = {{CLAUDE_CODE_MAX_OUTPUT_TOKENS = "1024"}}

[pricing.default]
{pricing}
"""
    daemons = await start_daemons(start_daemon, tmp_path, extra, claude_bin=real_claude)
    # Both daemons' workers spend the one budget at once: 40 requests, ~$0.03 of answer each.
    async with AsyncClient(key=KEY, url=daemons[0].url) as a, AsyncClient(key=KEY, url=daemons[1].url) as b:
        results = await asyncio.gather(*(client.prompt("[[tokens:2000]] write at length", timeout_s=120)
                                         for client in (a, b) * 20), return_exceptions=True)
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) >= 2 and all(over_budget(r) for r in results if isinstance(r, BaseException)), {
        repr(r) for r in results}
    for d in daemons:
        d.proc.send_signal(signal.SIGTERM)
        assert await d.wait_exit() == 0  # each flushed its records to Redis before it exited
    store = RedisStore(redis_url)
    try:
        state = await store.budget("acme")
        ledger = await store.ledger("acme")
    finally:
        await store.close()
    assert state.day_spent_usd <= budget
    assert state.reserved_usd == pytest.approx(0, abs=1e-12)
    assert sum(r.cost_usd for r in ledger) == pytest.approx(state.day_spent_usd, rel=1e-9)
    assert sum(r.cost_usd for r in served) <= state.day_spent_usd + 1e-12
