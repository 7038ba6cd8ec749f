"""The Unix-socket front end end to end: NDJSON frames over a real socket, the fake CLI behind it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import re
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from claudepool.errors import ConfigError
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import until

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
Frame = dict[str, Any]

TERMINAL = frozenset({"result", "error"})
RESULT_FIELDS = {"id", "event", "request_id", "tenant", "session", "text", "is_error", "stop_reason", "usage",
                 "cost_usd", "duration_ms", "queue_ms", "model"}
USAGE_FIELDS = {"input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"}


class FrameClient:
    """A raw NDJSON client: writes frames or bytes, reads frames, keeps every frame it has read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames: list[Frame] = []
        self._barriers = itertools.count(1)

    async def send(self, *items: Frame | bytes) -> None:
        """Write every item in one write (a dict becomes one JSON line; bytes go as they are)."""
        self.writer.write(b"".join(i if isinstance(i, bytes) else orjson.dumps(i) + b"\n" for i in items))
        async with asyncio.timeout(5):
            await self.writer.drain()

    async def next(self, timeout_s: float = 10.0) -> Frame:
        async with asyncio.timeout(timeout_s):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), f"the daemon closed the connection (tail {line[:200]!r})"
        frame = orjson.loads(line)
        assert isinstance(frame, dict), line
        self.frames.append(frame)
        return frame

    async def read_until(self, predicate: Callable[[Frame], bool], timeout_s: float = 10.0) -> Frame:
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.next(timeout_s)
                if predicate(frame):
                    return frame

    def by_id(self) -> dict[str | None, list[Frame]]:
        grouped: dict[str | None, list[Frame]] = {}
        for frame in self.frames:
            grouped.setdefault(frame.get("id"), []).append(frame)
        return grouped

    def has_terminal(self, frame_id: str) -> bool:
        return any(f.get("id") == frame_id and f.get("event") in TERMINAL for f in self.frames)

    async def until_terminals(self, *ids: str, timeout_s: float = 15.0) -> dict[str | None, list[Frame]]:
        """Read until every one of ``ids`` has a terminal frame; return all frames read, by id."""
        async with asyncio.timeout(timeout_s):
            while not all(self.has_terminal(i) for i in ids):
                await self.next(timeout_s)
        return self.by_id()

    async def barrier(self) -> None:
        """A round trip: every frame the daemon wrote before answering it has been read."""
        barrier_id = f"barrier-{next(self._barriers)}"
        await self.send({"id": barrier_id, "op": "cancel", "target": "no-such-request"})
        frame = await self.read_until(lambda f: f.get("id") == barrier_id)
        assert frame == {"id": barrier_id, "event": "cancelled", "target": "no-such-request", "found": False}

    async def read_to_eof(self, timeout_s: float = 10.0) -> list[Frame]:
        """Read the remaining frames until the daemon closes the connection."""
        rest: list[Frame] = []
        async with asyncio.timeout(timeout_s):
            while line := await self.reader.readline():
                frame = orjson.loads(line)
                self.frames.append(frame)
                rest.append(frame)
        return rest


@contextlib.asynccontextmanager
async def connect(d: RunningDaemon) -> AsyncIterator[FrameClient]:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_unix_connection(d.socket)
    try:
        yield FrameClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await writer.wait_closed()


def prompt(frame_id: str, text: str, tenant: str = "acme", **extra: Any) -> Frame:
    return {"id": frame_id, "op": "prompt", "key": KEYS[tenant], "prompt": text, **extra}


def events(frames: list[Frame]) -> list[str]:
    return [f["event"] for f in frames]


def deltas(frames: list[Frame]) -> str:
    return "".join(f["text"] for f in frames if f["event"] == "delta")


# -- multiplexing ----------------------------------------------------------------------------------


