"""``POST /v1/chat/completions``: the OpenAI Chat Completions API over the service path.

As the Messages front door (`claudepool.frontdoor.anthropic_api`), a request is translated
(`claudepool.frontdoor.openai_request`) into a `PromptRequest` and served by the same
`MessagesApi.handle` as ``/v1/prompt``: one authentication (the tenant's key as the bearer token,
what the SDK sends), admission, metering, log line and count. The answer is a ``chat.completion``,
or with ``"stream": true`` ``chat.completion.chunk`` lines (``data: {…}``): the role, the text as
the CLI streams it, the finish reason, the usage when ``stream_options.include_usage`` asks, then
``data: [DONE]``. Usage is OpenAI's: ``prompt_tokens`` counts every input token, cache reads and
writes included, and ``prompt_tokens_details.cached_tokens`` the cache reads.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with their
statuses; two change on the way, as OpenAI answers them: a spent budget is 429
``insufficient_quota`` (not 402), a model the tenant may not use 404 ``model_not_found``.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from claudepool.errors import BudgetExhausted, ClaudepoolError, ModelNotAllowed, Unauthorized
from claudepool.frontdoor.anthropic_api import MESSAGES_API, MessagesApi, said, translated
from claudepool.frontdoor.conversation import SESSION_HEADER, ConversationTurn
from claudepool.frontdoor.openai_request import ChatRequest, turns_of
from claudepool.frontdoor.serving import parse, read_body, serve
from claudepool.protocol.wire import PromptRequest, PromptResult, StreamItem, TextDelta

PATH = "/v1/chat/completions"
_FINISH = {"max_tokens": "length", "refusal": "content_filter"}


def add_routes(app: web.Application, api: MessagesApi) -> None:
    app[MESSAGES_API] = api
    app.router.add_post(PATH, _chat)


def openai_error(exc: ClaudepoolError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, body and headers (``retry-after`` when retrying later makes sense) of ``exc``."""
    status, kind, code = exc.status, "invalid_request_error" if exc.status < 500 else "server_error", exc.code
    if isinstance(exc, BudgetExhausted):
        status, kind, code = 429, "insufficient_quota", "insufficient_quota"
    elif isinstance(exc, ModelNotAllowed):
        status, code = 404, "model_not_found"
    elif isinstance(exc, Unauthorized):
        code = "invalid_api_key"
    elif status == 429:
        kind = "rate_limit_exceeded"
    headers = {"retry-after": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else {}
    return status, {"error": {"message": str(exc), "type": kind, "param": None, "code": code}}, headers


def error_response(exc: ClaudepoolError, request_id: str | None = None) -> web.Response:
    status, body, headers = openai_error(exc)
    if request_id is not None:
        headers["x-request-id"] = request_id
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def usage_of(answer: PromptResult) -> dict[str, Any]:
    u = answer.usage
    prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    return {"prompt_tokens": prompt, "completion_tokens": u.output_tokens, "total_tokens": prompt + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cache_read_input_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0}}


def _data(chunk: dict[str, Any] | str) -> bytes:
    return b"data: " + (chunk.encode() if isinstance(chunk, str) else orjson.dumps(chunk)) + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    api = request.app[MESSAGES_API]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    request_id = uuid.uuid4().hex
    created = int(time.time())
    model, streaming, include_usage = "", False, False
    stream: web.StreamResponse | None = None
    convo: ConversationTurn | None = None
    streamed: list[str] = []  # what a streaming client assembles its answer from (and resends)

    async def read() -> PromptRequest:
        nonlocal model, streaming, include_usage, convo
        tenant = api.authenticate(key)  # handle has checked it: this only names the profile
        body = parse(ChatRequest, await read_body(request))
        system, turns = turns_of(body)
        streaming = body.stream
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        prompt_request, model, convo = await translated(api, request, tenant, turns, system, model=body.model,
                                                        kind=body.kind, max_budget_usd=body.max_budget_usd,
                                                        stream=body.stream)
        return prompt_request

    def headers() -> dict[str, str]:
        return {"x-request-id": request_id, **({SESSION_HEADER: convo.session} if convo is not None else {})}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    async def opened() -> web.StreamResponse:
        nonlocal stream
        if stream is None:
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                 **headers()})
            await stream.prepare(request)
            await stream.write(_data(chunk({"role": "assistant", "content": ""})))
        return stream

    async def on_event(item: StreamItem) -> None:  # called only when the request asked for a stream
        if isinstance(item, TextDelta) and item.text:
            await (await opened()).write(_data(chunk({"content": item.text})))
            streamed.append(item.text)

    # The SDK raises an error chunk in the stream as APIError.
    answer = await serve(request, api.handle, key, read, on_event, request_id, stream=lambda: stream,
                         error_response=error_response, error_in_stream=lambda exc: _data(openai_error(exc)[1]))
    if convo is not None:
        # Before the answer's last bytes: the client may send its next turn as soon as it has them.
        await convo.settle(said(answer, streamed if streaming else None))
    if not isinstance(answer, PromptResult):
        return answer
    finish = _FINISH.get(answer.stop_reason or "", "stop")
    if not streaming:
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created,
                "model": answer.model or model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage_of(answer)}
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers())
    out = await opened()
    with contextlib.suppress(ConnectionResetError):
        tail = _data(chunk({}, finish))
        if include_usage:
            tail += _data({**chunk({}), "choices": [], "usage": usage_of(answer)})
        await out.write(tail + _data("[DONE]"))
        await out.write_eof()
    return out
