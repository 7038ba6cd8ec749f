"""The jobs over the Unix socket: one ``job.*`` frame (`claudepool.protocol.wire.JobFrame`), one answer.

``job.submit`` and ``job.cancel`` and ``job.get`` answer a ``job`` frame (``{"job": ...}``; for a
submission ``{id, status, lane, created}``), ``job.bulk`` and ``job.list`` a ``jobs`` frame. Following
a job as it runs is served over HTTP (``GET /v1/jobs/{id}/events``); on the socket, `job.get` again.
"""

from __future__ import annotations

from claudepool.errors import BadRequest, ClaudepoolError, NotFound
from claudepool.jobs.door import JobDoor
from claudepool.protocol.wire import JobFrame, error_frame, event_frame


async def answer(door: JobDoor | None, frame: JobFrame) -> bytes:
    try:
        if door is None:
            raise NotFound("jobs are not enabled on this daemon (jobs.enabled)")
        if frame.op == "job.submit":
            return event_frame(frame.id, "job", {"job": await door.submit(frame.key, frame.job,
                                                                          frame.idempotency_key)})
        if frame.op == "job.bulk":
            body = await door.submit_bulk(frame.key, {"jobs": frame.jobs}, frame.idempotency_key)
            return event_frame(frame.id, "jobs", body)
        if frame.op == "job.list":
            return event_frame(frame.id, "jobs", await door.list(frame.key, tenant=frame.tenant, status=frame.status,
                                                                 since=frame.since, limit=frame.limit))
        if frame.job_id is None:
            raise BadRequest(f"invalid request: job_id: Field required for {frame.op}")
        if frame.op == "job.get":
            return event_frame(frame.id, "job", {"job": await door.get(frame.key, frame.job_id, tenant=frame.tenant)})
        return event_frame(frame.id, "job", {"job": await door.cancel(frame.key, frame.job_id, tenant=frame.tenant)})
    except ClaudepoolError as exc:
        return error_frame(frame.id, exc)
