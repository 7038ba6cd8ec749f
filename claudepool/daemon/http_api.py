"""The HTTP front end (aiohttp): JSON and server-sent events.

    POST /v1/prompt   Authorization: Bearer <tenant key>; a `PromptRequest` body
    GET  /healthz     the process is alive
    GET  /readyz      warm capacity is available (503 while draining or a boot breaker is open)
    GET  /metrics     Prometheus text (the metrics or admin key, unless metrics.public)
    GET  /v1/pool     admin: every worker's state, pid, profile, turns, age, PSS; queue depths
                      (these four, alone, on ``server.metrics_http`` too: `build_metrics_app`)
    POST /v1/messages, GET /v1/models   the Anthropic front door (`claudepool.frontdoor.anthropic_api`),
                      with its own error shape

Errors are ``{"error": {"code", "message"}}`` with the status of the `ClaudepoolError` raised, and
``Retry-After`` when retrying later makes sense. A streaming request's events are ``delta``,
``tool_use`` and ``tool_result`` (`claudepool.protocol.wire.StreamItem`) as the turn runs, then one
``result`` or ``error``. It opens its event stream only when the first of them arrives, so anything
that fails before that (a full queue, a timeout) is still a plain HTTP error with its real status;
after that, failures arrive as one ``event: error``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from claudepool.daemon import cors, http_jobs
from claudepool.daemon.admission import new_request_id
from claudepool.daemon.facade import Api
from claudepool.daemon.http_wire import bearer, json_response, read_json
from claudepool.errors import BadRequest, ClaudepoolError, NotFound, PromptTooLarge, RequestError
from claudepool.frontdoor import anthropic_api, openai_api
from claudepool.frontdoor import errors as anthropic_errors
from claudepool.jobs.door import JobDoor
from claudepool.protocol.wire import (
    LedgerQuery,
    PromptRequest,
    PromptResult,
    SessionCreateRequest,
    StreamItem,
    TenantQuery,
    UsageQuery,
    describe_validation_error,
    error_body,
    parse_query,
)

log = logging.getLogger(__name__)

API: web.AppKey[Api] = web.AppKey("api")
_LEDGER_CHUNK_RECORDS = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(api: Api, *middlewares: Middleware, max_prompt_bytes: int, max_input_bytes: int = 0,
              cors_origins: Sequence[str] = (), messages: anthropic_api.MessagesApi | None = None,
              jobs: JobDoor | None = None) -> web.Application:
    """``middlewares`` run inside the error mapping, so what they raise is answered like a handler's.
    With ``messages``, the Anthropic and OpenAI front doors (``/v1/messages``, ``/v1/models``,
    ``/v1/chat/completions``) are served too."""
    app = web.Application(
        middlewares=[_errors, _refused_before_the_handler, *middlewares],
        # The body is a prompt, its input files as base64 (4 bytes per 3), and a small envelope;
        # larger bodies get 413 before being read whole.
        client_max_size=max_prompt_bytes + (max_input_bytes + 2) // 3 * 4 + 64 * 1024,
    )
    app[API] = api
    app.router.add_post("/v1/prompt", _prompt)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/pool", _pool)
    app.router.add_get("/v1/usage", _usage)
    app.router.add_get("/v1/ledger", _ledger)
    app.router.add_post("/v1/sessions", _session_create)
    app.router.add_get("/v1/sessions", _session_list)
    app.router.add_get("/v1/sessions/{id}", _session_get)
    app.router.add_delete("/v1/sessions/{id}", _session_delete)
    app.router.add_get("/v1/sessions/{id}/files", _session_files)
    app.router.add_get("/v1/sessions/{id}/files/{path:.+}", _session_file)
    if jobs is not None:
        http_jobs.add_routes(app, jobs)
    if messages is not None:
        anthropic_api.add_routes(app, messages)
        openai_api.add_routes(app, messages)
    cors.enable(app, cors_origins)  # last: every route above answers its origins
    return app


def build_metrics_app(api: Api, *middlewares: Middleware) -> web.Application:
    """This daemon's own observability endpoints, for ``server.metrics_http``: nothing a tenant calls."""
    app = web.Application(middlewares=[_errors, *middlewares], client_max_size=64 * 1024)
    app[API] = api
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/pool", _pool)
    return app


