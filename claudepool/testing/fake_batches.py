"""The provider's Message Batches API, as the fake upstream serves it (mounted by `FakeUpstream.start`).

    POST   /v1/messages/batches                {"requests": [{"custom_id", "params"}, ...]} -> a MessageBatch
    GET    /v1/messages/batches/{id}           the batch (poll it until ``processing_status`` is ``ended``)
    GET    /v1/messages/batches                most recently created first: ``limit`` (1..1000, default
                                               20), ``after_id`` / ``before_id``; ``has_more``,
                                               ``first_id``, ``last_id``
    POST   /v1/messages/batches/{id}/cancel    -> ``canceling``; it ends soon after, its unfinished
                                               requests ``canceled``
    DELETE /v1/messages/batches/{id}           only once ended -> {"id", "type": "message_batch_deleted"}
    GET    /v1/messages/batches/{id}/results   once ended: JSONL, one line per request (its ``results_url``)

in the shapes of the real API (the `anthropic` SDK's ``MessageBatch``, ``MessageBatchIndividualResponse``).
A batch is ``in_progress`` for the fake's ``batch_delay_s`` after its creation; its requests finish
one after another over that time (evenly spread), which only a cancel can see: the requests that
had not finished when it was canceled end ``canceled``. ``request_counts`` are all ``processing``
until the batch ends, as the provider counts them. Results come in the reverse of the requests'
order: the provider does not keep the order either, and a consumer must match them by ``custom_id``.

A request is answered by the same code as a non-streamed /v1/messages call (`FakeUpstream.message`),
when its batch ends, with the directives of its last user text, and these besides:

    [[expired]]        the request expires (``{"type": "expired"}``)
    [[batch_error]]    the request is errored with an ``invalid_request_error``
    [[status:N]]       the request is errored with that status's error type (529: ``overloaded_error``)

Every call needs a credential (``x-api-key`` or ``Authorization: Bearer``; any value, as the fake's
/v1/messages takes any): none is 401 ``authentication_error``. A body that is not a batch (no
requests, a ``custom_id`` that is not 1-64 letters, digits, ``-`` or ``_``, or is used twice, a
``params`` without ``model``, ``max_tokens`` or ``messages``, or one asking to stream) is 400
``invalid_request_error``, and no batch is made. An unknown batch is 404 ``not_found_error``;
deleting one that has not ended, and asking for the results of one that has not, are 400.

A request that succeeded is billed in the fake's Admin API (`claudepool.testing.fake_admin_api`) with
service tier ``batch`` at `claudepool.testing.fake_admin_api.BATCH_PRICE_FACTOR` of the list price.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiohttp import web
from multidict import MultiMapping

from claudepool.testing.fake_prompts import ERROR_TYPES, directives, error_body, last_user_text

BATCHES_PATH = "/v1/messages/batches"
# The provider's bounds: a batch expires 24 hours after its creation and holds at most 100,000 requests.
EXPIRES_AFTER_S = 24 * 3600.0
MAX_REQUESTS = 100_000
LIST_LIMITS = (1, 1000, 20)  # least, most, default
# A canceled batch is ``canceling`` this long before it ends.
CANCEL_DELAY_S = 0.05
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
Query = MultiMapping[str]


class RequestLog(Protocol):
    """What a record of the fake's request log offers here."""

    status: int


class BatchHost(Protocol):
    """The fake upstream, as its batches use it."""

    base_url: str
    batch_delay_s: float

    async def record(self, request: web.Request) -> Any: ...
    def response_headers(self, rec: Any, remaining: str | None = None, **extra: str) -> dict[str, str]: ...
    def message(self, body: dict[str, Any], plan: dict[str, str] | None = None) -> dict[str, Any]: ...


@dataclass
class BatchItem:
    """One request of a batch; once it succeeded, one billable request of the fake's Admin API."""

    custom_id: str
    params: dict[str, Any]
    received_unix: float  # its batch's creation: the usage report's bucket
    done_unix: float  # when it finishes processing (unless its batch is canceled first)
    plan: dict[str, str]
    result: dict[str, Any] | None = None  # set when its batch ends
    service_tier: str = "batch"

    @property
    def model(self) -> str:
        return str(self.params.get("model", ""))

    @property
    def usage(self) -> dict[str, Any] | None:
        if self.result is None or self.result["type"] != "succeeded":
            return None
        usage: dict[str, Any] = self.result["message"]["usage"]
        return usage


