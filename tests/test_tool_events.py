"""Tool activity reaches the client (issue 13): every tool call a turn makes is streamed as a
``tool_use`` event, and its outcome as a ``tool_result`` event with a bounded preview, over SSE and
on the socket, to that request's stream only. On the fake CLI, whose ``[[tool:Bash:CMD]]`` directive
emits the two messages the way the real CLI 2.1.328 does (tests/test_real_cli_tool_events.py runs
the real one)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.logs import JsonFormatter
from claudepool.protocol.wire import ToolResult, ToolUse
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import pid_gone, until
from tests.test_cli_client import claudepool, where
from tests.test_http_api import RESULT_FIELDS, auth, post, sse
from tests.test_unix_api import RESULT_FIELDS as FRAME_RESULT_FIELDS
from tests.test_unix_api import connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
Event = tuple[str, dict[str, Any]]
WIRES = ["sse", "socket"]
TOOL_EVENTS = {"tool_use", "tool_result"}


async def sse_events(d: RunningDaemon, text: str, tenant: str = "acme") -> list[Event]:
    """A streamed prompt over HTTP: its events in order, as ``(event, data)``."""
    return await sse(d.url, {"prompt": text}, tenant)


async def socket_events(d: RunningDaemon, text: str, tenant: str = "acme") -> list[Event]:
    """A streamed prompt on the socket: its frames in order, as ``(event, frame without id and event)``."""
    async with connect(d) as c:
        await c.send(prompt("r1", text, tenant, stream=True))
        frames = (await c.until_terminals("r1", timeout_s=30))["r1"]
    return [(f["event"], {k: v for k, v in f.items() if k not in ("id", "event")}) for f in frames]


async def streamed(d: RunningDaemon, wire: str, text: str, tenant: str = "acme") -> list[Event]:
    return await (sse_events if wire == "sse" else socket_events)(d, text, tenant)


def call_id(wire: str) -> str:
    """The field of a ``tool_use`` event that holds the call's id: ``id`` in SSE data; ``tool_use_id``
    on the socket, where ``id`` is the frame's."""
    return "id" if wire == "sse" else "tool_use_id"


def tool_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e[0] in TOOL_EVENTS]


# -- what is streamed, in order -------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
async def test_a_tool_call_streams_tool_use_then_tool_result_then_the_answer(make_daemon: MakeDaemon,
                                                                            wire: str) -> None:
    d = await make_daemon()
    events = await streamed(d, wire, "run it [[tool:Bash:echo hi]]")
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["tool_use", "tool_result"]
    assert set(kinds[2:-1]) == {"delta"}
    assert kinds[-1] == "result"
    (_, use), (_, result) = events[:2]
    ident = use[call_id(wire)]
    assert ident.startswith("toolu_")
    assert use == {call_id(wire): ident, "name": "Bash", "input": {"command": "echo hi"}, "truncated": False}
    assert result == {"tool_use_id": ident, "is_error": False, "preview": "hi", "truncated": False}
    assert events[-1][1]["text"] == "hi"  # the fake answers with what the tool printed


@pytest.mark.parametrize("wire", WIRES)
async def test_several_calls_come_in_order_and_a_failed_one_says_so(make_daemon: MakeDaemon, wire: str) -> None:
    d = await make_daemon()
    events = await streamed(d, wire, "[[tool:Bash:echo one]] [[tool:Bash:echo two >&2; exit 3]] "
                                     '[[tool:Read:{"file_path": "/etc/hostname"}]]')
    tools = tool_events(events)
    assert [kind for kind, _ in tools] == ["tool_use", "tool_result"] * 3
    uses, results = tools[0::2], tools[1::2]
    assert [u[1]["input"] for u in uses] == [{"command": "echo one"}, {"command": "echo two >&2; exit 3"},
                                             {"file_path": "/etc/hostname"}]
    assert [u[1]["name"] for u in uses] == ["Bash", "Bash", "Read"]
    # Each result answers the call before it.
    assert [r[1]["tool_use_id"] for r in results] == [u[1][call_id(wire)] for u in uses]
    assert len({r[1]["tool_use_id"] for r in results}) == 3
    assert [(r[1]["is_error"], r[1]["preview"].split("\n")[0]) for r in results[:2]] == [
        (False, "one"), (True, "Exit code 3")]
    assert results[1][1]["preview"] == "Exit code 3\ntwo"
    assert results[2][1]["is_error"] is True and "No such tool available: Read" in results[2][1]["preview"]
    assert events[-1][0] == "result"


# -- bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
async def test_the_preview_is_bounded_by_tool_preview_bytes(make_daemon: MakeDaemon, wire: str) -> None:
    d = await make_daemon()  # the default bound: 2048 bytes
    (_, _), (_, result) = tool_events(await streamed(d, wire, "[[tool:Bash:head -c 10000 /dev/zero | tr '\\0' x]]"))
    assert result["preview"] == "x" * 2048
    assert result["truncated"] is True
    small = await make_daemon(server={"socket": str(Path(d.socket).with_name("small.sock")),
                                      "tool_preview_bytes": 64})
    (_, _), (_, result) = tool_events(await streamed(small, wire, "[[tool:Bash:head -c 10000 /dev/zero | tr '\\0' x]]"))
    assert (result["preview"], result["truncated"]) == ("x" * 64, True)
    (_, _), (_, result) = tool_events(await streamed(small, wire, "[[tool:Bash:head -c 64 /dev/zero | tr '\\0' y]]"))
    assert (result["preview"], result["truncated"]) == ("y" * 64, False)  # exactly the bound: whole


