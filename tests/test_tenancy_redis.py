"""Tenancy on Redis: outages (limits fail open, budgets fail closed, no usage lost) and two daemons."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.store.base import Window
from tests.daemon_fixtures import (
    KEY,
    KEYS,
    DaemonProcess,
    RunningDaemon,
    make_daemon,
    start_daemon,
)
from tests.helpers import until
from tests.redis_server import RedisServer
from tests.test_lifecycle import write_config
from tests.test_tenancy import FAKE_PRICING, post

__all__ = ["make_daemon", "start_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
def persistent_redis() -> Any:
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_redis_outage_limits_fail_open_budgets_fail_closed_usage_is_kept(
    make_daemon: MakeDaemon, persistent_redis: RedisServer
) -> None:
    d = await make_daemon(
        store={"url": persistent_redis.url, "socket_timeout_s": 0.5},
        tenants={"acme": {"daily_budget_usd": 1.0}, "beta": {"requests_per_minute": 100}},
        pricing=FAKE_PRICING,
    )
    assert (await post(d, {"prompt": "before, budgeted"}))[0] == 200
    before = await post(d, {"prompt": "before, limited"}, tenant="beta")
    assert before[0] == 200
    await until(lambda: d.daemon.meter.backlog == 0, 10)

    await asyncio.to_thread(persistent_redis.stop)
    status, body, headers = await post(d, {"prompt": "during, budgeted"})
    assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "store_unavailable", "2")
    assert "password" not in body["error"]["message"]
    during = [await post(d, {"prompt": f"during {i}"}, tenant="beta") for i in range(3)]
    assert [s for s, _, _ in during] == [200, 200, 200]  # rate limits fail open onto a local limiter
    assert d.daemon.limiter.fallbacks > 0
    # Three usage records wait for the store.
    await until(lambda: not d.daemon.store.up and d.daemon.meter.backlog == 3, 10)

    await asyncio.to_thread(persistent_redis.start)
    await until(lambda: d.daemon.meter.backlog == 0, 20)  # the buffered records reach Redis
    usage = await d.daemon.store.usage(Window.current("day"), ["acme", "beta"])
    assert sum(t.requests for t in usage["beta"].values()) == 4
    assert sum(t.requests for t in usage["acme"].values()) == 1
    ledger = await d.daemon.store.ledger("beta")
    answered = [before[1]["cost_usd"], *(b["cost_usd"] for _, b, _ in during)]
    assert sorted(r.cost_usd for r in ledger) == pytest.approx(sorted(answered))
    assert (await post(d, {"prompt": "after, budgeted"}))[0] == 200  # budgets work again


async def start_daemons(start: Callable[..., Awaitable[DaemonProcess]], tmp_path: Path, extra: str, *,
                        names: tuple[str, ...] = ("a", "b"), **options: Any) -> list[DaemonProcess]:
    """Daemon processes sharing ``extra`` of the test config, each in a directory of its own."""
    daemons = []
    for name in names:
        workdir = tmp_path / name
        workdir.mkdir()
        daemons.append(await start("--config", str(write_config(workdir, extra=extra, **options))))
        assert daemons[-1].url, daemons[-1].output
    return daemons


async def _post_to(url: str, body: dict[str, Any], key: str = KEY) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/prompt", data=orjson.dumps(body), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.json()


async def test_two_daemons_share_rate_limits(
    tmp_path: Path, redis_url: str, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    pricing = "\n".join(f"{k} = {v}" for k, v in FAKE_PRICING["default"].items())
    extra = f"""requests_per_minute = 6

[store]
url = "{redis_url}"

[pricing.default]
{pricing}
"""
    a, b = await start_daemons(start_daemon, tmp_path, extra)
    # Six requests per minute for the tenant, across both daemons together.
    statuses = [(await _post_to(d.url, {"prompt": "shared limit"}))[0] for d in (a, b, a, b, a, b)]
    assert statuses == [200] * 6
    assert (await _post_to(a.url, {"prompt": "seventh"}))[0] == 429
    assert (await _post_to(b.url, {"prompt": "eighth"}))[0] == 429
    for d in (a, b):
        d.proc.send_signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    assert KEYS
