"""System prompts per request, per tenant and per session, on pools made on demand (issue 14).

The fake CLI answers ``[[system]]`` with the ``--system-prompt`` it was started with, so each answer
shows which workers served it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from claudepool.client import AsyncClient
from claudepool.config import load_settings
from claudepool.daemon.pools import PoolRegistry
from claudepool.errors import RemoteError, TooManyPools
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import until
from tests.test_sessions import call, say, sessions_config

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
PIRATE = "You are a pirate. SECRET-PERSONA-7731"
POET = "You answer in verse. SECRET-POET-0042"


def config(**tenants: dict[str, Any]) -> dict[str, Any]:
    """acme may send its own system prompts; beta may not (unless a test says otherwise)."""
    base: dict[str, Any] = {"acme": {"allow_custom_system_prompt": True, "profiles": ["default", "lean"]},
                            "beta": {}}
    for name, extra in tenants.items():
        base[name] = {**base.get(name, {}), **extra}
    return {"tenants": base}


def registry(d: RunningDaemon) -> PoolRegistry:
    return d.daemon.pool_registry


def cmdline(pid: int | None) -> list[str]:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def test_a_requests_system_prompt_reaches_the_command_line_of_the_workers_that_serve_it(
        make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    status, body = await say(d, None, "[[system]]", system=PIRATE)
    assert (status, body["text"]) == (200, PIRATE), body
    [pool] = registry(d).on_demand
    assert pool.config.min_idle == 0
    [worker] = pool.workers()
    argv = cmdline(worker.pid)
    assert argv[argv.index("--system-prompt") + 1] == PIRATE
    assert pool.profile.name.startswith("default~") and PIRATE not in pool.profile.name
    # Without one: the profile's pool, whose workers have no --system-prompt of their own.
    status, body = await say(d, None, "[[system]]")
    assert (status, body["text"]) == (200, "<none>")
    assert d.pool().stats.leases == 1 and pool.stats.leases == 1
    # The profile's own system prompt, sent as it is, is the profile's pool (lean's is "brief").
    status, body = await say(d, None, "[[system]]", system="brief", profile="lean")
    assert (status, body["text"]) == (200, "brief")
    assert registry(d).on_demand == [pool] and d.pool("lean").stats.leases == 1


async def test_two_tenants_with_the_same_system_prompt_share_one_pool(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(beta={"allow_custom_system_prompt": True}))
    for tenant in ("acme", "beta", "acme"):
        status, body = await say(d, None, "[[system]]", tenant, system=PIRATE)
        assert (status, body["text"]) == (200, PIRATE), body
    [pool] = registry(d).on_demand
    assert pool.stats.leases == 3 and registry(d).made == 1
    status, body = await say(d, None, "[[system]]", "beta", system=POET)
    assert (status, body["text"]) == (200, POET)
    assert registry(d).made == 2 and len(registry(d).on_demand) == 2


async def test_a_tenant_without_the_flag_is_refused_its_own_system_prompt(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(beta={"system_prompt": POET}))
    status, body = await say(d, None, "[[system]]", "beta", system=PIRATE)
    assert status == 403, body
    assert body["error"]["code"] == "forbidden" and "allow_custom_system_prompt" in body["error"]["message"]
    assert PIRATE not in body["error"]["message"]
    assert registry(d).made == 0  # refused before any pool was made
    # Its persona is its default, sent or not.
    for extra in ({}, {"system": POET}):
        status, body = await say(d, None, "[[system]]", "beta", **extra)
        assert (status, body["text"]) == (200, POET), body
    assert registry(d).made == 1


async def test_the_front_doors_select_the_pool_by_system_prompt(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with anthropic.AsyncAnthropic(base_url=d.url, api_key=KEYS["acme"], max_retries=0) as c:
        message = await c.messages.create(model="default", max_tokens=16,
                                          system=[{"type": "text", "text": PIRATE}],
                                          messages=[{"role": "user", "content": "[[system]]"}])
        assert message.content[0].text == PIRATE  # type: ignore[union-attr]
    async with anthropic.AsyncAnthropic(base_url=d.url, api_key=KEYS["beta"], max_retries=0) as c:
        with pytest.raises(anthropic.PermissionDeniedError):
            await c.messages.create(model="default", max_tokens=16, system=POET,
                                    messages=[{"role": "user", "content": "[[system]]"}])
    async with openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key=KEYS["acme"], max_retries=0) as o:
        completion = await o.chat.completions.create(model="default", messages=[
            {"role": "system", "content": PIRATE}, {"role": "user", "content": "[[system]]"}])
        assert completion.choices[0].message.content == PIRATE
        completion = await o.chat.completions.create(model="default", messages=[
            {"role": "developer", "content": POET}, {"role": "user", "content": "[[system]]"}])
        assert completion.choices[0].message.content == POET
    async with openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key=KEYS["beta"], max_retries=0) as o:
        with pytest.raises(openai.PermissionDeniedError):
            await o.chat.completions.create(model="default", messages=[
                {"role": "system", "content": POET}, {"role": "user", "content": "[[system]]"}])
    assert registry(d).made == 2  # PIRATE's pool served both doors


async def test_a_system_prompt_counts_towards_the_prompt_bound(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), server={"max_prompt_bytes": 1000, "max_system_prompt_bytes": 600})
    status, body = await say(d, None, "x" * 500, system="y" * 501)
    assert (status, body["error"]["code"]) == (413, "prompt_too_large")
    status, body = await say(d, None, "x", system="y" * 601)
    assert (status, body["error"]["code"]) == (413, "prompt_too_large")
    assert registry(d).made == 0


async def test_at_the_bound_the_least_recently_used_idle_pool_is_closed(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), pool={"max_on_demand_pools": 2})
    reg = registry(d)
    for system in ("first", "second", "first"):  # first is used again: second is the least recent
        assert (await say(d, None, "[[system]]", system=system))[1]["text"] == system
    # A maintenance pass sees both pools holding an idle worker: that is no use, and must not make
    # them equally recent (it did, and then the bound closed whichever came first).
    assert reg.reap() == 0
    pools = {p.profile.system_prompt: p for p in reg.on_demand}
    status, body = await say(d, None, "[[system]]", system="third")
    assert (status, body["text"]) == (200, "third")
    assert {p.profile.system_prompt for p in reg.on_demand} == {"first", "third"} and reg.evicted == 1
    assert d.sample("claudepool_on_demand_pool_events_total", event="evicted") == 1
    assert d.sample("claudepool_on_demand_pools") == 2
    await until(lambda: pools["second"].workers() == [], 10)  # closed, its worker with it
    assert pools["first"] in reg.on_demand


async def test_at_the_bound_with_every_pool_busy_a_new_prompt_is_refused(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), pool={"max_on_demand_pools": 1})
    busy = asyncio.create_task(say(d, None, "[[sleep:3]] [[system]]", system="busy"))
    await until(lambda: any(p.counts()["leased"] for p in registry(d).on_demand), 10)
    status, body = await say(d, None, "[[system]]", system="another")
    assert (status, body["error"]["code"]) == (503, "too_many_pools"), body
    assert (await busy)[1]["text"] == "busy"
    status, body = await say(d, None, "[[system]]", system="another")  # the busy one is idle now
    assert (status, body["text"]) == (200, "another")


async def test_idle_on_demand_pools_are_reaped(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), pool={"max_idle_s": 0.3, "on_demand_idle_s": 3600})
    reg = registry(d)
    assert (await say(d, None, "[[system]]", system=PIRATE))[1]["text"] == PIRATE
    [pool] = reg.on_demand
    assert reg.reap(now=1e12) == 0  # it still has a worker
    await until(lambda: not any(pool.counts().values()), 10)  # its idle worker retired (min_idle 0)
    assert reg.reap() == 0  # not idle for on_demand_idle_s yet
    assert reg.reap(now=2e12) == 1
    assert reg.on_demand == [] and pool.profile.name not in reg
    assert d.sample("claudepool_on_demand_pool_events_total", event="reaped") == 1
    assert d.sample("claudepool_on_demand_pools") == 0
    await until(lambda: pool._state.closed, 5)
    # Needed again: made again.
    assert (await say(d, None, "[[system]]", system=PIRATE))[1]["text"] == PIRATE
    assert reg.made == 2


async def test_metrics_stay_bounded_and_no_prompt_text_reaches_logs_or_labels(
        make_daemon: MakeDaemon, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    d = await make_daemon(**config())
    prompts = [f"{PIRATE} variant {n}" for n in range(4)]
    for system in prompts:
        assert (await say(d, None, "[[system]]", system=system))[1]["text"] == system
    assert len(registry(d).on_demand) == 4
    await until(lambda: all(p.counts()["idle"] == 1 for p in registry(d).on_demand), 10)  # resets done
    text = await d.metrics_text()
    assert d.sample("claudepool_workers", profile="default~custom", state="idle") == 4
    assert d.sample("claudepool_worker_spawns_total", profile="default~custom") == 4
    profiles = {line.split('profile="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                if 'profile="' in line and not line.startswith("#")}
    assert profiles <= {"default", "default.sessions", "lean", "lean.sessions", "other", "other.sessions",
                        "default~custom", "default~custom.sessions", "lean~custom", "lean~custom.sessions",
                        "other~custom", "other~custom.sessions"}, profiles
    for pool in registry(d).on_demand:
        assert pool.profile.name not in text  # no digest either: one label for them all
    status, pools = await call(d, "GET", "/v1/pool", key=ADMIN_KEY)  # the admin sees them, by key
    assert status == 200 and len([name for name in pools["pools"] if name.startswith("default~")]) == 4
    logged = caplog.text + "".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "SECRET-PERSONA" not in text and "SECRET-PERSONA" not in logged and "SECRET-PERSONA" not in str(pools)


async def test_a_session_keeps_its_system_prompt_through_parking_and_a_restart(make_daemon: MakeDaemon) -> None:
    cfg = {**config(beta={"system_prompt": POET}), **sessions_config(park_idle_s=600)}
    before = await make_daemon(**cfg)
    status, view = await call(before, "POST", "/v1/sessions", {"system": PIRATE})
    assert status == 201, view
    assert view["custom_system_prompt"] is True and PIRATE not in str(view)
    sid = view["id"]
    assert (await say(before, sid, "remember OSPREY-3 [[system]]"))[1]["text"] == PIRATE
    [pool] = registry(before).on_demand
    assert pool.profile.name.endswith(".sessions") and pool.profile.session_persistence
    # A turn may not change it; the same one is fine.
    status, body = await say(before, sid, "[[system]]", system=POET)
    assert status == 400 and "created with" in body["error"]["message"]
    assert (await say(before, sid, "[[system]]", system=PIRATE))[1]["text"] == PIRATE
    assert await before.daemon.sessions.park(sid)
    status, body = await say(before, sid, "[[system]]")  # resumed on a fresh process
    assert (status, body["text"]) == (200, PIRATE)
    status, body = await say(before, sid, "[[echo]]")
    assert "remember OSPREY-3" in body["text"]  # its history came along
    # beta's persona is its sessions' default.
    status, view = await call(before, "POST", "/v1/sessions", {}, "beta")
    beta_sid = view["id"]
    assert (await say(before, beta_sid, "[[system]]", "beta"))[1]["text"] == POET
    before.daemon.request_stop()
    async with asyncio.timeout(30):
        await before.task

    after = await make_daemon(**cfg)  # the in-memory store forgot; the checkpoints remember
    assert registry(after).made == 0
    status, body = await say(after, sid, "[[system]]")
    assert (status, body["text"]) == (200, PIRATE), body
    assert (await say(after, beta_sid, "[[system]]", "beta"))[1]["text"] == POET
    status, body = await say(after, sid, "[[echo]]")
    assert "remember OSPREY-3" in body["text"]
    assert after.daemon.sessions.events["resumed"] >= 2


async def test_a_session_of_its_own_system_prompt_needs_the_flag(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), **sessions_config())
    status, body = await call(d, "POST", "/v1/sessions", {"system": PIRATE}, "beta")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await call(d, "POST", "/v1/sessions", {"system": "x" * (64 * 1024 + 1)})
    assert (status, body["error"]["code"]) == (413, "prompt_too_large")
    record = await d.daemon.sessions.create(d.daemon.tenants.get("acme"), "default", system=POET)  # type: ignore[arg-type]
    assert record.system_prompt == POET
    assert (await say(d, record.id, "[[system]]"))[1]["text"] == POET


async def test_a_pinned_pool_is_never_evicted_and_the_bound_refuses_when_all_are_held(tmp_path: Path) -> None:
    """The registry alone (no worker is started): a request admitted to a pool pins it until it has
    its worker, so making room never closes a pool a request is about to wait on."""
    reg = PoolRegistry(load_settings(None, pool={"max_on_demand_pools": 1, "workdir": str(tmp_path)}))
    try:
        first = reg.pool_for("default", "first")
        assert reg.pool_for("default", "first") is first and reg.pool_for("default", None) is reg.configured["default"]
        unpin = reg.pin(first)
        with pytest.raises(TooManyPools):
            reg.pool_for("default", "second")
        assert reg.reap(now=1e12) == 0  # pinned: not idle either
        unpin()
        unpin()  # idempotent
        second = reg.pool_for("default", "second")
        assert reg.on_demand == [second] and reg.evicted == 1
    finally:
        await reg.close()


@pytest.mark.parametrize("transport", ["socket", "http"])
async def test_the_client_library_sends_system_on_both_transports(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon(**config(), **sessions_config())
    where: dict[str, Any] = {"socket_path": d.socket} if transport == "socket" else {"url": d.url}
    async with AsyncClient(key=KEYS["acme"], **where) as client:
        assert (await client.prompt("[[system]]", system=PIRATE)).text == PIRATE
        session = await client.create_session(system=POET)
        assert session["custom_system_prompt"] is True
        assert (await client.prompt("[[system]]", session=session["id"])).text == POET
    async with AsyncClient(key=KEYS["beta"], **where) as client:
        with pytest.raises(RemoteError) as refused:
            await client.prompt("[[system]]", system=PIRATE)
        assert refused.value.remote_code == "forbidden"


async def test_claudepool_run_sends_system(make_daemon: MakeDaemon) -> None:
    from tests.test_cli_client import claudepool

    d = await make_daemon(**config())
    done = await claudepool("run", "--socket", d.socket, "--key", KEYS["acme"], "--system", PIRATE, "[[system]]")
    assert (done.code, done.out) == (0, PIRATE + "\n"), done.err
