"""The jobs over HTTP (`claudepool.jobs.door`): submit, read, list, cancel, follow.

    POST   /v1/jobs               a job (`claudepool.jobs.api.JobRequest`) → 202 {id, status, lane, created}
    POST   /v1/jobs/bulk          {"jobs": [...]} → 202 {"jobs": [{id, status, lane, created}, ...]}
    GET    /v1/jobs/{id}          the job: status, result, usage, cost_usd, error, webhook
    GET    /v1/jobs?status=&since=&limit=   the tenant's own jobs, oldest first
    DELETE /v1/jobs/{id}          cancel it (an ended job is returned as it is)
    GET    /v1/jobs/{id}/events   server-sent events: ``job`` with the job each time its status
                                  changes, until it has ended; then the stream closes

An ``Idempotency-Key`` header makes a submission safe to retry: the same key (per tenant) answers
with the job it made the first time (``created: false``); in a bulk submission job ``i`` takes
``<key>.<i>``. The admin key reads (and cancels) a tenant's jobs with ``?tenant=``.
"""

from __future__ import annotations

import contextlib

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field

from claudepool.daemon.http_wire import bearer, json_response, read_json
from claudepool.jobs.door import JobDoor
from claudepool.jobs.model import JobStatus
from claudepool.protocol.wire import parse_query

JOBS: web.AppKey[JobDoor] = web.AppKey("jobs")


class JobQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = None
    status: JobStatus | None = None
    since: float | None = Field(default=None, allow_inf_nan=False)
    limit: int = Field(default=100, ge=1, le=1000)


class _TenantQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str | None = None


def add_routes(app: web.Application, door: JobDoor) -> None:
    app[JOBS] = door
    app.router.add_post("/v1/jobs", _submit)
    app.router.add_post("/v1/jobs/bulk", _submit_bulk)
    app.router.add_get("/v1/jobs", _list)
    app.router.add_get("/v1/jobs/{id}", _get)
    app.router.add_delete("/v1/jobs/{id}", _cancel)
    app.router.add_get("/v1/jobs/{id}/events", _events)


def _tenant(request: web.Request) -> str | None:
    return parse_query(_TenantQuery, request.query.items()).tenant


async def _submit(request: web.Request) -> web.Response:
    door = request.app[JOBS]
    key = bearer(request)
    door.authenticate(key)  # a bad key is refused before the body is read
    entry = await door.submit(key, await read_json(request), request.headers.get("Idempotency-Key"))
    return json_response(entry, status=202)


async def _submit_bulk(request: web.Request) -> web.Response:
    door = request.app[JOBS]
    key = bearer(request)
    door.authenticate(key)
    return json_response(await door.submit_bulk(key, await read_json(request), request.headers.get("Idempotency-Key")),
                 status=202)


async def _get(request: web.Request) -> web.Response:
    door = request.app[JOBS]
    return json_response(await door.get(bearer(request), request.match_info["id"], tenant=_tenant(request)))


async def _cancel(request: web.Request) -> web.Response:
    return json_response(await request.app[JOBS].cancel(bearer(request), request.match_info["id"],
                                                tenant=_tenant(request)))


async def _list(request: web.Request) -> web.Response:
    q = parse_query(JobQuery, request.query.items())
    return json_response(await request.app[JOBS].list(bearer(request), tenant=q.tenant, status=q.status, since=q.since,
                                              limit=q.limit))


async def _events(request: web.Request) -> web.StreamResponse:
    followed = request.app[JOBS].follow(bearer(request), request.match_info["id"], tenant=_tenant(request))
    # The first read happens before the stream opens: an unknown job is a plain 404.
    first = await anext(followed)
    stream = EventSourceResponse()
    await stream.prepare(request)
    with contextlib.suppress(ConnectionResetError):
        await stream.send(orjson.dumps(first).decode(), event="job")
        async for view in followed:
            await stream.send(orjson.dumps(view).decode(), event="job")
    await followed.aclose()
    stream.stop_streaming()
    await stream.wait()
    return stream

