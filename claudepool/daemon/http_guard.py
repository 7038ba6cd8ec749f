"""HTTP connections under deadlines and a bound, enforced on the transport.

aiohttp reads a request head and body for as long as the client takes: headers sent one line every
10 s, a chunked body that never ends or a body shorter than its Content-Length each hold a connection
(and, past the head, a handler) open indefinitely, and idle keep-alive connections stay for an hour.
So every HTTP connection passes through a `GuardedProtocol` between the transport and aiohttp's
`RequestHandler`, and one middleware marks where each request is:

- **head**: from accept, and from the first byte of a keep-alive connection's next request, the head
  must be complete within ``header_timeout_s``. Else the connection is closed, after a minimal 408
  when nothing was written on it yet (a first request; later, a response could still be going out).
- **body**: the middleware reads the body (aiohttp keeps it for the handler) within
  ``body_timeout_s`` of the head; else the request is answered 408 ``request_timeout`` and the
  connection closed a moment later, whatever the client still sends.
- **idle**: an idle keep-alive connection is closed after ``keepalive_timeout_s`` (aiohttp's own timer).
- **bound**: at most ``max_connections`` are open across the HTTP listeners. One more gets a minimal
  503 ``too_many_connections`` with ``Retry-After`` and is closed; it never reaches aiohttp.

Deadlines are timers on the event loop, not read timeouts, so a client trickling a byte a second
gains nothing. Nothing a client sent is ever logged here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from claudepool.errors import ClaudepoolError, RequestReadTimeout, TooManyConnections
from claudepool.protocol.wire import error_body

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# After a body timeout, how long the 408 has to go out before the connection is closed regardless.
_CLOSE_GRACE_S = 1.0
# A refused connection waits this long for the client to read its 503 and hang up (so the answer is
# not lost to a reset), but only this many at once: under a flood, the rest are closed at once.
_REFUSED_LINGER_S = 1.0
_MAX_LINGERING = 64


def raw_response(exc: ClaudepoolError) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for where aiohttp is not involved."""
    body = orjson.dumps({"error": error_body(exc)})
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(exc.status, "Error")
    retry = f"Retry-After: {int(exc.retry_after_s)}\r\n" if exc.retry_after_s is not None else ""
    head = (f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{retry}Connection: close\r\n\r\n")
    return head.encode() + body


class HttpGuard:
    """The deadlines and the connection bound shared by every HTTP listener of one daemon."""

    def __init__(self, *, max_connections: int, header_timeout_s: float, body_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.connections: dict[web.RequestHandler, GuardedProtocol] = {}
        # Refused connections waiting for their client to hang up (closed at shutdown too).
        self.lingering: set[asyncio.Transport] = set()
        # Connections closed by the guard, by reason: refused, head_timeout, body_timeout.
        self.closed: dict[str, int] = {"refused": 0, "head_timeout": 0, "body_timeout": 0}

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedProtocol(self, server)

    def close_lingering(self) -> None:
        for transport in list(self.lingering):
            transport.close()

    def middleware(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = self.connections.get(request.protocol)
            if connection is None:  # a connection that did not come through a GuardedSockSite
                return await handler(request)
            connection.request_started()
            try:
                if request.body_exists:
                    try:
                        async with asyncio.timeout(self.body_timeout_s):
                            await request.read()  # kept by aiohttp: the handler's read() returns it
                    except TimeoutError:
                        connection.body_timed_out()
                        raise RequestReadTimeout(
                            f"the request body did not arrive within {self.body_timeout_s:g} s") from None
                connection.body_done()
                return await handler(request)
            finally:
                connection.request_finished()

        return guard


class GuardedProtocol(asyncio.Protocol):
    """Sits between one transport and its aiohttp `RequestHandler`, and owns the connection's deadline."""

    def __init__(self, guard: HttpGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self._handler: web.RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._requests = 0
        self._in_request = False
        self._body_read = False
        self._next_head_started = False
        self._lost = False

    # -- the asyncio protocol, forwarded -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (``server.event_loop = "uvloop"``)
        # have asyncio's methods without subclassing its transport classes.
        self._transport = cast(asyncio.Transport, transport)
        if len(self._guard.connections) >= self._guard.max_connections:
            self._refuse(self._transport)
            return
        self._handler = self._server()
        self._guard.connections[self._handler] = self
        self._handler.connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._handler is None:
            return  # refused: whatever it sends is dropped unread
        if self._in_request:
            # Past its body, bytes are the next pipelined request; its deadline starts when this one ends.
            self._next_head_started = self._next_head_started or self._body_read
        elif self._timer is None:
            self._await_head()  # the first byte of a keep-alive connection's next request
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            self._handler.eof_received()
        return None  # as aiohttp's: the transport closes itself

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True  # a handler still finishing must not arm a deadline on a dead connection
        self._cancel_timer()
        if self._handler is None:
            if self._transport is not None:
                self._guard.lingering.discard(self._transport)
            return
        self._guard.connections.pop(self._handler, None)
        self._handler.connection_lost(exc)

    # -- where the request is, from the middleware ---------------------------------------------

    def request_started(self) -> None:
        self._requests += 1
        self._in_request = True
        self._body_read = False
        self._cancel_timer()

    def body_done(self) -> None:
        self._body_read = True

    def body_timed_out(self) -> None:
        self._guard.closed["body_timeout"] += 1
        log.debug("closing an HTTP connection whose request body did not arrive in time",
                  extra={"fields": {"peer": _peer(self._transport)}})
        self._arm(_CLOSE_GRACE_S, self._close)

    def request_finished(self) -> None:
        self._in_request = False
        if self._timer is not None:
            return  # closing after a body timeout
        if self._next_head_started:
            self._next_head_started = False
            self._await_head()
        # Otherwise idle: aiohttp's keep-alive timer closes the connection if no request follows.

    # -- deadlines -----------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._arm(self._guard.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._timer = None
        self._guard.closed["head_timeout"] += 1
        log.debug("closing an HTTP connection whose request head did not arrive in time",
                  extra={"fields": {"peer": _peer(self._transport)}})
        if self._requests == 0 and self._transport is not None:
            # Nothing was written on this connection yet, so a response cannot interleave with another.
            self._transport.write(raw_response(RequestReadTimeout(
                f"the request head did not arrive within {self._guard.header_timeout_s:g} s")))
        self._close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._guard.closed["refused"] += 1
        transport.write(raw_response(TooManyConnections(
            f"the daemon holds its {self._guard.max_connections} HTTP connections; retry shortly")))
        if len(self._guard.lingering) >= _MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        # Half-close: the client reads the whole 503 and its EOF, and its unread request cannot
        # turn our close into a reset that would discard the answer.
        transport.write_eof()
        self._guard.lingering.add(transport)
        self._arm(_REFUSED_LINGER_S, self._close)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        if self._lost:
            return
        self._timer = asyncio.get_running_loop().call_later(delay_s, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class GuardedSockSite(web.BaseSite):
    """An aiohttp site on a listening socket we hold (bound by us or by systemd), through the guard."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: HttpGuard, *, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{_address(self._sock)}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # asyncio listens again with this backlog, on a socket systemd handed over too.
        self._server = await loop.create_server(self._guard.protocol_factory(server), sock=self._sock,
                                                backlog=self._backlog)

    def stop_listening(self) -> None:
        """Close the listening socket and keep the connections (`stop` later closes those too)."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        await super().stop()
        self._guard.close_lingering()  # aiohttp closes the connections it knows; these it never saw


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(transport: asyncio.BaseTransport | None) -> Any:
    return transport.get_extra_info("peername") if transport is not None else None
