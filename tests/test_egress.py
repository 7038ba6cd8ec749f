"""The egress proxy on real sockets, without a sandbox (issue 13): what it lets through, what it
refuses and counts, and its bounds. Each refusal has its control: the same request with the entry
that allows it gets through, so the refusal comes from the check and not from an unreachable origin.
The sandbox's side (the relay, the variables, no proxy without an allow-list) is tested on the fake
CLI in tests/test_sandbox_egress.py and on the real CLI in tests/test_real_cli_egress.py."""

from __future__ import annotations

import asyncio
import doctest
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from claudepool.gateway import egress as egress_module
from claudepool.gateway.egress import EgressMetrics, EgressProxy
from claudepool.gateway.settings import EgressSettings
from claudepool.pool import hosts
from claudepool.pool.hosts import IPAddress
from claudepool.pool.profile import Profile
from claudepool.pool.worker import Worker
from tests.egress_fixtures import Origins, origins
from tests.helpers import until

__all__ = ["origins"]

PROFILE = "tools"


class FakeWorker:
    """What the proxy reads of a worker: its profile (only its identity matters otherwise)."""

    def __init__(self, allowed_hosts: list[str]) -> None:
        self.profile = Profile(name=PROFILE, tools=("Bash",), allowed_hosts=tuple(allowed_hosts))


async def resolve_fixed(host: str, port: int) -> list[IPAddress]:
    """The system's resolver, but ``redis.internal.example`` points at the loopback (as a DNS record
    an attacker controls would)."""
    if host == "redis.internal.example":
        return [ipaddress.ip_address("127.0.0.1")]
    return await egress_module.system_resolve(host, port)


class Harness:
    def __init__(self, **settings: float) -> None:
        self.registry = CollectorRegistry()
        self.proxy = EgressProxy(EgressSettings(**settings), metrics=EgressMetrics(self.registry, [PROFILE]),
                                 resolve=resolve_fixed)
        self.proxy.start()

    async def open(self, allowed_hosts: list[str]) -> tuple[Worker, Path]:
        worker = cast(Worker, FakeWorker(allowed_hosts))
        path = await self.proxy.open(worker)
        assert path is not None
        return worker, path

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"profile": PROFILE, **labels})

    def refused(self, reason: str) -> float | None:
        return self.sample("claudepool_egress_refusals_total", reason=reason)


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**settings: float) -> Harness:
        made.append(Harness(**settings))
        return made[-1]

    yield make
    for h in made:
        await h.proxy.close_all()


PONG = b"+PONG-FROM-PRIVATE-SERVICE\r\n"


