"""Effort and fallback models per profile on the real CLI (issue 14): while the profile's model is
overloaded (the fake upstream answers 529 to that model only), the CLI goes on with the profile's
``fallback_models``; the switch reaches the client as a ``model_fallback`` event, on SSE and on the
socket, and the metrics. Without ``fallback_models`` the same turn ends in the 529 error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from claudepool.client import AsyncClient, Piece
from claudepool.protocol.wire import ModelFallback, PromptResult
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
MAIN, FALLBACK = "claude-opus-4-5", "claude-sonnet-4-5"
BUSY = f"hello [[busy_model:{MAIN}]]"


async def daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, **profile: Any) -> RunningDaemon:
    # Three 529s in a row make the CLI fall back: it needs the retries to see them.
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"model": MAIN, "upstream_max_retries": 4, "effort": "low", **profile},
                  "lean": {"min_idle": 0}, "other": {"min_idle": 0}})


@pytest.mark.parametrize("transport", ["sse", "socket"])
async def test_a_busy_model_falls_back_and_the_client_is_told(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, transport: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, fallback_models=[FALLBACK])
    client = AsyncClient(key=KEYS["acme"], url=d.url if transport == "sse" else None,
                         socket_path=d.socket if transport == "socket" else None)
    async with client:
        pieces: list[Piece] = [piece async for piece in client.stream(BUSY, timeout_s=60)]
    fallbacks = [p for p in pieces if isinstance(p, ModelFallback)]
    assert fallbacks == [ModelFallback(original_model=MAIN, fallback_model=FALLBACK, trigger="overloaded")], pieces
    result = pieces[-1]
    assert isinstance(result, PromptResult) and not result.is_error, result
    models = [(r.model, r.status) for r in upstream.requests if r.path == "/v1/messages"]
    assert models[-1] == (FALLBACK, 200) and (MAIN, 529) in models
    assert d.sample("claudepool_model_fallbacks_total", profile="default", trigger="overloaded") == 1
    bodies = [orjson.loads(r.body) for r in upstream.requests if r.path == "/v1/messages"]
    assert all(b["output_config"]["effort"] == "low" for b in bodies if b["model"] == MAIN)  # the profile's effort


async def test_without_fallback_models_the_busy_model_is_the_answer(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, effort=None)
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        pieces = [piece async for piece in client.stream(BUSY, timeout_s=60)]
    assert not any(isinstance(p, ModelFallback) for p in pieces)
    result = pieces[-1]
    assert isinstance(result, PromptResult) and result.is_error and "529" in result.text, result
    bodies = [orjson.loads(r.body) for r in upstream.requests if r.path == "/v1/messages"]
    assert {b["model"] for b in bodies} == {MAIN}
    assert not any(b.get("output_config", {}).get("effort") == "low" for b in bodies)  # no effort set: none sent