async def test_many_requests_are_multiplexed_on_one_connection(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 3, "min_idle": 2})
    await d.idle(2)
    expected = {
        "r1": ("acme", "first answer, streamed slowly in pieces"),
        "r2": ("beta", "second"),
        "r3": ("beta", "third answer, streamed in pieces"),
        "r4": ("acme", "fourth"),
    }
    async with connect(d) as c:
        await c.send(
            prompt("r1", f"[[sleep:1.5]] [[reply:{expected['r1'][1]}]]", "acme", stream=True),
            prompt("r2", f"[[reply:{expected['r2'][1]}]]", "beta"),
            prompt("r3", f"[[reply:{expected['r3'][1]}]]", "beta", stream=True),
            prompt("r4", f"[[reply:{expected['r4'][1]}]]", "acme", profile="lean", stream=False),
        )
        await c.until_terminals(*expected)
        await c.barrier()  # nothing more may arrive for any of them
        grouped = c.by_id()

    assert set(grouped) == {*expected, "barrier-1"}
    request_ids = set()
    for frame_id, (tenant, text) in expected.items():
        frames = grouped[frame_id]
        kinds = events(frames)
        assert kinds[-1] == "result", frames
        assert sum(k in TERMINAL for k in kinds) == 1, frames
        result = frames[-1]
        assert set(result) == RESULT_FIELDS
        assert result["id"] == frame_id
        assert re.fullmatch(r"[0-9a-f]{32}", result["request_id"])
        request_ids.add(result["request_id"])
        assert result["tenant"] == tenant
        assert result["session"] is None
        assert result["text"] == text
        assert result["is_error"] is False
        assert result["stop_reason"] == "end_turn"
        assert set(result["usage"]) == USAGE_FIELDS
        assert result["usage"]["output_tokens"] > 0
        assert result["cost_usd"] > 0
        assert result["duration_ms"] >= result["queue_ms"] >= 0
        if frame_id in ("r1", "r3"):
            assert kinds.count("delta") >= 2  # the fake streams in 8-character pieces
            assert deltas(frames) == text
        else:
            assert kinds == ["result"]
    assert len(request_ids) == 4
    # Multiplexed, not serialised: the slow r1 was answered last although it was sent first, and the
    # other answers arrived between its frames.
    order = [f["id"] for f in c.frames if f["event"] == "result"]
    assert order[-1] == "r1", order
    r1_at = [i for i, f in enumerate(c.frames) if f["id"] == "r1"]
    assert any(c.frames[i]["id"] != "r1" for i in range(r1_at[0], r1_at[-1])), [f["id"] for f in c.frames]


# -- cancel ------------------------------------------------------------------------------------------


async def test_cancel_ends_the_request_and_the_worker_is_reset(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    pool = d.pool()
    async with connect(d) as c:
        await c.send(prompt("r1", "[[hang]] " + "a long answer " * 4, stream=True))
        first = await c.read_until(lambda f: f["id"] == "r1")
        assert first["event"] == "delta"
        await c.send({"id": "c1", "op": "cancel", "target": "r1"})
        await c.until_terminals("r1")
        if not any(f["id"] == "c1" for f in c.frames):
            await c.read_until(lambda f: f["id"] == "c1")
        await c.barrier()
        grouped = c.by_id()
        assert grouped["c1"] == [{"id": "c1", "event": "cancelled", "target": "r1", "found": True}]
        r1 = grouped["r1"]
        assert set(events(r1)) == {"delta", "error"}
        assert events(r1).count("error") == 1
        assert r1[-1]["event"] == "error"
        assert r1[-1]["code"] == "cancelled"
        assert r1[-1]["message"]
        await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets == 1, 10)
        assert d.daemon.service.in_flight == 0
        assert d.requests_by_outcome()["cancelled"] == 1

        # An unknown target is reported as not found; the id of the cancelled request is free again.
        await c.send({"id": "c2", "op": "cancel", "target": "never-sent"})
        assert await c.read_until(lambda f: f["id"] == "c2") == {
            "id": "c2", "event": "cancelled", "target": "never-sent", "found": False}
        await c.send(prompt("r1", "[[reply:again]]"))
        again = await c.read_until(lambda f: f["id"] == "r1")
        assert (again["event"], again["text"]) == ("result", "again")


async def test_cancel_written_together_with_its_prompt_still_ends_the_request(make_daemon: MakeDaemon) -> None:
    """A cancel that arrives in the same read as its prompt (the request task has not run yet) must
    still end that request with exactly one ``cancelled`` error and free its id."""
    d = await make_daemon()
    async with connect(d) as c:
        await c.send(prompt("r1", "[[hang]]", stream=True), {"id": "c1", "op": "cancel", "target": "r1"})
        await c.read_until(lambda f: f["id"] == "c1")
        await c.until_terminals("r1", timeout_s=3)
        await c.barrier()
        r1 = c.by_id()["r1"]
        assert [(f["event"], f.get("code")) for f in r1 if f["event"] in TERMINAL] == [("error", "cancelled")]
        # The id is free for a new request.
        await c.send(prompt("r1", "[[reply:reused]]"))
        again = await c.read_until(lambda f: f["id"] == "r1" and f["event"] in TERMINAL)
        assert (again["event"], again.get("text")) == ("result", "reused")