@dataclass
class FakeBatch:
    id: str
    created_unix: float
    ends_unix: float
    items: list[BatchItem]
    cancel_unix: float | None = None
    ended_unix: float | None = None

    def status(self) -> str:
        return "ended" if self.ended_unix is not None else "canceling" if self.cancel_unix is not None else \
            "in_progress"

    def as_json(self, base_url: str) -> dict[str, Any]:
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        for item in self.items:
            counts[item.result["type"] if item.result is not None else "processing"] += 1
        ended = self.ended_unix is not None
        return {
            "id": self.id, "type": "message_batch", "processing_status": self.status(), "request_counts": counts,
            "created_at": _rfc3339(self.created_unix), "expires_at": _rfc3339(self.created_unix + EXPIRES_AFTER_S),
            "ended_at": _rfc3339(self.ended_unix) if self.ended_unix is not None else None,
            "cancel_initiated_at": _rfc3339(self.cancel_unix) if self.cancel_unix is not None else None,
            "archived_at": None,
            "results_url": f"{base_url}{BATCHES_PATH}/{self.id}/results" if ended else None,
        }


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FakeBatches:
    """Every batch of one fake upstream, newest last."""

    host: BatchHost = field(repr=False, compare=False)
    batches: dict[str, FakeBatch] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # The clock batches end by (unix seconds); a test may replace it.
    clock: Callable[[], float] = time.time

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(BATCHES_PATH, self._create)
        app.router.add_get(BATCHES_PATH, self._list)
        app.router.add_get(BATCHES_PATH + "/{id}", self._retrieve)
        app.router.add_delete(BATCHES_PATH + "/{id}", self._delete)
        app.router.add_post(BATCHES_PATH + "/{id}/cancel", self._cancel)
        app.router.add_get(BATCHES_PATH + "/{id}/results", self._results)

    def billable(self) -> list[BatchItem]:
        """Every request of every batch (the Admin API bills those that succeeded)."""
        self._refresh()
        return [item for batch in self.batches.values() for item in batch.items]

    # -- the state machine: a batch ends when its time comes, its answers made then ---------------

    def _refresh(self) -> None:
        now = self.clock()
        for batch in self.batches.values():
            if batch.ended_unix is None and now >= batch.ends_unix:
                self._end(batch)

    def _end(self, batch: FakeBatch) -> None:
        for item in batch.items:
            if batch.cancel_unix is not None and item.done_unix > batch.cancel_unix:
                item.result = {"type": "canceled"}
            elif "expired" in item.plan:
                item.result = {"type": "expired"}
            elif "batch_error" in item.plan or "status" in item.plan:
                status = 400 if "batch_error" in item.plan else int(item.plan["status"])
                item.result = {"type": "errored", "error": error_body(
                    status, f"fake upstream injected {ERROR_TYPES.get(status, 'api_error')} in a batch")}
            else:
                item.result = {"type": "succeeded", "message": self.host.message(item.params, item.plan)}
        batch.ended_unix = batch.ends_unix

    # -- handlers ----------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._make)

    async def _list(self, request: web.Request) -> web.Response:
        return await self._handle(request, lambda _body, query, _id: self._page(query))

    async def _retrieve(self, request: web.Request) -> web.Response:
        return await self._handle(request, lambda _body, _query, batch_id: self._get(batch_id).as_json(
            self.host.base_url))

    async def _cancel(self, request: web.Request) -> web.Response:
        def cancel(_body: bytes, _query: Query, batch_id: str) -> dict[str, Any]:
            batch = self._get(batch_id)
            if batch.status() == "in_progress":
                batch.cancel_unix = self.clock()
                batch.ends_unix = min(batch.ends_unix, batch.cancel_unix + CANCEL_DELAY_S)
            return batch.as_json(self.host.base_url)

        return await self._handle(request, cancel)

    async def _delete(self, request: web.Request) -> web.Response:
        def delete(_body: bytes, _query: Query, batch_id: str) -> dict[str, Any]:
            if self._get(batch_id).ended_unix is None:
                raise _Refused(400, f"batch {batch_id} has not ended: cancel it, and delete it once it has")
            del self.batches[batch_id]
            return {"id": batch_id, "type": "message_batch_deleted"}

        return await self._handle(request, delete)

    async def _results(self, request: web.Request) -> web.Response:
        rec = await self.host.record(request)
        try:
            self._authorized(request)
            batch = self._get(request.match_info["id"])
            if batch.ended_unix is None:
                raise _Refused(400, f"batch {batch.id} has not ended: its results are not ready")
        except _Refused as exc:
            return self._refused(rec, exc)
        rec.status = 200
        lines = [orjson.dumps({"custom_id": i.custom_id, "result": i.result}) + b"\n" for i in reversed(batch.items)]
        return web.Response(body=b"".join(lines), content_type="application/binary",
                            headers=self.host.response_headers(rec))

    async def _handle(self, request: web.Request,
                      answer: Callable[[bytes, Query, str], dict[str, Any]]) -> web.Response:
        rec = await self.host.record(request)
        try:
            self._authorized(request)
            body = answer(await request.read(), request.query, request.match_info.get("id", ""))
        except _Refused as exc:
            return self._refused(rec, exc)
        rec.status = 200
        return web.json_response(body, headers=self.host.response_headers(rec))

    def _refused(self, rec: RequestLog, exc: _Refused) -> web.Response:
        rec.status = exc.status
        return web.json_response(error_body(exc.status, str(exc)), status=exc.status,
                                 headers=self.host.response_headers(rec))

    def _authorized(self, request: web.Request) -> None:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not request.headers.get("x-api-key") and not bearer:
            raise _Refused(401, "x-api-key header is required")
        self._refresh()

    def _get(self, batch_id: str) -> FakeBatch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise _Refused(404, f"no message batch {batch_id!r}")
        return batch

    def _make(self, raw: bytes, _query: Query, _id: str) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Refused(400, "the body is not JSON") from None
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise _Refused(400, "requests: expected a non-empty list")
        if len(requests) > MAX_REQUESTS:
            raise _Refused(400, f"requests: at most {MAX_REQUESTS}")
        seen: set[str] = set()
        for i, r in enumerate(requests):
            custom_id = r.get("custom_id") if isinstance(r, dict) else None
            params = r.get("params") if isinstance(r, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
                raise _Refused(400, f"requests.{i}.custom_id: expected 1-64 letters, digits, '-' or '_'")
            if custom_id in seen:
                raise _Refused(400, f"requests.{i}.custom_id: {custom_id!r} is used by another request of the batch")
            seen.add(custom_id)
            _check_params(params, f"requests.{i}.params")
        now = self.clock()
        delay_s = self.host.batch_delay_s
        items = [BatchItem(r["custom_id"], r["params"], now, now + delay_s * (i + 1) / len(requests),
                           directives(last_user_text(r["params"]))) for i, r in enumerate(requests)]
        batch = FakeBatch(f"msgbatch_fake{next(self._ids):012d}", now, now + delay_s, items)
        self.batches[batch.id] = batch
        return batch.as_json(self.host.base_url)

    def _page(self, query: Query) -> dict[str, Any]:
        least, most, default = LIST_LIMITS
        try:
            limit = int(query.get("limit", default))
        except ValueError:
            raise _Refused(400, "limit: expected an integer") from None
        if not least <= limit <= most:
            raise _Refused(400, f"limit: expected {least} to {most}")
        newest_first = list(reversed(self.batches.values()))
        ids = [b.id for b in newest_first]
        if "after_id" in query and "before_id" in query:
            raise _Refused(400, "give at most one of after_id and before_id")
        for cursor in ("after_id", "before_id"):
            if cursor in query and query[cursor] not in ids:
                raise _Refused(400, f"{cursor}: no message batch {query[cursor]!r}")
        if "before_id" in query:
            window = newest_first[:ids.index(query["before_id"])]
            page = window[-limit:]
        else:
            window = newest_first[ids.index(query["after_id"]) + 1:] if "after_id" in query else newest_first
            page = window[:limit]
        return {"data": [b.as_json(self.host.base_url) for b in page], "has_more": len(window) > len(page),
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


def _check_params(params: Any, where: str) -> None:
    if not isinstance(params, dict):
        raise _Refused(400, f"{where}: expected an object")
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise _Refused(400, f"{where}.model: required")
    if not isinstance(params.get("max_tokens"), int) or params["max_tokens"] < 1:
        raise _Refused(400, f"{where}.max_tokens: expected an integer of at least 1")
    if not isinstance(params.get("messages"), list):
        raise _Refused(400, f"{where}.messages: required")
    if params.get("stream"):
        raise _Refused(400, f"{where}.stream: a batch request may not stream")


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
