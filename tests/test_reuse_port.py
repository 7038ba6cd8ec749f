"""Several daemons on one host: one HTTP port shared with SO_REUSEPORT (``server.reuse_port``), one
Redis, and a Unix socket each (issue 16, goal 3).

Real daemon processes on the fake CLI. Each daemon's workers carry ``CP_DAEMON`` in their
environment, so an ``[[env]]`` answer names the daemon that served it."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError
from claudepool.store.base import Window
from claudepool.store.redis import RedisStore
from tests.daemon_fixtures import ADMIN, KEY, DaemonProcess, start_daemon
from tests.helpers import spend
from tests.test_lifecycle import write_config
from tests.test_tenancy import FAKE_PRICING

__all__ = ["start_daemon"]

Start = Callable[..., Awaitable[DaemonProcess]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_on(start: Start, workdir: Path, port: int, *, reuse_port: bool, extra: str = "",
                   socket_path: str | None = None, wait_ready: bool = True,
                   drain_timeout_s: float = 10) -> DaemonProcess:
    workdir.mkdir(exist_ok=True)
    config = write_config(workdir, http=f"127.0.0.1:{port}", extra=extra, socket_path=socket_path,
                          drain_timeout_s=drain_timeout_s)
    env = {"CLAUDEPOOL_SERVER__REUSE_PORT": "true" if reuse_port else "false",
           "CLAUDEPOOL_POOL__ENV": orjson.dumps({"CP_DAEMON": workdir.name}).decode()}
    return await start("--config", str(config), env=env, wait_ready=wait_ready)


async def served_by(url: str) -> str:
    # A session per request: a new connection from a new source port, which the kernel hashes
    # afresh to one of the listening daemons.
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/prompt", data=orjson.dumps({"prompt": "[[env]]"}), headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return str(orjson.loads(body["text"])["CP_DAEMON"])


async def test_two_daemons_share_one_port_and_one_redis(tmp_path: Path, redis_url: str, start_daemon: Start) -> None:
    port = free_port()
    pricing = "\n".join(f"{k} = {v}" for k, v in FAKE_PRICING["default"].items())
    extra = f'daily_budget_usd = 100\n\n[store]\nurl = "{redis_url}"\n\n[pricing.default]\n{pricing}\n'
    a = await start_on(start_daemon, tmp_path / "a", port, reuse_port=True, extra=extra)
    b = await start_on(start_daemon, tmp_path / "b", port, reuse_port=True, extra=extra)
    assert a.url == b.url == f"http://127.0.0.1:{port}"
    assert a.socket != b.socket  # each its own Unix socket

    answers: dict[str, int] = {"a": 0, "b": 0}
    sent = 0
    async with asyncio.timeout(60):
        while min(answers.values()) < 2:  # both serve: P(40 all to one) = 2**-39
            answers[await served_by(a.url)] += 1
            sent += 1
            assert sent <= 40, answers

    # One tenant, one budget: both daemons' requests land in the same Redis usage ...
    store = RedisStore(redis_url)
    try:
        async with asyncio.timeout(20):
            while sum(t.requests for t in (await store.usage(Window.current("day"), ["acme"]))["acme"].values()) \
                    < sent:
                await asyncio.sleep(0.05)
        # ... and a budget spent through the store is spent for both: each refuses on its own socket.
        await spend(store, "acme", 95.0)
    finally:
        await store.close()
    for d in (a, b):
        async with AsyncClient(key=KEY, socket_path=d.socket) as client:
            with pytest.raises(RemoteError) as refused:
                await client.prompt("over budget")
        assert refused.value.remote_code == "budget_exhausted"


@pytest.mark.parametrize(("first", "second", "hint"), [
    (False, False, "set server.reuse_port = true in every one of them"),
    (True, False, "set server.reuse_port = true in every one of them"),
    (False, True, "did not set SO_REUSEPORT"),
])
async def test_a_port_is_shared_only_when_every_daemon_sets_reuse_port(
    tmp_path: Path, start_daemon: Start, first: bool, second: bool, hint: str
) -> None:
    port = free_port()
    await start_on(start_daemon, tmp_path / "a", port, reuse_port=first)
    b = await start_on(start_daemon, tmp_path / "b", port, reuse_port=second, wait_ready=False)
    assert await b.wait_exit() == 2, b.output
    text = "".join(b.output)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in text
    assert hint in text


async def test_a_unix_socket_in_use_is_not_taken_over(tmp_path: Path, start_daemon: Start) -> None:
    # Without the check, the second daemon unlinked the first's live socket and bound its own there:
    # both started, and the first never got a socket client again.
    port = free_port()
    shared = str(tmp_path / "shared.sock")
    a = await start_on(start_daemon, tmp_path / "a", port, reuse_port=True, socket_path=shared)
    b = await start_on(start_daemon, tmp_path / "b", port, reuse_port=True, socket_path=shared, wait_ready=False)
    assert await b.wait_exit() == 2, b.output
    assert f"another process is listening on {shared}" in "".join(b.output)
    async with AsyncClient(key=KEY, socket_path=shared) as client:
        assert (await client.status())["ready"]  # still the first daemon's
    assert a.proc.returncode is None


async def test_a_draining_daemon_leaves_new_connections_to_the_others(tmp_path: Path, start_daemon: Start) -> None:
    # Without closing its listener, a draining daemon kept taking its share of new connections for
    # up to drain_timeout_s, and answered each 503 draining while its peer had idle workers.
    port = free_port()
    a = await start_on(start_daemon, tmp_path / "a", port, reuse_port=True, drain_timeout_s=60)
    b = await start_on(start_daemon, tmp_path / "b", port, reuse_port=True)
    async with AsyncClient(key=KEY, socket_path=a.socket) as on_a, \
            AsyncClient(key=ADMIN, socket_path=a.socket) as admin_a:
        # Long enough for the requests below on a loaded machine; the drain waits for it.
        slow = asyncio.create_task(on_a.prompt("[[sleep:8]] [[reply:drained]]"))
        async with asyncio.timeout(10):
            while (await admin_a.status())["in_flight"] != 1:
                await asyncio.sleep(0.02)
        a.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while not (await admin_a.status())["draining"]:
                await asyncio.sleep(0.02)
        served = [await served_by(b.url) for _ in range(12)]  # each must be 200: from b
        assert served == ["b"] * 12
        assert not slow.done()  # a was draining all along
        assert (await slow).text == "drained"
    assert await a.wait_exit() == 0
