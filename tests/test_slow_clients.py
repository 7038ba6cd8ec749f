"""Slow, malformed and too many clients: every connection ends within its deadline (issue item 4).

Raw asyncio sockets play the slowloris: a head sent a line at a time, a chunked body that never ends,
a body shorter than its Content-Length, connections that send nothing, and more connections than the
bound. Timeouts are set small; each wait on the daemon is bounded, so a missing protection fails the
test instead of hanging it."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.daemon import front_ends
from claudepool.errors import RemoteError
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import until
from tests.test_floods import http_address

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
# Seconds beyond a deadline within which the daemon must have closed the connection: loop lag on a
# loaded 2-core machine, plus the guard's own 1 s grace after a body timeout.
SLACK_S = 5.0
PROMPT = orjson.dumps({"prompt": "[[reply:served]]"})
AUTH = f"Authorization: Bearer {KEYS['acme']}\r\n"


class Conn:
    """One raw HTTP connection: write what a test says, then collect everything until the daemon closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()
        self.received = b""
        self.closed_after_s: float | None = None
        self._trickle: asyncio.Task[None] | None = None
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                self.received += chunk
        self.closed_after_s = time.monotonic() - self.opened

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def trickle(self, pieces: Callable[[int], bytes], every_s: float = 0.2) -> None:
        """Send ``pieces(i)`` every ``every_s`` for as long as the connection lives: the slowloris."""

        async def run() -> None:
            for i in range(100_000):
                self.send(pieces(i))
                await asyncio.sleep(every_s)

        self._trickle = asyncio.create_task(run())

    async def closed(self, within_s: float) -> float:
        """Wait until the daemon closes the connection; how long it stayed open."""
        async with asyncio.timeout(within_s):
            await asyncio.shield(self._reading)
        assert self.closed_after_s is not None
        return self.closed_after_s

    @property
    def is_open(self) -> bool:
        return not self._reading.done()

    async def aclose(self) -> None:
        for task in (self._trickle, self._reading):
            if task is not None:
                task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[RunningDaemon], Awaitable[Conn]]]:
    opened: list[Conn] = []

    async def open_one(d: RunningDaemon) -> Conn:
        reader, writer = await asyncio.open_connection(*http_address(d))
        conn = Conn(reader, writer)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        await conn.aclose()


Connect = Callable[[RunningDaemon], Awaitable[Conn]]


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def error_code(response: bytes) -> str:
    body = response.partition(b"\r\n\r\n")[2]
    return str(orjson.loads(body)["error"]["code"])


def head(extra: str = "", method: str = "POST") -> bytes:
    return f"{method} /v1/prompt HTTP/1.1\r\nHost: test\r\n{AUTH}{extra}".encode()


