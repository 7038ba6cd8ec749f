"""Outbound hosts on the real CLI (issue 13): the daemon composed as configured, a tenant's Bash tool
run through the fake upstream's tool directive, curl in the sandbox. The CLI itself is given
``HTTPS_PROXY`` too, and its model calls must still go straight to its gateway relay (``NO_PROXY``):
every answer below is one. A listed origin is reached; the same private service refused on a
profile that does not list it is reached on one that does (the negative control); a profile
without ``allowed_hosts`` has no proxy at all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from claudepool.client import AsyncClient
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.egress_fixtures import Origins, origins

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon", "origins"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
BASH = {"tools": ["Bash"], "allowed_tools": ["Bash"], "upstream_max_retries": 0, "min_idle": 1, "max_workers": 1}
# NO_PROXY names the loopback (so the CLI's gateway stays direct): curl to the test's loopback
# origin through the proxy drops it.
CURL = "env -u NO_PROXY -u no_proxy curl -sS --max-time 10"


async def run_tool(d: RunningDaemon, command: str, profile: str) -> str:
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        answer = await client.prompt(f"[[tool:Bash:{command}]]", profile=profile, timeout_s=60)
    return answer.text


async def test_a_sandboxed_tool_reaches_exactly_the_hosts_its_profile_lists(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, origins: Origins, tmp_path: Path
) -> None:
    http, redis = origins.http.port, origins.redis.port
    d = await make_daemon(
        pool={"claude_bin": real_claude, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {**BASH, "allowed_hosts": [f"127.0.0.1:{http}"]},
                  "cache": {**BASH, "allowed_hosts": [f"127.0.0.1:{http}", f"127.0.0.1:{redis}"]},
                  "closed": BASH, "lean": {"min_idle": 0}, "other": {"min_idle": 0}},
        tenants={"acme": {"profiles": ["default", "cache", "closed"]}})
    fetch = f"{CURL} -w ' code=%{{http_code}}' http://127.0.0.1:{http}/from-the-cli 2>&1"
    reached = await run_tool(d, fetch, "default")
    assert "EGRESS-ORIGIN-OK GET /from-the-cli HTTP/1.1" in reached and "code=200" in reached, reached

    # The Redis-like service: refused where it is not listed, reached (PONG) where it is.
    ping = (f"exec 3<>/dev/tcp/127.0.0.1/3128 && printf 'CONNECT 127.0.0.1:{redis} HTTP/1.1\\r\\n\\r\\nPING\\r\\n' "
            ">&3 && timeout 2 cat <&3; echo")
    refused = await run_tool(d, ping, "default")
    assert "403 Forbidden" in refused and "PONG" not in refused, refused
    assert d.sample("claudepool_egress_refusals_total", profile="default", reason="not_allowed") == 1
    listed = await run_tool(d, ping, "cache")
    assert "+PONG-FROM-PRIVATE-SERVICE" in listed, listed
    assert d.sample("claudepool_egress_refusals_total", profile="cache", reason="not_allowed") == 0
    assert origins.redis.connections == 1
    assert d.sample("claudepool_egress_tunnels_total", profile="default", kind="http") == 1
    assert d.sample("claudepool_egress_tunnels_total", profile="cache", kind="connect") == 1

    # No allowed_hosts: no proxy variable, no socket, nothing on the port.
    direct = fetch.replace(CURL, CURL + " -x 127.0.0.1:3128")  # the proxy named, not only in the environment
    closed = await run_tool(d, f"echo proxy=${{HTTPS_PROXY:-none}}; ls /run/claudepool; {direct}; echo curl-exit=$?",
                            "closed")
    assert "proxy=none" in closed and "egress.sock" not in closed and "curl-exit=7" in closed, closed
    assert origins.http.connections == 1