async def exchange(path: Path, request: bytes, then: bytes = b"") -> bytes:
    """Send ``request`` (and, once answered 200, ``then`` through the tunnel); everything read until
    EOF, or until the private service answered (it never closes)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        async with asyncio.timeout(10):
            writer.write(request)
            if request.startswith(b"GET http://127.0.0.1") and not then:
                first = await reader.read(4096)
                done = first.startswith(b"HTTP/1.1 4") or PONG in first
                return first if done else first + await reader.readuntil(PONG)
            if then:
                answer = await reader.readuntil(b"\r\n\r\n")
                if not answer.startswith(b"HTTP/1.1 200"):
                    return answer + await reader.read()
                writer.write(then)
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write_eof()  # the origin keeps the connection until its client is done
                return answer + await reader.read()
            return await reader.read()
    finally:
        writer.close()


def get(host: str) -> bytes:
    return f"GET http://{host}/x?y=1 HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n".encode()


def connect(host: str) -> bytes:
    return f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


# -- the allow-list's entries -----------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "canonical"), [
    ("pypi.org", "pypi.org"), ("PyPI.org:443", "pypi.org:443"), ("*.githubusercontent.com", "*.githubusercontent.com"),
    ("127.0.0.1:6379", "127.0.0.1:6379"), ("[::1]:8080", "[::1]:8080"), ("localhost", "localhost"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_an_entry_is_kept_in_its_canonical_spelling(entry: str, canonical: str) -> None:
    assert str(hosts.parse_entry(entry)) == canonical
    assert Profile(tools=("Bash",), allowed_hosts=(entry,)).allowed_hosts == (canonical,)


@pytest.mark.parametrize("entry", [
    "", " pypi.org", "https://pypi.org", "pypi.org/simple", "user@pypi.org", "pypi.org:0", "pypi.org:65536",
    "pypi.org:http", "*", "*.com", "a.*.example.com", "*.127.0.0.1", "::1", "[::1", "exa_mple.com", "-a.example.com",
    "pypi.org.", "bücher.example", "a" * 64 + ".example.com",
])
def test_a_malformed_entry_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"port|entry|wildcard|host name|IPv6|trailing dot"):
        hosts.parse_entry(entry)
    with pytest.raises(ValueError, match="allowed_hosts"):
        Profile(tools=("Bash",), allowed_hosts=(entry,))


def test_allowed_hosts_needs_the_sandbox() -> None:
    with pytest.raises(ValueError, match="allowed_hosts needs the sandbox"):
        Profile(tools=("Bash",), sandbox=False, allowed_hosts=("pypi.org",))
    with pytest.raises(ValueError, match="allowed_hosts needs the sandbox"):
        Profile(allowed_hosts=("pypi.org",))  # no tools: not sandboxed


def test_matching_is_on_the_name_asked_and_a_port_less_entry_allows_the_web_ports() -> None:
    allow = hosts.AllowList.of(["pypi.org", "*.example.com:8443", "10.1.2.3:5432"])
    assert allow.match("PYPI.ORG.", 443) and allow.match("pypi.org", 80)
    assert not allow.match("pypi.org", 22) and not allow.match("evil-pypi.org", 443)
    assert allow.match("a.b.example.com", 8443) and not allow.match("example.com", 8443)
    assert not allow.match("a.example.com", 443)
    assert allow.match("10.1.2.3", 5432) and not allow.match("10.1.2.4", 5432)


@pytest.mark.parametrize(("address", "allowed"), [
    ("151.101.0.223", True), ("2a04:4e42::223", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fd00::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:151.101.0.223", True),
])
def test_a_name_reaches_public_addresses_only(address: str, allowed: bool) -> None:
    rule = hosts.parse_entry("pypi.org")
    assert hosts.address_allowed(rule, ipaddress.ip_address(address)) is allowed


def test_an_entry_naming_an_address_or_localhost_reaches_exactly_that() -> None:
    ip = ipaddress.ip_address
    assert hosts.address_allowed(hosts.parse_entry("127.0.0.1:6379"), ip("127.0.0.1"))
    assert not hosts.address_allowed(hosts.parse_entry("127.0.0.1:6379"), ip("127.0.0.2"))
    assert hosts.address_allowed(hosts.parse_entry("localhost:6379"), ip("::1"))
    assert not hosts.address_allowed(hosts.parse_entry("localhost:6379"), ip("10.0.0.1"))


def test_the_usage_examples_in_docstrings_run() -> None:
    for module in (hosts, egress_module):
        result = doctest.testmod(module)
        assert (result.attempted > 0, result.failed) == (True, 0)


# -- the proxy ------------------------------------------------------------------------------------


async def test_a_listed_host_is_reached_by_connect_and_by_plain_http(
    harness: Callable[..., Harness], origins: Origins
) -> None:
    h = harness()
    _, path = await h.open([f"127.0.0.1:{origins.http.port}", f"localhost:{origins.http.port}"])
    tunneled = await exchange(path, connect(f"127.0.0.1:{origins.http.port}"), then=b"GET /t HTTP/1.1\r\n\r\n")
    assert tunneled.startswith(b"HTTP/1.1 200 Connection established") and b"EGRESS-ORIGIN-OK GET /t" in tunneled
    plain = await exchange(path, get(f"localhost:{origins.http.port}"))
    assert b"EGRESS-ORIGIN-OK GET /x?y=1 HTTP/1.1" in plain
    # In origin form, with the checked Host, Connection: close, and no Proxy-* header passed on.
    head = origins.http.heads[-1]
    assert f"Host: localhost:{origins.http.port}\r\n".encode() in head and b"Connection: close" in head
    assert b"Proxy-Authorization" not in head
    assert h.sample("claudepool_egress_tunnels_total", kind="connect") == 1
    assert h.sample("claudepool_egress_tunnels_total", kind="http") == 1
    assert (h.sample("claudepool_egress_bytes_total", direction="out") or 0) > 0
    assert (h.sample("claudepool_egress_bytes_total", direction="in") or 0) > len(tunneled)
    assert sum(h.refused(r) or 0 for r in egress_module.REFUSAL_REASONS) == 0


@pytest.mark.parametrize("listed", [False, True], ids=["unlisted", "listed-negative-control"])
@pytest.mark.parametrize("kind", ["connect", "http"])
async def test_a_host_not_listed_is_refused(
    harness: Callable[..., Harness], origins: Origins, listed: bool, kind: str
) -> None:
    # The private service's port is on the loopback as the origin's is; only the list tells them apart.
    h = harness()
    entries = [f"127.0.0.1:{origins.http.port}"] + ([f"127.0.0.1:{origins.redis.port}"] if listed else [])
    _, path = await h.open(entries)
    target = f"127.0.0.1:{origins.redis.port}"
    answer = await exchange(path, connect(target), then=b"PING\r\n") if kind == "connect" else \
        await exchange(path, get(target))
    if listed:
        assert b"+PONG-FROM-PRIVATE-SERVICE" in answer and origins.redis.connections == 1
        assert h.refused("not_allowed") == 0
    else:
        assert answer.startswith(b"HTTP/1.1 403 Forbidden"), answer
        assert b"not among this profile's allowed_hosts" in answer
        assert origins.redis.connections == 0 and h.refused("not_allowed") == 1


@pytest.mark.parametrize("listed_as", ["name", "localhost-negative-control"])
async def test_a_name_that_resolves_to_the_loopback_is_refused_unless_listed_as_such(
    harness: Callable[..., Harness], origins: Origins, listed_as: str
) -> None:
    h = harness()
    port = origins.redis.port
    _, path = await h.open([f"redis.internal.example:{port}", f"localhost:{port}"])
    name = "redis.internal.example" if listed_as == "name" else "localhost"
    answer = await exchange(path, connect(f"{name}:{port}"), then=b"PING\r\n")
    if listed_as == "name":
        assert answer.startswith(b"HTTP/1.1 403"), answer
        assert b"resolves to 127.0.0.1" in answer and origins.redis.connections == 0
        assert h.refused("private_address") == 1
    else:
        assert b"+PONG-FROM-PRIVATE-SERVICE" in answer and h.refused("private_address") == 0


async def test_the_machines_own_name_resolving_to_the_loopback_is_refused(
    harness: Callable[..., Harness], origins: Origins
) -> None:
    # A name the system resolver itself maps to the loopback (/etc/hosts), nothing injected.
    name = socket.gethostname().lower()
    resolved = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    assert any(ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(a).is_private for a in resolved), resolved
    h = harness()
    _, path = await h.open([f"{name}:{origins.redis.port}"])
    answer = await exchange(path, get(f"{name}:{origins.redis.port}"))
    assert answer.startswith(b"HTTP/1.1 403") and origins.redis.connections == 0
    assert h.refused("private_address") == 1


@pytest.mark.parametrize(("request_bytes", "status", "reason"), [
    (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"GET /relative HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"CONNECT bad_host!:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"GET http://user:pw@pypi.org/ HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"GET http://pypi.org/ HTTP/1.1\r\n folded: header\r\n\r\n", 400, "bad_request"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", 400, "bad_request"),
    (b"GET http://pypi.org/ HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n", 431, "head_too_large"),
])
async def test_a_request_it_does_not_serve_is_refused(
    harness: Callable[..., Harness], request_bytes: bytes, status: int, reason: str
) -> None:
    h = harness()
    _, path = await h.open(["pypi.org"])
    answer = await exchange(path, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert h.refused(reason) == 1


async def test_a_head_that_trickles_is_cut(harness: Callable[..., Harness]) -> None:
    h = harness(head_timeout_s=0.3)
    _, path = await h.open(["pypi.org"])
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"CONNECT pypi.org:443 HTTP/1.1\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 504") and h.refused("timeout") == 1


async def test_the_tunnels_of_a_worker_are_bounded_and_idle_ones_are_closed(
    harness: Callable[..., Harness], origins: Origins
) -> None:
    h = harness(max_tunnels=2, idle_timeout_s=1.0)
    worker, path = await h.open([f"127.0.0.1:{origins.redis.port}"])
    opened = []
    for _ in range(2):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(connect(f"127.0.0.1:{origins.redis.port}"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        opened.append((reader, writer))
    third = await exchange(path, connect(f"127.0.0.1:{origins.redis.port}"))
    assert third.startswith(b"HTTP/1.1 429") and h.refused("too_many_tunnels") == 1
    await until(lambda: h.proxy.open_tunnels(worker) == 2)  # the refused one's lingering close is over
    assert h.registry.get_sample_value("claudepool_egress_open_tunnels") == 2
    # One keeps talking, the other says nothing: the quiet one is closed after the idle timeout.
    (quiet_reader, _), (busy_reader, busy_writer) = opened
    async with asyncio.timeout(10):
        for _ in range(6):
            busy_writer.write(b"PING\r\n")
            assert await busy_reader.readline() == b"+PONG-FROM-PRIVATE-SERVICE\r\n"
            await asyncio.sleep(0.3)
        assert quiet_reader.at_eof() or await quiet_reader.read() == b""
    assert not busy_reader.at_eof() and h.proxy.open_tunnels(worker) == 1
    for _, writer in opened:
        writer.close()


async def test_closing_a_worker_removes_its_socket_and_ends_its_tunnels(
    harness: Callable[..., Harness], origins: Origins
) -> None:
    h = harness()
    worker, path = await h.open([f"127.0.0.1:{origins.redis.port}"])
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(connect(f"127.0.0.1:{origins.redis.port}") + b"PING\r\n")
    async with asyncio.timeout(10):
        await reader.readuntil(b"+PONG-FROM-PRIVATE-SERVICE\r\n")
        origins.redis.closed.clear()
        h.proxy.close(worker)
        assert await reader.read() == b""  # the tunnel ended from the proxy's side
        await origins.redis.closed.wait()  # and so did its connection to the origin
    writer.close()
    assert not path.exists() and h.proxy.open_tunnels() == 0 and len(h.proxy) == 0
    with pytest.raises(FileNotFoundError):
        await asyncio.open_unix_connection(str(path))


async def test_a_worker_whose_profile_allows_no_host_gets_no_socket(harness: Callable[..., Harness]) -> None:
    h = harness()
    assert await h.proxy.open(cast(Worker, FakeWorker([]))) is None and len(h.proxy) == 0
