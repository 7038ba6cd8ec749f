"""Outbound hosts from inside a real bubblewrap sandbox (issue 13), with the fake CLI's Bash tool:
curl (and bash's /dev/tcp) in the sandbox, the relay at 127.0.0.1:3128, the egress proxy in the
gateway, and loopback listeners the test starts on the host: an HTTP origin and a Redis-like service.

Every refusal has its control: the same command, with the entry that allows it, gets through.
Without ``allowed_hosts`` there is no proxy at all: no variable, no socket, nothing listening."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from claudepool.gateway.egress import EgressMetrics, EgressProxy
from claudepool.pool import sandbox
from claudepool.pool.profile import Profile
from claudepool.testing.fake_upstream import FakeUpstream
from tests.egress_fixtures import Origins, origins
from tests.gateway_fixtures import MakeStack, Stack, lease_for, make_stack
from tests.helpers import collect

__all__ = ["make_stack", "origins"]

# The fake CLI's own source: its shebang names the system's python3, which the sandbox has (/usr);
# the suite's copy names the venv's interpreter, which it has not.
FAKE_CLAUDE = Path(__file__).parent / "fakes" / "fake_claude.py"
# NO_PROXY names the loopback (the gateway's relay stays direct), so a test that reaches its
# loopback origin through the proxy drops it.
CURL = "env -u NO_PROXY -u no_proxy curl -sS --max-time 10"


def profile(allowed_hosts: list[str]) -> Profile:
    return Profile(name="tools", claude_bin=str(FAKE_CLAUDE), tools=("Bash",), allowed_hosts=tuple(allowed_hosts))


async def stack_for(make_stack: MakeStack, upstream: FakeUpstream, allowed_hosts: list[str]) -> Stack:
    registry = CollectorRegistry()
    stack = await make_stack(profile(allowed_hosts), upstream.base_url, key="sk-ant-test", gateway_options={
        "egress": EgressProxy(metrics=EgressMetrics(registry, ["tools"]))})
    stack.registry = registry
    return stack


async def run_tool(stack: Stack, command: str) -> str:
    lease = await lease_for(stack.pool, "acme", "req-egress")
    try:
        _, result = await collect(lease.run_turn(f"[[tool:Bash:{command}]]"), timeout_s=60)
    finally:
        lease.release()
    return result.text


def raw_connect(target: str) -> str:
    """A CONNECT written by hand to the relay, then a PING through the tunnel: what comes back."""
    return ("exec 3<>/dev/tcp/127.0.0.1/3128 && printf 'CONNECT %s HTTP/1.1\\r\\n\\r\\nPING\\r\\n' " + target
            + " >&3 && timeout 2 cat <&3; echo")


def refused(stack: Stack, reason: str) -> float | None:
    return stack.registry.get_sample_value("claudepool_egress_refusals_total", {"profile": "tools", "reason": reason})


@pytest.fixture
def hostname() -> str:
    """A name the system resolver maps to the loopback (this machine's own, in /etc/hosts)."""
    name = socket.gethostname().lower()
    addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    assert addresses and all(a.startswith("127.") for a in addresses), addresses
    return name


async def test_a_listed_origin_is_reached_from_the_sandbox_by_http_and_connect(
    make_stack: MakeStack, upstream: FakeUpstream, origins: Origins
) -> None:
    port = origins.http.port
    stack = await stack_for(make_stack, upstream, [f"localhost:{port}", f"127.0.0.1:{port}"])
    env = await run_tool(stack, "echo $HTTPS_PROXY $http_proxy $NO_PROXY")
    assert env.split() == ["http://127.0.0.1:3128", "http://127.0.0.1:3128", "127.0.0.1,localhost"]
    plain = await run_tool(stack, f"{CURL} -w ' code=%{{http_code}}' http://localhost:{port}/plain 2>&1")
    assert "EGRESS-ORIGIN-OK GET /plain HTTP/1.1" in plain and "code=200" in plain, plain
    tunneled = await run_tool(stack, f"{CURL} -p -w ' connect=%{{http_connect}}' http://127.0.0.1:{port}/tunnel 2>&1")
    assert "EGRESS-ORIGIN-OK GET /tunnel HTTP/1.1" in tunneled and "connect=200" in tunneled, tunneled
    assert origins.http.connections == 2


@pytest.mark.parametrize("listed", [False, True], ids=["unlisted", "listed-negative-control"])
async def test_a_private_service_not_listed_is_refused_from_the_sandbox(
    make_stack: MakeStack, upstream: FakeUpstream, origins: Origins, listed: bool
) -> None:
    # The Redis-like service is on the loopback as the origin is: only the list tells them apart.
    entries = [f"127.0.0.1:{origins.http.port}"] + ([f"127.0.0.1:{origins.redis.port}"] if listed else [])
    stack = await stack_for(make_stack, upstream, entries)
    tunneled = await run_tool(stack, raw_connect(f"127.0.0.1:{origins.redis.port}"))
    plain = await run_tool(stack, f"{CURL} -w ' code=%{{http_code}}' http://127.0.0.1:{origins.redis.port}/ 2>&1")
    if listed:
        assert "200 Connection established" in tunneled and "+PONG-FROM-PRIVATE-SERVICE" in tunneled, tunneled
        assert origins.redis.connections == 2 and refused(stack, "not_allowed") == 0
    else:
        assert "403 Forbidden" in tunneled and "PONG" not in tunneled, tunneled
        assert "not among this profile's allowed_hosts" in plain and "code=403" in plain, plain
        assert origins.redis.connections == 0 and refused(stack, "not_allowed") == 2


@pytest.mark.parametrize("listed_as", ["its-name", "localhost-negative-control"])
async def test_a_name_resolving_to_the_loopback_is_refused_from_the_sandbox(
    make_stack: MakeStack, upstream: FakeUpstream, origins: Origins, hostname: str, listed_as: str
) -> None:
    port = origins.redis.port
    stack = await stack_for(make_stack, upstream, [f"{hostname}:{port}", f"localhost:{port}"])
    answer = await run_tool(stack, raw_connect(f"{hostname if listed_as == 'its-name' else 'localhost'}:{port}"))
    if listed_as == "its-name":
        assert "403 Forbidden" in answer and "resolves to 127.0.0.1" in answer, answer
        assert origins.redis.connections == 0 and refused(stack, "private_address") == 1
    else:
        assert "+PONG-FROM-PRIVATE-SERVICE" in answer and refused(stack, "private_address") == 0


async def test_without_allowed_hosts_there_is_no_proxy_at_all(
    make_stack: MakeStack, upstream: FakeUpstream, origins: Origins
) -> None:
    stack = await stack_for(make_stack, upstream, [])
    answer = await run_tool(
        stack, "echo proxy=${HTTPS_PROXY:-none}; ls /run/claudepool; "
               "(exec 3<>/dev/tcp/127.0.0.1/3128) 2>/dev/null && echo port-open || echo port-closed; "
               f"curl -sS --max-time 5 -x http://127.0.0.1:3128 http://127.0.0.1:{origins.http.port}/ 2>&1; "
               "echo curl-exit=$?")
    assert "proxy=none" in answer and "egress.sock" not in answer and "port-closed" in answer, answer
    assert "curl-exit=7" in answer, answer  # couldn't connect: nothing listens there
    assert stack.gateway is not None and len(stack.gateway.egress) == 0 and origins.http.connections == 0


async def test_a_workers_egress_socket_goes_with_it(
    make_stack: MakeStack, upstream: FakeUpstream, origins: Origins
) -> None:
    stack = await stack_for(make_stack, upstream, [f"127.0.0.1:{origins.http.port}"])
    assert stack.gateway is not None
    egress = stack.gateway.egress
    path = egress.socket_path(stack.pool.workers()[0])
    assert len(egress) == 1 and path is not None and path.is_socket()
    await stack.pool.close()
    assert len(egress) == 0 and egress.open_tunnels() == 0 and not path.exists()


def test_the_command_line_binds_and_relays_the_egress_socket_only_when_there_is_one(tmp_path: Path) -> None:
    base = sandbox.Layout(worker_dir=tmp_path / "w", cli_root=tmp_path / "cli", gateway_socket=tmp_path / "g.sock")
    without = " ".join(sandbox.wrap(["claude"], base, bwrap="bwrap", socat="socat", etc=tmp_path / "etc"))
    assert sandbox.EGRESS_SOCKET not in without and f"TCP-LISTEN:{sandbox.EGRESS_PORT}" not in without
    layout = dataclasses.replace(base, egress_socket=tmp_path / "e.sock")
    argv = sandbox.wrap(["claude"], layout, bwrap="bwrap", socat="socat", etc=tmp_path / "etc")
    joined = " ".join(argv)
    assert f"--bind {tmp_path / 'e.sock'} {sandbox.EGRESS_SOCKET}" in joined
    script = argv[argv.index("-c") + 1]
    assert f"TCP-LISTEN:{sandbox.EGRESS_PORT},bind=127.0.0.1" in script
    assert f"UNIX-CONNECT:{sandbox.EGRESS_SOCKET}" in script
    assert f"TCP-LISTEN:{sandbox.RELAY_PORT},bind=127.0.0.1" in script and argv[-1] == "claude"
    assert sandbox.proxy_env()["NO_PROXY"] == "127.0.0.1,localhost"
