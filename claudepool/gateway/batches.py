"""A client of the provider's Message Batches API: half-price model calls that finish within 24 hours.

`BatchApi` sends batches to one `Upstream` (its base URL and credential headers, as the gateway
forwards calls there: `claudepool.gateway.forward.request_headers`), polls them until they end, and
streams their results. Answers are read into strict models (`BatchInfo`, `BatchResult`); an error
status of the provider, or an answer that is not what the API documents, is a `BatchApiError` (with
the provider's status and error type), one that cannot be reached an `UpstreamUnreachable`; a wait
that outlasts its bound a `BatchWaitTimeout`. Every call has a deadline: ``request_timeout_s`` for
one answer, ``results_timeout_s`` for a whole results file (and ``idle_timeout_s`` between its
chunks); a results line longer than ``max_line_bytes`` is an error, so the buffer stays bounded.

>>> async def run(upstream, requests):                                   # doctest: +SKIP
...     async with BatchApi(upstream) as api:
...         batch = await api.create([("q1", {"model": "claude-haiku-4-5", "max_tokens": 64,
...                                          "messages": [{"role": "user", "content": "hi"}]})])
...         await api.wait_ended(batch.id, first_poll_s=1, max_poll_s=60, timeout_s=86_400)
...         return {r.custom_id: r async for r in api.results(batch.id)}
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Literal, Self, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from claudepool.errors import BatchApiError, BatchWaitTimeout, UpstreamUnreachable
from claudepool.gateway.forward import close_session, request_headers
from claudepool.gateway.settings import API_VERSION, Upstream
from claudepool.gateway.usage import CallUsage, usage_of_message

BATCHES_PATH = "/v1/messages/batches"
# A results line holds one message: its text is bounded by max_tokens (at most a few MB of it).
MAX_LINE_BYTES = 32 * 1024 * 1024
Status = Literal["in_progress", "canceling", "ended"]
ResultType = Literal["succeeded", "errored", "canceled", "expired"]


class _Strict(BaseModel):
    # Strict types; fields the provider adds later are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class RequestCounts(_Strict):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class BatchInfo(_Strict):
    """A Message Batch as the provider reports it (``processing_status`` ``ended``: its results are ready)."""

    id: str
    type: Literal["message_batch"]
    processing_status: Status
    request_counts: RequestCounts
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None
    cancel_initiated_at: datetime | None = None
    archived_at: datetime | None = None
    results_url: str | None = None

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"


class _ErrorBody(_Strict):
    type: str
    message: str


class _ErrorEnvelope(_Strict):
    type: Literal["error"]
    error: _ErrorBody


class _Result(_Strict):
    type: ResultType
    message: dict[str, Any] | None = None
    error: _ErrorEnvelope | None = None


class _Line(_Strict):
    custom_id: str
    result: _Result


class BatchResult(_Strict):
    """One request's result: its message when it ``succeeded``, the provider's error type and message
    when it ``errored``; nothing more when ``canceled`` or ``expired`` (never sent to the model)."""

    custom_id: str
    type: ResultType
    message: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None

    def usage(self) -> CallUsage:
        """The message's usage, as the gateway reads a call's (`claudepool.gateway.usage`); empty (and
        not ``complete``) for a request that did not succeed."""
        return usage_of_message(self.message) if self.message is not None else CallUsage()


Answer = TypeVar("Answer", bound=BaseModel)


class BatchApi:
    """The Message Batches API of one upstream, over one client session (made on first use).
    The credential goes in the upstream's headers and nowhere else (not in an error, not in a log)."""

    def __init__(self, upstream: Upstream, *, request_timeout_s: float = 60.0, connect_timeout_s: float = 10.0,
                 results_timeout_s: float = 600.0, idle_timeout_s: float = 60.0,
                 max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.upstream = upstream
        self._headers = request_headers({"anthropic-version": API_VERSION, "content-type": "application/json",
                                         "accept": "application/json"}, upstream)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self._results_timeout = aiohttp.ClientTimeout(total=results_timeout_s, sock_connect=connect_timeout_s,
                                                      sock_read=idle_timeout_s)
        self._max_line_bytes = max_line_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        session, self._session = self._session, None
        await close_session(session, timeout_s)

    async def create(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> BatchInfo:
        """Send one batch: each request is a ``custom_id`` and the body of a non-streamed /v1/messages call."""
        body = orjson.dumps({"requests": [{"custom_id": cid, "params": params} for cid, params in requests]})
        return await self._call("POST", BATCHES_PATH, BatchInfo, body)

    async def retrieve(self, batch_id: str) -> BatchInfo:
        return await self._call("GET", self._path(batch_id), BatchInfo)

    async def cancel(self, batch_id: str) -> BatchInfo:
        """Ask the provider to stop: the batch is ``canceling``, and ends with its unfinished requests
        ``canceled`` (those already done keep their results)."""
        return await self._call("POST", self._path(batch_id, "/cancel"), BatchInfo)

    async def wait_ended(self, batch_id: str, *, first_poll_s: float, max_poll_s: float,
                         timeout_s: float) -> BatchInfo:
        """Poll until the batch has ended, first after ``first_poll_s``, each wait twice the last up to
        ``max_poll_s``; `BatchWaitTimeout` after ``timeout_s``. A transient error of one poll (429,
        5xx, unreachable) is waited out like a batch still in progress; any other is raised."""
        delay_s = first_poll_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        info = await self.retrieve(batch_id)
                        if info.ended:
                            return info
                    except BatchApiError as exc:
                        if not exc.transient:
                            raise
                    except UpstreamUnreachable:
                        pass
                    await asyncio.sleep(delay_s)
                    delay_s = min(max_poll_s, delay_s * 2)
        except TimeoutError:
            raise BatchWaitTimeout(f"batch {batch_id} did not end within {timeout_s} s") from None

    async def results(self, batch_id: str) -> AsyncIterator[BatchResult]:
        """Each request's result, as the results file streams them (in no particular order: match them
        by ``custom_id``). The batch must have ended."""
        url = self.upstream.url(self._path(batch_id, "/results"))
        headers = {**self._headers, "accept": "application/binary"}
        try:
            async with self._http().get(url, headers=headers, timeout=self._results_timeout,
                                        allow_redirects=False) as resp:
                if resp.status != 200:
                    raise _http_error(url, resp.status, await _bounded(resp, 64 * 1024))
                pending = bytearray()
                async for chunk in resp.content.iter_any():
                    pending += chunk
                    *lines, rest = pending.split(b"\n")
                    pending = bytearray(rest)
                    if len(pending) > self._max_line_bytes:
                        raise BatchApiError(f"{url}: a results line is over {self._max_line_bytes} bytes")
                    for line in lines:
                        if line.strip():
                            yield _result(line, url)
                if pending.strip():
                    yield _result(bytes(pending), url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(url, exc) from None

    def _path(self, batch_id: str, tail: str = "") -> str:
        return f"{BATCHES_PATH}/{urllib.parse.quote(batch_id, safe='')}{tail}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No cookies, nothing decompressed behind our back (the headers ask for identity).
            self._session = aiohttp.ClientSession(timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def _call(self, method: str, path: str, model: type[Answer], body: bytes | None = None) -> Answer:
        url = self.upstream.url(path)
        try:
            async with self._http().request(method, url, data=body, headers=self._headers,
                                            allow_redirects=False) as resp:
                raw = await _bounded(resp, self._max_line_bytes)
                if resp.status != 200:
                    raise _http_error(url, resp.status, raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unreachable(url, exc) from None
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise BatchApiError(f"{url}: not a {model.__name__} ({_problem(exc)})", provider_status=200) from None


async def _bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, refused past ``limit`` bytes (a batch's JSON is small)."""
    raw = bytearray()
    async for chunk in resp.content.iter_any():
        raw += chunk
        if len(raw) > limit:
            raise BatchApiError(f"{resp.url}: an answer over {limit} bytes", provider_status=resp.status)
    return bytes(raw)


def _result(line: bytes | bytearray, url: str) -> BatchResult:
    try:
        parsed = _Line.model_validate_json(line)
    except ValidationError as exc:
        raise BatchApiError(f"{url}: not a batch result line ({_problem(exc)})", provider_status=200) from None
    r = parsed.result
    if (r.type == "succeeded" and r.message is None) or (r.type == "errored" and r.error is None):
        raise BatchApiError(f"{url}: a {r.type} result of {parsed.custom_id!r} without its "
                            f"{'message' if r.type == 'succeeded' else 'error'}", provider_status=200)
    return BatchResult(custom_id=parsed.custom_id, type=r.type, message=r.message,
                       error_type=r.error.error.type if r.error else None,
                       error_message=r.error.error.message if r.error else None)


def _http_error(url: str, status: int, raw: bytes) -> BatchApiError:
    """The provider's error, as its body names it: ``HTTP 400: invalid_request_error: …``."""
    kind = message = None
    with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
        error = orjson.loads(raw)["error"]
        kind, message = str(error["type"]), str(error["message"])
    detail = f": {kind}: {message}"[:300] if kind else ""
    return BatchApiError(f"{url}: HTTP {status}{detail}", provider_status=status, provider_type=kind)


def _unreachable(url: str, exc: BaseException) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"the Message Batches API at {url} could not be reached or did not answer "
                               f"in time ({type(exc).__name__})")


def _problem(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    return f"{'.'.join(str(p) for p in problem['loc']) or 'the answer'}: {problem['msg']}"
