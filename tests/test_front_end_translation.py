"""The front ends only translate (issue 11): each runs here over a scripted `Api`, with no daemon,
pool or worker behind it, and must turn the same calls and errors into its own wire format."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from claudepool.daemon.facade import LedgerPage
from claudepool.daemon.http_api import Handler, build_app
from claudepool.daemon.service import OnEvent, ReadRequest
from claudepool.daemon.unix_api import UnixFrontEnd
from claudepool.errors import RateLimited, RequestReadTimeout, Unauthorized
from claudepool.protocol.wire import PromptRequest, PromptResult, TextDelta, UsageOut
from claudepool.tenancy.tenants import Tenant

KEY = "scripted-key"


@dataclass
class ScriptedApi:
    """Answers every prompt with ``deltas`` then ``error`` (if set) or a result echoing the prompt."""

    deltas: list[str] = field(default_factory=list)
    error: Exception | None = None
    prompts: list[tuple[str | None, str, bool]] = field(default_factory=list)
    refusals: list[tuple[str, str | None]] = field(default_factory=list)

    async def handle(self, key: str | None, request: PromptRequest | ReadRequest, on_event: OnEvent | None = None,
                     *, request_id: str | None = None) -> PromptResult:
        if not isinstance(request, PromptRequest):
            request = await request()
        self.prompts.append((key, request.prompt, request.stream))
        for text in self.deltas:
            if request.stream and on_event is not None:
                await on_event(TextDelta(text=text))
        if self.error is not None:
            raise self.error
        return PromptResult(id=request_id or "rid", tenant="t", session=None, text=f"echo {request.prompt}",
                            is_error=False, stop_reason=None, usage=UsageOut(output_tokens=3), cost_usd=0.5,
                            duration_ms=1.0, queue_ms=0.0)

    def refused(self, exc: BaseException, *, key: str | None = None) -> None:
        self.refusals.append((getattr(exc, "code", "error"), key))

    def authenticate(self, key: str | None) -> Tenant:
        raise Unauthorized("missing or unknown key")

    def scope(self, key: str | None, tenant: str | None = None) -> list[str] | None:
        raise Unauthorized("missing or unknown key")

    async def create_session(self, tenant: Tenant, profile: str | None, system: str | None = None
                             ) -> dict[str, Any]:
        raise NotImplementedError

    async def list_sessions(self, owner: str | None) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def delete_session(self, owner: str, session_id: str) -> None:
        raise NotImplementedError

    async def session_files(self, owner: str, session_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def session_file(self, owner: str, session_id: str, path: str) -> bytes:
        raise NotImplementedError

    async def usage(self, key: str | None, *, tenant: str | None = None, window: str = "day",
                    date: str | None = None) -> dict[str, Any]:
        return {"window": {"kind": window, "key": date}, "tenants": {}}

    def ledger(self, key: str | None, *, tenant: str | None, since: float | None,
               limit: int) -> AbstractAsyncContextManager[LedgerPage]:
        raise NotImplementedError

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return False, {"ready": False, "scripted": True}

    def pool_status(self, key: str | None) -> dict[str, Any]:
        raise Unauthorized("missing or unknown key")

    def status(self, key: str | None) -> dict[str, Any]:
        if key != KEY:
            raise Unauthorized("missing or unknown key")
        return {"scripted": True}

    def metrics(self, key: str | None) -> bytes:
        return b"# scripted\n"


# -- the Unix socket --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def unix_front(api: ScriptedApi, tmp_path: Path) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                                                asyncio.StreamWriter]]:
    front = UnixFrontEnd(api, max_frame_bytes=4096, max_requests_per_connection=4)
    path = str(tmp_path / "front.sock")
    await front.listen(path, 0o600)
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        yield reader, writer
    finally:
        writer.close()
        await front.close(5)


async def frames_until_terminal(reader: asyncio.StreamReader, frame_id: str) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(5):
        while True:
            frame = orjson.loads(await reader.readline())
            frames.append(frame)
            if frame["id"] == frame_id and frame["event"] in ("result", "error", "status"):
                return frames


async def test_unix_frames_are_the_calls_answers(tmp_path: Path) -> None:
    api = ScriptedApi(deltas=["Hel", "lo"])
    async with unix_front(api, tmp_path) as (reader, writer):
        writer.write(orjson.dumps({"id": "p1", "op": "prompt", "key": KEY, "prompt": "hi", "stream": True}) + b"\n")
        frames = await frames_until_terminal(reader, "p1")
        assert [(f["event"], f.get("text")) for f in frames] == [
            ("delta", "Hel"), ("delta", "lo"), ("result", "echo hi")]
        assert (frames[-1]["cost_usd"], frames[-1]["usage"]["output_tokens"]) == (0.5, 3)
        assert api.prompts == [(KEY, "hi", True)]

        api.error = RateLimited("4 of 4 requests per minute", kind="requests_per_minute", retry_after_s=7)
        writer.write(orjson.dumps({"id": "p2", "op": "prompt", "key": KEY, "prompt": "again"}) + b"\n")
        assert await frames_until_terminal(reader, "p2") == [
            {"id": "p2", "event": "error", "code": "rate_limited", "message": "4 of 4 requests per minute"}]

        writer.write(orjson.dumps({"id": "s1", "op": "status", "key": KEY}) + b"\n")
        assert await frames_until_terminal(reader, "s1") == [{"id": "s1", "event": "status", "scripted": True}]
        writer.write(orjson.dumps({"id": "s2", "op": "status", "key": "wrong"}) + b"\n")
        assert await frames_until_terminal(reader, "s2") == [{"id": "s2", "event": "status", "error": {
            "code": "unauthorized", "message": "missing or unknown key"}}]

        writer.write(b"not json\n")  # refused by the front end itself, before any call: counted there
        frame = orjson.loads(await reader.readline())
        assert (frame["id"], frame["code"]) == (None, "bad_request")
        assert api.refusals == [("bad_request", None)]


# -- HTTP -----------------------------------------------------------------------------------------


@pytest.fixture
async def http_url() -> AsyncIterator[tuple[str, ScriptedApi]]:
    api = ScriptedApi()
    runner = web.AppRunner(build_app(api, max_prompt_bytes=4096))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", api
    finally:
        await runner.cleanup()


async def sse_events(resp: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    events, event = [], ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((event, orjson.loads(line[len("data: "):])))
    return events


async def test_http_answers_are_the_calls_answers(http_url: tuple[str, ScriptedApi]) -> None:
    url, api = http_url
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/prompt", data=orjson.dumps({"prompt": "hi"}), headers=auth) as resp:
            assert (resp.status, (await resp.json())["text"]) == (200, "echo hi")
        api.deltas = ["Hel", "lo"]
        async with session.post(f"{url}/v1/prompt", data=orjson.dumps({"prompt": "hi", "stream": True}),
                                headers=auth) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert [e for e, _ in await sse_events(resp)] == ["delta", "delta", "result"]
        # An error before any text is a plain HTTP error with its status; after text, one error event.
        api.deltas, api.error = [], RateLimited("limited", kind="requests_per_minute", retry_after_s=7)
        async with session.post(f"{url}/v1/prompt", data=orjson.dumps({"prompt": "x", "stream": True}),
                                headers=auth) as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (429, "7")
            assert (await resp.json())["error"] == {"code": "rate_limited", "message": "limited"}
        api.deltas = ["partial"]
        async with session.post(f"{url}/v1/prompt", data=orjson.dumps({"prompt": "x", "stream": True}),
                                headers=auth) as resp:
            assert await sse_events(resp) == [("delta", {"text": "partial"}),
                                              ("error", {"code": "rate_limited", "message": "limited"})]
        # The body is read by the pipeline, so what cannot be read is the pipeline's to refuse.
        api.error = None
        async with session.post(f"{url}/v1/prompt", data=b"{", headers=auth) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (400, "bad_request")
        assert [key for key, _, _ in api.prompts] == [KEY] * 4
        async with session.get(f"{url}/readyz") as resp:
            assert (resp.status, await resp.json()) == (503, {"ready": False, "scripted": True})
        async with session.get(f"{url}/v1/pool", headers=auth) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (401, "unauthorized")


async def test_an_unexpected_failure_mid_stream_ends_it_with_one_error_event(
        http_url: tuple[str, ScriptedApi], caplog: pytest.LogCaptureFixture) -> None:
    url, api = http_url
    api.deltas, api.error = ["partial "], RuntimeError("a bug, not a claudepool error")
    async with aiohttp.ClientSession() as session, session.post(
            f"{url}/v1/prompt", data=orjson.dumps({"prompt": "hello", "stream": True}),
            headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert await sse_events(resp) == [("delta", {"text": "partial "}),
                                          ("error", {"code": "internal_error", "message": "internal error"})]
    assert "a bug, not a claudepool error" in caplog.text  # logged for us, not sent to the client


async def test_http_refusals_before_the_handler_go_to_the_api() -> None:
    """What a middleware refuses before the prompt handler runs (the connection guard: a body too
    slow) is answered like a handler's error, and the api counts it, under the caller's key."""
    api = ScriptedApi()

    @web.middleware
    async def too_slow(request: web.Request, handler: Handler) -> web.StreamResponse:
        raise RequestReadTimeout("the request body did not arrive within 1 s")

    runner = web.AppRunner(build_app(api, too_slow, max_prompt_bytes=4096))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{host}:{port}/v1/prompt", data=b"{}",
                                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
                assert (resp.status, (await resp.json())["error"]["code"]) == (408, "request_timeout")
            async with session.get(f"http://{host}:{port}/healthz") as resp:
                assert resp.status == 408  # refused too, but not a prompt: nothing to count
    finally:
        await runner.cleanup()
    assert api.refusals == [("request_timeout", KEY)]
    assert api.prompts == []