# -- bad frames --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "frame_id", "code"),
    [
        (b"{not json at all\n", None, "bad_request"),
        (b'["id", "op", "prompt"]\n', None, "bad_request"),
        (b'"just a string"\n', None, "bad_request"),
        (orjson.dumps({"id": "u1", "op": "dance", "key": KEYS["acme"]}) + b"\n", "u1", "bad_request"),
        (orjson.dumps({"id": "u2", "key": KEYS["acme"], "prompt": "x"}) + b"\n", "u2", "bad_request"),
        (orjson.dumps({"id": "p1", "op": "prompt", "prompt": "SECRET-PROMPT"}) + b"\n", "p1", "bad_request"),
        (orjson.dumps({**prompt("p2", "x"), "promt": "typo"}) + b"\n", "p2", "bad_request"),
        (orjson.dumps(prompt("p3", "")) + b"\n", "p3", "bad_request"),
        (orjson.dumps({**prompt("p4", "x"), "key": "wrong-key"}) + b"\n", "p4", "unauthorized"),
        (orjson.dumps({**prompt("p5", "x"), "key": ADMIN_KEY}) + b"\n", "p5", "unauthorized"),
        (orjson.dumps(prompt("p6", "x", profile="other")) + b"\n", "p6", "forbidden"),
        (orjson.dumps(prompt("p7", "x", tenant="beta", profile="lean")) + b"\n", "p7", "forbidden"),
        (orjson.dumps(prompt("p8", "x", profile="nope")) + b"\n", "p8", "not_found"),
        (orjson.dumps({"id": "c1", "op": "cancel"}) + b"\n", "c1", "bad_request"),
    ],
    ids=["not-json", "json-array", "json-string", "unknown-op", "no-op", "no-key", "unknown-field", "empty-prompt",
         "wrong-key", "admin-key-is-no-tenant", "profile-not-allowed", "profile-not-allowed-beta", "unknown-profile",
         "cancel-without-target"],
)
async def test_bad_frame_gets_an_error_and_the_connection_stays_usable(
    make_daemon: MakeDaemon, line: bytes, frame_id: str | None, code: str
) -> None:
    d = await make_daemon()
    async with connect(d) as c:
        await c.send(line)
        error = await c.next()
        assert error == {"id": frame_id, "event": "error", "code": code, "message": error["message"]}
        assert error["message"]
        assert "SECRET-PROMPT" not in error["message"]
        await c.send(prompt("ok", "[[reply:still here]]"))
        result = await c.next()
        assert (result["id"], result["event"], result["text"]) == ("ok", "result", "still here")
        await c.barrier()
        assert len(c.frames) == 3  # the error, the result, the barrier: nothing else


