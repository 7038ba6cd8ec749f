"""The egress proxy: a sandboxed worker's one way to the outbound hosts its profile allows.

A sandboxed worker has no network (`claudepool.pool.sandbox`). When its profile lists
``allowed_hosts``, the daemon opens a Unix socket for that worker alone (as the gateway does,
`claudepool.gateway.sockets`), bind-mounted into the sandbox, where socat relays
``127.0.0.1:3128`` to it and ``HTTPS_PROXY``/``HTTP_PROXY`` name that port. On it this module speaks
just enough HTTP proxy for curl, pip, npm, git and the CLI's own tools:

* ``CONNECT host:port`` (HTTPS, or any TCP): a ``200`` and then a byte tunnel;
* a request with an absolute ``http://`` URI: sent on to its origin in origin form, with
  ``Connection: close`` and the ``Proxy-*`` headers dropped, and the answer relayed back. A
  connection has one target: whatever else the client sends on it goes to that same origin.

Each is checked first, and refused with a status line and a short text at the first check it fails,
counted in ``claudepool_egress_refusals_total{profile,reason}`` (reasons: the ``reason`` of each
`claudepool.errors.EgressError`):

1. room for one more connection of this worker's (``egress.max_tunnels``; 429);
2. a head within ``egress.max_head_bytes`` (431), arrived within ``egress.head_timeout_s``, that
   is a request this proxy serves (400);
3. the host and port *as asked* match an entry of the profile (403 ``not_allowed``);
4. every address the name resolves to passes `claudepool.pool.hosts.address_allowed` (403
   ``private_address``: a DNS name cannot lead to the daemon's Redis or a metadata service);
5. a connection to one of those very addresses (not a second lookup: no DNS rebinding) within
   ``egress.connect_timeout_s`` (502, or 504).

A tunnel ends when both sides have closed, when no byte went either way for
``egress.idle_timeout_s``, or when its worker closes: closing a worker's socket ends its tunnels.

Written on asyncio streams, not on a proxy library: pproxy and proxy.py are whole proxy servers with
their own rule languages, neither lets the check run between the resolution and the connect to the
checked address, and neither is bound to one listener per worker; aiohttp's server cannot hand over
a CONNECT's socket. What is left is a request head to parse, which is small.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from claudepool.errors import (
    EgressBadRequest,
    EgressError,
    EgressHeadTooLarge,
    EgressPrivateAddress,
    EgressRefused,
    EgressTimeout,
    EgressTooManyTunnels,
)
from claudepool.gateway.settings import EgressSettings
from claudepool.pool.hosts import AllowList, IPAddress, address_allowed, normalise_host, split_host_port
from claudepool.pool.worker import Worker

REFUSAL_REASONS = tuple(e.reason for e in (EgressRefused, EgressPrivateAddress, EgressBadRequest, EgressHeadTooLarge,
                                           EgressTooManyTunnels, EgressTimeout, EgressError))
KINDS = ("connect", "http")
_CHUNK_BYTES = 64 * 1024
_LINGER_S = 1.0
_REQUEST_LINE = re.compile(r"^([A-Z]{1,20}) (\S{1,8000}) HTTP/1\.[01]$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Not passed on to the origin: about the hop to the proxy, or a connection the proxy decides.
_HOP_HEADERS = frozenset({"proxy-connection", "proxy-authorization", "connection", "keep-alive", "te", "trailer",
                          "upgrade"})
_PHRASES = {400: "Bad Request", 403: "Forbidden", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 504: "Gateway Timeout"}
_names = itertools.count(1)
log = logging.getLogger(__name__)

# A name and port to the addresses it resolves to (the default asks the system's resolver).
Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]


async def system_resolve(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


class EgressMetrics:
    """Refusals by profile and reason, connections made by profile and kind, bytes relayed by
    profile and direction (``out``: from the worker), and (at scrape time) the tunnels open now.
    ``profile`` is a pool's name: configured, so bounded; no host, tenant or worker is a label."""

    def __init__(self, registry: CollectorRegistry, profiles: Iterable[str] = ()) -> None:
        r = registry
        self.refusals = Counter("claudepool_egress_refusals", "Outbound connections the egress proxy refused or "
                                "could not make, by profile and reason.", ["profile", "reason"], registry=r)
        self.tunnels = Counter("claudepool_egress_tunnels", "Outbound connections the egress proxy made, by profile "
                               "and kind (connect: a CONNECT tunnel; http: a plain HTTP request).",
                               ["profile", "kind"], registry=r)
        self.bytes = Counter("claudepool_egress_bytes", "Bytes the egress proxy relayed, by profile and direction "
                             "(out: from the worker).", ["profile", "direction"], registry=r)
        for profile in sorted(set(profiles)):
            for reason in REFUSAL_REASONS:
                self.refusals.labels(profile, reason)
            for kind in KINDS:
                self.tunnels.labels(profile, kind)
            for direction in ("out", "in"):
                self.bytes.labels(profile, direction)
        # Read from the proxy at scrape time (`EgressProxy` sets the function).
        self.open_tunnels = Gauge("claudepool_egress_open_tunnels",
                                  "Connections open through the egress proxy now, all workers.", registry=r)


