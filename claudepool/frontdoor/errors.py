"""Claudepool's errors in the Anthropic API's shape: ``{"type": "error", "error": {"type", "message"}}``.

The status picks the type, as Anthropic documents them (400 ``invalid_request_error``, 401
``authentication_error``, 402 ``billing_error``, 403 ``permission_error``, 404 ``not_found_error``,
413 ``request_too_large``, 429 ``rate_limit_error``, 500 ``api_error``, 504 ``timeout_error``, 529
``overloaded_error``). Two statuses change on the way: every 503 (no worker in time, a full queue,
draining, the store down) answers 529 ``overloaded_error``, which the SDK raises as
``OverloadedError`` and retries; any other 5xx answers its status as ``api_error``. A model the
tenant may not use is 404 ``not_found_error``, as Anthropic answers for a model a key cannot reach.

>>> status, body, _ = anthropic_error(ModelNotAllowed("model 'x' is not allowed"))
>>> status, body["error"]["type"]
(404, 'not_found_error')
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web

from claudepool.errors import ClaudepoolError, ModelNotAllowed

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(exc: ClaudepoolError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, body and headers (``retry-after`` when retrying later makes sense) of ``exc``."""
    status = 404 if isinstance(exc, ModelNotAllowed) else exc.status
    if status == 503:
        status = 529
    kind = _TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(math.ceil(exc.retry_after_s))
    return status, {"type": "error", "error": {"type": kind, "message": str(exc)}}, headers


def error_response(exc: ClaudepoolError, request_id: str | None = None) -> web.Response:
    status, body, headers = anthropic_error(exc)
    if request_id is not None:
        headers["request-id"] = request_id
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_event(exc: ClaudepoolError) -> bytes:
    """A failure after the event stream opened: one SSE ``error`` event in the same shape."""
    _, body, _ = anthropic_error(exc)
    return sse("error", body)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