async def test_oversize_frames_are_refused_and_skipped_whole(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_frame_bytes": 4096})

    def oversize(tag: str) -> bytes:
        """~20 KB on one line, with complete-looking frames inside that must never be served."""
        smuggled = [orjson.dumps(prompt(f"{tag}-{i}", f"[[reply:smuggled {tag} {i}]]")) for i in range(3)]
        return (smuggled[0] + b" " + b"x" * 10_000 + b" " + smuggled[1] + b" " + b"y" * 10_000 + b" " + smuggled[2]
                + b"\n")

    async with connect(d) as c:
        # One write; then the same in pieces, so the line's end comes in a later read than its start
        # (a first piece under the limit, and pieces over the limit with no newline).
        for tag, cuts in (("whole", []), ("split-small", [3000]), ("split-large", [6000, 12000])):
            line = oversize(tag)
            assert 19_000 < len(line) < 21_000
            bounds = [0, *cuts, len(line)]
            for start, end in itertools.pairwise(bounds):
                await c.send(line[start:end])
                if end < len(line):
                    await asyncio.sleep(0.05)
            error = await c.next()
            # Answered under the id the oversize frame starts with, so a client waiting on it hears back.
            assert error == {"id": f"{tag}-0", "event": "error", "code": "frame_too_large",
                             "message": error["message"]}
            assert "4096" in error["message"]
            # A valid frame right after the oversize line is served, on the same connection.
            await c.send(prompt(f"ok-{tag}", "[[reply:still here]]"))
            result = (await c.until_terminals(f"ok-{tag}"))[f"ok-{tag}"][-1]
            assert (result["event"], result["text"]) == ("result", "still here")
        await c.barrier()
    assert [f["id"] for f in c.frames] == ["whole-0", "ok-whole", "split-small-0", "ok-split-small",
                                           "split-large-0", "ok-split-large", "barrier-1"]
    assert d.pool().stats.turns == 3  # the smuggled prompts never reached a worker


async def test_an_oversize_frame_reusing_an_id_in_flight_does_not_answer_that_request(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_frame_bytes": 4096})
    async with connect(d) as c:
        await c.send(prompt("r1", "[[sleep:0.5]] [[reply:done]]"))
        await until(lambda: d.daemon.service.in_flight == 1, 5)
        await c.send(orjson.dumps(prompt("r1", "x" * 10_000)) + b"\n")
        error = await c.next()
        assert (error["id"], error["code"]) == (None, "frame_too_large")
        assert "'r1'" in error["message"]
        answers = (await c.until_terminals("r1"))["r1"]
        assert [(f["event"], f.get("text")) for f in answers] == [("result", "done")]  # one answer, its own


async def test_blank_lines_are_ignored(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    async with connect(d) as c:
        await c.send(b"\n\n   \n\t\r\n\r\n")
        await c.send(b"\n", prompt("ok", "[[reply:fine]]"), b"\n \n")
        await c.until_terminals("ok")
        await c.barrier()
    assert [(f["id"], f["event"]) for f in c.frames] == [("ok", "result"), ("barrier-1", "cancelled")]
    assert c.frames[0]["text"] == "fine"


async def test_duplicate_id_in_flight_is_refused_and_the_first_completes(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    async with connect(d) as c:
        await c.send(prompt("dup", "[[sleep:0.5]] [[reply:the first one answers]]", stream=True))
        first = await c.read_until(lambda f: f["id"] == "dup")
        assert first["event"] == "delta"
        await c.send(prompt("dup", "[[reply:the second one must not run]]", tenant="beta"))
        # Answered with id null (an error under "dup" would read as the first one's end), naming the id.
        refused = await c.read_until(lambda f: f["id"] is None)
        assert refused["code"] == "bad_request"
        assert "'dup'" in refused["message"]
        assert "has not ended" in refused["message"]
        result = await c.read_until(lambda f: f["id"] == "dup" and f["event"] == "result")
        await c.barrier()
        frames = c.by_id()["dup"]
    assert [f["event"] for f in frames if f["event"] in TERMINAL] == ["result"]
    assert result["text"] == deltas(frames) == "the first one answers"
    assert result["tenant"] == "acme"
    assert d.pool().stats.turns == 1


# -- status ------------------------------------------------------------------------------------------


async def test_status_for_admin_tenant_and_bad_key(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    async with connect(d) as c:
        await c.send({"id": "s1", "op": "status", "key": ADMIN_KEY})
        admin = await c.next()
        await c.send({"id": "s2", "op": "status", "key": KEYS["beta"]})
        tenant = await c.next()
        await c.send({"id": "s3", "op": "status", "key": "nobody-holds-this"})
        bad = await c.next()
        await c.send({"id": "s4", "op": "status"})
        missing = await c.next()

    assert (admin["id"], admin["event"]) == ("s1", "status")
    assert set(admin["pools"]) == {"default", "lean", "other", "default.sessions", "lean.sessions",
                                   "other.sessions"}
    workers = admin["pools"]["default"]["workers"]
    assert workers
    assert {"id", "state", "pid", "profile", "turns", "age_s", "pss_bytes"} <= set(workers[0])
    assert {w["profile"] for w in workers} == {"default"}
    assert all(isinstance(w["pid"], int) for w in workers)
    assert admin["queue"] == {"waiting": 0}
    assert (admin["in_flight"], admin["draining"]) == (0, False)
    assert "error" not in admin

    assert (tenant["id"], tenant["event"]) == ("s2", "status")
    assert tenant["ready"] is True
    assert tenant["draining"] is False
    assert tenant["pools"]["default"]["healthy"] is True
    assert "workers" not in tenant["pools"]["default"]  # no worker details for tenants

    assert (bad["id"], bad["event"]) == ("s3", "status")
    assert bad["error"]["code"] == "unauthorized"
    assert bad["error"]["message"]
    assert "pools" not in bad

    assert (missing["id"], missing["event"], missing["code"]) == ("s4", "error", "bad_request")


# -- disconnects, the socket file, shutdown ------------------------------------------------------------


async def test_client_disconnect_cancels_its_requests_and_resets_the_worker(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    pool = d.pool()
    async with connect(d) as c:
        await c.send(prompt("r1", "[[sleep:3]] " + "a long answer " * 10, stream=True))
        first = await c.read_until(lambda f: f["id"] == "r1")
        assert first["event"] == "delta"
        assert d.daemon.service.in_flight == 1
    # The connection is closed with the request in flight.
    await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets == 1, 10)
    await until(lambda: d.daemon.service.in_flight == 0)
    assert d.requests_by_outcome() == {"cancelled": 1}
    await d.idle()
    async with connect(d) as c:
        await c.send(prompt("r2", "[[reply:next client]]"))
        assert (await c.next())["text"] == "next client"


async def test_socket_mode_and_a_stale_socket_is_replaced(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "run" / "stale.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, then closed: the file stays, and nobody listens on it
    before = os.stat(path)
    assert stat.S_ISSOCK(before.st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(path))

    d = await make_daemon(server={"socket": str(path)})
    assert d.socket == str(path)
    after = os.stat(path)
    assert stat.S_ISSOCK(after.st_mode)
    assert stat.S_IMODE(after.st_mode) == 0o660
    async with connect(d) as c:
        await c.send(prompt("r1", "[[reply:served on the new socket]]"))
        assert (await c.next())["text"] == "served on the new socket"


async def test_a_file_that_is_not_a_socket_is_never_replaced(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("do not delete")
    with pytest.raises(ConfigError, match="is not a socket"):
        await make_daemon(server={"socket": str(path), "http": ""})
    assert path.read_text() == "do not delete"


async def test_an_unusable_socket_path_is_a_config_error(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """Like an HTTP address that cannot be bound, a socket path that cannot be bound is a configuration
    error (`claudepool serve` exits 2 with a message), not an unexpected OSError."""
    path = tmp_path / ("s" * 120 + ".sock")  # longer than sun_path allows
    with pytest.raises(ConfigError):
        await make_daemon(server={"socket": str(path), "http": ""})


async def test_a_failed_socket_bind_leaves_no_http_listener_behind(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("do not delete")
    with pytest.raises(ConfigError, match="is not a socket"):
        await make_daemon(server={"socket": str(path)})  # HTTP is bound first, then the socket fails
    leaked = [o for o in gc.get_objects() if isinstance(o, web.AppRunner) and o.sites]
    addresses = [address for runner in leaked for address in runner.addresses]
    for runner in leaked:  # so that a leak cannot spill into later tests
        async with asyncio.timeout(10):
            await runner.cleanup()
    assert addresses == [], f"the daemon failed to start but still listens on {addresses}"


async def test_shutdown_stops_a_socket_request_with_one_draining_error(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"drain_timeout_s": 0.5})
    async with connect(d) as c:
        await c.send(prompt("r1", "[[hang]] " + "a long answer " * 4, stream=True))
        first = await c.read_until(lambda f: f["id"] == "r1")
        assert first["event"] == "delta"
        d.daemon.request_stop()
        await until(lambda: d.daemon.service.draining)
        # New requests are refused while the daemon drains; the connection still answers.
        await c.send(prompt("late", "[[reply:too late]]"))
        await c.until_terminals("r1", "late", timeout_s=10)
        async with asyncio.timeout(15):
            code = await d.task
        assert code == 0
        await c.read_to_eof()  # the daemon closed the connection, with nothing more for r1
    grouped = c.by_id()
    assert set(grouped) == {"r1", "late"}
    assert [(f["event"], f["code"]) for f in grouped["late"]] == [("error", "draining")]
    r1 = grouped["r1"]
    terminals = [f for f in r1 if f["event"] in TERMINAL]
    assert len(terminals) == 1
    assert r1[-1] is terminals[0]
    assert (terminals[0]["event"], terminals[0]["code"]) == ("error", "draining")
    assert d.daemon.service.in_flight == 0
    # r1, stopped at the deadline, and "late", refused at admission: each counted once.
    assert d.requests_by_outcome() == {"draining": 2}
