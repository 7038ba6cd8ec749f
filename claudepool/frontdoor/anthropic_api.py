"""``POST /v1/messages`` and ``GET /v1/models``: the Anthropic Messages API over the service path.

A request is translated (`claudepool.frontdoor.anthropic_request`) into a `PromptRequest` and
served by `MessagesApi.handle`, the same call ``/v1/prompt`` makes: one authentication, admission
(limits, budgets, queue bounds), metering, log line and count per request. The answer is the
``Message`` object, or with ``"stream": true`` the SSE sequence ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``, as the CLI streams),
``content_block_stop``, ``message_delta`` (stop_reason and usage), ``message_stop``. As on
``/v1/prompt``, the stream opens with the first text, so a failure before it is a plain HTTP error
with its status; after it, an SSE ``error`` event. Errors are in Anthropic's shape
(`claudepool.frontdoor.errors`). Tool activity is not streamed here (``/v1/prompt`` shows it).

``GET /v1/models`` lists what the caller's tenant may ask for: in the Anthropic shape when the
request carries ``anthropic-version`` (the SDK always does), else in the OpenAI shape.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web

from claudepool.errors import NotFound
from claudepool.frontdoor.anthropic_request import MessagesRequest, check_unsupported, system_of, turns_of
from claudepool.frontdoor.conversation import SESSION_HEADER, ConversationTurn, opted_out, plan
from claudepool.frontdoor.errors import error_event, error_response, sse
from claudepool.frontdoor.history import Role
from claudepool.frontdoor.serving import asked_model, kind_of, parse, read_body, serve, served_as
from claudepool.protocol.wire import PromptRequest, PromptResult, StreamItem, TextDelta
from claudepool.sessions.conversations import Conversations
from claudepool.tenancy.models import ModelCatalog, display_name, resolve_model
from claudepool.tenancy.routing import Router
from claudepool.tenancy.tenants import Tenant

# Stop reasons the Messages API knows; anything else the CLI says ends as end_turn.
_STOP_REASONS = frozenset({"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"})
# Model listings carry a creation date the daemon does not know: the epoch, said in README.
_CREATED_AT = "1970-01-01T00:00:00Z"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MessagesApi(Protocol):
    """What the front door needs of the daemon (`claudepool.daemon.facade.Facade` has it)."""

    async def handle(self, key: str | None, request: PromptRequest | Callable[[], Awaitable[PromptRequest]],
                     on_event: Callable[[StreamItem], Awaitable[None]] | None = None, *,
                     request_id: str | None = None) -> PromptResult: ...

    def refused(self, exc: BaseException, *, key: str | None = None) -> None: ...

    def authenticate(self, key: str | None) -> Tenant: ...

    @property
    def catalog(self) -> ModelCatalog: ...

    @property
    def conversations(self) -> Conversations | None:
        """What recognises conversations from their history (None: every request is stateless)."""
        ...

    @property
    def router(self) -> Router: ...


MESSAGES_API: web.AppKey[MessagesApi] = web.AppKey("messages_api")
PATHS = ("/v1/messages", "/v1/models")


async def translated(api: MessagesApi, request: web.Request, tenant: Tenant, turns: Sequence[tuple[Role, str]],
                     system: str | None, *, model: str, kind: str | None, max_budget_usd: float | None,
                     stream: bool) -> tuple[PromptRequest, str, ConversationTurn | None]:
    """What both doors run for a chat request: the `PromptRequest` (routed by its kind, in the
    conversation its history belongs to), the model its answer names before the CLI reports one
    (as admission will resolve it), and the conversation turn to settle afterwards (None: stateless)."""
    kind, asked = kind_of(request, kind), asked_model(model)
    profile, served = served_as(api.router, api.catalog, tenant, kind, asked)
    planned = await plan(api.conversations, tenant, turns, profile=profile, model=served, system=system,
                         profile_system_prompt=api.catalog.system_prompt(profile), opted_out=opted_out(request))
    return (PromptRequest(prompt=planned.prompt, model=asked, kind=kind, max_budget_usd=max_budget_usd,
                          stream=stream, system=planned.system, session=planned.session), served, planned.turn)


def add_routes(app: web.Application, api: MessagesApi) -> None:
    app[MESSAGES_API] = api
    app.router.add_post("/v1/messages", _messages)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{id}", _model)


def is_front_door(path: str) -> bool:
    """Whether ``path`` answers in Anthropic's error shape (also for what middlewares refuse)."""
    return any(path == p or path.startswith(p + "/") for p in PATHS)


