"""Sessions outlive their daemon: a restart resumes them, and with Redis another daemon does too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.test_sessions import call, new_session, say, sessions_config

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


async def stop(d: RunningDaemon) -> None:
    d.daemon.request_stop()
    async with asyncio.timeout(30):
        await d.task


async def test_a_restart_finds_parked_sessions_and_resumes_them(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """The in-memory store forgets everything; the checkpoint and its sidecar do not."""
    before = await make_daemon(**sessions_config(park_idle_s=600))
    sid = await new_session(before)
    await say(before, sid, "before the restart: CORMORANT-11")
    other = await new_session(before, "beta")
    await say(before, other, "beta's own: DUNLIN-4", "beta")
    await stop(before)  # a clean stop parks every active session

    after = await make_daemon(**sessions_config(park_idle_s=600))
    status, view = await call(after, "GET", f"/v1/sessions/{sid}")
    assert status == 200
    assert (view["turns"], view["where"]["state"]) == (1, "parked")
    assert (await call(after, "GET", f"/v1/sessions/{sid}", tenant="beta"))[0] == 404  # still acme's only
    status, resumed = await say(after, sid, "[[echo]]")
    assert status == 200
    assert "CORMORANT-11" in resumed["text"]
    assert "DUNLIN-4" not in resumed["text"]
    assert after.daemon.sessions.events["resumed"] == 1
    assert (await call(after, "GET", f"/v1/sessions/{sid}"))[1]["turns"] == 2


async def test_a_closed_session_stays_closed_after_a_restart(make_daemon: MakeDaemon) -> None:
    before = await make_daemon(**sessions_config(max_turns=1, retention_s=3600))
    sid = await new_session(before)
    await say(before, sid, "only turn")
    assert (await say(before, sid, "over the limit"))[1]["error"]["code"] == "session_limit_reached"
    await stop(before)
    after = await make_daemon(**sessions_config(max_turns=1, retention_s=3600))
    status, body = await say(after, sid, "revive?")
    assert (status, body["error"]["code"]) == (410, "session_closed")


def shared(redis_url: str, tmp_path: Path, name: str, sessions_dir: Path, **kw: Any) -> dict[str, Any]:
    config = sessions_config(park_idle_s=600, **kw)
    config["sessions"]["dir"] = str(sessions_dir)
    return {**config, "store": {"url": redis_url},
            "server": {"socket": str(tmp_path / f"{name}.sock")},
            "pool": {"workdir": str(tmp_path / f"w-{name}")}}


async def test_with_redis_another_daemon_resumes_a_parked_session(make_daemon: MakeDaemon, redis_url: str,
                                                                  tmp_path: Path) -> None:
    a = await make_daemon(**shared(redis_url, tmp_path, "a", tmp_path / "shared"))
    b = await make_daemon(**shared(redis_url, tmp_path, "b", tmp_path / "shared"))
    sid = await new_session(a)
    await say(a, sid, "said on a: GANNET-7")
    # Active on a: b refuses rather than run a second copy of the conversation.
    status, body = await say(b, sid, "[[echo]]")
    assert (status, body["error"]["code"]) == (409, "session_elsewhere")
    assert (await call(b, "GET", f"/v1/sessions/{sid}"))[1]["where"] == {"state": "active",
                                                                         "daemon": a.daemon.sessions.daemon_id}
    assert await a.daemon.sessions.park(sid)
    status, resumed = await say(b, sid, "[[echo]]")
    assert status == 200
    assert "GANNET-7" in resumed["text"]
    assert b.daemon.sessions.events["resumed"] == 1
    # And back: a now refuses, b holds it.
    assert (await say(a, sid, "[[echo]]"))[1]["error"]["code"] == "session_elsewhere"
    # Another tenant sees nothing on either daemon.
    for d in (a, b):
        assert (await say(d, sid, "[[echo]]", "beta"))[0] == 404


async def test_with_redis_but_no_shared_directory_resume_is_a_clear_error(make_daemon: MakeDaemon, redis_url: str,
                                                                          tmp_path: Path) -> None:
    a = await make_daemon(**shared(redis_url, tmp_path, "a", tmp_path / "on-a"))
    b = await make_daemon(**shared(redis_url, tmp_path, "b", tmp_path / "on-b"))
    sid = await new_session(a)
    await say(a, sid, "said on a: SHAG-2")
    assert await a.daemon.sessions.park(sid)
    status, body = await say(b, sid, "[[echo]]")
    assert (status, body["error"]["code"]) == (409, "session_unavailable")
    assert "sessions directory" in body["error"]["message"]
    status, back = await say(a, sid, "[[echo]]")  # nothing lost: its own daemon still resumes it
    assert status == 200
    assert "SHAG-2" in back["text"]