@pytest.mark.parametrize("wire", WIRES)
async def test_a_huge_input_is_cut_the_same_way(make_daemon: MakeDaemon, wire: str) -> None:
    d = await make_daemon(server={"tool_preview_bytes": 64})
    command = "echo " + "é" * 500  # 1000 bytes of two-byte characters: the cut falls inside one
    (_, use), (_, result) = tool_events(await streamed(d, wire, f"[[tool:Bash:{command}]]"))
    encoded = orjson.dumps({"command": command})
    assert use["truncated"] is True
    assert isinstance(use["input"], str)
    cut = use["input"].encode()
    assert len(cut) <= 64 and encoded.startswith(cut) and len(cut) >= 63  # whole characters, as many as fit
    assert result["truncated"] is True and len(result["preview"].encode()) <= 64
    small = {"command": "echo small"}
    (_, use), _ = tool_events(await streamed(d, wire, "[[tool:Bash:echo small]]"))
    assert (use["input"], use["truncated"]) == (small, False)


# The tool prints "ab", a byte that is not UTF-8 (the CLI makes it U+FFFD, 3 bytes), then "€" (3
# bytes) and "😀" (4 bytes): 12 bytes of UTF-8 in all. Each bound keeps the whole characters that fit.
UTF8_OUTPUT = "ab\ufffd€😀"
# (The whole table of cuts is in tests/test_stream_items.py; here, bounds inside each character.)
UTF8_CUTS = {4: "ab", 7: "ab\ufffd", 11: "ab\ufffd€"}


@pytest.mark.parametrize("wire", WIRES)
async def test_output_that_is_not_utf8_is_cut_on_a_character_boundary(make_daemon: MakeDaemon, wire: str,
                                                                      tmp_path: Path) -> None:
    command = r"printf 'ab\377\342\202\254\360\237\230\200'"
    for bound, expected in UTF8_CUTS.items():
        d = await make_daemon(server={"socket": str(tmp_path / f"b{bound}.sock"), "tool_preview_bytes": bound})
        (_, _), (_, result) = tool_events(await streamed(d, wire, f"[[tool:Bash:{command}]]"))
        assert result["preview"] == expected, bound
        assert len(result["preview"].encode()) <= bound
        assert result["truncated"] is True
        d.daemon.request_stop()


# -- a client that leaves while a tool runs --------------------------------------------------------


def written(path: Path) -> bool:
    """``path`` holds a line: the shell's redirection creates the file before ``echo`` writes it, and a
    disconnect in between would kill the tool before it told its pid."""
    return path.exists() and path.read_text().endswith("\n")


@pytest.mark.parametrize("wire", WIRES)
async def test_a_stream_that_disconnects_mid_tool_stops_the_tool_and_resets_the_worker(
    make_daemon: MakeDaemon, wire: str, tmp_path: Path
) -> None:
    d = await make_daemon()
    pool = d.pool()
    pid_file = tmp_path / "tool.pid"
    text = f"[[tool:Bash:echo $$ > {pid_file}; sleep 60; echo never]]"
    if wire == "sse":
        async with aiohttp.ClientSession() as session, session.post(
            f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": text, "stream": True}), headers=auth()
        ) as resp:
            assert (await resp.content.readline()).startswith(b"event: tool_use")
            await until(lambda: written(pid_file))
    else:
        async with connect(d) as c:
            await c.send(prompt("r1", text, stream=True))
            assert (await c.next())["event"] == "tool_use"
            await until(lambda: written(pid_file))
    tool_pid = int(pid_file.read_text())
    # The connection is closed mid-tool: the turn is interrupted, the tool killed, and the worker
    # reset, or retired when its interrupted turn does not end in time (the fake CLI, about one run
    # in ten, is late to end it while it reaps the killed tool): either way no one reuses its state.
    await until(lambda: pool.stats.abandoned_turns == 1
                and pool.stats.resets + pool.stats.retired["failed"] >= 1, 10)
    await until(lambda: pid_gone(tool_pid), 10)
    await until(lambda: d.daemon.service.in_flight == 0)
    assert d.requests_by_outcome() == {"cancelled": 1}
    await d.idle()
    events = await streamed(d, wire, "[[tool:Bash:echo after]]")
    assert [kind for kind, _ in tool_events(events)] == ["tool_use", "tool_result"]
    assert events[-1][1]["text"] == "after"


# -- isolation ------------------------------------------------------------------------------------