@dataclass(frozen=True)
class Target:
    """What a request asks the proxy for; ``head`` is what goes to the origin first (plain HTTP)."""

    kind: str  # "connect" or "http"
    host: str
    port: int
    head: bytes = b""


@dataclass(eq=False)
class _Listener:
    profile: str
    allow: AllowList
    path: Path
    server: asyncio.AbstractServer | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False


class EgressProxy:
    """The per-worker egress sockets and their connections (see the module's docstring).

    >>> async def demo(worker):                                # doctest: +SKIP
    ...     proxy = EgressProxy(EgressSettings())
    ...     proxy.start()
    ...     path = await proxy.open(worker)   # None when its profile allows no host
    ...     ...
    ...     proxy.close(worker)               # its socket and every tunnel of it are gone
    """

    def __init__(self, settings: EgressSettings | None = None, *, metrics: EgressMetrics | None = None,
                 resolve: Resolve | None = None) -> None:
        self.settings = settings or EgressSettings()
        self.metrics = metrics
        self._resolve = resolve or system_resolve
        self._dir: Path | None = None
        self._listeners: dict[Worker, _Listener] = {}
        if metrics is not None:
            metrics.open_tunnels.set_function(self.open_tunnels)

    def __repr__(self) -> str:
        return f"<EgressProxy {len(self._listeners)} sockets, {self.open_tunnels()} tunnels>"

    def __len__(self) -> int:
        return len(self._listeners)

    def open_tunnels(self, worker: Worker | None = None) -> int:
        """Connections being served now: ``worker``'s, or all workers'."""
        if worker is not None:
            listener = self._listeners.get(worker)
            return len(listener.tasks) if listener is not None else 0
        return sum(len(listener.tasks) for listener in self._listeners.values())

    def socket_path(self, worker: Worker) -> Path | None:
        """The host path of ``worker``'s egress socket, while it has one."""
        listener = self._listeners.get(worker)
        return listener.path if listener is not None else None

    def start(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="claudepool-eg-"))  # 0700, short: a socket path is short

    async def open(self, worker: Worker) -> Path | None:
        """A new egress socket for ``worker`` (replacing any it had), its host path; None when its
        profile allows no host (then there is no socket, and nothing in its sandbox listens)."""
        if self._dir is None:
            raise RuntimeError("the egress proxy is not started")
        self.close(worker)
        allow = AllowList.of(worker.profile.allowed_hosts)
        if not allow:
            return None
        listener = _Listener(worker.profile.label, allow, self._dir / f"{next(_names)}.sock")
        listener.server = await asyncio.start_unix_server(
            lambda r, w: self._accept(listener, r, w), str(listener.path), limit=self.settings.max_head_bytes)
        os.chmod(listener.path, 0o600)
        self._listeners[worker] = listener
        return listener.path

    def close(self, worker: Worker) -> None:
        """Stop accepting on ``worker``'s socket, remove it and end its tunnels; idempotent."""
        listener = self._listeners.pop(worker, None)
        if listener is None:
            return
        listener.closed = True
        if listener.server is not None:
            listener.server.close()
        for task in list(listener.tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            listener.path.unlink()

    async def close_all(self, timeout_s: float = 5.0) -> None:
        """Close every worker's socket and tunnel; wait (at most ``timeout_s``) until they are done."""
        tasks = [task for listener in self._listeners.values() for task in listener.tasks]
        for worker in list(self._listeners):
            self.close(worker)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- one connection -----------------------------------------------------------------------------

    def _accept(self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of the proxy's own per connection (not asyncio's for a coroutine callback, which
        # reports its cancellation as an error): closing the worker cancels them.
        if listener.closed:
            writer.transport.abort()
            return
        full = len(listener.tasks) >= self.settings.max_tunnels
        task = asyncio.get_running_loop().create_task(self._serve(listener, reader, writer, full))
        listener.tasks.add(task)
        task.add_done_callback(lambda done: self._served(listener, done))

    @staticmethod
    def _served(listener: _Listener, task: asyncio.Task[None]) -> None:
        listener.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("egress connection failed", exc_info=task.exception())

    async def _serve(self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     full: bool) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                if full:
                    raise EgressTooManyTunnels(f"this worker has {self.settings.max_tunnels} connections open already")
                target = await self._read_target(reader)
                upstream_reader, upstream_writer = await self._connect(listener, target)
            except EgressError as exc:
                self._count_refusal(listener, exc)
                await _refuse(reader, writer, exc)
                return
            if self.metrics is not None:
                self.metrics.tunnels.labels(listener.profile, target.kind).inc()
            if target.kind == "connect":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_writer.write(target.head)
            await self._relay(listener, reader, writer, upstream_reader, upstream_writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # either side went away
        finally:
            # At once, cancelled or not (every write was drained: nothing owed is dropped).
            writer.transport.abort()
            if upstream_writer is not None:
                upstream_writer.transport.abort()

    async def _read_target(self, reader: asyncio.StreamReader) -> Target:
        try:
            async with asyncio.timeout(self.settings.head_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise EgressHeadTooLarge(f"the request's head is over {self.settings.max_head_bytes} bytes") from None
        except TimeoutError:
            raise EgressTimeout(f"no whole request head within {self.settings.head_timeout_s:g} s") from None
        return parse_request(head)

    async def _connect(self, listener: _Listener, target: Target) -> tuple[asyncio.StreamReader,
                                                                            asyncio.StreamWriter]:
        rule = listener.allow.match(target.host, target.port)
        if rule is None:
            raise EgressRefused(f"{target.host}:{target.port} is not among this profile's allowed_hosts")
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                addresses = await self._resolve(target.host, target.port)
                refused = [str(a) for a in addresses if not address_allowed(rule, a)]
                if refused or not addresses:
                    raise EgressPrivateAddress(
                        f"{target.host} resolves to {', '.join(refused) or 'nothing'}: a loopback, link-local or "
                        f"private address is reached only by an entry that names it (the entry matched: {rule})")
                failure: OSError | None = None
                for address in addresses:
                    try:
                        return await asyncio.open_connection(str(address), target.port, limit=_CHUNK_BYTES)
                    except OSError as exc:
                        failure = exc
                raise EgressError(f"cannot connect to {target.host}:{target.port}: "
                                  f"{failure.strerror if failure else 'no address'}")
        except TimeoutError:
            raise EgressTimeout(f"{target.host}:{target.port} not connected within "
                                f"{self.settings.connect_timeout_s:g} s") from None
        except OSError as exc:  # resolution failed (socket.gaierror)
            raise EgressError(f"cannot resolve {target.host}: {exc.strerror or exc}") from None

    async def _relay(self, listener: _Listener, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter, upstream_reader: asyncio.StreamReader,
                     upstream_writer: asyncio.StreamWriter) -> None:
        """Bytes both ways until both sides are done, or none moved for the idle timeout."""
        loop = asyncio.get_running_loop()
        last_activity = [loop.time()]
        counted = (self.metrics.bytes.labels(listener.profile, "out"), self.metrics.bytes.labels(listener.profile, "in")
                   ) if self.metrics is not None else None

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, direction: int) -> None:
            while chunk := await source.read(_CHUNK_BYTES):
                last_activity[0] = loop.time()
                sink.write(chunk)
                if counted is not None:
                    counted[direction].inc(len(chunk))
                await sink.drain()
            if sink.can_write_eof():  # a half-close passes on: the other way may still have bytes to send
                sink.write_eof()

        pumps = {asyncio.create_task(pump(client_reader, upstream_writer, 0)),
                 asyncio.create_task(pump(upstream_reader, client_writer, 1))}
        try:
            while pumps:
                idle_left_s = last_activity[0] + self.settings.idle_timeout_s - loop.time()
                if idle_left_s <= 0:
                    return
                done, pumps = await asyncio.wait(pumps, timeout=idle_left_s, return_when=asyncio.FIRST_COMPLETED)
                if any(not task.cancelled() and task.exception() is not None for task in done):
                    return  # a reset on either side ends the tunnel
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def _count_refusal(self, listener: _Listener, exc: EgressError) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(listener.profile, exc.reason).inc()


def parse_request(head: bytes) -> Target:
    """A proxy request's head (up to and with its blank line) as a `Target`; `EgressBadRequest`.

    >>> parse_request(b"CONNECT pypi.org:443 HTTP/1.1\\r\\nHost: pypi.org:443\\r\\n\\r\\n")
    Target(kind='connect', host='pypi.org', port=443, head=b'')
    >>> parse_request(b"GET http://Example.com/a?b HTTP/1.1\\r\\nHost: x\\r\\nProxy-Connection: close\\r\\n\\r\\n").head
    b'GET /a?b HTTP/1.1\\r\\nHost: Example.com\\r\\nConnection: close\\r\\n\\r\\n'
    """
    lines = head.decode("latin-1").split("\r\n")[:-2]
    matched = _REQUEST_LINE.match(lines[0]) if lines else None
    if matched is None:
        raise EgressBadRequest("not an HTTP/1.x request line")
    method, target = matched.groups()
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.match(name) or any(c in line for c in "\r\n\0"):
            raise EgressBadRequest("a malformed header line")
        headers.append((name, value.strip()))
    try:
        if method == "CONNECT":
            host, port = split_host_port(target)
            if port is None:
                raise ValueError("CONNECT needs host:port")
            return Target("connect", normalise_host(host), port)
        parts = urllib.parse.urlsplit(target)
        if parts.scheme.lower() != "http" or not parts.hostname or "@" in parts.netloc or parts.fragment:
            raise ValueError("a proxied request names an absolute http:// URI (use CONNECT for https)")
        host, port = normalise_host(parts.hostname), parts.port or 80
    except ValueError as exc:
        raise EgressBadRequest(str(exc)) from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The Host the origin sees is the one that was checked (RFC 9112: a proxy replaces it with the URI's).
    kept = [("Host", parts.netloc), *((n, v) for n, v in headers if n.lower() not in {*_HOP_HEADERS, "host"})]
    out = [f"{method} {path} HTTP/1.1", *(f"{n}: {v}" for n, v in kept), "Connection: close", "", ""]
    return Target("http", host, port, "\r\n".join(out).encode("latin-1"))


def _status_response(exc: EgressError) -> bytes:
    body = f"claudepool egress: {exc}\n".encode("utf-8", errors="replace")
    phrase = _PHRASES.get(exc.status, "Error")
    return (f"HTTP/1.1 {exc.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: EgressError) -> None:
    """Answer ``exc``, then a lingering close: bytes the client sent that were never read would
    reset the connection before the client read the answer."""
    with contextlib.suppress(ConnectionError, TimeoutError, asyncio.LimitOverrunError, ValueError):
        writer.write(_status_response(exc))
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(_LINGER_S):
            while await reader.read(_CHUNK_BYTES):
                pass
