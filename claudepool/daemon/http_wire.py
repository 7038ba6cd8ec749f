"""What every claudepool HTTP handler reads and writes the same way: the bearer key, a JSON body
(413 past the body bound, 400 when it is not JSON), a JSON answer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from claudepool.errors import BadRequest, PromptTooLarge


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def bearer(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def read_json(request: web.Request, *, empty: Any = None) -> Any:
    """The body as JSON; ``empty`` (unless None) stands for an empty body."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PromptTooLarge("request body too large") from None
    if empty is not None and not raw.strip():
        return empty
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
