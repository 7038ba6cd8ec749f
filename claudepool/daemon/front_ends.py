"""Binding the front ends: the sockets systemd handed over (socket activation), else those configured.

A Unix socket goes to the socket API (`claudepool.daemon.unix_api`), a TCP socket to HTTP
(`claudepool.daemon.http_api`, behind `claudepool.daemon.http_guard`); ``server.metrics_http``, bound
here alone, to this daemon's own metrics and status (`build_metrics_app`). `FrontEnds.start` returns
once every listener is bound, or raises (`ConfigError` for an address it cannot take) with nothing
left listening; `FrontEnds.close` stops them, after the requests are done or stopped.
"""

from __future__ import annotations

import errno
import os
import socket

from aiohttp import web

from claudepool.config import ServerSettings, host_port
from claudepool.daemon.facade import Api
from claudepool.daemon.http_api import build_app, build_metrics_app
from claudepool.daemon.http_guard import GuardedSockSite, HttpGuard
from claudepool.daemon.listen_fds import inherited_sockets, split_by_kind
from claudepool.daemon.notify import unset_environment
from claudepool.daemon.rlimit import ensure_open_files
from claudepool.daemon.unix_api import UnixFrontEnd
from claudepool.errors import ConfigError
from claudepool.frontdoor.anthropic_api import MessagesApi
from claudepool.jobs.door import JobDoor

# Connections the metrics listener holds at once: a few scrapers and operators, never tenants.
METRICS_MAX_CONNECTIONS = 64


class FrontEnds:
    def __init__(self, runner: web.AppRunner | None, guard: HttpGuard | None, unix: UnixFrontEnd,
                 listening: dict[str, str], sites: list[GuardedSockSite] | None = None) -> None:
        self.metrics_runner: web.AppRunner | None = None
        self.runner = runner
        self.sites = sites or []  # the HTTP listeners
        self.guard = guard  # the HTTP connections and their deadlines (None without HTTP)
        self.unix = unix
        # "http" and "unix" -> where each listens, as printed at start-up.
        self.listening = listening

    @classmethod
    async def start(cls, api: Api, server: ServerSettings, *, shutdown_timeout_s: float,
                    messages: MessagesApi | None = None, jobs: JobDoor | None = None) -> FrontEnds:
        """``messages``: serve the Anthropic front door over HTTP too (the daemon's `Facade` is one)."""
        # Each front end admits max_connections; the metrics listener its own few.
        ensure_open_files(2 * server.max_connections + (METRICS_MAX_CONNECTIONS if server.metrics_http else 0))
        adopted = inherited_sockets()
        # Both the notifier and socket activation have read their variables: no child may see them.
        unset_environment(os.environ)
        unix_socks, inet_socks = split_by_kind(s.sock for s in adopted)
        listening: dict[str, str] = {}
        runner: web.AppRunner | None = None
        guard: HttpGuard | None = None
        sites: list[GuardedSockSite] = []
        if inet_socks or server.http:
            # handler_cancellation: a client that disconnects cancels its handler, which abandons the
            # turn; the pool then interrupts and resets the worker.
            guard = HttpGuard(max_connections=server.max_connections, header_timeout_s=server.header_timeout_s,
                              body_timeout_s=server.body_timeout_s)
            runner = web.AppRunner(build_app(api, guard.middleware(), max_prompt_bytes=server.max_prompt_bytes,
                                             max_input_bytes=server.max_input_bytes,
                                             cors_origins=server.cors_origins, messages=messages,
                                             jobs=jobs),
                                   handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s,
                                   keepalive_timeout=server.keepalive_timeout_s)
            await runner.setup()
            if inet_socks:
                for sock in inet_socks:
                    sites.append(GuardedSockSite(runner, sock, guard, backlog=server.backlog))
                    await sites[-1].start()
                listening["http"] = ", ".join(_address(s) for s in inet_socks)
            else:
                try:
                    sock = _listen(server.http, server, reuse_port=server.reuse_port, shared=True)
                except ConfigError:
                    await runner.cleanup()
                    raise
                sites.append(GuardedSockSite(runner, sock, guard, backlog=server.backlog))
                await sites[-1].start()
                listening["http"] = f"http://{_address(sock)}"
        unix = UnixFrontEnd(api, max_connections=server.max_connections, max_frame_bytes=server.max_frame_bytes,
                            max_requests_per_connection=server.max_requests_per_connection, jobs=jobs)
        front = cls(runner, guard, unix, listening, sites)
        try:
            if server.metrics_http:
                await front._listen_metrics(api, server)
            if unix_socks:
                for sock in unix_socks:
                    await unix.listen("", server.socket_mode, sock=sock, backlog=server.backlog)
                listening["unix"] = ", ".join(_address(s) for s in unix_socks)
            elif server.socket:
                await unix.listen(server.socket, server.socket_mode, backlog=server.backlog)
                listening["unix"] = server.socket
        except BaseException:
            # Do not leave the HTTP port listening behind a daemon that failed to start.
            await front.close(shutdown_timeout_s)
            raise
        return front

    async def _listen_metrics(self, api: Api, server: ServerSettings) -> None:
        guard = HttpGuard(max_connections=METRICS_MAX_CONNECTIONS, header_timeout_s=server.header_timeout_s,
                          body_timeout_s=server.body_timeout_s)
        self.metrics_runner = web.AppRunner(build_metrics_app(api, guard.middleware()), access_log=None,
                                            shutdown_timeout=1.0, keepalive_timeout=server.keepalive_timeout_s)
        await self.metrics_runner.setup()
        sock = _listen(server.metrics_http, server, reuse_port=False, shared=False)
        await GuardedSockSite(self.metrics_runner, sock, guard, backlog=server.backlog).start()
        self.listening["metrics"] = f"http://{_address(sock)}"

    def stop_listening_http(self) -> None:
        """Accept no new HTTP connection; those open go on (each request then gets 503 ``draining``).

        For a daemon that shares its port (``server.reuse_port``): once its listener is closed, the
        kernel sends every new connection to the other daemons on the port."""
        for site in self.sites:
            site.stop_listening()

    async def close(self, timeout_s: float) -> None:
        """Stop listening and close every connection (call once requests are done or stopped)."""
        await self.unix.close(timeout_s)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.metrics_runner is not None:  # last: a draining daemon can still be scraped
            await self.metrics_runner.cleanup()


def _listen(address: str, server: ServerSettings, *, reuse_port: bool, shared: bool) -> socket.socket:
    """A bound, listening, non-blocking socket on ``address``; ``shared``: the port daemons may share,
    whose refusal explains ``server.reuse_port``."""
    host, port = host_port(address)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=server.backlog, reuse_port=reuse_port)
    except OSError as exc:
        hint = _in_use_hint(exc, server) if shared else ""
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}{hint}") from None
    sock.setblocking(False)
    return sock


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name)


def _in_use_hint(exc: OSError, server: ServerSettings) -> str:
    """Why a port is taken and what shares it: SO_REUSEPORT only joins sockets that all set it."""
    if exc.errno != errno.EADDRINUSE:
        return ""
    if server.reuse_port:
        return " (the process holding it did not set SO_REUSEPORT, or runs as another user)"
    return " (to run several daemons on one port, set server.reuse_port = true in every one of them)"
