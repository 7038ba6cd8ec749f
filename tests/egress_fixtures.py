"""Loopback listeners for the egress tests: an HTTP origin that says what it was asked, and a
Redis-like TCP service that answers anything with ``+PONG``. Both count their connections."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Listener:
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set each time a client's connection ends
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None


async def _http(listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    listener.connections += 1
    listener.writers.append(writer)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        listener.heads.append(head)
        body = b"EGRESS-ORIGIN-OK " + head.split(b"\r\n", 1)[0] + b"\n"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        if b"\r\nconnection: close\r\n" in head.lower():
            return
        # Else it stays open (keep-alive) until the client closes: tunnels are closed by their ends.
        while await reader.read(65536):
            pass
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        listener.closed.set()


async def _redis(listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    listener.connections += 1
    listener.writers.append(writer)
    try:
        while await reader.read(65536):
            writer.write(b"+PONG-FROM-PRIVATE-SERVICE\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        listener.closed.set()


@dataclass
class Origins:
    http: Listener
    redis: Listener


@pytest.fixture
async def origins() -> AsyncIterator[Origins]:
    made = Origins(Listener(), Listener())
    for listener, handler in ((made.http, _http), (made.redis, _redis)):
        listener.server = await asyncio.start_server(functools.partial(handler, listener), "127.0.0.1", 0)
        listener.port = listener.server.sockets[0].getsockname()[1]
    yield made
    for listener in (made.http, made.redis):
        assert listener.server is not None
        listener.server.close()
        for writer in listener.writers:
            writer.transport.abort()  # its handler sees the end and returns, not cancelled at the loop's end
        await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await listener.server.wait_closed()
