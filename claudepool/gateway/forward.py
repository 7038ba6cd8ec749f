"""Forwarding one call to the provider and relaying its answer byte for byte.

One `aiohttp.ClientSession` serves every worker (its connector keeps connections to the provider
alive and reuses them). The request goes out with the worker's body unchanged and an allow-list of
its headers (``anthropic-version``, ``anthropic-beta``, ``content-type`` and what else the CLI
2.1.328 sends that carries no credential), with the upstream's credential in place of the worker's.
The answer comes back as it is, whatever its status: every chunk of the body is written to the
worker as read (``iter_any``), with an allow-list of the provider's headers (``retry-after``,
``request-id``, ``x-should-retry``, ``anthropic-ratelimit-*``, the content type): an error of the
provider reaches the CLI exactly as the provider sent it, so the CLI's own retry logic is unchanged.

``accept-encoding: identity`` is asked for, so that the bytes relayed are the bytes a parser of the
answer reads (usage, for metering); should a provider compress anyway, its bytes and its
``content-encoding`` are relayed untouched (nothing is decompressed).

A worker that goes away mid-answer cancels its handler (the server runs with handler
cancellation): the provider's connection is closed at once, not read to its end. A provider that
cannot be reached is a `UpstreamUnreachable` (502 ``api_error``, which the CLI retries); one that
breaks off mid-answer is relayed as a broken-off answer (the worker's connection is closed without
the end of the body), as the CLI would have seen it without the gateway. One that sends nothing for
``idle_timeout_s`` is cut (`Forwarder`): the answer's headers are held until its first byte, so a
provider idle before it is answered with a retryable 504; a stream idle after it ends with the
provider's own ``overloaded_error`` event, which the CLI retries too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web

from claudepool.errors import UpstreamIdle, UpstreamUnreachable
from claudepool.gateway.calls import Call
from claudepool.gateway.settings import Upstream

log = logging.getLogger(__name__)

# The worker's headers that are forwarded (lower case); everything else is dropped, the worker's own
# credential first. The x-stainless-* headers are the SDK's (retry count, timeout, runtime).
FORWARDED_REQUEST_HEADERS = frozenset({
    "anthropic-version", "anthropic-beta", "content-type", "accept", "user-agent", "x-app",
    "x-claude-code-session-id", "anthropic-dangerous-direct-browser-access",
})  # fmt: skip
_FORWARDED_REQUEST_PREFIXES = ("x-stainless-",)
# The provider's headers that reach the worker.
RELAYED_RESPONSE_HEADERS = frozenset({
    "content-type", "content-encoding", "cache-control", "retry-after", "request-id", "x-should-retry",
})  # fmt: skip
_RELAYED_RESPONSE_PREFIXES = ("anthropic-ratelimit-",)


def request_headers(worker_headers: Mapping[str, str], upstream: Upstream) -> dict[str, str]:
    """The headers of the forwarded call: the worker's allowed ones, then the upstream's own (its
    credential and extra headers), which no worker header can replace."""
    headers = {name.lower(): value for name, value in worker_headers.items()
               if name.lower() in FORWARDED_REQUEST_HEADERS or name.lower().startswith(_FORWARDED_REQUEST_PREFIXES)}
    headers.update(upstream.headers)
    headers["accept-encoding"] = "identity"
    return headers


def response_headers(provider_headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in provider_headers.items()
            if name.lower() in RELAYED_RESPONSE_HEADERS or name.lower().startswith(_RELAYED_RESPONSE_PREFIXES)}


# The SSE event that ends a stream the provider left idle: the provider's own overloaded error, which
# the CLI 2.1.328 treats as retryable (README, "The idle-stream cut").
IDLE_ERROR_EVENT = (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                    b'"message":"the provider sent nothing for too long; the gateway cut the stream"}}\n\n')
# A streamed call, as the CLI asks for it: its answer's headers come at once, so the wait for them is
# bounded by the idle timeout too. A non-streamed answer's headers come with the whole body, which
# may take minutes: that wait is not bounded (its body, once begun, is). In JSON a key is never
# preceded by an escaped quote, so a user's text holding "stream": true does not match.
_STREAMED = re.compile(rb'"stream"\s*:\s*true')


async def close_session(session: aiohttp.ClientSession | None, timeout_s: float) -> None:
    """Close a client session within ``timeout_s`` (a peer that never answers must not hold a shutdown)."""
    if session is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await session.close()


class Forwarder:
    """The gateway's one client session, and the relay of each call through it.

    ``idle_timeout_s`` (0: none) bounds the wait for each chunk of an answer and, for a streamed
    call, for its headers: a provider silent that long is cut (`UpstreamIdle` before anything was
    relayed; an SSE ``overloaded_error`` event after)."""

    def __init__(self, *, connect_timeout_s: float, max_connections: int, idle_timeout_s: float = 0.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._idle_timeout_s = idle_timeout_s or None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # No total or read timeout: a call lasts as long as its answer streams (the CLI has its
            # own API_TIMEOUT_MS, and the daemon its turn watchdog). No cookies, no redirects followed,
            # no default User-Agent of ours: the call is the worker's, not a client of our own.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def close(self, timeout_s: float) -> None:
        session, self._session = self._session, None
        await close_session(session, timeout_s)

    async def forward(self, request: web.Request, body: bytes, upstream: Upstream, call: Call,
                      on_chunk: Callable[[bytes], None],
                      on_answer: Callable[[int, Mapping[str, str]], None] | None = None) -> web.StreamResponse:
        """Send the call, relay its answer; ``on_answer`` sees the provider's status and headers as
        they arrive, ``on_chunk`` every chunk of the body as relayed.
        Raises `UpstreamUnreachable` when no answer began (nothing was written to the worker yet)."""
        if self._session is None:
            raise UpstreamUnreachable("the gateway is closed")
        idle_s = self._idle_timeout_s if _STREAMED.search(body) else None
        idle = asyncio.timeout(idle_s)
        try:
            async with idle:
                answer = await self._session.request(request.method, upstream.url(request.path_qs), data=body,
                                                     headers=request_headers(request.headers, upstream),
                                                     allow_redirects=False)
        except TimeoutError:
            if not idle.expired():
                raise
            call.finish("upstream_idle")
            raise UpstreamIdle(f"the provider sent no answer within {idle_s} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            call.finish("unreachable")
            raise UpstreamUnreachable(f"the provider at {upstream.base_url} could not be reached "
                                      f"({type(exc).__name__})") from None
        if on_answer is not None:
            on_answer(answer.status, answer.headers)
        try:
            return await self._relay(request, answer, call, on_chunk)
        finally:
            # Read to its end: the connection goes back to the pool. Otherwise (the worker left, the
            # provider broke off) it is closed: nothing more is read from it.
            if answer.content.at_eof():
                answer.release()
            else:
                answer.close()

    async def _relay(self, request: web.Request, answer: aiohttp.ClientResponse, call: Call,
                     on_chunk: Callable[[bytes], None]) -> web.StreamResponse:
        call.status = answer.status
        call.upstream_request_id = answer.headers.get("request-id")
        response = web.StreamResponse(status=answer.status, reason=answer.reason,
                                      headers=response_headers(answer.headers))
        if answer.content_length is not None:
            response.content_length = answer.content_length
        chunks = answer.content.iter_any().__aiter__()
        try:
            # The worker gets the headers with the first chunk: until then nothing is relayed, and a
            # provider that goes idle can still be answered with a clean, retryable error.
            while True:
                idle = asyncio.timeout(self._idle_timeout_s)
                try:
                    async with idle:
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not idle.expired():
                        raise
                    return await self._cut_idle(request, response, answer, call)
                except (aiohttp.ClientError, OSError) as exc:
                    # The provider broke off: so does the answer (the end of its body is never sent).
                    log.warning("gateway call %s: the provider broke off its answer after %d bytes (%s)",
                                call.id, call.response_bytes, type(exc).__name__)
                    call.finish("upstream_cut")
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if call.first_byte_s is None:
                    call.first_byte_s = time.monotonic() - call.started
                    await response.prepare(request)
                call.response_bytes += len(chunk)
                on_chunk(chunk)
                await response.write(chunk)
            if not response.prepared:
                await response.prepare(request)  # an empty body
            await response.write_eof()
        except ConnectionError:
            call.finish("client_gone")  # the worker's connection closed under a write
            return response
        call.finish("ok" if answer.status < 400 else "upstream_error")
        return response

    async def _cut_idle(self, request: web.Request, response: web.StreamResponse, answer: aiohttp.ClientResponse,
                        call: Call) -> web.StreamResponse:
        """The provider sent nothing for the idle timeout: before any byte was relayed, a retryable
        5xx (raised); in a stream, the provider's own overloaded error event ends it; in a JSON body,
        the connection is cut (there is no way to say more in a body that began)."""
        call.finish("upstream_idle")
        if not response.prepared:
            raise UpstreamIdle(f"the provider sent nothing for {self._idle_timeout_s} s")
        log.warning("gateway call %s: the provider sent nothing for %s s after %d bytes; cut",
                    call.id, self._idle_timeout_s, call.response_bytes)
        if answer.content_type == "text/event-stream":
            await response.write(IDLE_ERROR_EVENT)
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()
        return response
