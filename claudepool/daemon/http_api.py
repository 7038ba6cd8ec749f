"""The HTTP front end (aiohttp): JSON and server-sent events.

    POST /v1/prompt   Authorization: Bearer <tenant key>; a `PromptRequest` body
    GET  /healthz     the process is alive
    GET  /readyz      warm capacity is available (503 while draining or a boot breaker is open)
    GET  /metrics     Prometheus text (the metrics or admin key, unless metrics.public)
    GET  /v1/pool     admin: every worker's state, pid, profile, turns, age, PSS; queue depths

Errors are ``{"error": {"code", "message"}}`` with the status of the `ClaudepoolError` raised, and
``Retry-After`` when retrying later makes sense. A streaming request opens its event stream only
when the first text arrives, so anything that fails before that (a full queue, a timeout) is still a
plain HTTP error with its real status; after that, failures arrive as one ``event: error``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from claudepool.errors import BadRequest, ClaudepoolError, NotFound, PromptTooLarge, RequestError, TooManyInFlight
from claudepool.protocol.wire import (
    LedgerQuery,
    PromptRequest,
    PromptResult,
    SessionCreateRequest,
    TenantQuery,
    UsageQuery,
    describe_validation_error,
    error_body,
    parse_query,
)

if TYPE_CHECKING:
    from claudepool.daemon.app import Daemon
    from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
# Ledger reads in flight, per tenant ("admin" for the admin key).
LEDGER_READS: web.AppKey[Counter[str]] = web.AppKey("ledger_reads")
_LEDGER_CHUNK_RECORDS = 1000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(daemon: Daemon, *middlewares: Middleware) -> web.Application:
    """``middlewares`` run inside the error mapping, so what they raise is answered like a handler's."""
    app = web.Application(
        middlewares=[_errors, _refused_before_the_handler, *middlewares],
        # The body is a prompt plus a small envelope; larger bodies get 413 before being read whole.
        client_max_size=daemon.settings.server.max_prompt_bytes + 64 * 1024,
    )
    app[DAEMON] = daemon
    app[LEDGER_READS] = Counter()
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
    return app


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def error_response(exc: ClaudepoolError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
    return json_response({"error": error_body(exc)}, status=exc.status, headers=headers)


def bearer(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClaudepoolError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(PromptTooLarge("request body too large"))
    except web.HTTPNotFound:
        return error_response(NotFound(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return json_response({"error": {"code": "method_not_allowed", "message": f"{request.method} not allowed"}},
                             status=405)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ClaudepoolError("internal error"))


_PROMPT_HANDLED: web.RequestKey[bool] = web.RequestKey("prompt_handled")


@web.middleware
async def _refused_before_the_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A prompt refused before its handler runs (the connection guard reads the body first: too
    large, or too slow) still gets its one canonical log line and count; the handler and `admit`
    count what they refuse themselves."""
    try:
        return await handler(request)
    except (ClaudepoolError, web.HTTPRequestEntityTooLarge) as exc:
        if request.path != "/v1/prompt" or request.get(_PROMPT_HANDLED):
            raise
        refusal = PromptTooLarge("request body too large") if isinstance(exc, web.HTTPRequestEntityTooLarge) else exc
        daemon = request.app[DAEMON]
        try:
            tenant: Tenant | None = daemon.tenants.authenticate(bearer(request))
        except ClaudepoolError:
            tenant = None
        daemon.service.refused(refusal, tenant=tenant)
        raise refusal from None


async def _read_request(request: web.Request) -> PromptRequest:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PromptTooLarge("request body too large") from None
    try:
        return PromptRequest.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


async def _prompt(request: web.Request) -> web.StreamResponse:
    request[_PROMPT_HANDLED] = True
    daemon = request.app[DAEMON]
    tenant: Tenant | None = None
    try:
        tenant = daemon.tenants.authenticate(bearer(request))
        body = await _read_request(request)
    except ClaudepoolError as exc:
        daemon.service.refused(exc, tenant=tenant)  # what `admit` refuses, it counts itself
        raise
    admission = await daemon.service.admit(tenant, body)
    if not body.stream:
        result = await daemon.service.run(admission)
        return json_response(result.model_dump())

    stream: EventSourceResponse | None = None

    async def opened() -> EventSourceResponse:
        nonlocal stream
        if stream is None:
            stream = EventSourceResponse(allow_all_methods=True, headers={"X-Request-Id": admission.request_id})
            await stream.prepare(request)
        return stream

    async def on_delta(text: str) -> None:
        await (await opened()).send(orjson.dumps({"text": text}).decode(), event="delta")

    try:
        answer: PromptResult = await daemon.service.run(admission, on_delta)
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
        await (await opened()).send(answer.model_dump_json(), event="result")
    assert stream is not None
    stream.stop_streaming()
    await stream.wait()
    return stream


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    ready, detail = daemon.readiness()
    return json_response(detail, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    if not daemon.settings.metrics.public:
        daemon.tenants.require_scraper(bearer(request))
    body = generate_latest(daemon.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _usage(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    q = parse_query(UsageQuery, request.query.items())
    report = await daemon.usage_report(bearer(request), tenant=q.tenant, window=q.window, date=q.date)
    return json_response(report)


async def _ledger(request: web.Request) -> web.StreamResponse:
    """The usage ledger as JSON lines, oldest first: one record per settled turn.

    One answer carries at most ``server.ledger_page_records`` (the limit it applied is in
    ``X-Ledger-Limit``), is written in chunks so encoding it never holds the event loop for long,
    and a tenant has at most ``server.max_ledger_reads_per_tenant`` reads in flight: a tenant
    cannot make the daemon build large answers for it over and over, at once."""
    daemon = request.app[DAEMON]
    server = daemon.settings.server
    q = parse_query(LedgerQuery, request.query.items())
    key = bearer(request)
    scope = daemon.caller_scope(key, q.tenant)
    # Counted per tenant; the admin key's reads (of any tenant, or of all) count as "admin".
    reader = "admin" if scope is None or daemon.tenants.is_admin(key) else scope[0]
    reads = request.app[LEDGER_READS]
    if reads[reader] >= server.max_ledger_reads_per_tenant:
        raise TooManyInFlight(f"{reads[reader]} ledger reads of this tenant are in flight, its limit")
    reads[reader] += 1
    try:
        limit = min(q.limit, server.ledger_page_records)
        records = []
        for tenant in scope if scope is not None else [None]:
            records += await daemon.store.ledger(tenant, since=q.since, limit=limit)
        records.sort(key=lambda r: r.at)
        del records[limit:]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Ledger-Limit": str(limit)})
        await response.prepare(request)
        for start in range(0, len(records), _LEDGER_CHUNK_RECORDS):
            # orjson encodes the dataclass itself: ~10x faster than dataclasses.asdict first.
            await response.write(b"".join(orjson.dumps(r) + b"\n"
                                          for r in records[start:start + _LEDGER_CHUNK_RECORDS]))
        await response.write_eof()
        return response
    finally:
        reads[reader] -= 1
        if reads[reader] <= 0:
            del reads[reader]


async def _session_create(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    tenant = daemon.tenants.authenticate(bearer(request))
    raw = await request.read()
    try:
        body = SessionCreateRequest.model_validate(orjson.loads(raw) if raw.strip() else {})
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None
    record = await daemon.sessions.create(tenant, body.profile)
    return json_response(daemon.sessions.view(record), status=201)


def _session_owner(request: web.Request) -> str | None:
    """The tenant whose sessions the caller may see: itself, or for the admin ``?tenant=`` (or all)."""
    daemon = request.app[DAEMON]
    scope = daemon.caller_scope(bearer(request), parse_query(TenantQuery, request.query.items()).tenant)
    return scope[0] if scope else None


async def _session_list(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    records = await daemon.sessions.list(_session_owner(request))
    return json_response({"sessions": [daemon.sessions.view(r) for r in records]})


async def _session_get(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    owner = _session_owner(request)
    if owner is None:
        raise BadRequest("the admin key needs ?tenant= to read one session")
    return json_response(daemon.sessions.view(await daemon.sessions.get(owner, request.match_info["id"])))


async def _session_delete(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    owner = _session_owner(request)
    if owner is None:
        raise BadRequest("the admin key needs ?tenant= to delete one session")
    await daemon.sessions.delete(owner, request.match_info["id"])
    return web.Response(status=204)


async def _pool(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    try:
        daemon.tenants.require_admin(bearer(request))
    except RequestError as exc:
        return error_response(exc)
    return json_response(daemon.pool_status())
