"""Workspaces (issue 13): files into a request's workspace, files back out of it, a session's
workspace kept across park and resume, and the files API, on the fake CLI (whose ``[[tool:Bash:CMD]]``
runs CMD in the worker's cwd). Each refusal comes with the attack it stops: a symbolic link, a hard
link, a FIFO or a path out of the workspace planted by the tool, aimed at a marker file outside the
workspace that must never come back (tests/test_real_cli_workspace_files.py: the same on the real
CLI, sandboxed)."""

from __future__ import annotations

import asyncio
import base64
import doctest
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.pool import workspace_files
from claudepool.pool.workspace_files import matches
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_cli_client import claudepool
from tests.test_sessions import call, new_session, say, sessions_config
from tests.test_unix_api import connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
MARKER = "OUTSIDE-MARKER-4417"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tool(command: str) -> str:
    return f"[[tool:Bash:{command}]]"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file outside every workspace, as another tenant's file or /etc/shadow would be."""
    path = tmp_path / "elsewhere" / "secret.txt"
    path.parent.mkdir()
    path.write_text(MARKER)
    return path


async def get(d: RunningDaemon, path: str, tenant: str = "acme") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{d.url}{path}", headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as resp:
        return resp.status, await resp.read()


async def one_worker(make_daemon: MakeDaemon, sessions: dict[str, Any] | None = None,
                     **overrides: Any) -> RunningDaemon:
    """One stateless worker (so the next lease is the same worker's); sessions parked only when a test says."""
    return await make_daemon(pool={"min_idle": 1, "max_workers": 1},
                             **sessions_config(park_idle_s=600, **(sessions or {})), **overrides)


def test_the_module_doctests_pass_and_globs_stay_in_their_components() -> None:
    assert doctest.testmod(workspace_files).failed == 0
    assert not matches(("out", "deep", "a.txt"), ("out", "*.txt"))  # * never crosses a /
    assert matches(("out", "a.txt"), ("out", "**", "*.txt"))  # ** may be no component at all
    assert not matches(("x", "out", "a.txt"), ("out", "*.txt"))  # anchored at the workspace


# -- input files --------------------------------------------------------------------------------


async def test_input_files_are_in_the_workspace_when_the_prompt_runs_and_gone_after(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon)
    files = [{"path": "in/data.txt", "content_base64": b64(b"alpha\n")},
             {"path": "top.bin", "content_base64": b64(bytes(range(256)))}]
    status, body = await say(d, None, tool("cat in/data.txt; wc -c < top.bin"), files=files)
    assert status == 200, body
    assert body["text"].split() == ["alpha", "256"]
    await d.idle(1)
    # The next lease of the same (only) worker, another tenant's: its workspace is empty again.
    status, body = await say(d, None, tool("ls -A | wc -l"), tenant="beta")
    assert status == 200 and body["text"].strip() == "0", body


@pytest.mark.parametrize("bad", ["/etc/passwd", "../up.txt", "a/../../b", "a//b", "./a", "nul\x00.txt", "a/.."])
async def test_a_path_out_of_the_workspace_is_refused_and_nothing_runs(make_daemon: MakeDaemon, fake_log: Path,
                                                                       bad: str) -> None:
    d = await make_daemon()
    before = fake_log.read_bytes() if fake_log.exists() else b""
    status, body = await say(d, None, "never runs", files=[{"path": "ok.txt", "content_base64": b64(b"x")},
                                                            {"path": bad, "content_base64": b64(b"x")}])
    assert status == 400 and body["error"]["code"] == "workspace_path_refused", body
    after = fake_log.read_bytes() if fake_log.exists() else b""
    assert b"never runs" not in after[len(before):]


async def test_bounds_on_input_files_give_typed_errors(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_input_files": 2, "max_input_file_bytes": 10, "max_input_bytes": 15,
                                  "max_return_files": 1})
    one = {"path": "a", "content_base64": b64(b"12345")}
    cases = [
        ([one, {**one, "path": "b"}, {**one, "path": "c"}], [], 413, "files_too_large"),  # count
        ([{"path": "a", "content_base64": b64(b"x" * 11)}], [], 413, "files_too_large"),  # one file
        ([{"path": "a", "content_base64": b64(b"x" * 8)}, {"path": "b", "content_base64": b64(b"x" * 8)}], [],
         413, "files_too_large"),  # together
        ([{"path": "a", "content_base64": "not base64!"}], [], 400, "bad_request"),
        ([one, one], [], 400, "workspace_path_refused"),  # the same path twice
        ([], ["a", "b"], 413, "files_too_large"),  # return_files patterns
        ([], ["../*"], 400, "workspace_path_refused"),
    ]
    for files, patterns, status_code, code in cases:
        status, body = await say(d, None, "hi", files=files, return_files=patterns)
        assert (status, body["error"]["code"]) == (status_code, code), (files, patterns, body)
    status, body = await say(d, None, tool("cat a"), files=[one])
    assert status == 200 and body["text"] == "12345"


