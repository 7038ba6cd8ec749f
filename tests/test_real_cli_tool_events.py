"""Tool activity reaches the client, on the real CLI end to end (issue 13): a Bash-enabled profile, the
loopback fake provider's ``[[tool:Bash:CMD]]`` directive (the model asks for a Bash call, the CLI runs
it, the next answer is its output), the daemon's SSE and socket streams, and the client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.protocol.wire import ToolResult, ToolUse
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import pid_gone, until
from tests.test_tool_events import call_id, sse_events, streamed, tool_events
from tests.test_unix_api import connect, prompt

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


async def bash_daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, *, sandbox: bool = True,
                      **server: object) -> RunningDaemon:
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 2, "max_workers": 3, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"tools": ["Bash"], "args": ["--allowedTools", "Bash"], "upstream_max_retries": 0,
                              "sandbox": sandbox}},
        **({"server": server} if server else {}),
    )


@pytest.mark.parametrize("wire", ["sse", "socket"])
async def test_a_bash_call_streams_tool_use_then_tool_result_with_its_output(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, wire: str
) -> None:
    d = await bash_daemon(make_daemon, real_claude, upstream)
    await d.idle(2)
    # Another tenant streams at the same time, on the other worker: it sees none of it.
    acme, beta = await asyncio.gather(streamed(d, wire, "run it [[tool:Bash:echo hi]]", "acme"),
                                      streamed(d, wire, "[[reply:beta's own answer]] [[chunks:3]]", "beta"))
    kinds = [kind for kind, _ in acme]
    assert [k for k in kinds if k != "delta"] == ["tool_use", "tool_result", "result"]
    (_, use), (_, result) = tool_events(acme)
    assert use[call_id(wire)].startswith("toolu_")
    assert (use["name"], use["input"], use["truncated"]) == ("Bash", {"command": "echo hi"}, False)
    assert result == {"tool_use_id": use[call_id(wire)], "is_error": False, "preview": "hi", "truncated": False}
    # The answer's text comes after the tool's result: the provider's second answer is the output.
    assert "".join(body["text"] for kind, body in acme[kinds.index("tool_result"):] if kind == "delta") == "hi"
    assert acme[-1][1]["text"] == "hi"
    assert {kind for kind, _ in beta} == {"delta", "result"}
    assert "toolu_" not in orjson.dumps(beta).decode() and "echo hi" not in orjson.dumps(beta).decode()
    assert beta[-1][1]["text"] == "beta's own answer"
    assert len(upstream.message_requests()) == 3  # the tool call, the answer after it, beta's


async def test_the_preview_is_bounded_and_cut_on_a_character_boundary(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await bash_daemon(make_daemon, real_claude, upstream, tool_preview_bytes=7)
    # "ab", a byte that is not UTF-8, "€": the CLI replaces the byte with U+FFFD (3 bytes), so 9 bytes.
    (_, use), (_, result) = tool_events(await sse_events(d, r"[[tool:Bash:printf 'ab\377\342\202\254']]"))
    assert (result["preview"], result["truncated"], result["is_error"]) == ("ab\ufffd", True, False)
    assert use["truncated"] is True and isinstance(use["input"], str)  # '{"comma': 7 bytes of the input's JSON
    assert use["input"] == '{"comma'
    async with AsyncClient(key=KEYS["acme"], socket_path=d.socket) as client:
        pieces = [p async for p in client.stream("[[tool:Bash:head -c 3000 /dev/zero | tr '\\0' x; exit 2]]")]
    uses = [p for p in pieces if isinstance(p, ToolUse)]
    results = [p for p in pieces if isinstance(p, ToolResult)]
    assert len(uses) == len(results) == 1
    assert results[0].tool_use_id == uses[0].id
    assert results[0].is_error is True and results[0].truncated is True
    assert results[0].preview == "Exit co"


async def test_a_client_that_leaves_mid_tool_interrupts_the_turn_and_resets_the_worker(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # Unsandboxed: the tool writes its host pid where the test reads it (a sandboxed tool sees neither
    # the test's directory nor host pids; what the sandbox does with a lease's processes is
    # tests/test_real_cli_sandbox.py's). Here: the CLI's own interrupt stops the tool.
    d = await bash_daemon(make_daemon, real_claude, upstream, sandbox=False)
    pool = d.pool()
    pid_file = tmp_path / "tool.pid"
    async with connect(d) as c:
        await c.send(prompt("r1", f"MID-TOOL-SECRET [[tool:Bash:echo $$ > {pid_file}; sleep 30; echo never]]",
                            stream=True))
        first = await c.next(timeout_s=30)
        assert (first["event"], first["name"]) == ("tool_use", "Bash")
        await until(lambda: pid_file.exists() and bool(pid_file.read_text().strip()), 20)
    await until(lambda: pool.stats.abandoned_turns == 1 and pool.stats.resets >= 1, 30)
    await until(lambda: pid_gone(int(pid_file.read_text())), 10)  # the CLI stopped the tool
    await until(lambda: d.daemon.service.in_flight == 0, 10)
    assert d.requests_by_outcome() == {"cancelled": 1}
    before = len(upstream.requests)
    events = await streamed(d, "socket", "[[tool:Bash:echo next tenant]]", "beta")
    assert [kind for kind, _ in tool_events(events)] == ["tool_use", "tool_result"]
    assert events[-1][1]["text"] == "next tenant"
    assert not any(r.contains("MID-TOOL-SECRET") for r in upstream.requests[before:])
