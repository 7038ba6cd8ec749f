"""The client library (`AsyncClient`, `Client`) against an in-process daemon, over both transports."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypedDict, Unpack

import pytest

from claudepool.client import AsyncClient, Client, Piece
from claudepool.errors import RemoteError
from claudepool.protocol.wire import PromptResult
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import closed_port_url, until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
TRANSPORTS = ["socket", "url"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


class Where(TypedDict, total=False):
    socket_path: str
    url: str


def where(d: RunningDaemon, transport: str) -> Where:
    return {"socket_path": d.socket} if transport == "socket" else {"url": d.url}


def async_client(d: RunningDaemon, transport: str, key: str = KEYS["acme"]) -> AsyncClient:
    return AsyncClient(key=key, **where(d, transport))


async def collect(stream: AsyncIterator[Piece],
                  into: list[Piece] | None = None) -> list[Piece]:
    """Iterate a stream to its end, appending each item to ``into`` as it arrives."""
    items = into if into is not None else []
    async for item in stream:
        items.append(item)
    return items


async def test_prompt_returns_the_result(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with async_client(d, transport) as client, asyncio.timeout(15):
        result = await client.prompt("hello [[reply:HELLO THERE]]")
        second = await client.prompt("[[reply:and again]]", profile="lean")
    assert isinstance(result, PromptResult)
    assert result.text == "HELLO THERE"
    assert result.tenant == "acme"
    assert result.is_error is False
    assert result.stop_reason == "end_turn"
    assert result.usage.output_tokens > 0
    assert result.cost_usd > 0
    assert re.fullmatch(r"[0-9a-f]{32}", result.id)
    assert second.text == "and again"
    assert second.id != result.id
    assert d.pool("lean").stats.turns == 1


async def test_stream_yields_text_then_one_result(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    answer = "one two three four five six seven"
    async with async_client(d, transport) as client, asyncio.timeout(15):
        items = await collect(client.stream(f"[[reply:{answer}]]"))
    *pieces, last = items
    assert len(pieces) >= 2  # the fake streams in 8-character pieces
    assert all(isinstance(p, str) for p in pieces)
    assert isinstance(last, PromptResult)
    assert "".join(p for p in pieces if isinstance(p, str)) == last.text == answer


async def test_model_errors_are_results_not_exceptions(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with async_client(d, transport) as client, asyncio.timeout(15):
        result = await client.prompt("[[api_error:529]]")
        streamed = await collect(client.stream("[[api_error:529]]"))
    assert result.is_error is True
    assert "529" in result.text
    assert len(streamed) == 1
    assert isinstance(streamed[0], PromptResult)
    assert streamed[0].is_error is True


async def test_a_failure_mid_stream_raises_after_the_text(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    pieces: list[Piece] = []
    async with async_client(d, transport) as client, asyncio.timeout(15):
        with pytest.raises(RemoteError) as raised:
            await collect(client.stream("[[crash]] [[reply:partial answer here]]"), pieces)
        assert raised.value.remote_code == "worker_died"
        assert pieces == ["partial "]
        # The client is still usable after a failed request.
        assert (await client.prompt("[[reply:recovered]]")).text == "recovered"


async def test_concurrent_prompts_on_one_client(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon(pool={"max_workers": 3, "min_idle": 2})
    async with async_client(d, transport) as client, asyncio.timeout(30):
        results = await asyncio.gather(*(client.prompt(f"[[sleep:0.2]] [[reply:answer-{i}]]") for i in range(5)))
    assert [r.text for r in results] == [f"answer-{i}" for i in range(5)]
    assert len({r.id for r in results}) == 5
    assert d.pool().stats.turns == 5


async def test_wrong_key_raises_remote_error(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with async_client(d, transport, key="nobody-holds-this") as client, asyncio.timeout(15):
        with pytest.raises(RemoteError) as raised:
            await client.prompt("hello")
        assert raised.value.remote_code == "unauthorized"
        assert raised.value.message
        with pytest.raises(RemoteError) as raised_streaming:
            await collect(client.stream("hello"))
        assert raised_streaming.value.remote_code == "unauthorized"
    if transport == "url":
        assert raised.value.http_status == 401
    assert d.pool().stats.leases == 0


async def test_forbidden_profile_raises_remote_error(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with async_client(d, transport) as client, asyncio.timeout(15):
        with pytest.raises(RemoteError) as raised:
            await client.prompt("hello", profile="other")
    assert raised.value.remote_code == "forbidden"


async def test_status_with_the_admin_key(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with async_client(d, transport, key=ADMIN_KEY) as client, asyncio.timeout(15):
        status = await client.status()
    assert set(status["pools"]) == {"default", "lean", "other", "default.sessions", "lean.sessions",
                                    "other.sessions"}
    workers = status["pools"]["default"]["workers"]
    assert workers
    assert workers[0]["profile"] == "default"
    assert workers[0]["pid"] == d.pool().snapshot()[0]["pid"]
    assert status["queue"] == {"waiting": 0}
    assert status["in_flight"] == 0
    assert status["draining"] is False


def sync_session(key: str, admin_key: str, **where: Unpack[Where]) -> tuple[PromptResult, list[Piece],
                                                                   dict[str, Any]]:
    """Runs in a worker thread: the sync client drives its own event loop."""
    with Client(key=key, **where) as client:
        result = client.prompt("[[reply:from the sync client]]")
        streamed = list(client.stream("[[reply:streamed by the sync client]]"))
    with Client(key=admin_key, **where) as admin:
        status = admin.status()
    return result, streamed, status


async def test_sync_client_prompt_stream_and_status(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon()
    async with asyncio.timeout(30):
        result, streamed, status = await asyncio.to_thread(sync_session, KEYS["beta"], ADMIN_KEY,
                                                           **where(d, transport))
    assert isinstance(result, PromptResult)
    assert (result.text, result.tenant) == ("from the sync client", "beta")
    *pieces, last = streamed
    assert len(pieces) >= 2
    assert isinstance(last, PromptResult)
    assert "".join(p for p in pieces if isinstance(p, str)) == last.text == "streamed by the sync client"
    assert status["pools"]["default"]["workers"]
    assert d.pool().stats.turns == 2


async def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody-listens.sock")
    # The client retries a connect refused for connect_timeout_s (a restarting daemon); then gives up.
    async with AsyncClient(key=KEYS["acme"], socket_path=path, connect_timeout_s=0.2) as client, asyncio.timeout(10):
        started = time.monotonic()
        with pytest.raises(RemoteError) as raised:
            await client.prompt("hello")
        assert time.monotonic() - started >= 0.2  # it kept trying until its deadline
        assert raised.value.remote_code == "unavailable"
        assert path in raised.value.message
        with pytest.raises(RemoteError) as raised_status:
            await client.status()
        assert raised_status.value.remote_code == "unavailable"


async def test_unreachable_daemon_is_unavailable(tmp_path: Path, transport: str) -> None:
    """Over either transport, a daemon that is not running is a `RemoteError` ``unavailable``
    (that is what `claudepool run` turns into a one-line message and exit code 1)."""
    with closed_port_url() as url:
        target = {"socket_path": str(tmp_path / "nobody-listens.sock")} if transport == "socket" else {"url": url}
        async with AsyncClient(key=KEYS["acme"], connect_timeout_s=0.2, **target) as client, asyncio.timeout(10):
            with pytest.raises(RemoteError) as raised:
                await client.prompt("hello")
    assert raised.value.remote_code == "unavailable"


async def test_a_client_started_before_the_daemon_is_served_once_it_listens(make_daemon: MakeDaemon, transport: str,
                                                                             tmp_path: Path) -> None:
    """A refused connect (no socket file yet, nothing on the port) is retried with back-off within
    ``connect_timeout_s``: a daemon (re)starting meanwhile answers the request (issue item 3)."""
    path = str(tmp_path / "late.sock")
    with contextlib.ExitStack() as port:
        url = port.enter_context(closed_port_url())
        target: Where = {"socket_path": path} if transport == "socket" else {"url": url}
        async with AsyncClient(key=KEYS["acme"], connect_timeout_s=30, **target) as client, asyncio.timeout(30):
            answer = asyncio.create_task(client.prompt("[[reply:worth the wait]]"))
            for _ in range(5):
                await asyncio.sleep(0)  # the first attempts run, and fail: nothing listens
            assert not answer.done()
            port.close()  # the port is the daemon's to take now
            await make_daemon(server={"socket": path, "http": url.removeprefix("http://")})
            assert (await answer).text == "worth the wait"


async def test_daemon_gone_after_connecting_is_unavailable(make_daemon: MakeDaemon, transport: str) -> None:
    """A client that outlives its daemon's connection gets `RemoteError` ``unavailable``, not a raw
    socket or aiohttp exception."""
    d = await make_daemon()
    async with AsyncClient(key=KEYS["acme"], connect_timeout_s=0.2, **where(d, transport)) as client, \
            asyncio.timeout(20):
        assert (await client.prompt("[[reply:before]]")).text == "before"
        d.daemon.request_stop()
        assert await d.task == 0
        for _ in range(2):
            with pytest.raises(RemoteError) as raised:
                await client.prompt("[[reply:after]]")
            assert raised.value.remote_code == "unavailable"


async def test_sync_client_on_a_missing_socket_is_unavailable(tmp_path: Path) -> None:
    def attempt() -> RemoteError:
        with Client(key=KEYS["acme"], socket_path=str(tmp_path / "nobody-listens.sock"),
                    connect_timeout_s=0.2) as client:
            try:
                client.prompt("hello")
            except RemoteError as exc:
                return exc
        raise AssertionError("no RemoteError")

    async with asyncio.timeout(10):
        error = await asyncio.to_thread(attempt)
    assert error.remote_code == "unavailable"


def test_exactly_one_transport_is_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AsyncClient(key="k")
    with pytest.raises(ValueError, match="exactly one"):
        AsyncClient(key="k", socket_path="/x", url="http://127.0.0.1:1")


async def test_abandoning_a_socket_stream_cancels_the_turn(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    pool = d.pool()
    async with AsyncClient(key=KEYS["acme"], socket_path=d.socket) as client:
        stream = client.stream("[[sleep:5]] " + "a long answer " * 10)
        first = await anext(stream)
        assert isinstance(first, str)
        await stream.aclose()  # type: ignore[attr-defined]
        # The client sent a cancel: the daemon stops the turn long before its 5 s are up.
        await until(lambda: pool.stats.abandoned_turns == 1, 3)


async def test_a_conversation_through_the_client(make_daemon: MakeDaemon, transport: str) -> None:
    d = await make_daemon(sessions={"max_workers": 1})
    async with async_client(d, transport) as client, async_client(d, transport, KEYS["beta"]) as other:
        session = await client.create_session()
        assert session["where"] == {"state": "new"}
        await client.prompt("the client's word is PUFFIN-3", session=session["id"])
        follow_up = await client.prompt("[[echo]]", session=session["id"])
        assert (follow_up.session, "PUFFIN-3" in follow_up.text) == (session["id"], True)
        with pytest.raises(RemoteError) as denied:
            await other.delete_session(session["id"])
        assert denied.value.remote_code == "not_found"
        await client.delete_session(session["id"])
        with pytest.raises(RemoteError) as gone:
            await client.prompt("again", session=session["id"])
        assert gone.value.remote_code == "not_found"


async def test_a_prompt_over_the_socket_frame_limit_is_an_error_not_a_hang(make_daemon: MakeDaemon) -> None:
    # The socket frame limit is below the prompt limit here, as when an operator lowers it.
    d = await make_daemon(server={"max_frame_bytes": 4096})
    async with async_client(d, "socket") as client, asyncio.timeout(15):
        with pytest.raises(RemoteError) as refused:
            await client.prompt("[[reply:never]] " + "x" * 20_000)
        assert refused.value.remote_code == "frame_too_large"
        assert (await client.prompt("[[reply:still here]]")).text == "still here"  # the connection lives on