async def test_an_input_file_never_goes_through_a_planted_link_or_onto_a_fifo(make_daemon: MakeDaemon,
                                                                            marker: Path) -> None:
    d = await one_worker(make_daemon)
    sid = await new_session(d)
    outside = marker.parent
    status, _ = await say(d, sid, tool(f"ln -s {outside} linkdir; ln -s {marker} link.txt; mkfifo fifo; echo ok"))
    assert status == 200
    # Each would write outside the workspace (into the marker's directory, over the marker) or block
    # on the FIFO without the checks; with them: refused, and nothing of the set written.
    for bad in ("linkdir/planted.txt", "link.txt", "fifo", "linkdir"):
        status, body = await say(d, sid, "never runs", files=[{"path": "fine.txt", "content_base64": b64(b"x")},
                                                                {"path": bad, "content_base64": b64(b"OVER")}])
        assert status == 400 and body["error"]["code"] == "workspace_path_refused", (bad, body)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert marker.read_text() == MARKER
    status, body = await say(d, sid, tool("ls"))
    assert "fine.txt" not in body["text"] and "planted" not in body["text"], body


# -- files back with the answer ---------------------------------------------------------------


PLANT = ("mkdir -p out/deep && echo one > out/a.txt && echo two > out/deep/b.txt && echo log > out/c.log && "
         "ln -s {marker} out/link.txt && ln {marker} out/hard.txt && mkfifo out/fifo.txt && echo planted")


async def test_return_files_come_back_and_links_and_fifos_never_do(make_daemon: MakeDaemon, marker: Path) -> None:
    d = await make_daemon()
    status, body = await say(d, None, tool(PLANT.format(marker=marker)), return_files=["out/*.txt", "out/**/b.txt"])
    assert status == 200, body
    files = {f["path"]: base64.b64decode(f["content_base64"]) for f in body["files"]}
    assert files == {"out/a.txt": b"one\n", "out/deep/b.txt": b"two\n"}
    assert [f["size_bytes"] for f in body["files"]] == [4, 4]
    assert {o["path"]: o["reason"] for o in body["files_omitted"]} == {
        "out/link.txt": "symlink", "out/hard.txt": "not_regular", "out/fifo.txt": "not_regular"}
    assert MARKER not in orjson.dumps(body).decode()
    assert base64.b64encode(MARKER.encode()).decode() not in orjson.dumps(body).decode()


