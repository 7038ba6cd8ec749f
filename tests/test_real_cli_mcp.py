"""MCP servers per profile on the real CLI (issue 14): a profile's stdio MCP server is started by
its warm workers and kept across leases, its tool reaches the model's tool call through the fake
upstream, and in a sandboxed profile (the default for one with MCP servers) the server runs inside
the worker's sandbox. Without ``mcp_servers`` the same call names a tool that does not exist."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.testing.fake_upstream import FakeUpstream
from tests.conftest import REPO
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
FAKES = REPO / "tests" / "fakes"
ECHO = {"echo": {"command": "/usr/bin/python3", "args": [str(FAKES / "mcp_echo.py")]}}
CALL = '[[tool:mcp__echo__shout:{"text": "hello there"}]]'


async def daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, **profile: Any) -> RunningDaemon:
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"allowed_tools": ["mcp__echo__shout"], "upstream_max_retries": 0, **profile},
                  "lean": {"min_idle": 0}, "other": {"min_idle": 0}})


async def ask(d: RunningDaemon, tenant: str) -> str:
    async with AsyncClient(key=KEYS[tenant], url=d.url) as client:
        return (await client.prompt(CALL, timeout_s=60)).text


async def test_a_profiles_mcp_server_runs_in_its_sandbox_and_stays_warm_across_leases(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, mcp_servers=ECHO, sandbox_read_only=[str(FAKES)])
    assert d.daemon.settings.profile("default").sandboxed  # MCP servers run code: sandboxed by default
    first, second = await ask(d, "acme"), await ask(d, "beta")
    for answer in (first, second):
        assert "HELLO THERE MCP-ECHO" in answer, answer
        # Inside the sandbox: uid 1000 and a handful of processes, not the host's.
        seen = dict(re.findall(r"(\w+)=(\d+)", answer))
        assert seen["uid"] == "1000" and int(seen["procs"]) < 20, answer
    assert re.findall(r"pid=(\d+)", first) == re.findall(r"pid=(\d+)", second)  # one server, kept warm
    tools = [t["name"] for r in upstream.requests if r.path == "/v1/messages"
             for t in orjson.loads(r.body).get("tools", [])]
    assert "mcp__echo__shout" in tools  # the CLI offered the model the server's tool


async def test_without_mcp_servers_the_tool_does_not_exist(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream
) -> None:
    d = await daemon(make_daemon, real_claude, upstream)
    answer = await ask(d, "acme")
    assert "MCP-ECHO" not in answer and "HELLO THERE" not in answer, answer
