"""A loopback fake of the Anthropic Messages API for driving the real `claude` CLI.

It streams answers as server-sent events the way the real API does, reports usage with a small
prompt-cache simulation, injects errors and stalls on request, and keeps a log of every request so
tests can prove what did (and did not) reach the model.

Behaviour is chosen per request from directives in the text of the *last* user message, so old
history never re-triggers them:

    [[reply:TEXT]]     answer exactly TEXT
    [[echo]]           answer with every user text of the request (what the model "sees")
    [[tokens:N]]       answer N tokens of filler (a long answer from a short prompt)
    [[status:529]]     answer with that HTTP error status and an Anthropic error body
    [[delay_s:0.5]]    wait before the answer starts
    [[chunks:5]]       split the answer into this many text deltas
    [[chunk_delay_s:0.1]] pause between deltas
    [[stall]]          start the stream, send one delta, then never finish
    [[retry_after:7]]  with [[status:…]]: send ``retry-after: 7`` with the error
    [[busy_model:M]]   answer 529 overloaded to requests for model M, as usual to any other
    [[ratelimit_remaining:N]] report N left of every kind of the account's limits (default: limit - 1)
    [[tool:Bash:CMD]]  answer ``stop_reason: "tool_use"`` with one ``tool_use`` block: tool ``Bash``,
                       input ``{"command": "CMD"}`` (another tool's argument is its input as a JSON
                       object); CMD may not contain ``]``
    [[loop:N]]         a tool loop: answer N Bash tool calls in a row (``echo loop step K``), one per
                       request of the turn, then the last tool result; ``[[loop:N:B]]``: each tool
                       prints B bytes more (a loop whose context grows)

A request whose last user message carries a ``tool_result`` (the CLI ran the tool) is answered with
that result's text, so the tenant's answer shows what the tool printed. Without a directive the
answer is ``ok: <first 40 chars of the prompt>``. An answer longer than the request's ``max_tokens``
is cut there, with ``stop_reason: "max_tokens"``.

Every response carries a ``request-id`` (``req_fake_…``, kept in the log) and the provider's
``anthropic-ratelimit-{requests,input-tokens,output-tokens}-*`` headers, as the real API sends them
(limits `RATELIMITS`).

Given an ``admin_key``, it also serves the provider's Usage & Cost Admin API over its own log
(`claudepool.testing.fake_admin_api`): what it sent, priced with its ``pricing`` table.

It serves the Message Batches API too (`claudepool.testing.fake_batches`): a batch ends
``batch_delay_s`` after its creation, each request answered as `FakeUpstream.message` answers a
non-streamed call. The directives and the cache simulation live in `claudepool.testing.fake_prompts`.

Run standalone with ``python -m claudepool.testing.fake_upstream --port 8788``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.settings import default_prices
from claudepool.testing import fake_admin_api, fake_batches
from claudepool.testing.fake_prompts import (
    answer_text,
    cache_usage,
    directives,
    error_body,
    last_user_text,
    loop_step,
    tokens,
    tool_result_text,
    tool_use_block,
)

# The account's limits per kind this fake reports (a tier-4-like account).
RATELIMITS = {"requests": 4000, "input-tokens": 2_000_000, "output-tokens": 400_000}


@dataclass(frozen=True)
class Reply:
    """What the fake answers to a message request it does not fail: the text (or one tool call) and
    the usage it reports."""

    text: str
    tool_use: dict[str, Any] | None
    stop_reason: str
    usage: dict[str, int]


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    received_at: float
    status: int = 0
    # The usage this fake's answer had reported when it ended (message requests answered 200): a
    # stream's ``message_start`` usage once that event was sent, its final usage once
    # ``message_delta`` was; a JSON answer's usage. None for an error, or a stream cut before it began.
    usage: dict[str, int] | None = None
    # The ``request-id`` this fake answered with, as the provider's own id of the call.
    request_id: str = ""
    query: str = ""
    # The client went away before the answer was complete (its handler was cancelled).
    cut: bool = False
    # When it arrived, in unix seconds (the Admin API's buckets), and the model it asked for.
    received_unix: float = 0.0
    model: str = ""
    # What the provider bills it as (the Admin API's service tier): a /v1/messages call is standard.
    service_tier: str = "standard"

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    def contains(self, needle: str) -> bool:
        """True when the raw request, body or headers, holds ``needle``."""
        raw = needle.encode()
        return raw in self.body or any(needle in v for v in self.headers.values())


@dataclass
class FakeUpstream:
    """Fake Messages API bound to 127.0.0.1 on an ephemeral port."""

    requests: list[RecordedRequest] = field(default_factory=list)
    # When set, overrides the directive parser: each request pops one plan from the left.
    scripted: list[dict[str, str]] = field(default_factory=list)
    base_url: str = ""
    # The organisation's Admin API key for the usage and cost reports ("": they answer 401), and the
    # prices the cost report applies (the daemon's defaults unless a test gives its own).
    admin_key: str = ""
    pricing: PricingTable = field(default_factory=lambda: PricingTable.of(default_prices()))
    _runner: web.AppRunner | None = None
    _seen_prefixes: set[bytes] = field(default_factory=set)
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _stalled: list[asyncio.Event] = field(default_factory=list)
    # A Message Batch ends this long after it was created (`claudepool.testing.fake_batches`).
    batch_delay_s: float = 0.2
    batches: fake_batches.FakeBatches = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.batches = fake_batches.FakeBatches(self)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        fake_admin_api.add_routes(app, self)
        self.batches.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._other)
        # A client that disconnects cancels its handler, so the log can say a stream was cut.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound_port = sockets[0].getsockname()[1]
        self.base_url = f"http://{host}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        for ev in self._stalled:
            ev.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- inspection helpers ------------------------------------------------------------------

    def message_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/messages"]

    def billable_requests(self) -> Sequence[fake_admin_api.Billable]:
        """What the Admin API reports: the message requests, then every request of every batch."""
        return [*self.message_requests(), *self.batches.billable()]

    def requests_containing(self, needle: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.contains(needle)]

    # -- handlers ----------------------------------------------------------------------------

    async def record(self, request: web.Request) -> RecordedRequest:
        body = await request.read()
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            body=body,
            headers={k.lower(): v for k, v in request.headers.items()},
            received_at=time.monotonic(),
            received_unix=time.time(),
            request_id=f"req_fake_{next(self._ids):06d}",
            query=request.query_string,
        )
        self.requests.append(rec)
        return rec

    def response_headers(self, rec: RecordedRequest, remaining: str | None = None, **extra: str) -> dict[str, str]:
        """What the provider sends with every answer: its id of the call and the account's limits
        (``remaining`` of each kind, default its limit - 1; reset a minute from now)."""
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        headers = {"request-id": rec.request_id}
        for kind, limit in RATELIMITS.items():
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = remaining if remaining is not None else str(limit - 1)
            headers[f"anthropic-ratelimit-{kind}-reset"] = reset
        return {**headers, **extra}

    async def _other(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        rec.status = 404
        return web.json_response(error_body(404, "not found in fake upstream"), status=404,
                                 headers=self.response_headers(rec))

    async def _count_tokens(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        rec.status = 200
        return web.json_response({"input_tokens": tokens(rec.body)}, headers=self.response_headers(rec))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        try:
            return await self._answer(request, rec)
        except asyncio.CancelledError:
            rec.cut = True
            raise

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        body = rec.json() or {}
        rec.model = str(body.get("model", "claude-fake"))
        plan = self.scripted.pop(0) if self.scripted else directives(last_user_text(body))
        if "delay_s" in plan:
            await asyncio.sleep(float(plan["delay_s"]))
        if plan.get("busy_model") == rec.model:  # that model is overloaded; any other answers
            plan = {**plan, "status": "529"}
        if "status" in plan:
            status = int(plan["status"])
            rec.status = status
            extra = {"retry-after": plan["retry_after"]} if "retry_after" in plan else {}
            return web.json_response(error_body(status, f"fake upstream injected {status}"), status=status,
                                     headers=self.response_headers(rec, plan.get("ratelimit_remaining"), **extra))
        reply = self.reply(body, plan)
        rec.status = 200
        if not body.get("stream"):
            message = self._message_of(body, reply)
            rec.usage = reply.usage
            return web.json_response(message, headers=self.response_headers(rec, plan.get("ratelimit_remaining")))
        return await self._stream(request, rec, body, reply.text, reply.usage, plan, reply.tool_use,
                                  reply.stop_reason)

    def reply(self, body: dict[str, Any], plan: dict[str, str]) -> Reply:
        """The answer to a message request under ``plan`` (its directives), error statuses and delays
        aside. Each reply is a call to the cache simulation: it reads and writes the prompt cache."""
        tool_result = tool_result_text(body)
        step, pad_bytes = loop_step(body)
        if step:
            pad = f"head -c {pad_bytes} /dev/zero | tr '\\0' x; " if pad_bytes else ""
            plan = {**plan, "tool": f"Bash:{pad}echo loop step {step}"}
        if "tool" in plan and (tool_result is None or step):
            block = tool_use_block(plan["tool"], next(self._ids))
            return Reply("", block, "tool_use", self._usage(body, orjson.dumps(block["input"])))
        text = tool_result if tool_result is not None and not {"reply", "echo"} & set(plan) else \
            answer_text(plan, body)
        stop_reason = "end_turn"
        output = text.encode()
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and tokens(output) > max_tokens:
            # The answer stops at max_tokens, as the API's does (4 bytes a token here).
            output = output[:4 * max_tokens]
            text, stop_reason = output.decode(errors="ignore"), "max_tokens"
        return Reply(text, None, stop_reason, self._usage(body, output))

    def message(self, body: dict[str, Any], plan: dict[str, str] | None = None) -> dict[str, Any]:
        """The message JSON /v1/messages answers a non-streamed ``body`` with (under ``plan``, default
        the directives of its last user text), as a Message Batches request is answered too."""
        return self._message_of(body, self.reply(body, directives(last_user_text(body)) if plan is None else plan))

    def _message_of(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message = self._message_object(body, reply.text, reply.usage, reply.stop_reason)
        if reply.tool_use is not None:
            message["content"] = [reply.tool_use]
        return message

    def _usage(self, body: dict[str, Any], output: bytes) -> dict[str, int]:
        return {**cache_usage(body, self._seen_prefixes), "output_tokens": max(1, tokens(output))}

    async def _stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        body: dict[str, Any],
        text: str,
        usage: dict[str, int],
        plan: dict[str, str],
        tool_use: dict[str, Any] | None = None,
        stop_reason: str = "end_turn",
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self.response_headers(rec, plan.get("ratelimit_remaining"), **{
            "content-type": "text/event-stream", "cache-control": "no-cache"}))
        await resp.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

        start = self._message_object(body, "", {**usage, "output_tokens": 1}, None)
        await send("message_start", {"type": "message_start", "message": start})
        rec.usage = start["usage"]  # what the stream has reported so far: billed if it is cut now
        if tool_use is not None:
            # As the API streams a tool call: the block with empty input, then its JSON in pieces.
            await send("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {**tool_use, "input": {}}})
            await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                "type": "input_json_delta", "partial_json": orjson.dumps(tool_use["input"]).decode()}})
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
            await send("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                         "usage": {"output_tokens": usage["output_tokens"]}})
            rec.usage = usage
            await send("message_stop", {"type": "message_stop"})
            await resp.write_eof()
            return resp
        await send("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        await send("ping", {"type": "ping"})
        n_chunks = max(1, int(plan.get("chunks", "1")))
        chunk_delay_s = float(plan.get("chunk_delay_s", "0"))
        size = max(1, math.ceil(len(text) / n_chunks))
        pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
        if "stall" in plan:
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": pieces[0]}})
            stalled = asyncio.Event()
            self._stalled.append(stalled)
            await stalled.wait()
            return resp
        for i, piece in enumerate(pieces):
            if i and chunk_delay_s:
                await asyncio.sleep(chunk_delay_s)
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}})
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}})
        rec.usage = usage
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp

    def _message_object(
        self, body: dict[str, Any], text: str, usage: dict[str, int], stop_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": f"msg_fake_{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-fake"),
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }


async def _serve(port: int, batch_delay_s: float) -> None:
    upstream = FakeUpstream(batch_delay_s=batch_delay_s)
    url = await upstream.start(port=port)
    print(f"fake upstream listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8788)
    parser.add_argument("--batch-delay-s", type=float, default=0.2, help="how long a Message Batch takes to end")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.batch_delay_s))


if __name__ == "__main__":
    main()