def error_response(exc: ClaudepoolError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
    return json_response({"error": error_body(exc)}, status=exc.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClaudepoolError as exc:
        return _answer_error(request, exc)
    except web.HTTPRequestEntityTooLarge:
        return _answer_error(request, PromptTooLarge("request body too large"))
    except web.HTTPNotFound:
        return _answer_error(request, NotFound(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return json_response({"error": {"code": "method_not_allowed", "message": f"{request.method} not allowed"}},
                             status=405)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _answer_error(request, ClaudepoolError("internal error"))


def _answer_error(request: web.Request, exc: ClaudepoolError) -> web.Response:
    """``exc`` in the shape of the API ``request`` called: Anthropic's or OpenAI's on their front
    doors, else ours."""
    if anthropic_api.is_front_door(request.path):
        return anthropic_errors.error_response(exc)
    if request.path == openai_api.PATH:
        return openai_api.error_response(exc)
    return error_response(exc)


_PROMPT_HANDLED: web.RequestKey[bool] = web.RequestKey("prompt_handled")


@web.middleware
async def _refused_before_the_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A prompt refused before its handler runs (the connection guard reads the body first: too
    large, or too slow) still gets its one canonical log line and count; the handler and `admit`
    count what they refuse themselves."""
    try:
        return await handler(request)
    except (ClaudepoolError, web.HTTPRequestEntityTooLarge) as exc:
        if request.path not in ("/v1/prompt", "/v1/messages", openai_api.PATH) or request.get(_PROMPT_HANDLED):
            raise
        refusal = PromptTooLarge("request body too large") if isinstance(exc, web.HTTPRequestEntityTooLarge) else exc
        key = anthropic_api.api_key(request) if request.path == "/v1/messages" else bearer(request)
        request.app[API].refused(refusal, key=key)
        raise refusal from None


async def _read_request(request: web.Request) -> PromptRequest:
    """The body as a `PromptRequest` (read only once the key is known to be good)."""
    body = await read_json(request)
    try:
        return PromptRequest.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


async def _prompt(request: web.Request) -> web.StreamResponse:
    request[_PROMPT_HANDLED] = True
    api = request.app[API]
    request_id = new_request_id()
    stream: EventSourceResponse | None = None
    streaming = False

    async def read() -> PromptRequest:
        nonlocal streaming
        body = await _read_request(request)
        streaming = body.stream
        return body

    async def opened() -> EventSourceResponse:
        nonlocal stream
        if stream is None:
            stream = EventSourceResponse(allow_all_methods=True, headers={"X-Request-Id": request_id})
            await stream.prepare(request)
        return stream

    async def on_event(item: StreamItem) -> None:  # called only when the request asked for a stream
        await (await opened()).send(orjson.dumps(item.model_dump()).decode(), event=item.event)

    try:
        answer: PromptResult = await api.handle(bearer(request), read, on_event, request_id=request_id)
    except Exception as exc:
        if stream is None:
            raise
        # The stream is open, so it must end with one error event, never a second HTTP response.
        if not isinstance(exc, ClaudepoolError):
            if not isinstance(exc, ConnectionResetError):  # the client left: nothing to tell anyone
                log.exception("unhandled error in a streamed %s %s", request.method, request.path)
            exc = ClaudepoolError("internal error")
        with contextlib.suppress(ConnectionResetError):
            await stream.send(orjson.dumps(error_body(exc)).decode(), event="error")
    else:
        if not streaming:
            return json_response(answer.model_dump())
        await (await opened()).send(answer.model_dump_json(), event="result")
    assert stream is not None
    stream.stop_streaming()
    await stream.wait()
    return stream


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, detail = request.app[API].readiness()
    return json_response(detail, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[API].metrics(bearer(request))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _usage(request: web.Request) -> web.Response:
    q = parse_query(UsageQuery, request.query.items())
    report = await request.app[API].usage(bearer(request), tenant=q.tenant, window=q.window, date=q.date)
    return json_response(report)


async def _ledger(request: web.Request) -> web.StreamResponse:
    """The usage ledger as JSON lines, oldest first: one record per settled turn.

    One answer carries at most ``server.ledger_page_records`` (the limit it applied is in
    ``X-Ledger-Limit``), is written in chunks so encoding it never holds the event loop for long,
    and a tenant has at most ``server.max_ledger_reads_per_tenant`` reads in flight: a tenant
    cannot make the daemon build large answers for it over and over, at once."""
    q = parse_query(LedgerQuery, request.query.items())
    async with request.app[API].ledger(bearer(request), tenant=q.tenant, since=q.since, limit=q.limit) as page:
        records = page.records
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "X-Ledger-Limit": str(page.limit)})
        await response.prepare(request)
        for start in range(0, len(records), _LEDGER_CHUNK_RECORDS):
            # orjson encodes the dataclass itself: ~10x faster than dataclasses.asdict first.
            await response.write(b"".join(orjson.dumps(r) + b"\n"
                                          for r in records[start:start + _LEDGER_CHUNK_RECORDS]))
        await response.write_eof()
        return response


async def _session_create(request: web.Request) -> web.Response:
    api = request.app[API]
    tenant = api.authenticate(bearer(request))
    try:
        body = SessionCreateRequest.model_validate(await read_json(request, empty={}))
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None
    return json_response(await api.create_session(tenant, body.profile, body.system), status=201)


def _session_owner(request: web.Request) -> str | None:
    """The tenant whose sessions the caller may see: itself, or for the admin ``?tenant=`` (or all)."""
    scope = request.app[API].scope(bearer(request), parse_query(TenantQuery, request.query.items()).tenant)
    return scope[0] if scope else None


async def _session_list(request: web.Request) -> web.Response:
    return json_response({"sessions": await request.app[API].list_sessions(_session_owner(request))})


def _one_session_owner(request: web.Request, what: str = "read") -> str:
    """The tenant whose session the path names; the admin key must say which, with ``?tenant=``."""
    owner = _session_owner(request)
    if owner is None:
        raise BadRequest(f"the admin key needs ?tenant= to {what} one session")
    return owner


async def _session_get(request: web.Request) -> web.Response:
    owner = _one_session_owner(request)
    return json_response(await request.app[API].get_session(owner, request.match_info["id"]))


async def _session_delete(request: web.Request) -> web.Response:
    owner = _one_session_owner(request, "delete")
    await request.app[API].delete_session(owner, request.match_info["id"])
    return web.Response(status=204)


async def _session_files(request: web.Request) -> web.Response:
    """The session's workspace: ``{"files": [{path, type, size_bytes}], "truncated"}``."""
    owner = _one_session_owner(request)
    return json_response(await request.app[API].session_files(owner, request.match_info["id"]))


async def _session_file(request: web.Request) -> web.Response:
    """One regular file of the session's workspace, its bytes as they are."""
    owner = _one_session_owner(request)
    data = await request.app[API].session_file(owner, request.match_info["id"], request.match_info["path"])
    return web.Response(body=data, content_type="application/octet-stream")


async def _pool(request: web.Request) -> web.Response:
    try:
        status = request.app[API].pool_status(bearer(request))
    except RequestError as exc:
        return error_response(exc)
    return json_response(status)
