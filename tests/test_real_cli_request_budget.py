"""A budget per request, and a routed request, on the real CLI (issue 14). A request's
``max_budget_usd`` (or its tenant's ``max_request_budget_usd``) is held per model call at the
gateway: a tool loop stops at the call that no longer fits, the request ends 402
``request_budget_exhausted``, and the next request has its own budget again. A request routed by
its kind reaches the upstream on the route's model and effort, and the next one on the profile's.
The upstream is the loopback fake; prices are Sonnet-like."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError, WorkerProtocolError
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_real_cli_budgets import LOW_OUTPUT, real_daemon, settled

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
LOOP = "[[loop:20:8000]] run the steps"  # twenty tool calls in one turn: 21 model calls
# The first call writes the CLI's system prompt to the cache (~$0.05), each next one reads it
# (~$0.005): these pay for a handful of calls, as in tests/test_real_cli_budgets.py.
BUDGETS = {"strict": 0.30, "soft": 0.08}


async def loop(d: RunningDaemon, tenant: str = "acme", **options: Any) -> Any:
    async with AsyncClient(key=KEYS[tenant], url=d.url) as client:
        try:
            return await client.prompt(LOOP, timeout_s=120, **options)
        except RemoteError as exc:
            return exc


@pytest.mark.parametrize("mode", ["strict", "soft"])
async def test_a_tool_loop_stops_at_its_requests_budget_and_the_next_request_has_its_own(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, mode: str
) -> None:
    budget = BUDGETS[mode]
    # No budget of the tenant's own: only the request's cap holds the calls.
    d = await real_daemon(make_daemon, real_claude, upstream, workers=1, tools=True, env=LOW_OUTPUT,
                          tenants={"acme": {"max_request_budget_usd": budget, "budget_mode": mode}})
    result = await loop(d)
    assert isinstance(result, RemoteError) and result.remote_code == "request_budget_exhausted", result
    assert result.http_status == 402
    await settled(d)
    first = upstream.message_requests()
    assert 2 <= len(first) < 21  # it ran, then stopped mid-turn at the call that did not fit
    assert d.sample("claudepool_gateway_refusals_total", reason="budget") == 1  # the CLI did not retry it
    ledger = await d.daemon.store.ledger("acme")
    spent = sum(r.cost_usd for r in ledger)
    if mode == "strict":
        assert spent <= budget  # not by a cent
    else:  # soft: the last call that fitted its estimate may cost more than it
        assert spent < budget + max(r.cost_usd for r in ledger)
    # The cap is per request, not a running total: the next request may spend as much again.
    again = await loop(d)
    assert isinstance(again, RemoteError) and again.remote_code == "request_budget_exhausted", again
    await settled(d)
    assert len(upstream.message_requests()) - len(first) >= 2
    print(f"{mode}: a budget of ${budget} per request held {len(first)} of the loop's 21 calls, ${spent:.4f} spent")


async def test_without_a_request_budget_the_same_loop_runs_to_the_end(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    # Negative control: the loop is what the budget stops, not something else.
    d = await real_daemon(make_daemon, real_claude, upstream, workers=1, tools=True, env=LOW_OUTPUT,
                          tenants={"acme": {"budget_mode": "strict"}})
    result = await loop(d)
    assert not isinstance(result, RemoteError) and not result.is_error, result
    assert len(upstream.message_requests()) >= 21


async def test_a_request_asks_for_less_than_its_tenants_cap_but_never_more(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await real_daemon(make_daemon, real_claude, upstream, workers=1, tools=True, env=LOW_OUTPUT,
                          tenants={"acme": {"max_request_budget_usd": 10.0, "budget_mode": "strict"}})
    over = await loop(d, max_budget_usd=10.5)
    assert isinstance(over, RemoteError) and (over.http_status, over.remote_code) == (400, "bad_request"), over
    assert "cap of 10" in str(over) and upstream.message_requests() == []  # refused before any call
    result = await loop(d, max_budget_usd=0.30)  # within the cap, far below it: stops the loop
    assert isinstance(result, RemoteError) and result.remote_code == "request_budget_exhausted", result
    await settled(d)
    assert sum(r.cost_usd for r in await d.daemon.store.ledger("acme")) <= 0.30


async def test_a_routed_request_reaches_the_upstream_on_the_routes_model_and_effort(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await real_daemon(
        make_daemon, real_claude, upstream, workers=1,
        routes={"security_audit": {"model": "opus", "effort": "high"}},
        tiers={"free": {"routes": {"security_audit": {"effort": "low"}}}},
        tenants={"acme": {"tier": "free", "models": ["opus"]}, "beta": {"models": ["opus"]}})
    async with AsyncClient(key=KEYS["acme"], url=d.url) as acme, AsyncClient(key=KEYS["beta"], url=d.url) as beta:
        routed = await acme.prompt("[[reply:audited]]", kind="security_audit", timeout_s=60)
        plain = await acme.prompt("[[reply:plain]]", timeout_s=60)
        other_tier = await beta.prompt("[[reply:audited]]", kind="security_audit", timeout_s=60)
        plain_again = await beta.prompt("[[reply:plain]]", timeout_s=60)
    assert routed.text == "audited" and routed.model == "claude-opus-4-5", routed
    assert other_tier.model == "claude-opus-4-5", other_tier
    assert plain.model == plain_again.model != "claude-opus-4-5"  # the profile's (the CLI's default)
    bodies = [orjson.loads(r.body) for r in upstream.requests if r.path == "/v1/messages"]
    answered = [b for b in bodies if b.get("max_tokens", 0) > 1]  # not set_model's own check of a new model
    efforts = [(b["model"], b.get("output_config", {}).get("effort")) for b in answered]
    print("model and effort of each call:", efforts)
    assert efforts[0] == ("claude-opus-4-5", "low")  # acme's tier route: its effort, the global model
    assert efforts[2] == ("claude-opus-4-5", "high")  # beta has no tier: the global route
    assert efforts[1] == efforts[3] and efforts[1][0] == plain.model  # back on the profile's, both times
    assert d.daemon.pools["default"].stats.reset_failures == 0


@pytest.mark.parametrize("profile_effort", ["low", "xhigh"])
async def test_a_profile_with_its_own_effort_gets_it_back_after_a_routed_one(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, profile_effort: str
) -> None:
    # The CLI names a level set at runtime in get_settings' ``effective``, the spawn's --effort
    # not: the reset must still find the worker as it started, and keep it. On opus-4-5 the CLI runs
    # --effort xhigh as high (measured): restored as it started, high.
    sent = {"low": "low", "xhigh": "high"}[profile_effort]
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"upstream_max_retries": 0, "model": "claude-opus-4-5", "effort": profile_effort},
                  "lean": {"min_idle": 0}, "other": {"min_idle": 0}},
        routes={"security_audit": {"effort": "high"}})
    async with AsyncClient(key=KEYS["acme"], url=d.url) as acme, AsyncClient(key=KEYS["beta"], url=d.url) as beta:
        for client, kind in ((acme, "security_audit"), (beta, None), (acme, "security_audit"), (beta, None)):
            await client.prompt("[[reply:ok]]", kind=kind, timeout_s=60)
    efforts = [orjson.loads(r.body).get("output_config", {}).get("effort")
               for r in upstream.requests if r.path == "/v1/messages"]
    assert efforts == ["high", sent, "high", sent], efforts
    stats = d.daemon.pools["default"].stats
    assert (stats.spawned, stats.reset_failures) == (1, 0)  # restored and kept, never retired


async def test_the_cli_does_not_switch_to_effort_max_at_runtime(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    # Why a route's "max" needs a profile of its own (a config error otherwise): asked at runtime,
    # the CLI keeps the effort it had. Seen through a worker of the pool, the daemon's way.
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"model": "claude-opus-4-5", "effort": "low"}, "lean": {"min_idle": 0},
                  "other": {"min_idle": 0}})
    pool = d.daemon.pools["default"]
    lease = await pool.acquire("acme", timeout_s=30)
    lease.worker.dirty = True  # as the service marks it: the reset restores the profile's effort
    try:
        assert await lease.worker.set_effort("high") == "high"
        with pytest.raises(WorkerProtocolError, match="effort 'max' asked, 'high' in force"):
            await lease.worker.set_effort("max")
    finally:
        lease.release()
    async with asyncio.timeout(30):  # the reset puts the profile's effort back, or retires the worker
        while pool.stats.resets + pool.stats.reset_failures == 0:
            await asyncio.sleep(0.05)
    assert (pool.stats.resets, pool.stats.reset_failures) == (1, 0)
