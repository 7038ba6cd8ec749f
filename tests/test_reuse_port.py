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
from prometheus_client.parser import text_string_to_metric_families

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
                   drain_timeout_s: float = 10, metrics_http: str = "") -> DaemonProcess:
    workdir.mkdir(exist_ok=True)
    config = write_config(workdir, http=f"127.0.0.1:{port}", extra=extra, socket_path=socket_path,
                          drain_timeout_s=drain_timeout_s)
    env = {"CLAUDEPOOL_SERVER__REUSE_PORT": "true" if reuse_port else "false",
           "CLAUDEPOOL_SERVER__METRICS_HTTP": metrics_http,
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


async def requests_ok(metrics_url: str, *, key: str = ADMIN) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            f"{metrics_url}/metrics", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "claudepool_requests_total" and sample.labels.get("outcome") == "ok")


async def test_each_daemon_on_a_shared_port_is_scraped_at_its_own_metrics_address(
        tmp_path: Path, start_daemon: Start) -> None:
    # Over the shared port a scrape reaches whichever daemon the kernel picks; server.metrics_http
    # is each daemon's own: what each counts there is exactly what it served.
    port = free_port()
    a = await start_on(start_daemon, tmp_path / "a", port, reuse_port=True, metrics_http="127.0.0.1:0")
    b = await start_on(start_daemon, tmp_path / "b", port, reuse_port=True, metrics_http="127.0.0.1:0")
    assert a.metrics_url and b.metrics_url and a.metrics_url != b.metrics_url != a.url
    answers: dict[str, int] = {"a": 0, "b": 0}
    async with asyncio.timeout(60):
        while min(answers.values()) < 2:
            answers[await served_by(a.url)] += 1
            assert sum(answers.values()) <= 40, answers
    assert await requests_ok(a.metrics_url) == answers["a"]
    assert await requests_ok(b.metrics_url) == answers["b"]
    async with aiohttp.ClientSession() as session:
        # The same key as /metrics on the shared port, and nothing a tenant calls: no second front door.
        async with session.get(f"{a.metrics_url}/metrics") as resp:
            assert resp.status == 401
        async with session.get(f"{a.metrics_url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200 and (await resp.json())["pools"]
        async with session.post(f"{a.metrics_url}/v1/prompt", data=b'{"prompt": "hi"}',
                                headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 404


async def test_a_metrics_address_in_use_stops_the_start_with_nothing_listening(
        tmp_path: Path, start_daemon: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        port = free_port()
        d = await start_on(start_daemon, tmp_path / "a", port, reuse_port=False, metrics_http=busy, wait_ready=False)
        assert await d.wait_exit() == 2, d.output
    assert f"cannot listen on {busy}: Address already in use" in "".join(d.output)
    with socket.socket() as probe:  # its HTTP port was let go
        probe.bind(("127.0.0.1", port))


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
