"""CORS for configured origins (``server.cors_origins``), so a browser app can call the daemon.

Off by default: with no origin configured no response carries a CORS header and a preflight
``OPTIONS`` is 405, so a page on another origin cannot read any answer. An origin listed exactly
(``https://app.example.com``, scheme, host and port; no wildcard, no path) gets
``Access-Control-Allow-Origin`` with itself on every route's answers, errors included, and its
preflights answered with the methods and headers a client of the daemon's APIs sends (its key
travels in ``Authorization`` or ``x-api-key``, never in a cookie: credentials mode stays off).

aiohttp-cors (aio-libs) does the protocol: preflights, ``Vary: Origin``, exposing headers.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp_cors
from aiohttp import web

# Answer headers a browser script may read besides the simple ones: the back-off and the rate-limit
# hints, the request's id, the session a front door's conversation runs in.
EXPOSED_HEADERS = ("Retry-After", "X-Request-Id", "X-Ledger-Next-Since", "X-Ledger-Limit", "X-Claudepool-Session")
PREFLIGHT_MAX_AGE_S = 600


def enable(app: web.Application, origins: Sequence[str]) -> None:
    """CORS for ``origins`` on every route ``app`` has now (call it once its routes are added)."""
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # its __init__ has no annotations
        allow_credentials=False, expose_headers=EXPOSED_HEADERS, allow_headers="*",
        allow_methods=["GET", "POST", "DELETE"], max_age=PREFLIGHT_MAX_AGE_S)
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        cors.add(route)