def api_key(request: web.Request) -> str | None:
    """``x-api-key`` (what the SDK sends), else a bearer token."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def message_id(request_id: str) -> str:
    return f"msg_{request_id}"


def usage_of(answer: PromptResult) -> dict[str, int]:
    u = answer.usage
    return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "cache_creation_input_tokens": u.cache_creation_input_tokens,
            "cache_read_input_tokens": u.cache_read_input_tokens}


def stop_reason_of(answer: PromptResult) -> str:
    return answer.stop_reason if answer.stop_reason in _STOP_REASONS else "end_turn"


def message_of(answer: PromptResult, model: str) -> dict[str, Any]:
    return {"id": message_id(answer.id), "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": answer.text}] if answer.text else [],
            "model": answer.model or model, "stop_reason": stop_reason_of(answer), "stop_sequence": None,
            "usage": usage_of(answer)}


async def _messages(request: web.Request) -> web.StreamResponse:
    api = request.app[MESSAGES_API]
    key = api_key(request)
    request_id = uuid.uuid4().hex
    model = ""
    streaming = False
    stream: web.StreamResponse | None = None
    convo: ConversationTurn | None = None
    streamed: list[str] = []  # what a streaming client assembles its answer from (and resends)

    async def read() -> PromptRequest:
        nonlocal model, streaming, convo
        tenant = api.authenticate(key)  # handle has checked it: this only names the profile
        body = parse(MessagesRequest, await read_body(request))
        check_unsupported(body)
        streaming = body.stream
        # model: what message_start names, sent before the CLI reports the model in force.
        prompt_request, model, convo = await translated(
            api, request, tenant, turns_of(body.messages), system_of(body), model=body.model, kind=body.kind,
            max_budget_usd=body.max_budget_usd, stream=body.stream)
        return prompt_request

    def headers() -> dict[str, str]:
        return {"request-id": request_id, **({SESSION_HEADER: convo.session} if convo is not None else {})}

    async def opened() -> web.StreamResponse:
        nonlocal stream
        if stream is None:
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                 **headers()})
            await stream.prepare(request)
            await stream.write(
                sse("message_start", {"type": "message_start", "message": {
                    "id": message_id(request_id), "type": "message", "role": "assistant", "content": [],
                    "model": model, "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}})
                + sse("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})
                + sse("ping", {"type": "ping"}))
        return stream

    async def on_event(item: StreamItem) -> None:  # called only when the request asked for a stream
        if isinstance(item, TextDelta) and item.text:
            await (await opened()).write(sse("content_block_delta", {
                "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": item.text}}))
            streamed.append(item.text)

    answer = await serve(request, api.handle, key, read, on_event, request_id, stream=lambda: stream,
                         error_response=error_response, error_in_stream=error_event)
    if convo is not None:
        # Before the answer's last bytes: the client may send its next turn as soon as it has them.
        await convo.settle(said(answer, streamed if streaming else None))
    if not isinstance(answer, PromptResult):
        return answer
    if not streaming:
        return web.Response(body=orjson.dumps(message_of(answer, model)), content_type="application/json",
                            headers=headers())
    out = await opened()
    with contextlib.suppress(ConnectionResetError):
        await out.write(
            sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": stop_reason_of(answer), "stop_sequence": None},
                                    "usage": usage_of(answer)})
            + sse("message_stop", {"type": "message_stop"}))
        await out.write_eof()
    return out


def said(answer: PromptResult | web.StreamResponse, streamed: list[str] | None) -> str | None:
    """The answer's text as the client has it (and will resend it): what it was streamed, else the
    answer's text; None for a request that failed."""
    if not isinstance(answer, PromptResult):
        return None
    return "".join(streamed) if streamed is not None else answer.text


def _listed(request: web.Request) -> tuple[bool, list[str]]:
    api = request.app[MESSAGES_API]
    tenant = api.authenticate(api_key(request))
    return "anthropic-version" in request.headers, api.catalog.allowed(tenant.profile, tenant.models)


def _anthropic_model(model: str) -> dict[str, Any]:
    return {"type": "model", "id": model, "display_name": display_name(model), "created_at": _CREATED_AT}


def _openai_model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "anthropic"}


async def _models(request: web.Request) -> web.Response:
    anthropic, models = _listed(request)
    if anthropic:
        body: dict[str, Any] = {"data": [_anthropic_model(m) for m in models], "has_more": False,
                                "first_id": models[0] if models else None, "last_id": models[-1] if models else None}
    else:
        body = {"object": "list", "data": [_openai_model(m) for m in models]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _model(request: web.Request) -> web.Response:
    anthropic, models = _listed(request)
    wanted = resolve_model(request.match_info["id"])
    if wanted not in models:
        raise NotFound(f"model {request.match_info['id']!r} is not available to this tenant")
    body = _anthropic_model(wanted) if anthropic else _openai_model(wanted)
    return web.Response(body=orjson.dumps(body), content_type="application/json")
