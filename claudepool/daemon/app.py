"""The daemon: composition and lifecycle.

Start-up: pools begin warming → front ends bind (or adopt systemd's sockets) → print where we listen
→ once every pool has ``min_idle`` warm workers, ``READY=1``.

Shutdown, on SIGTERM or SIGINT, in a fixed order: ``STOPPING=1`` and stop admitting (new requests
get 503 ``draining``, /readyz turns 503) → wait for requests in flight up to
``server.drain_timeout_s`` → stop the stragglers (each answers 503 ``draining``) → close the front
ends → close every worker → exit 0. A second signal skips the wait and exits 1 once workers are
closed. Previous signal handlers are restored on the way out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
import socket
import time
from typing import Any

from aiohttp import web

from claudepool.config import Settings, key_digest
from claudepool.daemon.http_api import build_app
from claudepool.daemon.http_guard import GuardedSockSite, HttpGuard
from claudepool.daemon.listen_fds import inherited_sockets, split_by_kind
from claudepool.daemon.metrics import Metrics
from claudepool.daemon.notify import Notifier, unset_environment
from claudepool.daemon.rlimit import ensure_open_files
from claudepool.daemon.service import PromptService, ServiceLimits
from claudepool.daemon.unix_api import UnixFrontEnd
from claudepool.errors import BadRequest, ClaudepoolError, ConfigError, Forbidden
from claudepool.logs import add_key_digests
from claudepool.pool.pool import Pool
from claudepool.sessions.manager import SessionManager
from claudepool.store.base import UsageTotals, Window
from claudepool.store.factory import build_store
from claudepool.store.instrumented import InstrumentedStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.scheduler import TenantSlots
from claudepool.tenancy.tenants import TenantRegistry

log = logging.getLogger(__name__)

# How long closing HTTP connections may take once requests are done or stopped.
_HTTP_SHUTDOWN_TIMEOUT_S = 5.0


class Daemon:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.tenants: TenantRegistry = settings.tenant_registry()
        add_key_digests(_held_key_digests(settings))  # masked wherever a log line would show one
        self.metrics = Metrics(self, max_tenant_labels=settings.metrics.max_tenant_labels,
                               max_model_labels=settings.metrics.max_model_labels)
        self.store = InstrumentedStore(build_store(settings.store))
        self.store.observer = self.metrics.store_call
        store_url = settings.store.url.get_secret_value()
        self.limiter = RateLimiter(store_url, key_prefix=settings.store.key_prefix,
                                   socket_timeout_s=settings.store.socket_timeout_s)
        self.pricing = PricingTable.of(settings.pricing)
        self.meter = Meter(self.store, self.limiter, self.pricing, settings.metering,
                           on_record=self.metrics.turn_billed)
        slots = TenantSlots()
        hooks: dict[str, Any] = {"on_turn_result": self.meter.on_turn_result, "on_lease_done": self.meter.on_lease_done,
                                 "slots": slots, "observer": self.metrics}
        self.pools = {name: Pool(settings.profile(name), settings.pool_config(name), **hooks)
                      for name in settings.profiles}
        # Conversations run on each profile's session-capable twin: the same spawn settings, with
        # transcripts kept so a parked conversation can resume on any of its workers.
        sessions = settings.sessions
        self.session_pools = {
            name: Pool(settings.profile(name).session_variant(),
                       settings.pool_config(name).model_copy(update={"min_idle": sessions.min_idle,
                                                                     "max_workers": sessions.max_workers}),
                       **hooks)
            for name in settings.profiles
        }
        self.sessions = SessionManager(self.store, self.session_pools, settings.session_options())
        server = settings.server
        self.service = PromptService(
            self.pools,
            ServiceLimits(server.max_prompt_bytes, server.default_timeout_s, server.max_timeout_s, server.max_queued,
                          settings.store.reservation_ttl_s),
            store=self.store, limiter=self.limiter, meter=self.meter, pricing=self.pricing,
            metering=settings.metering, metrics=self.metrics, sessions=self.sessions,
        )
        self.notifier = notifier or Notifier()
        self.listening: dict[str, str] = {}
        self.started_at = time.monotonic()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._warm = False
        self._signals = 0

    def all_pools(self) -> dict[str, Pool]:
        """Stateless and session-capable pools, by pool name (``default``, ``default.sessions``)."""
        return {pool.profile.name: pool for pool in (*self.pools.values(), *self.session_pools.values())}

    # -- status ------------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        pools: dict[str, Any] = {}
        ready = self._warm and not self.service.draining
        for name, pool in self.pools.items():
            counts = pool.counts()
            warm = counts["idle"] + counts["leased"] + counts["cleaning"]
            pools[name] = {"healthy": pool.healthy, "warm": warm, "idle": counts["idle"]}
            # A profile started on demand (min_idle 0) is ready with no warm worker.
            ready = ready and pool.healthy and (warm > 0 or pool.config.min_idle == 0)
        return ready, {"ready": ready, "draining": self.service.draining, "pools": pools}

    def pool_status(self) -> dict[str, Any]:
        pools = {}
        for name, pool in self.all_pools().items():
            pools[name] = {
                "max_workers": pool.max_workers,
                "breaker": str(pool.breaker_state),
                "counts": pool.counts(),
                "total_pss_bytes": pool.total_pss_bytes(),
                "workers": pool.snapshot(),
            }
        return {
            "pools": pools,
            "queue": {"waiting": sum(p.waiting for p in self.all_pools().values())},
            "in_flight": self.service.in_flight,
            "draining": self.service.draining,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    def caller_scope(self, key: str | None, tenant: str | None) -> list[str] | None:
        """Which tenants' usage ``key`` may read: the admin any (None = all), a tenant only itself."""
        if self.tenants.is_admin(key):
            return [tenant] if tenant else None
        caller = self.tenants.authenticate(key)
        if tenant and tenant != caller.name:
            raise Forbidden("a tenant key reads only its own usage")
        return [caller.name]

    async def usage_report(self, key: str | None, *, tenant: str | None = None, window: str = "day",
                           date: str | None = None) -> dict[str, Any]:
        """Usage per tenant and model for one UTC day or month, with each tenant's budget state."""
        scope = self.caller_scope(key, tenant)
        try:
            span = Window.parse(window, date)
        except ValueError as exc:
            raise BadRequest(f"bad usage window: {exc}") from None
        usage = await self.store.usage(span, scope)
        tenants: dict[str, Any] = {}
        for name in sorted(set(usage) | set(scope or [])):
            models = usage.get(name, {})
            total = UsageTotals()
            for totals in models.values():
                for field, value in totals.to_dict().items():
                    setattr(total, field, getattr(total, field) + value)
            entry: dict[str, Any] = {"models": {m: t.to_dict() for m, t in models.items()}, "total": total.to_dict()}
            configured = self.tenants.get(name)
            if configured is not None:
                state = await self.store.budget(name)
                entry["budget"] = {
                    "daily_limit_usd": configured.daily_budget_usd,
                    "monthly_limit_usd": configured.monthly_budget_usd,
                    "day_spent_usd": round(state.day_spent_usd, 10),
                    "month_spent_usd": round(state.month_spent_usd, 10),
                    "reserved_usd": round(state.reserved_usd, 10),
                }
            tenants[name] = entry
        return {"window": {"kind": span.kind, "key": span.label()}, "tenants": tenants}

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
        """Serve until stopped. Returns the process exit code."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        runner: web.AppRunner | None = None
        unix: UnixFrontEnd | None = None
        background: list[asyncio.Task[None]] = []
        metering = asyncio.create_task(self.meter.run(), name="metering")
        try:
            for pool in self.all_pools().values():
                await pool.start()
            runner, unix = await self._start_front_ends()
            where = " and ".join(f"{kind} {addr}" for kind, addr in self.listening.items()) or "nothing"
            print(f"claudepool: listening on {where}", flush=True)
            background.append(asyncio.create_task(self._announce_ready(), name="announce-ready"))
            background.append(asyncio.create_task(self.notifier.run_watchdog(), name="watchdog"))
            background.append(asyncio.create_task(self._refresh_spend(), name="spend-gauges"))
            background.append(asyncio.create_task(self.sessions.maintain(), name="sessions"))
            await self._stop.wait()
            return await self._shutdown()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if unix is not None:
                await unix.close(_HTTP_SHUTDOWN_TIMEOUT_S)
            if runner is not None:
                await runner.cleanup()
            # Conversations keep their checkpoints and resume after a restart (or on another daemon).
            await self.sessions.park_all()
            for pool in self.all_pools().values():
                await pool.close()
            # Every turn has settled now; give its record a bounded chance to reach the store.
            await self.meter.flush(_HTTP_SHUTDOWN_TIMEOUT_S)
            metering.cancel()
            await asyncio.gather(metering, return_exceptions=True)
            await self.store.close()
            await self.limiter.close()
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.notifier.close()

    async def _start_front_ends(self) -> tuple[web.AppRunner | None, UnixFrontEnd]:
        server = self.settings.server
        ensure_open_files(2 * server.max_connections)  # each front end admits max_connections
        adopted = inherited_sockets()
        # Both the notifier and socket activation have read their variables: no child may see them.
        unset_environment(os.environ)
        unix_socks, inet_socks = split_by_kind(s.sock for s in adopted)
        runner: web.AppRunner | None = None
        if inet_socks or server.http:
            # handler_cancellation: a client that disconnects cancels its handler, which abandons the
            # turn; the pool then interrupts and resets the worker.
            guard = HttpGuard(max_connections=server.max_connections, header_timeout_s=server.header_timeout_s,
                              body_timeout_s=server.body_timeout_s)
            runner = web.AppRunner(build_app(self, guard.middleware()), handler_cancellation=True, access_log=None,
                                   shutdown_timeout=_HTTP_SHUTDOWN_TIMEOUT_S,
                                   keepalive_timeout=server.keepalive_timeout_s)
            await runner.setup()
            if inet_socks:
                for sock in inet_socks:
                    await GuardedSockSite(runner, sock, guard, backlog=server.backlog).start()
                self.listening["http"] = ", ".join(_address(s) for s in inet_socks)
            else:
                host, port = server.http_host_port()
                try:
                    sock = socket.create_server(
                        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=server.backlog
                    )
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {server.http}: {exc.strerror}") from None
                sock.setblocking(False)
                await GuardedSockSite(runner, sock, guard, backlog=server.backlog).start()
                self.listening["http"] = f"http://{_address(sock)}"
        unix = UnixFrontEnd(self, max_connections=server.max_connections)
        try:
            if unix_socks:
                for sock in unix_socks:
                    await unix.listen("", server.socket_mode, sock=sock, backlog=server.backlog)
                self.listening["unix"] = ", ".join(_address(s) for s in unix_socks)
            elif server.socket:
                await unix.listen(server.socket, server.socket_mode, backlog=server.backlog)
                self.listening["unix"] = server.socket
        except BaseException:
            # Do not leave the HTTP port listening behind a daemon that failed to start.
            await unix.close(_HTTP_SHUTDOWN_TIMEOUT_S)
            if runner is not None:
                await runner.cleanup()
            raise
        return runner, unix

    async def _refresh_spend(self, interval_s: float = 15.0) -> None:
        """Keep the spend gauges of budgeted tenants current (a scrape must not wait on the store)."""
        while True:
            for name in sorted(self.metrics.labelled_tenants):
                tenant = self.tenants.get(name)
                if tenant is None or not tenant.has_budget:
                    continue
                try:
                    state = await self.store.budget(name)
                except ClaudepoolError:
                    break  # the store is down: keep the last values; store_up says why
                self.metrics.spent[name] = (state.day_spent_usd, state.month_spent_usd)
            await asyncio.sleep(interval_s)

    async def _announce_ready(self) -> None:
        try:
            for pool in self.all_pools().values():
                await pool.wait_ready(self.settings.server.ready_timeout_s)
        except (TimeoutError, ClaudepoolError) as exc:
            # Not fatal: the pool keeps trying and /readyz says why; systemd will time the start out.
            log.error("pools did not warm up: %r", exc)
            self.notifier.status(f"warming failed: {exc!r}")
            return
        self._warm = True
        warm = sum(p.idle_count for p in self.all_pools().values())
        self.notifier.ready()
        self.notifier.status(f"serving with {warm} warm workers")
        log.info("ready: %d warm workers", warm)

    async def _shutdown(self) -> int:
        """Drain; the front ends and pools are closed by `run` on the way out."""
        self.notifier.stopping()
        self.service.draining = True
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


# Worker variables whose values are credentials, masked in logs like the keys.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _held_key_digests(settings: Settings) -> set[str]:
    """The SHA-256 of every key and credential the daemon holds (see `claudepool.logs.mask_secrets`)."""
    keys = [t.key for t in settings.tenants.values()] + [settings.server.admin_key, settings.metrics.key]
    digests = {key_digest(k.get_secret_value()) for k in keys if k.get_secret_value()}
    for env in (settings.pool.env, *(p.env for p in settings.profiles.values())):
        digests |= {hashlib.sha256(v.encode()).hexdigest() for k, v in env.items() if v and _SECRET_NAME.search(k)}
    return digests


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name)
