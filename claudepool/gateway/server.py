"""The gateway: an Anthropic-Messages-compatible endpoint that only the daemon's workers can use.

Every worker's ``ANTHROPIC_BASE_URL`` points here and its ``ANTHROPIC_API_KEY`` is a credential of
its own (`claudepool.gateway.credentials`). A call is checked in this order, and refused with the
provider's own error format at the first check it fails (and counted by reason):

1. a credential the gateway issued to a live worker (401 ``authentication_error``), on that
   worker's own socket when it is sandboxed (403 ``permission_error``; `claudepool.gateway.sockets`);
2. an endpoint the CLI needs: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` (404
   ``not_found_error``; the CLI 2.1.328 with the daemon's quiet environment calls nothing else);
3. the worker serves a request (its pool's lease) and runs a turn (403 ``permission_error``);
4. a body within ``upstream.max_request_bytes`` (413 ``request_too_large``);
5. room in the tenant's budget for the call, its ``max_tokens`` lowered to fit under a strict budget
   (402 ``billing_error``, which the CLI does not retry; `claudepool.gateway.budget`);
6. room under the account's caps for the call's priority (429 ``rate_limit_error`` with
   ``retry-after``, which the CLI waits out and retries; `claudepool.gateway.caps`).

Then the call is attributed to that request (`claudepool.gateway.attribution`), forwarded to the
upstream of the worker's pool with the upstream's credential (`claudepool.gateway.forward`), and
relayed back byte for byte, every chunk seen by the hooks (`claudepool.gateway.calls`).

The listener is pluggable (`Listener`): loopback TCP on an ephemeral port for unsandboxed workers;
each sandboxed worker also gets a Unix socket of its own, accepted with the same handler.

>>> async def demo(pools, upstream):                          # doctest: +SKIP
...     credentials = CredentialRegistry()
...     gateway = Gateway(credentials, from_leases(pools), {"default": upstream})
...     await gateway.start()             # workers may start now: credentials.base_url is set
...     ...
...     await gateway.close(5.0)
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web

from claudepool.errors import (
    AccountCapped,
    BudgetStoreDown,
    EndpointRefused,
    GatewayError,
    GatewayRefused,
    GatewayRequestTooLarge,
    NoLease,
    NotInTurn,
    UpstreamIdle,
    UpstreamUnreachable,
    WrongSocket,
)
from claudepool.gateway.attribution import Attribute, Attribution
from claudepool.gateway.budget import CallBudget
from claudepool.gateway.calls import Call, Hooks
from claudepool.gateway.caps import AccountCaps
from claudepool.gateway.credentials import CredentialRegistry, presented_credential
from claudepool.gateway.egress import EgressProxy
from claudepool.gateway.forward import Forwarder
from claudepool.gateway.metrics import GatewayMetrics
from claudepool.gateway.ratelimits import AccountLimits
from claudepool.gateway.settings import MiB, Upstream
from claudepool.gateway.sockets import WorkerSockets
from claudepool.logs import RateLimitedLog, scrub
from claudepool.pool.profile import configured_pool

log = logging.getLogger(__name__)

# What the CLI calls (with the query it adds, ``?beta=true``, passed on as it is).
ENDPOINTS = frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")})


class Listener(Protocol):
    """Where the gateway listens: a bound, listening socket, and the base URL workers are given."""

    def open(self) -> socket.socket: ...

    def base_url(self, sock: socket.socket) -> str: ...


@dataclass(frozen=True)
class LoopbackListener:
    """TCP on the loopback interface, an ephemeral port by default."""

    host: str = "127.0.0.1"
    port: int = 0
    backlog: int = 1024

    def open(self) -> socket.socket:
        sock = socket.create_server((self.host, self.port), backlog=self.backlog)
        sock.setblocking(False)
        return sock

    def base_url(self, sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"


def error_response(exc: GatewayError) -> web.Response:
    """``exc`` in the provider's error format; ``x-should-retry`` and ``retry-after`` as the provider
    would set them."""
    body = {"type": "error", "error": {"type": exc.anthropic_type, "message": str(exc)}}
    headers = {"x-should-retry": "true" if exc.retryable else "false"}
    if exc.retry_after_s is not None:
        headers["retry-after"] = str(math.ceil(exc.retry_after_s))
    return web.Response(status=exc.status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


class Gateway:
    def __init__(self, credentials: CredentialRegistry, attribute: Attribute, upstreams: Mapping[str, Upstream], *,
                 default: Upstream | None = None, metrics: GatewayMetrics | None = None,
                 account_limits: AccountLimits | None = None, listener: Listener | None = None,
                 caps: AccountCaps | None = None, budget: CallBudget | None = None,
                 egress: EgressProxy | None = None,
                 connect_timeout_s: float = 10.0, max_connections: int = 100,
                 idle_timeout_s: float = 0.0,
                 max_request_bytes: int = 32 * MiB, shutdown_timeout_s: float = 5.0,
                 keepalive_timeout_s: float = 75.0) -> None:
        """``upstreams`` by configured pool name (a worker's profile name, an on-demand pool's base
        profile's: `configured_pool`); a pool without one uses ``default``.
        ``account_limits`` hears every answer's status and headers, by the upstream's account;
        ``caps`` holds the windows of the upstreams' caps (default: one-minute windows)."""
        self.credentials = credentials
        self._attribute = attribute
        self._upstreams = dict(upstreams)
        self._default = default
        self.metrics = metrics
        self.account_limits = account_limits
        self._caps = caps or AccountCaps()
        self.budget = budget
        self._sockets = WorkerSockets()
        # Opens a socket only for a sandboxed worker whose profile lists allowed_hosts.
        self.egress = egress if egress is not None else EgressProxy()  # an empty one is falsy
        self.hooks = Hooks()
        if metrics is not None:
            self.hooks.add(metrics)
        self._listener = listener or LoopbackListener()
        self._forwarder = Forwarder(connect_timeout_s=connect_timeout_s, max_connections=max_connections,
                                    idle_timeout_s=idle_timeout_s)
        self._max_request_bytes = max_request_bytes
        self._shutdown_timeout_s = shutdown_timeout_s
        # How long a worker's idle connection to the gateway is kept (aiohttp's default); a worker
        # frozen past it finds it closed when thawed (`tests/test_real_cli_freeze_keepalive.py`).
        self._keepalive_timeout_s = keepalive_timeout_s
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None
        # A tool hammering the gateway with a stolen or stale credential must not flood the log.
        self._refusal_log = RateLimitedLog(log, what="gateway refusal lines")

    def __repr__(self) -> str:
        return f"<Gateway {self.base_url or 'not listening'}: {len(self.credentials)} credentials>"

    async def start(self) -> str:
        """Listen, and tell the credentials where workers must call; returns the base URL."""
        if self._runner is not None:
            assert self.base_url is not None
            return self.base_url
        await self._forwarder.start()
        app = web.Application(client_max_size=self._max_request_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a worker that disconnects mid-answer cancels its handler, which stops
        # reading the provider's answer at once (see forward.py).
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self._shutdown_timeout_s, keepalive_timeout=self._keepalive_timeout_s)
        await runner.setup()
        try:
            sock = self._listener.open()
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            await self._forwarder.close(self._shutdown_timeout_s)
            raise
        self._runner = runner
        assert runner.server is not None
        self._sockets.start(runner.server)
        self.credentials.sockets = self._sockets
        self.egress.start()
        self.credentials.egress = self.egress
        self.base_url = self.credentials.base_url = self._listener.base_url(sock)
        log.info("gateway listening", extra={"fields": {"url": self.base_url, "upstreams": {
            name: repr(u) for name, u in self._upstreams.items()}}})
        return self.base_url

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop listening and close the provider's connections; bounded by ``timeout_s`` (default:
        the shutdown timeout) for each. Close it after the pools: draining workers still call."""
        timeout_s = self._shutdown_timeout_s if timeout_s is None else timeout_s
        runner, self._runner = self._runner, None
        self._sockets.close_all()
        await self.egress.close_all(timeout_s)
        if runner is not None:
            await runner.cleanup()  # bounded by the runner's shutdown_timeout
        await self._forwarder.close(timeout_s)

    # -- one call -----------------------------------------------------------------------------------

    def _check(self, request: web.Request) -> tuple[Attribution, Upstream]:
        worker = self.credentials.worker_of(presented_credential(request.headers))
        owner = self._sockets.owner(request.transport.get_extra_info("sockname") if request.transport else None)
        if owner is not worker and (owner is not None or self._sockets.has_socket(worker)):
            raise WrongSocket(f"the credential of worker {worker.id} came in on another listener than its own socket")
        if (request.method, request.path) not in ENDPOINTS:
            raise EndpointRefused(f"{request.method} {scrub(request.path, 80)} is not an endpoint of this gateway")
        attribution = self._attribute(worker) if worker.is_alive() else None
        if attribution is None:
            raise NoLease(f"worker {worker.id} serves no request")
        if not (worker.in_turn() or worker.in_model_switch()):
            raise NotInTurn(f"worker {worker.id} runs no turn")
        # A pool made on demand (another system prompt) calls its configured profile's upstream.
        upstream = self._upstreams.get(configured_pool(attribution.pool), self._default)
        if upstream is None:
            raise NoLease(f"no upstream for pool {attribution.pool}")
        return attribution, upstream

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            attribution, upstream = self._check(request)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise GatewayRequestTooLarge(f"the request is over {self._max_request_bytes} bytes") from None
        except GatewayRefused as exc:
            self._refused(request, exc)
            return error_response(exc)
        call = Call(attribution, upstream.name, request.method, request.path, len(body))
        try:
            if self.budget is not None:
                body = await self.budget.hold(call, body)
            # Last: a call refused for any other reason must not take room under the caps.
            self._caps.admit(upstream, attribution.priority, input_bound_tokens=len(body))
        except (GatewayRefused, AccountCapped, BudgetStoreDown) as exc:
            if self.budget is not None:
                self.budget.release(call)
            self._refused(request, exc)
            return error_response(exc)
        self.hooks.started(call, body)
        try:
            return await self._forwarder.forward(request, body, upstream, call, lambda c: self.hooks.chunk(call, c),
                                                 self._observer(upstream))
        except (UpstreamUnreachable, UpstreamIdle) as exc:
            log.warning("gateway call %s: %s", call.id, exc)
            call.status = exc.status
            return error_response(exc)
        finally:
            # A cancelled handler (the worker went away) ends here too: the call is still recorded.
            call.finish("client_gone")
            self.hooks.finished(call)
            self._log(call)

    def _observer(self, upstream: Upstream) -> Callable[[int, Mapping[str, str]], None] | None:
        limits = self.account_limits
        if limits is None:
            return None
        return lambda status, headers: limits.observe(upstream.account, headers, status=status)

    def _refused(self, request: web.Request, exc: GatewayError) -> None:
        if self.metrics is not None:
            self.metrics.refused(exc.reason)
        self._refusal_log.info("gateway refused a call", {
            "reason": exc.reason, "status": exc.status, "method": scrub(request.method, 16),
            "path": scrub(request.path, 80), "detail": str(exc)})

    @staticmethod
    def _log(call: Call) -> None:
        a = call.attribution
        log.info("gateway call", extra={"fields": {
            "call": call.id, "tenant": a.tenant, "request_id": a.request_id, "session": a.session,
            "profile": a.profile, "worker": a.worker, "slot": a.slot, "path": call.path, "status": call.status,
            "outcome": call.outcome, "upstream": call.upstream, "upstream_request_id": call.upstream_request_id,
            "request_bytes": call.request_bytes, "response_bytes": call.response_bytes,
            "first_byte_ms": None if call.first_byte_s is None else round(call.first_byte_s * 1000, 2),
            "duration_ms": round((call.duration_s or (time.monotonic() - call.started)) * 1000, 2),
            **_usage_fields(call)}})


def _usage_fields(call: Call) -> dict[str, object]:
    u = call.usage
    if u is None:
        return {}
    return {"message_id": u.message_id, "model": u.model, "stop_reason": u.stop_reason, "complete": u.complete,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "cache_read_tokens": u.cache_read_tokens,
            "cache_write_5m_tokens": u.cache_write_5m_tokens, "cache_write_1h_tokens": u.cache_write_1h_tokens,
            "cost_usd": None if call.cost_usd is None else round(call.cost_usd, 8),
            "first_token_ms": call.first_token_ms, "skipped_events": u.skipped_events}
