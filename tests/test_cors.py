"""CORS (`claudepool.daemon.cors`): a configured origin may call the daemon from a browser, any other
origin, and every origin when none is configured (the negative control), gets no CORS header."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from claudepool.config import load_settings
from claudepool.errors import ConfigError
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
APP = "https://app.example.com"


async def call(d: RunningDaemon, method: str, path: str, origin: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.request(
            method, d.url + path, headers={"Origin": origin, **kwargs.pop("headers", {})}, **kwargs) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


@pytest.mark.parametrize("configured", [True, False])
async def test_a_configured_origin_reads_answers_and_errors_and_passes_preflight(
    make_daemon: MakeDaemon, configured: bool
) -> None:
    d = await make_daemon(server={"cors_origins": [APP, "http://localhost:5173"]} if configured else {})
    auth = {"Authorization": f"Bearer {KEYS['acme']}"}
    ok, ok_headers = await call(d, "POST", "/v1/prompt", APP, json={"prompt": "[[reply:hi]]"}, headers=auth)
    denied, denied_headers = await call(d, "POST", "/v1/prompt", APP, json={"prompt": "x"},
                                        headers={"Authorization": "Bearer nope"})
    preflight, preflight_headers = await call(d, "OPTIONS", "/v1/prompt", APP, headers={
        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})
    assert (ok, denied) == (200, 401)
    if configured:
        assert ok_headers["Access-Control-Allow-Origin"] == APP
        assert denied_headers["Access-Control-Allow-Origin"] == APP  # the browser app can read the error
        assert "Retry-After" in ok_headers["Access-Control-Expose-Headers"]
        assert "Access-Control-Allow-Credentials" not in ok_headers  # keys travel in headers, not cookies
        assert preflight == 200
        assert preflight_headers["Access-Control-Allow-Origin"] == APP
        assert "POST" in preflight_headers["Access-Control-Allow-Methods"]
        assert "AUTHORIZATION" in preflight_headers["Access-Control-Allow-Headers"].upper()
    else:
        assert not any(h.startswith("Access-Control-") for h in {**ok_headers, **denied_headers})
        assert preflight == 405


async def test_an_origin_not_listed_gets_nothing(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"cors_origins": [APP]})
    for origin in ("https://evil.example.com", "https://app.example.com.evil.com", "null"):
        status, headers = await call(d, "POST", "/v1/prompt", origin, json={"prompt": "[[reply:hi]]"},
                                     headers={"Authorization": f"Bearer {KEYS['acme']}"})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers, origin
        preflight, headers = await call(d, "OPTIONS", "/v1/prompt", origin,
                                        headers={"Access-Control-Request-Method": "POST"})
        assert preflight == 403 and "Access-Control-Allow-Origin" not in headers, origin


@pytest.mark.parametrize("origin", ["*", "https://app.example.com/", "app.example.com", "https://*.example.com",
                                    "ftp://app.example.com"])
def test_an_origin_is_exact(origin: str) -> None:
    with pytest.raises(ConfigError, match="CORS origin"):
        load_settings(None, server={"cors_origins": [origin]})
