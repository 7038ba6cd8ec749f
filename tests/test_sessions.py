"""Conversations on the fake CLI: affinity, isolation, parking and resume, limits, expiry, retention."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import eventually, pid_gone, release_fifo, until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


async def call(d: RunningDaemon, method: str, path: str, body: Any = None, tenant: str = "acme",
               key: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key or KEYS[tenant]}"}
    async with aiohttp.ClientSession() as session, session.request(
        method, f"{d.url}{path}", data=orjson.dumps(body) if body is not None else None, headers=headers
    ) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None


async def new_session(d: RunningDaemon, tenant: str = "acme") -> str:
    status, body = await call(d, "POST", "/v1/sessions", {}, tenant)
    assert status == 201, body
    return str(body["id"])


async def say(d: RunningDaemon, session: str | None, prompt: str, tenant: str = "acme",
              **extra: Any) -> tuple[int, Any]:
    return await call(d, "POST", "/v1/prompt", {"prompt": prompt, "session": session, **extra}, tenant)


def sessions_config(**kw: Any) -> dict[str, Any]:
    return {"sessions": {"min_idle": 0, "max_workers": 2, "maintenance_interval_s": 0.05, "sweep_interval_s": 0.05,
                         **kw}}


async def test_a_session_continues_on_the_same_warm_worker(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    assert sid.startswith("s_")
    status, first = await say(d, sid, "remember PELICAN-42 [[reply:noted]]")
    assert (status, first["session"], first["text"]) == (200, sid, "noted")
    pool = d.daemon.session_pools["default"]
    pid = pool.workers()[0].pid
    status, second = await say(d, sid, "[[echo]]")
    assert status == 200
    assert "remember PELICAN-42" in second["text"]  # the conversation continued
    assert [w.pid for w in pool.workers()] == [pid]  # on the same process
    assert pool.stats.resets == 0  # with no reset between turns
    status, view = await call(d, "GET", f"/v1/sessions/{sid}")
    assert status == 200
    assert view["turns"] == 2
    assert view["where"]["state"] == "active"
    assert view["where"]["worker_slot"] == pool.workers()[0].slot
    assert view["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])
    assert view["output_tokens"] == first["usage"]["output_tokens"] + second["usage"]["output_tokens"]
    assert "cli_session_id" not in view


async def test_sessions_and_stateless_requests_never_mix(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    await say(d, sid, "the vault code is OSPREY-17")
    for tenant in ("acme", "beta"):
        status, stateless = await say(d, None, "[[echo]]", tenant)
        assert status == 200
        assert "OSPREY-17" not in stateless["text"]
    # Stateless workers keep no transcripts; the session pool's worker does.
    for worker in d.pool().workers():
        assert worker.home is not None
        assert not list(worker.home.rglob("*.jsonl"))


async def test_another_tenant_gets_404_never_the_conversation(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    await say(d, sid, "acme's secret is HERON-99")
    assert await say(d, sid, "[[echo]]", "beta") == (404, {"error": {"code": "not_found",
                                                                       "message": "unknown session"}})
    assert (await call(d, "GET", f"/v1/sessions/{sid}", tenant="beta"))[0] == 404
    assert (await call(d, "DELETE", f"/v1/sessions/{sid}", tenant="beta"))[0] == 404
    status, listed = await call(d, "GET", "/v1/sessions", tenant="beta")
    assert (status, listed) == (200, {"sessions": []})
    status, own = await say(d, sid, "[[echo]]")
    assert status == 200  # beta's attempts changed nothing
    assert "HERON-99" in own["text"]
    status, everyone = await call(d, "GET", "/v1/sessions", key=ADMIN_KEY)
    assert [s["id"] for s in everyone["sessions"]] == [sid]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "s_", "s_../../x", "S_AAAAAAAAAA", "s_" + "A" * 100])
async def test_malformed_session_ids_are_unknown(make_daemon: MakeDaemon, bad: str) -> None:
    d = await make_daemon(**sessions_config())
    status, body = await say(d, bad, "hi")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_idle_session_is_parked_and_resumed_with_its_history(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(park_idle_s=0.3))
    sid = await new_session(d)
    await say(d, sid, "first: KESTREL-5")
    await say(d, sid, "second: PLOVER-8")
    pool = d.daemon.session_pools["default"]
    first_pid = pool.workers()[0].pid

    async def parked() -> bool:
        return bool((await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "parked")

    await eventually(parked, 5)
    await until(lambda: pool.stats.resets == 1, 5)  # its worker was reset for others
    for worker in pool.workers():  # and kept no copy of the conversation
        assert worker.home is not None
        assert not [p for p in worker.home.rglob("*.jsonl") if "KESTREL" in p.read_text()]
    status, resumed = await say(d, sid, "[[echo]]")
    assert status == 200
    assert "first: KESTREL-5" in resumed["text"]
    assert "second: PLOVER-8" in resumed["text"]
    worker = next(w for w in pool.workers() if w.in_turn() or w.pid != first_pid)
    assert worker.pid is not None
    assert "--resume" in psutil.Process(worker.pid).cmdline()
    assert d.daemon.sessions.events["resumed"] == 1
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["turns"] == 3


async def test_a_waiting_session_parks_the_least_recently_used(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(max_workers=1, park_idle_s=600))
    a, b = await new_session(d), await new_session(d, "beta")
    await say(d, a, "a says ALBATROSS")
    status, _answer = await say(d, b, "b says BITTERN", "beta", timeout_s=10)
    assert status == 200  # a gave its only worker to b
    status, a_again = await say(d, a, "[[echo]]", timeout_s=10)
    assert status == 200  # and a resumed, taking it back from b
    assert "ALBATROSS" in a_again["text"]
    assert "BITTERN" not in a_again["text"]
    status, b_again = await say(d, b, "[[echo]]", "beta", timeout_s=10)
    assert "BITTERN" in b_again["text"]
    assert "ALBATROSS" not in b_again["text"]
    assert d.daemon.sessions.events["parked"] >= 2


async def test_a_resume_waiting_for_its_transcript_holds_up_no_one_else(make_daemon: MakeDaemon,
                                                                         tmp_path: Path) -> None:
    d = await make_daemon(**sessions_config(park_idle_s=600))
    sid = await new_session(d)
    await say(d, sid, "remember LAPWING-4")
    assert await d.daemon.sessions.park(sid)
    transcript = tmp_path / "sessions" / "acme" / f"{sid}.jsonl"
    saved = transcript.read_bytes()
    transcript.unlink()
    os.mkfifo(transcript)  # a slow disk: the transcript can be read only once its writer comes
    try:
        resumed = asyncio.create_task(say(d, sid, "[[echo]]", timeout_s=30))
        status, _ = await say(d, None, "served meanwhile", "beta")  # the event loop is not stuck in the copy
        assert status == 200
        assert not resumed.done()
        await asyncio.wait_for(asyncio.to_thread(transcript.write_bytes, saved), 10)  # the disk answers
        status, body = await asyncio.wait_for(resumed, 30)
        assert status == 200, body
        assert "remember LAPWING-4" in body["text"]
        assert d.daemon.sessions.events["resumed"] == 1
        assert not list((tmp_path / "w").glob(".claudepool-resume-*"))  # the staged copy was placed
    finally:
        release_fifo(transcript)


async def test_a_session_keeps_its_worker_while_the_pool_can_grow(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(max_workers=2, park_idle_s=600))
    a, b = await new_session(d), await new_session(d, "beta")
    await say(d, a, "a first")
    status, _ = await say(d, b, "b waits for a second worker to start", "beta", timeout_s=10)
    assert status == 200
    for _ in range(3):  # maintenance rounds, run here so that they surely ran
        await d.daemon.sessions.park_some()
    assert d.daemon.sessions.events["parked"] == 0  # a was not evicted for a worker that was coming anyway
    assert (await call(d, "GET", f"/v1/sessions/{a}"))[1]["where"]["state"] == "active"


async def test_a_long_conversation_is_recycled_by_turns_and_resumes(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(park_idle_s=600), pool={"max_turns": 2, "max_turns_jitter": 0})
    sid = await new_session(d)
    pool = d.daemon.session_pools["default"]
    await say(d, sid, "remember HERON-5")
    first_pid = pool.workers()[0].pid
    await say(d, sid, "second turn")
    # The worker reached the pool's turn limit: the session gave it back and the pool retired it.
    assert d.daemon.sessions.events["recycled"] == 1
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "parked"
    await until(lambda: pool.stats.retired["turns"] == 1 and pid_gone(first_pid), 5)
    status, third = await say(d, sid, "[[echo]]")
    assert status == 200
    assert "remember HERON-5" in third["text"]
    assert d.daemon.sessions.events["resumed"] == 1
    assert first_pid not in [w.pid for w in pool.workers()]


async def test_a_conversation_whose_worker_grows_is_recycled_between_turns(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(park_idle_s=600),
                          pool={"max_worker_pss_bytes": 80 * 1024 * 1024, "maintenance_interval_s": 0.05})
    sid = await new_session(d)
    pool = d.daemon.session_pools["default"]
    await say(d, sid, "remember IBIS-3 [[grow:120]]")
    grown_pid = pool.workers()[0].pid
    # Measured between turns: the session parks and the pool retires the grown process.
    await until(lambda: d.daemon.sessions.events["recycled"] == 1, 5)
    await until(lambda: pool.stats.retired["memory"] == 1 and pid_gone(grown_pid), 5)
    status, second = await say(d, sid, "[[echo]]")
    assert status == 200
    assert "remember IBIS-3" in second["text"]
    assert d.daemon.sessions.events["resumed"] == 1


async def test_concurrent_turns_on_one_session_run_one_after_the_other(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    first, second = await asyncio.gather(say(d, sid, "one [[sleep:0.5]] [[reply:ONE]]"),
                                         say(d, sid, "two [[reply:TWO]]"))
    assert (first[0], second[0]) == (200, 200)
    waits = sorted([first[1]["queue_ms"], second[1]["queue_ms"]])
    assert waits[1] >= 400  # the later one waited for the earlier turn to end
    _status, history = await say(d, sid, "[[echo]]")
    assert history["text"].count("[[reply:") == 2  # both turns are in the conversation, once each


async def test_limits_close_a_session(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(max_turns=2))
    sid = await new_session(d)
    assert (await say(d, sid, "one"))[0] == 200
    assert (await say(d, sid, "two"))[0] == 200
    status, body = await say(d, sid, "three")
    assert (status, body["error"]["code"]) == (409, "session_limit_reached")
    assert "max_turns (2)" in body["error"]["message"]
    # Closed means closed: its worker went back to the pool, and parking everything cannot revive it.
    assert d.daemon.sessions.counts()["active_here"] == 0
    await d.daemon.sessions.park_all()
    status, body = await say(d, sid, "four")
    assert (status, body["error"]["code"]) == (410, "session_closed")
    status, view = await call(d, "GET", f"/v1/sessions/{sid}")
    assert view["where"]["state"] == "closed"
    assert view["close_reason"] == "limit: max_turns (2)"


async def test_tenant_limits_override_and_rollover_starts_fresh(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config(max_turns=100, rollover=True),
                          tenants={"acme": {"max_session_turns": 1}})
    sid = await new_session(d)
    await say(d, sid, "old: GREBE-3")
    status, body = await say(d, sid, "[[echo]] after the limit")
    assert status == 200
    assert body["session"] != sid  # rolled over into a fresh session, whose id comes back
    assert "GREBE-3" not in body["text"]
    assert d.daemon.sessions.events["rolled_over"] == 1


async def test_idle_sessions_expire_and_their_transcripts_go_after_retention(make_daemon: MakeDaemon,
                                                                             tmp_path: Path) -> None:
    d = await make_daemon(**sessions_config(ttl_s=0.4, retention_s=0.6, park_idle_s=0.2))
    sid = await new_session(d)
    await say(d, sid, "short-lived")
    transcript = tmp_path / "sessions" / "acme" / f"{sid}.jsonl"
    assert transcript.exists()
    async def closed() -> bool:
        return bool((await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "closed")

    await eventually(closed, 5)
    status, body = await say(d, sid, "too late")
    assert (status, body["error"]["code"]) == (410, "session_closed")
    await until(lambda: not transcript.exists(), 5)
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[0] == 404
    assert d.daemon.sessions.events["expired"] == 1


async def test_delete_removes_the_transcript_at_once(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = await make_daemon(**sessions_config(retention_s=3600))
    sid = await new_session(d)
    await say(d, sid, "delete me")
    transcript = tmp_path / "sessions" / "acme" / f"{sid}.jsonl"
    assert transcript.exists()
    assert (await call(d, "DELETE", f"/v1/sessions/{sid}"))[0] == 204
    assert not transcript.exists()
    assert (await say(d, sid, "again"))[0] == 404
    assert d.daemon.session_pools["default"].counts()["leased"] == 0


async def test_transcript_disk_use_is_measured_and_bounded(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = await make_daemon(**sessions_config(max_disk_bytes=2000, park_idle_s=600))
    old, new = await new_session(d), await new_session(d)
    await say(d, old, "x" * 1500)
    await until(lambda: d.daemon.sessions.transcript_bytes > 1500, 5)
    await say(d, new, "y" * 1500)
    assert await d.daemon.sessions.park(old)
    # Over the bound: the least recently used parked session is closed and its transcript removed.
    # An active session is never evicted (its worker holds the conversation anyway).
    await until(lambda: not (tmp_path / "sessions" / "acme" / f"{old}.jsonl").exists(), 5)
    assert (await call(d, "GET", f"/v1/sessions/{old}"))[1]["close_reason"] == "disk"
    assert (await call(d, "GET", f"/v1/sessions/{new}"))[1]["where"]["state"] == "active"
    assert (tmp_path / "sessions" / "acme" / f"{new}.jsonl").exists()


async def test_the_disk_bound_never_closes_a_session_that_resumed_after_its_listing(make_daemon: MakeDaemon,
                                                                                   tmp_path: Path) -> None:
    d = await make_daemon(**sessions_config(park_idle_s=600))
    sid = await new_session(d)
    await say(d, sid, "remember OSPREY-8 " + "x" * 1500)
    sessions = d.daemon.sessions
    listing = await sessions.store.session_list(None)
    for record in listing:
        record.state = "parked"  # as listed just before the session resumed
    await sessions.shrink(10**9, listing)  # acting on that stale listing: the race, made certain
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "active"
    assert (tmp_path / "sessions" / "acme" / f"{sid}.jsonl").exists()
    assert "OSPREY-8" in (await say(d, sid, "[[echo]]"))[1]["text"]


async def test_sessions_over_the_unix_socket(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    reader, writer = await asyncio.open_unix_connection(d.socket)

    async def ask(frame: dict[str, Any]) -> dict[str, Any]:
        writer.write(orjson.dumps(frame) + b"\n")
        async with asyncio.timeout(10):
            while True:
                reply = orjson.loads(await reader.readline())
                if reply["id"] == frame["id"] and reply["event"] != "delta":
                    return dict(reply)

    created = await ask({"id": "c", "op": "session.create", "key": KEYS["acme"]})
    sid = created["session"]["id"]
    await ask({"id": "1", "op": "prompt", "key": KEYS["acme"], "prompt": "socket turn: WREN-1", "session": sid})
    echoed = await ask({"id": "2", "op": "prompt", "key": KEYS["acme"], "prompt": "[[echo]]", "session": sid})
    assert "WREN-1" in echoed["text"]
    assert echoed["session"] == sid
    denied = await ask({"id": "3", "op": "session.delete", "key": KEYS["beta"], "session": sid})
    assert (denied["event"], denied["code"]) == ("error", "not_found")
    deleted = await ask({"id": "4", "op": "session.delete", "key": KEYS["acme"], "session": sid})
    assert deleted["event"] == "session_deleted"
    writer.close()


async def test_a_worker_crash_mid_turn_loses_only_that_turn(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    await say(d, sid, "kept: TERN-21")
    status, body = await say(d, sid, "lost [[crash]]")
    assert (status, body["error"]["code"]) == (502, "worker_died")
    status, after = await say(d, sid, "[[echo]]")
    assert status == 200  # resumed from the last checkpoint on a fresh worker
    assert "kept: TERN-21" in after["text"]
    assert "[[crash]]" not in after["text"]
    assert d.daemon.sessions.events["resumed"] == 1
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["turns"] == 2


async def test_a_timed_out_turn_does_not_wedge_the_session(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**sessions_config())
    sid = await new_session(d)
    await say(d, sid, "before: SKUA-6")
    status, body = await say(d, sid, "slow [[hang]]", timeout_s=0.5)
    assert (status, body["error"]["code"]) == (504, "timeout")
    status, after = await say(d, sid, "[[echo]]", timeout_s=10)
    assert status == 200
    assert "before: SKUA-6" in after["text"]


async def test_a_turn_whose_transcript_cannot_be_saved_is_a_typed_error_and_loses_nothing(
        make_daemon: MakeDaemon) -> None:
    # Issue 10: a failed checkpoint (a full disk) answered 500 internal_error.
    d = await make_daemon(**sessions_config(park_idle_s=0.2))
    sid = await new_session(d)
    assert (await say(d, sid, "first [[reply:one]]"))[0] == 200
    blocker = d.daemon.sessions.dir / "acme" / f"{sid}.partial"
    blocker.mkdir()  # the copy lands on a directory: an OSError as a full disk gives one
    status, body = await say(d, sid, "second MARTEN-8 [[reply:two]]")
    assert status == 507
    assert body["error"]["code"] == "session_checkpoint_failed"
    assert "was billed and stays in session" in body["error"]["message"]
    # Past park_idle_s the session is due for parking, which tries to save it again, and fails.
    await until(lambda: d.daemon.sessions.events["checkpoint_failed"] >= 2, 5)
    status, view = await call(d, "GET", f"/v1/sessions/{sid}")
    assert (view["turns"], view["where"]["state"]) == (2, "active")  # counted, and its worker kept
    blocker.rmdir()
    await until(lambda: d.daemon.sessions.counts()["active_here"] == 0, 5)  # saved, then parked
    status, echo = await say(d, sid, "[[echo]]")  # resumed from disk
    assert status == 200
    assert "second MARTEN-8" in echo["text"]
