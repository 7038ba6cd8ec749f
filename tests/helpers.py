"""Small helpers shared by the tests: collect a turn, wait for a condition, check a pid, spend a budget."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psutil
from aiohttp import web

from claudepool.pool.worker import TurnResult
from claudepool.protocol.cli_events import CliEvent
from claudepool.store.base import Store, UsageRecord
from claudepool.testing.fake_upstream import FakeUpstream


async def collect(turn: AsyncIterator[CliEvent | TurnResult], timeout_s: float = 30.0) -> tuple[
    list[CliEvent], TurnResult
]:
    """Iterate one turn to its end: the events, then the result."""
    events: list[CliEvent] = []
    async with asyncio.timeout(timeout_s):
        async for item in turn:
            if isinstance(item, TurnResult):
                return events, item
            events.append(item)
    raise AssertionError("the turn ended without a result")


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, every_s: float = 0.02) -> None:
    """`until` for a condition that must be asked for (an HTTP call, a store read): ask until it holds;
    fail the test after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(every_s)


def pid_gone(pid: int | None) -> bool:
    """True once the process is gone *and reaped*: a zombie still counts, since whoever started it has
    not waited for it yet (a leak of its own), so wait for this with `until`."""
    assert pid is not None
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


@contextlib.contextmanager
def closed_port_url() -> Iterator[str]:
    """An HTTP URL on which nothing listens, for as long as the block runs: the port stays bound (and
    not listening, so a connect is refused) so no other test's server can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}"


def release_fifo(path: os.PathLike[str] | str) -> None:
    """Let every thread blocked opening a FIFO go: open and close each end without blocking (a waiting
    writer then sees its reader go, a waiting reader gets EOF). For tests that use a FIFO as a disk
    that does not answer, so no thread outlives them."""
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        with contextlib.suppress(OSError):  # ENXIO: nobody waits to read; ENOENT: gone
            os.close(os.open(path, flags))


async def spend(store: Store, tenant: str, cost_usd: float) -> None:
    """Make ``tenant`` have spent ``cost_usd`` more today, as a settled model call does."""
    assert await store.settle(UsageRecord(record_id=f"spent-{tenant}-{time.monotonic_ns()}", request_id="earlier",
                                          tenant=tenant, profile="default", model="m", outcome="ok", at=time.time(),
                                          cost_usd=cost_usd, kind="call"))


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port for the block: its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running(server: FakeUpstream) -> AsyncIterator[FakeUpstream]:
    """The fake upstream started for the block, stopped after it."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
