"""The daemon: composition and lifecycle.

`Daemon.__init__` builds every component and wires them (the only place that knows them all); the
front ends get the narrow `claudepool.daemon.facade.Facade`, never the daemon. `Daemon.run` is the
lifecycle, under one `asyncio.TaskGroup` that owns every background task.

Start-up: the metering flusher starts → the gateway listens on loopback (workers are pointed at it
when they spawn, so it comes first) → pools begin warming, each with its memory-measuring loop →
front ends bind (or adopt systemd's sockets) → print where we listen → the background loops start
(announce-ready, watchdog, spend gauges, the event-loop lag monitor, session maintenance) → once
every pool has ``min_idle`` warm workers, ``READY=1``.

Shutdown, on SIGTERM or SIGINT, in a fixed order: ``STOPPING=1`` and stop admitting (new requests
get 503 ``draining``, /readyz turns 503; with ``server.reuse_port`` the HTTP listener closes, so the
port's other daemons take new connections) → wait for requests in flight up to
``server.drain_timeout_s`` → stop the stragglers (each answers 503 ``draining``) → stop the
background loops → close the front ends → park the conversations → close every worker → close the
gateway (after the workers: a turn drained at close still calls it) → flush the usage records →
close the store and the limiter (bounded) → exit 0. A second signal skips the wait
and exits 1 once workers are closed. Previous signal handlers are restored on the way out.

A background task that crashes is logged with its traceback and stops the daemon like a second
signal would (no drain wait), with exit code 1: a daemon without its metering, its session
maintenance or its pools' memory measurements would serve on half-alive, while systemd
(``Restart=on-failure``) starts a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from prometheus_client import CollectorRegistry

from claudepool.config import Settings, key_digest
from claudepool.daemon.admission import Gate, ServiceLimits
from claudepool.daemon.collectors import (
    CapacityCollector,
    LimiterCollector,
    MeterCollector,
    OnDemandPoolCollector,
    PoolCollector,
    ProcessCollector,
    ServiceCollector,
    SessionCollector,
    StoreCollector,
)
from claudepool.daemon.facade import Facade
from claudepool.daemon.front_ends import FrontEnds
from claudepool.daemon.jobs import Jobs
from claudepool.daemon.loop_lag import LoopLagMonitor
from claudepool.daemon.metrics import RequestMetrics, StoreMetrics, TenantLabels, UsageMetrics, WorkerMetrics
from claudepool.daemon.notify import Notifier
from claudepool.daemon.pools import PoolRegistry
from claudepool.daemon.service import PromptService
from claudepool.daemon.spend import TenantSpend
from claudepool.daemon.status import Status
from claudepool.errors import ClaudepoolError
from claudepool.gateway.attribution import from_leases
from claudepool.gateway.budget import CallBudget
from claudepool.gateway.call_usage import CallUsageMeter
from claudepool.gateway.credentials import CredentialRegistry
from claudepool.gateway.egress import EgressMetrics, EgressProxy
from claudepool.gateway.metrics import GatewayMetrics
from claudepool.gateway.ratelimits import AccountLimits
from claudepool.gateway.server import Gateway
from claudepool.gateway.settings import Upstream
from claudepool.logs import add_key_digests
from claudepool.pool import sandbox
from claudepool.pool.capacity import Capacity
from claudepool.pool.profile import pool_labels
from claudepool.pool.shares import TenantSlots
from claudepool.pool.workspace_files import FileBounds
from claudepool.sessions.manager import SessionManager
from claudepool.store.factory import build_store
from claudepool.store.instrumented import InstrumentedStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.tenants import TenantRegistry

log = logging.getLogger(__name__)

# How long closing HTTP connections may take once requests are done or stopped.
_HTTP_SHUTDOWN_TIMEOUT_S = 5.0


class Daemon:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        if any(settings.profile(name).sandboxed for name in settings.profiles):
            sandbox.probe()  # a profile with tools refuses to start without its sandbox (ConfigError)
        self.tenants: TenantRegistry = settings.tenant_registry()
        add_key_digests(_held_key_digests(settings))  # masked wherever a log line would show one
        # One registry, handed to every component that exports something (nothing global).
        self.registry = CollectorRegistry(auto_describe=True)
        tenant_labels = TenantLabels(self.tenants.names(), max_labels=settings.metrics.max_tenant_labels)
        request_metrics = RequestMetrics(self.registry, tenant_labels)
        # On-demand pools count under PROFILE~custom (`claudepool.pool.profile.pool_label`).
        worker_metrics = WorkerMetrics(self.registry, [label for name in settings.profiles
                                                       for label in pool_labels(name)])
        usage_metrics = UsageMetrics(self.registry, tenant_labels, max_model_labels=settings.metrics.max_model_labels)
        self.store = InstrumentedStore(build_store(settings.store))
        self.store.observer = StoreMetrics(self.registry).store_call
        store_url = settings.store.url.get_secret_value()
        self.limiter = RateLimiter(store_url, key_prefix=settings.store.key_prefix,
                                   socket_timeout_s=settings.store.socket_timeout_s)
        self.pricing = PricingTable.of(settings.pricing)
        self.meter = Meter(self.store, self.limiter, self.pricing, settings.metering,
                           on_record=usage_metrics.turn_billed)
        slots = TenantSlots()
        # One worker ceiling and RAM budget for every pool (stateless, sessions, and on demand).
        self.capacity = Capacity(settings.capacity)
        # Every worker's credential for the gateway: the workers never see the provider's key.
        self.credentials = CredentialRegistry()
        # Every pool, configured or made on demand for another system prompt, is built by the registry.
        # The configured pools' memory measurements run in the task group (see _serve), the others' in the registry.
        self.pool_registry = PoolRegistry(
            settings, observer=worker_metrics, on_turn_result=self.meter.on_turn_result,
            on_lease_done=self.meter.on_lease_done, slots=slots, credentials=self.credentials,
            capacity=self.capacity)
        self.pools = self.pool_registry.configured
        self.session_pools = self.pool_registry.configured_sessions
        self.sessions = SessionManager(self.store, self.pool_registry, settings.session_options(),
                                       max_system_prompt_bytes=settings.server.max_system_prompt_bytes)
        self.gateway = self._gateway(settings, tenant_labels)
        server = settings.server
        file_bounds = FileBounds(
            max_input_files=server.max_input_files, max_input_file_bytes=server.max_input_file_bytes,
            max_input_bytes=server.max_input_bytes, max_return_files=server.max_return_files,
            max_return_bytes=server.max_return_bytes, max_listed_files=server.max_listed_files,
            max_file_read_bytes=server.max_file_read_bytes)
        gate = Gate(
            self.pool_registry,
            ServiceLimits(server.max_prompt_bytes, server.default_timeout_s, server.max_timeout_s, server.max_queued,
                          file_bounds, server.max_system_prompt_bytes),
            store=self.store, limiter=self.limiter, sessions=self.sessions, router=settings.router(),
        )
        self.service = PromptService(gate, self.tenants, self.meter, metrics=request_metrics, sessions=self.sessions,
                                     tool_preview_bytes=server.tool_preview_bytes, file_bounds=file_bounds)
        self.status = Status(self.pools, self.all_pools(), self.service, self.capacity)
        self.spend = TenantSpend(self.tenants, self.store, tenant_labels, self.registry)
        PoolCollector(self.all_pools(), self.registry)
        OnDemandPoolCollector(self.pool_registry, self.registry)
        CapacityCollector(self.capacity, self.registry)
        ServiceCollector(self.service, self.registry)
        ProcessCollector(self.registry)
        SessionCollector(self.sessions, self.registry)
        StoreCollector(self.store, self.registry)
        LimiterCollector(self.limiter, self.registry)
        MeterCollector(self.meter, self.registry)
        self.loop_lag = LoopLagMonitor(self.registry, busy=lambda: self.service.in_flight > 0)
        self.facade = Facade(tenants=self.tenants, service=self.service, sessions=self.sessions, store=self.store,
                             status=self.status, registry=self.registry, metrics_public=settings.metrics.public,
                             ledger_page_records=server.ledger_page_records,
                             max_ledger_reads_per_tenant=server.max_ledger_reads_per_tenant, file_bounds=file_bounds)
        self.jobs = Jobs.build(settings, self.service, self.tenants, self.registry) if settings.jobs.enabled else None
        self.notifier = notifier or Notifier()
        self.listening: dict[str, str] = {}
        self.front_ends: FrontEnds | None = None  # once bound
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self.crashed: list[str] = []  # the background tasks that crashed, by name

    def _gateway(self, settings: Settings, tenant_labels: TenantLabels) -> Gateway:
        """The one path from the workers to the provider: each pool's calls go to its profile's upstream."""
        upstreams: dict[str, Upstream] = {}
        for name in settings.profiles:
            upstreams[name] = upstreams[f"{name}.sessions"] = settings.upstream_for(name)
        add_key_digests(hashlib.sha256(secret.encode()).hexdigest()
                        for upstream in upstreams.values() for secret in upstream.secrets())
        missing = sorted({u.name for u in upstreams.values() if not u.has_credential})
        if missing:
            log.warning("no provider credential in %s (nor $ANTHROPIC_API_KEY): model calls go out without one",
                        ", ".join(missing))
        up = settings.upstream
        metrics = GatewayMetrics(self.registry, tenant_labels, tenants=tenant_labels.names,
                                 live_credentials=lambda: len(self.credentials))
        # Every configured account's 429/529 counts exist from the start (a rate() has a baseline).
        account_limits = AccountLimits(self.registry, accounts=tuple(sorted({u.account for u in upstreams.values()})))
        # Each call holds its tenant's budget before it goes out (its max_tokens lowered under a
        # strict budget); its record settles it.
        budget = CallBudget(self.store, self.tenants, self.pricing, settings.metering, self.meter,
                            reservation_ttl_s=settings.store.reservation_ttl_s)
        # Only the pools whose profile allows outbound hosts have egress series (the others open no socket).
        egress = EgressProxy(settings.egress, metrics=EgressMetrics(self.registry, [
            label for name in settings.profiles if settings.profile(name).allowed_hosts
            for label in pool_labels(name)]))
        gateway = Gateway(self.credentials, from_leases(self.all_pools()), upstreams, metrics=metrics,
                          account_limits=account_limits, budget=budget, egress=egress,
                          connect_timeout_s=up.connect_timeout_s, max_connections=up.max_connections,
                          idle_timeout_s=up.idle_timeout_s,
                          max_request_bytes=up.max_request_bytes, shutdown_timeout_s=_HTTP_SHUTDOWN_TIMEOUT_S)
        # Every model call is billed where it happens: one ledger record per call (the CLI's turn
        # figure is then a cross-check).
        gateway.hooks.add(CallUsageMeter(self.pricing, self.registry, tenant_labels, tenants=tenant_labels.names,
                                         meter=self.meter))
        gateway.hooks.add(budget)  # after the pricing hook: it learns from each call's cost
        return gateway

    def all_pools(self) -> PoolRegistry:
        """Every live pool by pool name (``default``, ``default.sessions``, and those made on demand,
        ``default~…``): a live view, which sees pools made later."""
        return self.pool_registry

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """What a signal does: the first one drains, the second one forces."""
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: draining requests in flight (signal again to force)")
            self._stop.set()
        else:
            log.warning("second stop request: forcing exit")
            self._force.set()

    async def run(self, *, handle_signals: bool = True) -> int:
        """Serve until stopped. Returns the process exit code: 0 after a drain, 1 when forced or
        when a background task crashed."""
        failure: Exception | None = None
        code = 1
        try:
            with _stop_signals(self.request_stop, enabled=handle_signals):
                async with asyncio.TaskGroup() as tg:
                    try:
                        code = await self._serve(tg)
                    except Exception as exc:
                        # Raised once the group is done, as itself (a front end that cannot bind is a
                        # ConfigError to the caller, not an ExceptionGroup).
                        failure = exc
        finally:
            self.notifier.close()
        if failure is not None:
            raise failure
        return 1 if self.crashed else code

    async def _serve(self, tg: asyncio.TaskGroup) -> int:
        metering = self._supervise(tg, "metering", self.meter.run)
        loops: list[asyncio.Task[None]] = []
        front: FrontEnds | None = None
        try:
            await self.gateway.start()
            if self.jobs is not None:
                await self.jobs.start()
            for name, pool in list(self.all_pools().items()):
                await pool.start()
                loops.append(self._supervise(tg, f"pool-{name}-maintenance", pool.maintain))
            loops.append(self._supervise(tg, "pools-on-demand", self.pool_registry.maintain))
            front = self.front_ends = await FrontEnds.start(self.facade, self.settings.server,
                                                            shutdown_timeout_s=_HTTP_SHUTDOWN_TIMEOUT_S,
                                                            messages=self.facade,
                                                            jobs=self.jobs.door if self.jobs is not None else None)
            self.listening.update(front.listening)
            where = " and ".join(f"{kind} {addr}" for kind, addr in self.listening.items()) or "nothing"
            print(f"claudepool: listening on {where}", flush=True)
            loops += [self._supervise(tg, "announce-ready", self._announce_ready),
                      self._supervise(tg, "watchdog", self.notifier.run_watchdog),
                      self._supervise(tg, "spend-gauges", self.spend.run),
                      self._supervise(tg, "loop-lag", self.loop_lag.run),
                      self._supervise(tg, "sessions", self.sessions.maintain)]
            if self.jobs is not None:
                loops += [self._supervise(tg, name, loop) for name, loop in self.jobs.loops()]
            await self._stop.wait()
            return await self._shutdown()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if front is not None:
                await front.close(_HTTP_SHUTDOWN_TIMEOUT_S)
            # Conversations keep their checkpoints and resume after a restart (or on another daemon).
            await self.sessions.park_all()
            await self.pool_registry.close()
            await self.gateway.close(_HTTP_SHUTDOWN_TIMEOUT_S)
            # Every turn has settled now; give its record a bounded chance to reach the store.
            if not metering.done():
                await self.meter.flush(_HTTP_SHUTDOWN_TIMEOUT_S)
            metering.cancel()
            await asyncio.gather(metering, return_exceptions=True)
            # Bounded: a store that stopped answering must not hold the exit (systemd would kill us).
            for closing in (self.store.close, self.limiter.close, *([self.jobs.close] if self.jobs else [])):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_HTTP_SHUTDOWN_TIMEOUT_S):
                        await closing()

    def _supervise(self, tg: asyncio.TaskGroup, name: str,
                   loop: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run ``loop`` in the group; if it raises, log why and stop the daemon at once (exit 1)."""
        async def supervised() -> None:
            try:
                await loop()
            except Exception:
                log.exception("%s crashed: stopping the daemon", name)
                self.crashed.append(name)
                self.notifier.status(f"stopping: {name} crashed")
                self._force.set()
                self._stop.set()

        return tg.create_task(supervised(), name=name)

    async def _announce_ready(self) -> None:
        try:
            for pool in (*self.pools.values(), *self.session_pools.values()):
                await pool.wait_ready(self.settings.server.ready_timeout_s)
        except (TimeoutError, ClaudepoolError) as exc:
            # Not fatal: the pool keeps trying and /readyz says why; systemd will time the start out.
            log.error("pools did not warm up: %r", exc)
            self.notifier.status(f"warming failed: {exc!r}")
            return
        self.status.warm = True
        warm = sum(p.idle_count for p in self.all_pools().values())
        self.notifier.ready()
        self.notifier.status(f"serving with {warm} warm workers")
        log.info("ready: %d warm workers", warm)

    async def _shutdown(self) -> int:
        """Drain; the front ends and pools are closed by `_serve` on the way out."""
        self.notifier.stopping()
        self.service.draining = True
        if self.settings.server.reuse_port and self.front_ends is not None:
            # The port's other daemons serve the new connections while we drain; a daemon alone on
            # its port keeps listening, so that its clients get 503 draining, not a refused connection.
            self.front_ends.stop_listening_http()
        self.notifier.status(f"draining {self.service.in_flight} requests")
        drained = asyncio.create_task(self.service.wait_idle(self.settings.server.drain_timeout_s))
        forced = asyncio.create_task(self._force.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drained, forced):
            task.cancel()
        await asyncio.gather(drained, forced, return_exceptions=True)
        stopped = await self.service.stop_in_flight()
        self.notifier.status("closing workers")
        counts = {name: pool.stats for name, pool in self.pools.items()}
        log.info("shutdown: %d requests stopped at the deadline; pool stats %s", stopped, counts)
        return 1 if self._force.is_set() else 0


@contextlib.contextmanager
def _stop_signals(on_signal: Callable[[], None], *, enabled: bool) -> Iterator[None]:
    """SIGTERM and SIGINT call ``on_signal`` while the block runs; the handlers in place before
    (Python's, or asyncio.run's for SIGINT) are put back after it."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)  # this leaves the default handler, not the previous one
            if handler is not None:  # None: set outside Python, nothing we could put back
                signal.signal(sig, handler)


# Worker variables whose values are credentials, masked in logs like the keys.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _held_key_digests(settings: Settings) -> set[str]:
    """The SHA-256 of every key and credential the daemon holds (see `claudepool.logs.mask_secrets`)."""
    keys = [t.key for t in settings.tenants.values()] + [settings.server.admin_key, settings.metrics.key,
                                                         settings.upstream.admin_key]
    keys += [t.webhook_secret for t in settings.tenants.values() if t.webhook_secret is not None]
    digests = {key_digest(k.get_secret_value()) for k in keys if k.get_secret_value()}
    for env in (settings.pool.env, *(p.env for p in settings.profiles.values())):
        digests |= {hashlib.sha256(v.encode()).hexdigest() for k, v in env.items() if v and _SECRET_NAME.search(k)}
    return digests
