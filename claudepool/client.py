"""Clients for the daemon, over the Unix socket or HTTP, async and sync.

>>> async def demo():                                                  # doctest: +SKIP
...     async with AsyncClient(key="…", socket_path="/run/claudepool/claudepool.sock") as client:
...         async for piece in client.stream("Tell me a story"):
...             if isinstance(piece, str):
...                 print(piece, end="")
...             elif isinstance(piece, ToolUse):        # the agent called a tool (ToolResult: its output)
...                 print(f"[{piece.name}]", file=sys.stderr)
...         result = await client.prompt("And another")
>>> Client(key="…", url="http://127.0.0.1:8787").prompt("Hi").text    # doctest: +SKIP

Errors the daemon answers with are raised as `RemoteError` (with the wire ``remote_code``). A connect
that is refused (the daemon restarting, or its listen backlog full under a burst of clients) is
retried with capped exponential back-off and jitter for up to ``connect_timeout_s``; after that it is
`RemoteError` ``unavailable``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from claudepool.errors import RemoteError
from claudepool.protocol.framing import LineFramer
from claudepool.protocol.wire import (
    STREAM_ITEMS,
    ModelFallback,
    PromptResult,
    TextDelta,
    ToolResult,
    ToolUse,
    stream_item_of_frame,
)

_TERMINAL_EVENTS = frozenset({"result", "error", "status", "cancelled", "usage", "session", "session_deleted", "job",
                              "jobs"})
# Back-off between connect attempts: full jitter over a doubling ceiling, from 10 ms up to 0.5 s.
_RETRY_FIRST_S = 0.01
_RETRY_MAX_S = 0.5
# A Unix socket whose backlog is full answers EAGAIN; one not (yet) bound, ENOENT or ECONNREFUSED.
_UNIX_RETRYABLE = (BlockingIOError, ConnectionRefusedError, FileNotFoundError)

T = TypeVar("T")
# What `AsyncClient.stream` yields: text as it arrives, each tool call and its result, a switch to a
# fallback model, then the answer.
Piece = str | ToolUse | ToolResult | ModelFallback | PromptResult


class AsyncClient:
    """One client, one connection (socket) or session (HTTP); many concurrent requests."""

    def __init__(self, *, key: str, socket_path: str | None = None, url: str | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path or url")
        self.key = key
        self.socket_path = socket_path
        self.url = url.rstrip("/") if url else None
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._unix: _UnixConnection | None = None
        self._connecting = asyncio.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._unix is not None:
            await self._unix.close()
            self._unix = None

    async def prompt(self, prompt: str, **options: Any) -> PromptResult:
        """Send one prompt and wait for the whole answer. ``files={path: bytes}`` puts files into its
        workspace first; ``return_files=[glob, …]`` brings files back in ``result.files``."""
        async for item in self._prompt(prompt, stream=False, **options):
            if isinstance(item, PromptResult):
                return item
        raise RemoteError("protocol_error", "the daemon ended the request without a result")

    def stream(self, prompt: str, **options: Any) -> AsyncIterator[Piece]:
        """Send one prompt; yield text (``str``) as it arrives and each tool call (`ToolUse`) and its
        result (`ToolResult`) as they happen, a `ModelFallback` if the profile's model was busy, then
        the `PromptResult`."""
        return self._prompt(prompt, stream=True, **options)

    async def status(self) -> dict[str, Any]:
        """The pool (admin key) or, for a tenant key, the daemon's readiness."""
        if self.url is not None:
            try:
                return await self._http_get("/v1/pool")
            except RemoteError as exc:
                if exc.remote_code != "forbidden":
                    raise
            return await self._http_get("/readyz", ok_statuses=(200, 503))
        body: dict[str, Any] = {}
        async for frame in (await self._socket()).request({"op": "status", "key": self.key}):
            if frame.get("event") == "error":
                raise RemoteError(frame["code"], frame["message"])
            body = {k: v for k, v in frame.items() if k not in ("id", "event")}
        if "error" in body:
            raise RemoteError(body["error"]["code"], body["error"]["message"])
        return body

    async def usage(self, *, window: str = "day", date: str | None = None, tenant: str | None = None) -> dict[str, Any]:
        """Usage per tenant and model for a UTC day (``date`` YYYY-MM-DD) or month (YYYY-MM)."""
        query = {"window": window, **({"date": date} if date else {}), **({"tenant": tenant} if tenant else {})}
        if self.url is not None:
            return await self._http_get("/v1/usage?" + urlencode(query))
        async for frame in (await self._socket()).request({"op": "usage", "key": self.key, **query}):
            if frame.get("event") == "error":
                raise RemoteError(frame["code"], frame["message"])
            return {k: v for k, v in frame.items() if k not in ("id", "event")}
        raise RemoteError("protocol_error", "no answer to the usage request")

    async def create_session(self, profile: str | None = None, *, system: str | None = None) -> dict[str, Any]:
        """Start a conversation; pass its ``id`` as ``session=`` to `prompt` or `stream`. ``system`` is its
        system prompt for every turn (as ``system=`` to `prompt` is for one request)."""
        body = {k: v for k, v in (("profile", profile), ("system", system)) if v is not None}
        if self.url is not None:
            try:
                async with await self._request("POST", "/v1/sessions", data=orjson.dumps(body),
                                               headers=self._auth()) as resp:
                    return await _json_or_raise(resp, (201,))
            except aiohttp.ClientConnectionError as exc:
                raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None
        async for frame in (await self._socket()).request({"op": "session.create", "key": self.key, **body}):
            if frame.get("event") == "error":
                raise RemoteError(frame["code"], frame["message"])
            session: dict[str, Any] = frame["session"]
            return session
        raise RemoteError("protocol_error", "no answer to session.create")

    async def delete_session(self, session: str) -> None:
        """Close a conversation and delete its transcript now."""
        if self.url is not None:
            try:
                async with await self._request("DELETE", f"/v1/sessions/{quote(session, safe='')}",
                                               headers=self._auth()) as resp:
                    if resp.status != 204:
                        await _json_or_raise(resp)
                    return
            except aiohttp.ClientConnectionError as exc:
                raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None
        async for frame in (await self._socket()).request({"op": "session.delete", "key": self.key,
                                                           "session": session}):
            if frame.get("event") == "error":
                raise RemoteError(frame["code"], frame["message"])
            return
        raise RemoteError("protocol_error", "no answer to session.delete")

    async def session_files(self, session: str) -> dict[str, Any]:
        """The session's workspace: ``{"files": [{path, type, size_bytes}], "truncated"}`` (HTTP only)."""
        if self.url is None:
            raise ValueError("session files are served over HTTP: create the client with url=")
        return await self._http_get(f"/v1/sessions/{quote(session, safe='')}/files")

    async def session_file(self, session: str, path: str) -> bytes:
        """One file of the session's workspace, its bytes (HTTP only)."""
        if self.url is None:
            raise ValueError("session files are served over HTTP: create the client with url=")
        try:
            async with await self._request("GET", f"/v1/sessions/{quote(session, safe='')}/files/"
                                                  f"{quote(path, safe='/')}", headers=self._auth()) as resp:
                if resp.status != 200:
                    await _json_or_raise(resp)
                return await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None

    async def ledger(self, *, tenant: str | None = None, since: float | None = None,
                     limit: int = 1000) -> list[dict[str, Any]]:
        """Settled usage records, oldest first (HTTP only)."""
        records, _ = await self.ledger_page(tenant=tenant, since=since, limit=limit)
        return records

    async def ledger_page(self, *, tenant: str | None = None, since: float | None = None,
                          limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        """One answer of the ledger: its records (at or after ``since``, oldest first) and the limit the
        daemon applied (``X-Ledger-Limit``: ``limit``, or less past ``server.ledger_page_records``).
        Fewer records than that limit: no more to come."""
        if self.url is None:
            raise ValueError("the ledger is served over HTTP: create the client with url=")
        query: dict[str, str] = {"limit": str(limit)}
        if tenant:
            query["tenant"] = tenant
        if since is not None:
            query["since"] = str(since)
        try:
            async with await self._request("GET", f"/v1/ledger?{urlencode(query)}", headers=self._auth()) as resp:
                if resp.status != 200:
                    await _json_or_raise(resp)
                applied = int(resp.headers.get("X-Ledger-Limit", limit))
                return [orjson.loads(line) for line in (await resp.read()).splitlines() if line], applied
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None

    # -- transports ------------------------------------------------------------------------------

    async def _prompt(self, prompt: str, *, stream: bool, **options: Any) -> AsyncIterator[Piece]:
        files = options.get("files")
        if isinstance(files, Mapping):  # {path: bytes}: the wire's [{path, content_base64}]
            options["files"] = [{"path": path, "content_base64": base64.b64encode(data).decode()}
                                for path, data in files.items()]
        body = {"prompt": prompt, "stream": stream, **{k: v for k, v in options.items() if v is not None}}
        if self.url is not None:
            async for item in self._http_prompt(body):
                yield item
            return
        async for frame in (await self._socket()).request({"op": "prompt", "key": self.key, **body}):
            event = frame.get("event")
            streamed = stream_item_of_frame(frame)
            if streamed is not None:
                yield streamed.text if isinstance(streamed, TextDelta) else streamed
            elif event == "result":
                body = {k: v for k, v in frame.items() if k not in ("id", "event", "request_id")}
                yield PromptResult.model_validate({**body, "id": frame["request_id"]})
            elif event == "error":
                raise RemoteError(frame["code"], frame["message"])

    async def _http_get(self, path: str, ok_statuses: tuple[int, ...] = (200,)) -> dict[str, Any]:
        try:
            async with await self._request("GET", path, headers=self._auth()) as resp:
                return await _json_or_raise(resp, ok_statuses)
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None

    async def _http_prompt(self, body: dict[str, Any]) -> AsyncIterator[Piece]:
        try:
            async with await self._request("POST", "/v1/prompt", data=orjson.dumps(body),
                                           headers={**self._auth(), "Content-Type": "application/json"}) as resp:
                if not body["stream"] or resp.content_type != "text/event-stream":
                    yield PromptResult.model_validate(await _json_or_raise(resp))
                    return
                async for event, data in _sse_events(resp):
                    if event in STREAM_ITEMS:
                        item = STREAM_ITEMS[event].model_validate_json(data)
                        yield item.text if isinstance(item, TextDelta) else item
                    elif event == "result":
                        yield PromptResult.model_validate_json(data)
                    elif event == "error":
                        error = orjson.loads(data)
                        raise RemoteError(error["code"], error["message"], resp.status)
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self.url}: {exc}") from None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _request(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """Send one HTTP request; a refused connect is retried (nothing was sent) until the connect deadline."""
        session = await self._http()

        async def attempt(left_s: float) -> aiohttp.ClientResponse:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=max(left_s, 0.001))
            return await session.request(method, f"{self.url}{path}", timeout=timeout, **kwargs)

        return await _retry_connect(attempt, self.connect_timeout_s, _refused_http)

    async def _socket(self) -> _UnixConnection:
        # Concurrent first requests must share one connection, not each open their own.
        async with self._connecting:
            if self._unix is not None and self._unix.task.done():
                await self._unix.close()  # the daemon closed it (restart, drain): connect again
                self._unix = None
            if self._unix is None:
                assert self.socket_path is not None
                self._unix = await _UnixConnection.open(self.socket_path, self.connect_timeout_s)
        return self._unix


async def _json_or_raise(resp: aiohttp.ClientResponse, ok_statuses: tuple[int, ...] = (200,)) -> dict[str, Any]:
    raw = await resp.read()
    try:
        body: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RemoteError("protocol_error", f"HTTP {resp.status}: not JSON", resp.status) from None
    if resp.status not in ok_statuses:
        error = body.get("error") or {}
        raise RemoteError(error.get("code", "http_error"), error.get("message", f"HTTP {resp.status}"), resp.status)
    return body


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    event, data = "message", list[str]()
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class _UnixConnection:
    """One socket connection; a reader task routes frames to their request by ``id``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.failure: BaseException | None = None
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, path: str, connect_timeout_s: float) -> _UnixConnection:
        try:
            reader, writer = await _retry_connect(lambda _left_s: _connect_unix(path), connect_timeout_s,
                                                  lambda exc: isinstance(exc, _UNIX_RETRYABLE))
        except OSError as exc:
            raise RemoteError("unavailable", f"cannot connect to {path}: {exc.strerror or exc}") from None
        return cls(reader, writer)

    async def request(self, frame: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        frame_id = f"c{next(self.ids)}"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues[frame_id] = queue
        finished = False
        try:
            try:
                self.writer.write(orjson.dumps({"id": frame_id, **frame}) + b"\n")
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise RemoteError("unavailable", f"the daemon connection is gone: {exc}") from None
            while True:
                item = await queue.get()
                finished = item.get("event") in _TERMINAL_EVENTS
                yield item
                if finished:
                    return
        finally:
            self.queues.pop(frame_id, None)
            if not finished and frame.get("op") == "prompt" and not self.writer.is_closing():
                # The caller stopped listening: stop the turn too, as closing an HTTP response does.
                cancel = {"id": f"{frame_id}-cancel", "op": "cancel", "target": frame_id}
                self.writer.write(orjson.dumps(cancel) + b"\n")

    async def _read(self) -> None:
        framer = LineFramer()
        lost = {"event": "error", "code": "unavailable", "message": "the daemon closed the connection"}
        try:
            while chunk := await self.reader.read(1 << 16):
                for line in framer.feed(chunk):
                    frame = orjson.loads(line)
                    queue = self.queues.get(frame.get("id"))
                    if queue is not None:
                        queue.put_nowait(frame)
                    elif frame.get("id") is None and frame.get("event") == "error":
                        lost = frame  # about the connection (too_many_connections): why it is closing
        except Exception as exc:  # the connection is unusable; every waiter learns why
            self.failure = exc
        for queue in self.queues.values():
            queue.put_nowait(lost)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def _retry_connect(attempt: Callable[[float], Awaitable[T]], timeout_s: float,
                         retryable: Callable[[BaseException], bool]) -> T:
    """``attempt(seconds_left)`` until it succeeds or raises what ``retryable`` rejects, or the deadline passes.

    Sleeps are capped exponential back-off with full jitter, so a burst of clients refused together
    does not come back together; no sleep runs past the deadline, and the last error is raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for failures in itertools.count():
        try:
            return await attempt(deadline - loop.time())
        except Exception as exc:
            left_s = deadline - loop.time()
            if not retryable(exc) or left_s <= 0:
                raise
            ceiling_s = min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** min(failures, 16))
            await asyncio.sleep(min(left_s, random.uniform(0, ceiling_s)))
    raise AssertionError("unreachable")


def _refused_http(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError)


async def _connect_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect without asyncio's own connect, which takes a full backlog's EAGAIN for "in progress" on a
    Unix socket and hands back a socket that never connected (the first write then fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)  # a Unix socket connects at once or fails: there is no EINPROGRESS
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


class Client:
    """The synchronous client: the same API, each call run to completion on a private loop."""

    def __init__(self, *, key: str, socket_path: str | None = None, url: str | None = None,
                 connect_timeout_s: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncClient(key=key, socket_path=socket_path, url=url, connect_timeout_s=connect_timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prompt(self, prompt: str, **options: Any) -> PromptResult:
        return self._loop.run_until_complete(self._client.prompt(prompt, **options))

    def stream(self, prompt: str, **options: Any) -> Iterator[Piece]:
        events = self._client.stream(prompt, **options)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(anext(events))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(events.aclose())  # type: ignore[attr-defined]

    def status(self) -> dict[str, Any]:
        return self._loop.run_until_complete(self._client.status())

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
            self._loop.close()