async def served(d: RunningDaemon) -> str:
    """A well-behaved client's request."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(10), session.post(
        f"{d.url}/v1/prompt", data=PROMPT, headers={"Authorization": f"Bearer {KEYS['acme']}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["text"])


async def test_a_head_sent_a_line_at_a_time_is_cut_at_the_header_timeout(make_daemon: MakeDaemon,
                                                                        connect: Connect) -> None:
    d = await make_daemon(server={"header_timeout_s": 1.0})
    conn = await connect(d)
    conn.send(head())
    conn.trickle(lambda i: f"X-Slow-{i}: never done\r\n".encode())
    open_s = await conn.closed(1.0 + SLACK_S)
    assert open_s >= 0.9  # the deadline, not something else, ended it
    assert status_of(conn.received) == 408
    assert error_code(conn.received) == "request_timeout"


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(make_daemon: MakeDaemon,
                                                                              connect: Connect) -> None:
    d = await make_daemon(server={"header_timeout_s": 1.0})
    idle = [await connect(d) for _ in range(60)]
    for conn in idle:
        await conn.closed(1.0 + SLACK_S)
        assert status_of(conn.received) == 408


async def test_a_chunked_body_that_never_ends_is_cut_at_the_body_timeout(make_daemon: MakeDaemon,
                                                                        connect: Connect) -> None:
    d = await make_daemon(server={"body_timeout_s": 1.0})
    conn = await connect(d)
    conn.send(head("Transfer-Encoding: chunked\r\n\r\n"))
    conn.trickle(lambda i: b"5\r\nhello\r\n")
    open_s = await conn.closed(1.0 + SLACK_S)
    assert open_s >= 0.9
    assert status_of(conn.received) == 408
    assert error_code(conn.received) == "request_timeout"
    assert d.daemon.service.in_flight == 0  # it never reached admission


async def test_a_body_shorter_than_its_content_length_is_cut_at_the_body_timeout(make_daemon: MakeDaemon,
                                                                                connect: Connect) -> None:
    d = await make_daemon(server={"body_timeout_s": 1.0})
    conn = await connect(d)
    conn.send(head(f"Content-Length: {len(PROMPT) + 100}\r\n\r\n") + PROMPT)
    await conn.closed(1.0 + SLACK_S)
    assert status_of(conn.received) == 408


async def test_an_idle_keep_alive_connection_is_closed_at_the_keepalive_timeout(make_daemon: MakeDaemon,
                                                                               connect: Connect) -> None:
    d = await make_daemon(server={"keepalive_timeout_s": 1.0, "header_timeout_s": 30.0})
    conn = await connect(d)
    conn.send(head(f"Content-Length: {len(PROMPT)}\r\n\r\n") + PROMPT)
    await conn.closed(1.0 + SLACK_S + 5)  # the turn itself, then the idle deadline
    assert status_of(conn.received) == 200
    assert b'"text":"served"' in conn.received


async def test_a_slow_but_timely_client_and_keep_alive_requests_are_served(make_daemon: MakeDaemon,
                                                                          connect: Connect) -> None:
    d = await make_daemon(server={"header_timeout_s": 2.0, "body_timeout_s": 2.0, "keepalive_timeout_s": 5.0})
    conn = await connect(d)
    for _ in range(2):  # two requests on one connection, each head and body in pieces inside its deadline
        conn.send(head())
        await asyncio.sleep(0.3)
        conn.send(f"Content-Length: {len(PROMPT)}\r\n\r\n".encode() + PROMPT[:10])
        await asyncio.sleep(0.3)
        conn.send(PROMPT[10:])
        await asyncio.sleep(0.5)
    async with asyncio.timeout(10):
        while conn.received.count(b'"text":"served"') < 2:
            await asyncio.sleep(0.02)
    assert conn.received.count(b"HTTP/1.1 200 OK") == 2
    assert conn.is_open


async def test_a_client_is_served_while_sixty_slowloris_connections_are_held(make_daemon: MakeDaemon,
                                                                            connect: Connect) -> None:
    d = await make_daemon(server={"header_timeout_s": 3.0, "body_timeout_s": 3.0})
    bad: list[Conn] = []
    for i in range(60):
        conn = await connect(d)
        if i % 3 == 0:
            conn.send(head())
            conn.trickle(lambda n: f"X-Slow-{n}: v\r\n".encode(), every_s=0.5)
        elif i % 3 == 1:
            conn.send(head("Transfer-Encoding: chunked\r\n\r\n"))
            conn.trickle(lambda n: b"1\r\nx\r\n", every_s=0.5)
        else:
            conn.send(head("Content-Length: 100000\r\n\r\n") + b'{"prompt": "')
        bad.append(conn)
    guard = d.daemon.front_ends.guard if d.daemon.front_ends is not None else None
    assert guard is not None
    await until(lambda: len(guard.connections) == 60)  # every one accepted and held before the client comes
    assert await served(d) == "served"
    assert all(conn.is_open for conn in bad)  # served while every bad connection was still held
    for conn in bad:
        await conn.closed(3.0 + SLACK_S)
        assert status_of(conn.received) == 408
    assert await served(d) == "served"


async def test_connections_past_max_connections_get_503_and_are_closed(make_daemon: MakeDaemon,
                                                                      connect: Connect) -> None:
    d = await make_daemon(server={"max_connections": 20, "header_timeout_s": 30.0})
    held = [await connect(d) for _ in range(20)]
    extra = await connect(d)
    await extra.closed(SLACK_S)
    assert status_of(extra.received) == 503
    assert error_code(extra.received) == "too_many_connections"
    assert b"Retry-After: 1\r\n" in extra.received
    # An aiohttp client sending its request at once still reads the whole 503.
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.url}/v1/prompt", data=PROMPT, headers={"Authorization": f"Bearer {KEYS['acme']}"}
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "too_many_connections"
    assert all(conn.is_open for conn in held)
    for conn in held[:5]:
        await conn.aclose()
    async with asyncio.timeout(10):
        while True:  # the daemon notices the closes in its own time; then there is room again
            with contextlib.suppress(AssertionError):
                assert await served(d) == "served"
                break
            await asyncio.sleep(0.05)


async def socket_prompt_once_admitted(d: RunningDaemon) -> str:
    """Once the daemon has seen a close, a new connection is admitted; until then, refused."""
    while True:
        client = AsyncClient(key=KEYS["acme"], socket_path=d.socket)
        try:
            return (await client.prompt("[[reply:room again]]")).text
        except RemoteError as exc:
            if exc.remote_code != "too_many_connections":
                raise
            await asyncio.sleep(0.05)
        finally:
            await client.close()


async def test_socket_connections_past_max_connections_get_a_typed_error(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_connections": 5})
    clients = [AsyncClient(key=KEYS["acme"], socket_path=d.socket) for _ in range(6)]
    try:
        async with asyncio.timeout(20):
            for client in clients[:5]:
                assert (await client.prompt("[[reply:held]]")).text == "held"
            with pytest.raises(RemoteError) as refused:
                await clients[5].prompt("[[reply:one too many]]")
            assert refused.value.remote_code == "too_many_connections"
            await clients[0].close()
            await asyncio.sleep(0)
            assert await socket_prompt_once_admitted(d) == "room again"
    finally:
        for client in clients:
            await client.close()


async def test_the_open_file_limit_is_raised_to_fit_the_connection_bounds(make_daemon: MakeDaemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 4096, "this machine's hard limit is too low for the test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        await make_daemon(server={"max_connections": 1500})
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2 * 1500
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))


async def test_the_metrics_listener_cuts_slow_heads_and_bounds_its_connections(
        make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    # server.metrics_http is a listener of its own: without its guard, idle or trickling connections
    # would be held there for good, and as many as a client opens.
    monkeypatch.setattr(front_ends, "METRICS_MAX_CONNECTIONS", 5)
    d = await make_daemon(server={"metrics_http": "127.0.0.1:0", "header_timeout_s": 1.0})
    host, _, port = d.daemon.listening["metrics"].removeprefix("http://").rpartition(":")
    opened = [Conn(*await asyncio.open_connection(host, int(port))) for _ in range(6)]
    try:
        held, extra = opened[:5], opened[5]
        for conn in held:
            conn.send(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
            conn.trickle(lambda i: f"X-Slow-{i}: never done\r\n".encode())
        await extra.closed(SLACK_S)
        assert status_of(extra.received) == 503 and error_code(extra.received) == "too_many_connections"
        assert await served(d) == "served"  # the tenants' port is not held up by the metrics one
        for conn in held:
            assert await conn.closed(1.0 + SLACK_S) >= 0.9
            assert status_of(conn.received) == 408
    finally:
        for conn in opened:
            await conn.aclose()
