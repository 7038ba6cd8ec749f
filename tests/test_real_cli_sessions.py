"""Conversations on the real CLI: what reaches the model proves continuity, resume and isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest

from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.test_sessions import call, new_session, say, sessions_config

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


def real_config(real_claude: str, upstream: FakeUpstream, **sessions: Any) -> dict[str, Any]:
    return {
        "pool": {"claude_bin": real_claude, "min_idle": 1, "max_workers": 2, "timeouts": {"ready_timeout_s": 30}},
        "upstream": {"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        "profiles": {"default": {"upstream_max_retries": 0}, "lean": {}, "other": {}},
        **sessions_config(park_idle_s=600, **sessions),
    }


@pytest.fixture
async def real_daemon(make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream) -> RunningDaemon:
    return await make_daemon(**real_config(real_claude, upstream))


async def test_turn_two_reaches_the_model_with_turn_one_on_the_same_process(
    real_daemon: RunningDaemon, upstream: FakeUpstream
) -> None:
    d = real_daemon
    sid = await new_session(d)
    status, first = await say(d, sid, "remember the word TOUCAN-31 [[reply:noted TOUCAN]]")
    assert (status, first["text"]) == (200, "noted TOUCAN")
    pool = d.daemon.session_pools["default"]
    (worker,) = pool.workers()
    pid = worker.pid
    status, second = await say(d, sid, "what was the word? [[reply:it was TOUCAN-31]]")
    assert status == 200
    (turn_two,) = upstream.requests_containing("what was the word?")
    assert turn_two.contains("remember the word TOUCAN-31")  # the model saw turn one
    assert turn_two.contains("noted TOUCAN")  # and its own answer
    assert [w.pid for w in pool.workers()] == [pid]  # the same warm process
    assert pool.stats.resets == 0  # never reset between the turns
    status, view = await call(d, "GET", f"/v1/sessions/{sid}")
    assert (view["turns"], view["output_tokens"]) == (2, first["usage"]["output_tokens"]
                                                      + second["usage"]["output_tokens"])


async def test_a_parked_session_resumes_with_its_history_upstream(
    real_daemon: RunningDaemon, upstream: FakeUpstream
) -> None:
    d = real_daemon
    sid = await new_session(d)
    await say(d, sid, "first turn: IBIS-64")
    await say(d, sid, "second turn: JACANA-12")
    pool = d.daemon.session_pools["default"]
    parked_pid = pool.workers()[0].pid
    assert await d.daemon.sessions.park(sid)
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "parked"
    status, third = await say(d, sid, "third turn after the park [[reply:back]]")
    assert (status, third["text"]) == (200, "back")
    (resumed,) = upstream.requests_containing("third turn after the park")
    assert resumed.contains("first turn: IBIS-64")
    assert resumed.contains("second turn: JACANA-12")
    active = d.daemon.sessions.bound_worker(sid)
    assert active is not None and active.pid is not None and active.pid != parked_pid
    assert "--resume" in psutil.Process(active.pid).cmdline()
    assert d.daemon.sessions.events["resumed"] == 1


async def test_another_tenant_never_reaches_the_conversation(
    real_daemon: RunningDaemon, upstream: FakeUpstream
) -> None:
    d = real_daemon
    sid = await new_session(d)
    await say(d, sid, "acme's secret is KAKAPO-77")
    requests_before = len(upstream.requests)
    status, body = await say(d, sid, "BETA-ASKS repeat everything [[echo]]", "beta")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert len(upstream.requests) == requests_before  # refused before any model call
    # Beta's own traffic, in a session and stateless, on the same daemon after acme's session parked.
    assert await d.daemon.sessions.park(sid)
    own = await new_session(d, "beta")
    for session in (own, None, own):
        status, answer = await say(d, session, "BETA-ASKS [[echo]]", "beta")
        assert status == 200
        assert "KAKAPO" not in answer["text"]
    beta_requests = upstream.requests_containing("BETA-ASKS")
    assert len(beta_requests) == 3
    assert not any(r.contains("KAKAPO-77") for r in beta_requests)
    status, mine = await say(d, sid, "acme again [[echo]]")  # acme's conversation is intact
    assert "KAKAPO-77" in mine["text"]


async def test_context_limit_closes_a_real_session(make_daemon: MakeDaemon, real_claude: str,
                                                   upstream: FakeUpstream) -> None:
    d = await make_daemon(**real_config(real_claude, upstream, max_context_tokens=10))
    sid = await new_session(d)
    status, _ = await say(d, sid, "fills the context")
    assert status == 200
    view = (await call(d, "GET", f"/v1/sessions/{sid}"))[1]
    assert view["context_tokens"] >= 10  # measured from the CLI's own usage report
    status, body = await say(d, sid, "one more")
    assert (status, body["error"]["code"]) == (409, "session_limit_reached")
    assert "max_context_tokens" in body["error"]["message"]
    assert not upstream.requests_containing("one more")


async def test_a_restart_resumes_a_real_session(make_daemon: MakeDaemon, real_claude: str,
                                                upstream: FakeUpstream) -> None:
    before = await make_daemon(**real_config(real_claude, upstream))
    sid = await new_session(before)
    await say(before, sid, "before the restart: LORIKEET-9")
    before.daemon.request_stop()
    async with asyncio.timeout(30):
        await before.task
    after = await make_daemon(**real_config(real_claude, upstream))
    status, answer = await say(after, sid, "after the restart [[reply:still here]]")
    assert (status, answer["text"]) == (200, "still here")
    (request,) = upstream.requests_containing("after the restart")
    assert request.contains("before the restart: LORIKEET-9")
