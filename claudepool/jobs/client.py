"""Jobs from Python, over the daemon's HTTP API or its socket, with the client's key and transport.

>>> async def demo():                                                  # doctest: +SKIP
...     async with AsyncClient(key="acme-key", socket_path="/run/claudepool/claudepool.sock") as client:
...         jobs = JobsClient(client)
...         entry = await jobs.submit("Summarise this document: ...", idempotency_key="doc-17")
...         done = await jobs.wait(entry["id"])
...         print(done["status"], done["result"]["text"])
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from claudepool.client import AsyncClient, _json_or_raise, _sse_events
from claudepool.errors import RemoteError

_ENDED = frozenset({"succeeded", "failed", "cancelled", "dead"})


class JobsClient:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def submit(self, prompt: str | None = None, *, idempotency_key: str | None = None,
                     **fields: Any) -> dict[str, Any]:
        """Queue one job (``prompt``, or ``messages=[...]``, and any `claudepool.jobs.api.JobRequest`
        field): ``{id, status, lane, created}``."""
        job = {**({"prompt": prompt} if prompt is not None else {}), **fields}
        if self._client.url is not None:
            return await self._http("POST", "/v1/jobs", job, idempotency_key, ok=(202,))
        return dict((await self._frame({"op": "job.submit", "job": job, "idempotency_key": idempotency_key}))["job"])

    async def submit_bulk(self, jobs: list[dict[str, Any]], *, idempotency_key: str | None = None
                          ) -> list[dict[str, Any]]:
        if self._client.url is not None:
            body = await self._http("POST", "/v1/jobs/bulk", {"jobs": jobs}, idempotency_key, ok=(202,))
        else:
            body = await self._frame({"op": "job.bulk", "jobs": jobs, "idempotency_key": idempotency_key})
        return list(body["jobs"])

    async def get(self, job_id: str) -> dict[str, Any]:
        if self._client.url is not None:
            return await self._http("GET", f"/v1/jobs/{quote(job_id, safe='')}")
        return dict((await self._frame({"op": "job.get", "job_id": job_id}))["job"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        if self._client.url is not None:
            return await self._http("DELETE", f"/v1/jobs/{quote(job_id, safe='')}")
        return dict((await self._frame({"op": "job.cancel", "job_id": job_id}))["job"])

    async def list(self, *, status: str | None = None, since: float | None = None, limit: int = 100
                   ) -> list[dict[str, Any]]:
        query = {k: str(v) for k, v in (("status", status), ("since", since), ("limit", limit)) if v is not None}
        if self._client.url is not None:
            return list((await self._http("GET", f"/v1/jobs?{urlencode(query)}"))["jobs"])
        frame: dict[str, Any] = {"op": "job.list", "status": status, "since": since, "limit": limit}
        return list((await self._frame(frame))["jobs"])

    async def events(self, job_id: str, *, poll_s: float = 0.5) -> AsyncIterator[dict[str, Any]]:
        """The job each time its status changes, until it has ended (HTTP: its event stream; the
        socket: read again every ``poll_s``)."""
        if self._client.url is None:
            last = None
            while True:
                job = await self.get(job_id)
                if job["status"] != last:
                    last = job["status"]
                    yield job
                if job["status"] in _ENDED:
                    return
                await asyncio.sleep(poll_s)
        try:
            async with await self._client._request("GET", f"/v1/jobs/{quote(job_id, safe='')}/events",
                                                   headers=self._client._auth()) as resp:
                if resp.status != 200:
                    await _json_or_raise(resp)
                async for event, data in _sse_events(resp):
                    if event == "job":
                        yield orjson.loads(data)
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self._client.url}: {exc}") from None

    async def wait(self, job_id: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The job once it has ended."""
        async with asyncio.timeout(timeout_s):
            last: dict[str, Any] = {}
            async for seen in self.events(job_id):
                last = seen
            return last

    async def _http(self, method: str, path: str, body: Any = None, idempotency_key: str | None = None,
                    ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        headers = self._client._auth()
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            async with await self._client._request(method, path, headers=headers,
                                                   data=None if body is None else orjson.dumps(body)) as resp:
                return await _json_or_raise(resp, ok)
        except aiohttp.ClientConnectionError as exc:
            raise RemoteError("unavailable", f"cannot reach {self._client.url}: {exc}") from None

    async def _frame(self, frame: dict[str, Any]) -> dict[str, Any]:
        sent = {"key": self._client.key, **{k: v for k, v in frame.items() if v is not None}}
        async for answer in (await self._client._socket()).request(sent):
            if answer.get("event") == "error":
                raise RemoteError(answer["code"], answer["message"])
            return answer
        raise RemoteError("protocol_error", f"no answer to {frame['op']}")