async def test_return_files_bounds_name_what_was_left_out(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_return_files": 2, "max_return_bytes": 6})
    status, body = await say(d, None, tool("printf 1234 > a; printf 12345678 > b; printf 12 > c; printf 1 > d"),
                             return_files=["*"])
    assert status == 200, body
    assert [f["path"] for f in body["files"]] == ["a", "c"]
    assert {o["path"]: o["reason"] for o in body["files_omitted"]} == {"b": "too_large", "d": "too_many"}


async def test_return_files_reach_the_sse_and_socket_terminal_events_and_the_client(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    make = tool("echo streamed > r.txt")
    async with aiohttp.ClientSession() as session, session.post(
            f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": make, "stream": True, "return_files": ["r.txt"]}),
            headers={"Authorization": f"Bearer {KEYS['acme']}"}) as resp:
        text = (await resp.read()).decode()
    result = orjson.loads(text.split("event: result\r\ndata: ", 1)[1].split("\r\n", 1)[0])
    assert result["files"][0]["path"] == "r.txt"
    async with connect(d) as c:
        await c.send(prompt("r1", make, return_files=["r.txt"]))
        frames = (await c.until_terminals("r1", timeout_s=30))["r1"]
    assert frames[-1]["event"] == "result" and frames[-1]["files"][0]["content_base64"] == b64(b"streamed\n")
    # Without return_files an answer is as it always was: no files fields.
    status, body = await say(d, None, "plain [[reply:x]]")
    assert status == 200 and "files" not in body and "files_omitted" not in body
    wheres: list[dict[str, Any]] = [{"url": d.url}, {"socket_path": d.socket}]
    for where in wheres:
        async with AsyncClient(key=KEYS["acme"], **where) as client:
            answer = await client.prompt(tool("cat in.txt > copy.txt"), files={"in.txt": b"via client"},
                                         return_files=["copy.txt"])
        assert answer.files is not None and answer.files[0].content() == b"via client"


# -- a session keeps its workspace --------------------------------------------------------------


async def park_and_resume(d: RunningDaemon, sid: str) -> None:
    assert await d.daemon.sessions.park(sid)
    assert (await call(d, "GET", f"/v1/sessions/{sid}"))[1]["where"]["state"] == "parked"


@pytest.mark.parametrize("saving", [True, False])
async def test_a_parked_session_resumes_with_its_workspace(make_daemon: MakeDaemon, saving: bool) -> None:
    d = await one_worker(make_daemon, sessions={"save_workspace": saving})
    sid = await new_session(d)
    status, body = await say(d, sid, tool("mkdir -p notes && echo kept-7 > notes/n.txt && echo $$"),
                             files=[{"path": "given.txt", "content_base64": b64(b"given-8")}])
    assert status == 200, body
    first_worker = d.daemon.sessions.bound_worker(sid)
    await park_and_resume(d, sid)
    status, body = await say(d, sid, tool("cat notes/n.txt given.txt 2>&1"))
    assert status == 200, body
    assert d.daemon.sessions.bound_worker(sid) is not first_worker  # resumed on a new process
    if saving:
        assert body["text"].split() == ["kept-7", "given-8"]
        assert d.daemon.sessions.events["workspace_restored"] == 1
    else:  # the negative control: the workspace went with the worker's reset
        assert "kept-7" not in body["text"] and "No such file" in body["text"]


async def test_a_workspace_over_its_bound_is_dropped_and_the_park_still_happens(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon, sessions={"max_saved_workspace_bytes": 64 * 1024})
    sid = await new_session(d)
    await say(d, sid, tool("head -c 200000 /dev/zero > big.bin; echo small > s.txt"))
    await park_and_resume(d, sid)
    view = (await call(d, "GET", f"/v1/sessions/{sid}"))[1]
    assert view["workspace"].startswith("dropped: over sessions.max_saved_workspace_bytes"), view
    assert d.daemon.sessions.events["workspace_dropped"] == 1
    assert not d.daemon.sessions.files.workspace(await d.daemon.sessions.get("acme", sid)).exists()
    status, body = await say(d, sid, tool("ls"))
    assert status == 200 and "s.txt" not in body["text"]


async def test_the_saved_workspace_goes_with_the_session(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon)
    sid = await new_session(d)
    await say(d, sid, tool("echo x > f.txt"))
    await park_and_resume(d, sid)
    archive = d.daemon.sessions.files.workspace(await d.daemon.sessions.get("acme", sid))
    assert archive.exists()
    assert (await call(d, "DELETE", f"/v1/sessions/{sid}"))[0] == 204
    assert not archive.exists()


async def test_disk_bound_counts_and_frees_saved_workspaces(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon, sessions={"max_disk_bytes": 30_000, "sweep_interval_s": 3600})
    sid = await new_session(d)
    await say(d, sid, tool("head -c 40000 /dev/urandom > r.bin; echo ok"))
    await park_and_resume(d, sid)
    record = await d.daemon.sessions.get("acme", sid)
    archive = d.daemon.sessions.files.workspace(record)
    assert archive.stat().st_size > 40_000
    await d.daemon.sessions.sweep()  # over the bound by the archive alone: the parked session goes
    assert not archive.exists()
    assert (await d.daemon.sessions.get("acme", sid)).close_reason == "disk"


# -- the files API -------------------------------------------------------------------------------


async def test_a_live_session_lists_and_serves_its_files_and_refuses_links_and_fifos(make_daemon: MakeDaemon,
                                                                                  marker: Path) -> None:
    d = await one_worker(make_daemon)
    sid = await new_session(d)
    await say(d, sid, tool(PLANT.format(marker=marker) + f" && ln -s {marker.parent} out/dirlink"))
    status, raw = await get(d, f"/v1/sessions/{sid}/files")
    assert status == 200, raw
    listing = {f["path"]: (f["type"], f["size_bytes"]) for f in orjson.loads(raw)["files"]}
    assert listing["out/a.txt"] == ("file", 4) and listing["out/deep"] == ("dir", 0)
    assert listing["out/link.txt"][0] == "symlink" and listing["out/fifo.txt"][0] == "other"
    assert listing["out/dirlink"][0] == "symlink"
    assert not any(p.startswith("out/dirlink/") for p in listing)  # never followed
    assert MARKER not in raw.decode()
    assert await get(d, f"/v1/sessions/{sid}/files/out/deep/b.txt") == (200, b"two\n")
    for path in ("out/link.txt", "out/hard.txt", "out/dirlink/secret.txt", "out/deep"):
        status, raw = await get(d, f"/v1/sessions/{sid}/files/{path}")
        assert status == 400 and orjson.loads(raw)["error"]["code"] == "workspace_path_refused", (path, raw)
        assert MARKER.encode() not in raw
    async with asyncio.timeout(5):  # a FIFO is never opened for a blocking read
        status, raw = await get(d, f"/v1/sessions/{sid}/files/out/fifo.txt")
    assert status == 400, raw
    for path in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "out/..%2F..%2F..%2Fsecret.txt", "nope.txt"):
        status, raw = await get(d, f"/v1/sessions/{sid}/files/{path}")
        assert status in (400, 404) and MARKER.encode() not in raw and b"root:" not in raw, (path, raw)


async def test_a_parked_sessions_files_come_from_its_archive_which_holds_no_link_target(
        make_daemon: MakeDaemon, marker: Path) -> None:
    d = await one_worker(make_daemon)
    sid = await new_session(d)
    await say(d, sid, tool(PLANT.format(marker=marker)))
    await park_and_resume(d, sid)
    archive = d.daemon.sessions.files.workspace(await d.daemon.sessions.get("acme", sid))
    assert MARKER.encode() not in archive.read_bytes()  # neither the link's target nor the hard link's
    with tarfile.open(archive) as tar:
        assert all(m.isreg() or m.isdir() for m in tar.getmembers())
    status, raw = await get(d, f"/v1/sessions/{sid}/files")
    paths = {f["path"] for f in orjson.loads(raw)["files"]}
    assert {"out/a.txt", "out/c.log", "out/deep/b.txt"} <= paths
    assert not paths & {"out/link.txt", "out/hard.txt", "out/fifo.txt"}
    assert await get(d, f"/v1/sessions/{sid}/files/out/a.txt") == (200, b"one\n")
    status, raw = await get(d, f"/v1/sessions/{sid}/files/out/link.txt")
    assert status == 404 and MARKER.encode() not in raw


async def test_another_tenants_session_files_are_404(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon)
    sid = await new_session(d)
    await say(d, sid, tool("echo mine > m.txt"))
    for live in (True, False):
        for path in (f"/v1/sessions/{sid}/files", f"/v1/sessions/{sid}/files/m.txt"):
            status, raw = await get(d, path, tenant="beta")
            assert status == 404 and b"mine" not in raw and orjson.loads(raw)["error"]["code"] == "not_found"
        assert (await get(d, f"/v1/sessions/{sid}/files/m.txt"))[1] == b"mine\n"
        if live:
            await park_and_resume(d, sid)


async def test_a_file_read_over_its_bound_is_refused(make_daemon: MakeDaemon) -> None:
    d = await one_worker(make_daemon, server={"max_file_read_bytes": 10, "max_listed_files": 2})
    sid = await new_session(d)
    await say(d, sid, tool("printf 12345678901 > big; printf 1 > a; printf 2 > b"))
    status, raw = await get(d, f"/v1/sessions/{sid}/files/big")
    assert status == 413 and orjson.loads(raw)["error"]["code"] == "files_too_large"
    body = orjson.loads((await get(d, f"/v1/sessions/{sid}/files"))[1])
    assert len(body["files"]) == 2 and body["truncated"] is True


async def test_claudepool_run_file_puts_a_local_file_into_the_workspace(make_daemon: MakeDaemon,
                                                                       tmp_path: Path) -> None:
    d = await make_daemon()
    local = tmp_path / "report.txt"
    local.write_text("from-disk-5\n")
    done = await claudepool("run", "--url", d.url, "--key", KEYS["acme"], "--file", str(local),
                            "--file", f"{local}=sub/copy.txt", tool("cat report.txt sub/copy.txt"))
    assert done.code == 0, done.err
    assert done.out.split() == ["from-disk-5", "from-disk-5"]
    done = await claudepool("run", "--url", d.url, "--key", KEYS["acme"], "--file", f"{local}=../x", "hi")
    assert done.code == 1 and "workspace_path_refused" in done.err