async def test_another_tenants_concurrent_stream_never_sees_the_tool_calls(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(pool={"max_workers": 4, "min_idle": 2})
    await d.idle(2)
    secret = "ACME-TOOL-SECRET-5521"
    acme_prompt = f"[[tool:Bash:sleep 0.3; echo {secret}]] [[tool:Bash:echo {secret}-2]]"
    beta_prompt = "[[sleep:1.2]] " + "beta's own answer " * 4
    async with connect(d) as c:  # both tenants on one connection too
        await c.send(prompt("a1", acme_prompt, "acme", stream=True), prompt("b1", beta_prompt, "beta", stream=True))
        sse_acme, sse_beta, frames = await asyncio.gather(
            sse_events(d, acme_prompt, "acme"), sse_events(d, beta_prompt, "beta"),
            c.until_terminals("a1", "b1", timeout_s=30))
    for acme, beta in ((sse_acme, sse_beta), ([(f["event"], f) for f in frames["a1"]],
                                              [(f["event"], f) for f in frames["b1"]])):
        assert [kind for kind, _ in tool_events(acme)] == ["tool_use", "tool_result"] * 2
        assert secret in orjson.dumps(acme).decode()
        assert {kind for kind, _ in beta} == {"delta", "result"}
        assert secret not in orjson.dumps(beta).decode()
        assert beta[-1][1]["tenant"] == "beta"
    assert all(f["id"] in ("a1", "b1") for f in c.frames)


# -- what does not change -------------------------------------------------------------------------


async def test_answers_that_are_not_streamed_are_unchanged(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    streamed_events = await sse_events(d, "[[tool:Bash:echo plain]]")
    assert [kind for kind, _ in tool_events(streamed_events)] == ["tool_use", "tool_result"]  # when streamed
    status, body, _ = await post(d.url, {"prompt": "[[tool:Bash:echo plain]]"})
    assert status == 200
    assert set(body) == RESULT_FIELDS
    assert body["text"] == "plain"
    async with connect(d) as c:
        await c.send(prompt("r1", "[[tool:Bash:echo plain]]"))
        frames = (await c.until_terminals("r1"))["r1"]
    assert [f["event"] for f in frames] == ["result"]
    assert set(frames[0]) == FRAME_RESULT_FIELDS
    assert frames[0]["text"] == "plain"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every record at DEBUG too (tests.test_observability's fixture stops at INFO): a tool's input or
    output must reach no log line at any level."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_tool_input_and_output_reach_neither_logs_nor_metrics(make_daemon: MakeDaemon,
                                                                   json_logs: io.StringIO) -> None:
    d = await make_daemon()
    in_secret, out_secret = "TOOL-INPUT-SECRET-9931", "TOOL-OUTPUT-SECRET-4417"
    events = await sse_events(d, f"[[tool:Bash:echo {in_secret} | tr I O; echo {out_secret}]] [[tool:Bash:true]]")
    assert [kind for kind, _ in tool_events(events)] == ["tool_use", "tool_result"] * 2
    assert out_secret in events[1][1]["preview"]  # the stream has them, nothing else does
    await d.idle()
    logged = json_logs.getvalue()
    assert in_secret not in logged and out_secret not in logged and "TOOL-ONPUT" not in logged
    lines = [orjson.loads(line) for line in logged.splitlines()]
    requests = [line for line in lines if line["logger"] == "claudepool.request"]
    assert [(r["outcome"], r["tool_calls"]) for r in requests] == [("ok", 2)]
    metrics = await d.metrics_text()
    assert in_secret not in metrics and out_secret not in metrics


# -- the client and `claudepool run` --------------------------------------------------------------


async def pieces_of(stream: AsyncIterator[Any]) -> list[Any]:
    async with asyncio.timeout(30):
        return [piece async for piece in stream]


@pytest.mark.parametrize("wire", WIRES)
async def test_the_client_yields_tool_calls_as_typed_objects(make_daemon: MakeDaemon, wire: str) -> None:
    d = await make_daemon()
    client = AsyncClient(key=KEYS["acme"], url=d.url) if wire == "sse" else AsyncClient(key=KEYS["acme"],
                                                                                        socket_path=d.socket)
    async with client:
        pieces = await pieces_of(client.stream("[[tool:Bash:echo typed]]"))
    use, result = pieces[0], pieces[1]
    assert isinstance(use, ToolUse) and isinstance(result, ToolResult)
    assert (use.name, use.input, use.truncated) == ("Bash", {"command": "echo typed"}, False)
    assert use.id.startswith("toolu_")
    assert (result.tool_use_id, result.is_error, result.preview, result.truncated) == (use.id, False, "typed", False)
    assert "".join(p for p in pieces if isinstance(p, str)) == "typed"
    assert pieces[-1].text == "typed"


@pytest.mark.parametrize("wire", ["url", "socket"])
async def test_claudepool_run_prints_one_marker_per_tool_call_to_stderr(make_daemon: MakeDaemon, wire: str) -> None:
    d = await make_daemon()
    done = await claudepool("run", *where(d, wire), "--key", KEYS["acme"],
                            "[[tool:Bash:echo one]] [[tool:Bash:echo two]]")
    assert done.code == 0, done.err
    assert done.out == "two\n"  # stdout is the answer alone
    assert done.err.splitlines() == ['[tool] Bash {"command":"echo one"}', '[tool] Bash {"command":"echo two"}']
