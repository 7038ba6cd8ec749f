"""Workspaces on the real CLI, sandboxed (issue 13): the fake upstream's ``[[tool:Bash:CMD]]`` makes the
real CLI run CMD in its bubblewrap sandbox, in the workspace. Input files are there for the tool, files
it writes come back, a session's workspace survives park and resume (negative control: without
saving it is gone), and a link the tool plants to a host file holding a marker (a path the tool
cannot even see inside its sandbox, but the daemon could, outside it) never brings the marker back:
not in an answer, a listing, a fetch or the saved archive."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_real_cli_sandbox import BASH
from tests.test_workspace_files import MARKER, marker

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon", "marker"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


async def bash_daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream,
                      **sessions: Any) -> RunningDaemon:
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": BASH, "lean": {"min_idle": 0}, "other": {"min_idle": 0}},
        sessions={"min_idle": 0, "max_workers": 2, "park_idle_s": 600, **sessions})


async def get(d: RunningDaemon, path: str, tenant: str = "acme") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{d.url}{path}", headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as resp:
        return resp.status, await resp.read()


async def test_input_files_reach_the_sandboxed_tool_and_its_files_come_back_without_a_links_target(
        make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, marker: Path) -> None:
    d = await bash_daemon(make_daemon, real_claude, upstream)
    command = (f"mkdir -p out && tr a-z A-Z < in/data.txt > out/upper.txt && ln -s {marker} out/link.txt && "
               f"cat {marker} 2>&1; ls in")
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        answer = await client.prompt(f"[[tool:Bash:{command}]]", files={"in/data.txt": b"shout\n"},
                                     return_files=["out/*.txt"], timeout_s=60)
    assert "No such file" in answer.text and "data.txt" in answer.text  # the host path is out of its sight
    assert answer.files is not None and [(f.path, f.content()) for f in answer.files] == [("out/upper.txt", b"SHOUT\n")]
    assert [(o.path, o.reason) for o in answer.files_omitted or []] == [("out/link.txt", "symlink")]
    assert MARKER not in answer.model_dump_json()
    assert base64.b64encode(MARKER.encode()).decode() not in answer.model_dump_json()


@pytest.mark.parametrize("saving", [True, False])
async def test_a_sandboxed_session_resumes_with_its_workspace_and_never_a_links_target(
        make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, marker: Path, saving: bool) -> None:
    d = await bash_daemon(make_daemon, real_claude, upstream, save_workspace=saving)
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        sid = (await client.create_session())["id"]
        plant = f"mkdir -p notes && echo kept-31 > notes/n.txt && ln -s {marker} notes/link && echo planted"
        assert "planted" in (await client.prompt(f"[[tool:Bash:{plant}]]", session=sid, timeout_s=60)).text
        listing = await client.session_files(sid)
        assert {f["path"]: f["type"] for f in listing["files"]} == {
            "notes": "dir", "notes/n.txt": "file", "notes/link": "symlink"}
        assert await client.session_file(sid, "notes/n.txt") == b"kept-31\n"
        status, raw = await get(d, f"/v1/sessions/{sid}/files/notes/link")
        assert status == 400 and MARKER.encode() not in raw
        first = d.daemon.sessions.bound_worker(sid)
        assert await d.daemon.sessions.park(sid)
        archive = d.daemon.sessions.files.workspace(await d.daemon.sessions.get("acme", sid))
        if saving:
            assert MARKER.encode() not in archive.read_bytes()
            assert await client.session_file(sid, "notes/n.txt") == b"kept-31\n"  # from the archive
        else:
            assert not archive.exists()
        again = await client.prompt("[[tool:Bash:cat notes/n.txt 2>&1; ls -A notes 2>&1]]", session=sid,
                                    timeout_s=60)
        assert d.daemon.sessions.bound_worker(sid) is not first  # resumed on another process
        status, raw = await get(d, f"/v1/sessions/{sid}/files", tenant="beta")
        assert status == 404 and b"notes" not in raw
    if saving:
        assert again.text.split() == ["kept-31", "n.txt"]  # the file back, the link not
    else:  # the negative control
        assert "kept-31" not in again.text and "No such file" in again.text
    assert MARKER not in orjson.dumps(listing).decode() + again.text
