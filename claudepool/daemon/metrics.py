"""Prometheus metrics on a private registry.

Events (requests, tokens, spawns, exits, store calls) are counters and histograms updated where they
happen. Pool and memory state is read at scrape time by a collector, from values the pool's
maintenance loop already measured: a scrape reads no ``/proc`` file per worker, only the daemon's
own RSS and the host's available memory.

Label rules: one ``claudepool_`` prefix, base units, ``_total`` on counters, known series set to 0
at start, never a pid, request or session id. ``tenant`` is a configured tenant's name (the first
``max_tenant_labels`` of them, sorted) or ``__other__``, or ``__unauthenticated__`` for a request
refused before any tenant was known; ``model`` is one of the first ``max_model_labels`` models seen,
or ``__other__``; ``slot`` is a small per-pool worker index.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from claudepool.errors import ClaudepoolError
from claudepool.pool.memory import available_memory_bytes, plan_memory
from claudepool.store.base import UsageRecord

if TYPE_CHECKING:
    from claudepool.daemon.app import Daemon

OTHER = "__other__"
# The tenant label of a request refused before any tenant was known (no or a wrong key, a socket
# frame that could not be read): never the key it presented.
UNAUTHENTICATED = "__unauthenticated__"
WORKER_STATES = ("starting", "idle", "leased", "cleaning", "closing")
EXIT_REASONS = ("recycle_turns", "recycle_age", "recycle_memory", "recycle_context", "watchdog", "crash",
                "reset_failed", "boot_failure", "memory_pressure", "idle", "unclean", "shutdown", "respawn")
OUTCOMES = ("ok", "model_error", "cancelled", "draining", "timeout", "turn_stalled", "worker_died",
            "worker_error", "pool_timeout", "pool_unhealthy", "rate_limited", "budget_exhausted", "queue_full",
            "store_unavailable", "session_closed", "session_limit_reached", "session_elsewhere",
            "session_unavailable", "bad_request", "unauthorized", "forbidden", "not_found", "prompt_too_large",
            "frame_too_large", "session_checkpoint_failed", "too_many_in_flight", "error")
# What a request can end in before its tenant is known.
UNAUTHENTICATED_OUTCOMES = ("unauthorized", "bad_request", "prompt_too_large", "frame_too_large")
REJECTION_KINDS = ("requests_per_minute", "tokens_per_minute", "budget", "queue_full")
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")
# Upstream HTTP statuses the CLI reports on a retry or a failed turn, every one present from the start;
# ``none`` when it gave no status (a connection failure), ``other`` for anything not listed.
UPSTREAM_STATUSES = ("400", "401", "403", "404", "408", "409", "413", "429", "500", "502", "503", "504", "529",
                     "none", "other")
SESSION_EVENTS = ("created", "parked", "recycled", "resumed", "rolled_over", "expired", "deleted",
                  "checkpoint_failed")
STORE_OPERATIONS = ("reserve", "settle", "release", "budget", "usage", "ledger", "session")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_SPAWN_SECONDS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def upstream_status(status: int | None) -> str:
    """The bounded ``status`` label of an upstream retry or error."""
    if status is None:
        return "none"
    label = str(status)
    return label if label in UPSTREAM_STATUSES else "other"


def outcome_of(exc: BaseException | None, *, is_error: bool = False) -> str:
    """The bounded ``outcome`` label of a finished request."""
    if exc is None:
        return "model_error" if is_error else "ok"
    code = exc.code if isinstance(exc, ClaudepoolError) else "error"
    return code if code in OUTCOMES else "worker_error" if code.startswith(("worker_", "reset_")) else "error"


class Metrics:
    def __init__(self, daemon: Daemon, *, max_tenant_labels: int = 100, max_model_labels: int = 20) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        self._tenants = frozenset(sorted(daemon.tenants.names())[:max_tenant_labels])
        self._max_models = max_model_labels
        self._models: set[str] = set()
        # tenant -> (spent today, spent this month), refreshed from the store by the daemon.
        self.spent: dict[str, tuple[float, float]] = {}
        r = self.registry
        self.requests = Counter("claudepool_requests", "Requests answered, by tenant and outcome.",
                                ["tenant", "outcome"], registry=r)
        self.request_seconds = Histogram("claudepool_request_duration_seconds",
                                         "Time from admission to the last byte of the answer.", buckets=_SECONDS,
                                         registry=r)
        self.queue_seconds = Histogram("claudepool_queue_wait_seconds", "Time waiting for a worker.",
                                       buckets=_SECONDS, registry=r)
        self.ttft_seconds = Histogram("claudepool_time_to_first_token_seconds",
                                      "Time from admission to the first text of a streamed answer.",
                                      buckets=_SECONDS, registry=r)
        self.tokens = Counter("claudepool_tokens", "Tokens billed, by tenant, model and type.",
                              ["tenant", "model", "type"], registry=r)
        self.cost = Counter("claudepool_cost_usd", "Cost billed in USD (the CLI's figure).", ["tenant", "model"],
                            registry=r)
        self.rejections = Counter("claudepool_rejections", "Requests refused by a limit, budget or queue bound.",
                                  ["tenant", "kind"], registry=r)
        self.upstream_retries = Counter("claudepool_upstream_retries", "Upstream retries the CLI reported.",
                                        ["status"], registry=r)
        self.upstream_errors = Counter("claudepool_upstream_errors", "Turns that ended in an upstream error.",
                                       ["status"], registry=r)
        self.spawns = Counter("claudepool_worker_spawns", "Workers started and ready.", ["profile"], registry=r)
        self.exits = Counter("claudepool_worker_exits", "Workers that left the pool, by reason.",
                             ["profile", "reason"], registry=r)
        self.spawn_seconds = Histogram("claudepool_worker_spawn_seconds", "Spawn to ready (initialize answered).",
                                       ["profile"], buckets=_SPAWN_SECONDS, registry=r)
        self.resets = Counter("claudepool_worker_resets", "Confirmed /clear resets.", ["profile"], registry=r)
        self.store_errors = Counter("claudepool_store_errors", "Store operations that failed.", ["operation"],
                                    registry=r)
        self.store_seconds = Histogram("claudepool_store_operation_seconds", "Store operation latency.",
                                       ["operation"], buckets=_SECONDS, registry=r)
        self._initialise()
        r.register(_StateCollector(daemon))

    def _initialise(self) -> None:
        for tenant in (*sorted(self._tenants), OTHER):
            for outcome in OUTCOMES:
                self.requests.labels(tenant, outcome)
            for kind in REJECTION_KINDS:
                self.rejections.labels(tenant, kind)
        for outcome in UNAUTHENTICATED_OUTCOMES:
            self.requests.labels(UNAUTHENTICATED, outcome)
        pools = [pool for name in self.daemon.settings.profiles for pool in (name, f"{name}.sessions")]
        for profile in pools:
            self.spawns.labels(profile)
            self.resets.labels(profile)
            self.spawn_seconds.labels(profile)
            for reason in EXIT_REASONS:
                self.exits.labels(profile, reason)
        for status in UPSTREAM_STATUSES:
            self.upstream_retries.labels(status)
            self.upstream_errors.labels(status)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
            self.store_seconds.labels(operation)

    @property
    def labelled_tenants(self) -> frozenset[str]:
        return self._tenants

    def tenant(self, name: str) -> str:
        return name if name in self._tenants else OTHER

    def model(self, name: str) -> str:
        if name in self._models:
            return name
        if len(self._models) < self._max_models:
            self._models.add(name)
            return name
        return OTHER

    # -- event hooks -----------------------------------------------------------------------------

    def request_done(self, tenant: str | None, outcome: str, duration_s: float | None, queue_s: float | None) -> None:
        """One answered request; ``tenant`` None when it was refused before authentication."""
        label = UNAUTHENTICATED if tenant is None else self.tenant(tenant)
        self.requests.labels(label, outcome if outcome in OUTCOMES else "error").inc()
        if duration_s is not None:
            self.request_seconds.observe(duration_s)
        if queue_s is not None:
            self.queue_seconds.observe(queue_s)

    def rejected(self, tenant: str, kind: str) -> None:
        self.rejections.labels(self.tenant(tenant), kind).inc()

    def turn_billed(self, record: UsageRecord) -> None:
        tenant, model = self.tenant(record.tenant), self.model(record.model)
        for kind, count in (("input", record.input_tokens), ("output", record.output_tokens),
                            ("cache_read", record.cache_read_input_tokens),
                            ("cache_write", record.cache_creation_input_tokens)):
            self.tokens.labels(tenant, model, kind).inc(count)
        self.cost.labels(tenant, model).inc(record.cost_usd)

    # PoolObserver
    def worker_spawned(self, profile: str, seconds: float) -> None:
        self.spawns.labels(profile).inc()
        self.spawn_seconds.labels(profile).observe(seconds)

    def worker_exited(self, profile: str, reason: str) -> None:
        self.exits.labels(profile, reason if reason in EXIT_REASONS else "crash").inc()

    def worker_reset(self, profile: str) -> None:
        self.resets.labels(profile).inc()

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self.store_seconds.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()


class _StateCollector(Collector):
    """Pool, queue, memory and store state, computed at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._self = psutil.Process()

    def describe(self) -> Iterator[Metric]:
        # Registered before the pools exist: no collect() at registration time.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        workers = GaugeMetricFamily("claudepool_workers", "Workers by pool state.", labels=["profile", "state"])
        max_workers = GaugeMetricFamily("claudepool_max_workers",
                                        "Worker ceiling: configured (0 = derive), RAM-derived, and in force.",
                                        labels=["profile", "kind"])
        breaker = GaugeMetricFamily("claudepool_pool_breaker_open", "1 while the boot breaker pauses spawning.",
                                    labels=["profile"])
        pss = GaugeMetricFamily("claudepool_worker_pss_bytes", "PSS of each worker's process tree.",
                                labels=["profile", "slot"])
        rss = GaugeMetricFamily("claudepool_worker_rss_bytes", "RSS of each worker's process tree.",
                                labels=["profile", "slot"])
        total_pss = GaugeMetricFamily("claudepool_workers_pss_bytes", "PSS of all workers of a pool.",
                                      labels=["profile"])
        budget = GaugeMetricFamily("claudepool_memory_budget_bytes", "Total PSS limits used for sizing.",
                                   labels=["profile", "limit"])
        available = available_memory_bytes()
        in_turn = 0
        for name, pool in d.all_pools().items():
            counts = pool.counts()
            for state in WORKER_STATES:
                workers.add_metric([name, state], counts[state])
            plan = pool.memory
            ram = plan_memory(available_bytes=available, pool_pss_bytes=pool.total_pss_bytes(),
                              memory_fraction=pool.config.memory_fraction, per_worker_bytes=plan.per_worker_bytes)
            max_workers.add_metric([name, "configured"], pool.config.max_workers)
            max_workers.add_metric([name, "ram_derived"], ram.max_workers)
            max_workers.add_metric([name, "effective"], pool.max_workers)
            breaker.add_metric([name], 0 if str(pool.breaker_state) == "closed" else 1)
            for worker in pool.workers():
                in_turn += worker.in_turn()
                if worker.pss_bytes is not None:
                    pss.add_metric([name, str(worker.slot)], worker.pss_bytes)
                if worker.rss_bytes is not None:
                    rss.add_metric([name, str(worker.slot)], worker.rss_bytes)
            total_pss.add_metric([name], pool.total_pss_bytes())
            budget.add_metric([name, "soft"], plan.soft_limit_bytes)
            budget.add_metric([name, "hard"], plan.hard_limit_bytes)
        yield from (workers, max_workers, breaker, pss, rss, total_pss, budget)

        queue = GaugeMetricFamily("claudepool_queue_depth", "Requests waiting for a worker.", labels=["priority"])
        waiting = {"interactive": 0, "batch": 0}
        for pool in d.all_pools().values():
            for priority, count in pool.waiting_by_priority().items():
                waiting[priority] += count
        for priority, count in waiting.items():
            queue.add_metric([priority], count)
        yield queue
        yield GaugeMetricFamily("claudepool_in_flight_requests", "Requests being served.", value=d.service.in_flight)
        yield GaugeMetricFamily("claudepool_in_flight_turns", "Workers running a turn.", value=in_turn)
        yield GaugeMetricFamily("claudepool_draining", "1 while shutting down.", value=int(d.service.draining))
        yield GaugeMetricFamily("claudepool_daemon_rss_bytes", "RSS of the daemon process itself.",
                                value=self._self.memory_info().rss)
        yield GaugeMetricFamily("claudepool_memory_available_bytes",
                                "Memory available to the daemon (host, capped by its cgroup).", value=available)

        limits = GaugeMetricFamily("claudepool_tenant_budget_usd", "Configured budgets (0 = none).",
                                   labels=["tenant", "period"])
        spent = GaugeMetricFamily("claudepool_tenant_spent_usd",
                                  "Spend this UTC day and month of tenants with a budget, from the store "
                                  "(shared by every daemon on it), refreshed every few seconds.",
                                  labels=["tenant", "period"])
        for name in sorted(d.metrics.labelled_tenants):
            tenant = d.tenants.get(name)
            if tenant is not None:
                limits.add_metric([name, "day"], tenant.daily_budget_usd)
                limits.add_metric([name, "month"], tenant.monthly_budget_usd)
            if tenant is not None and tenant.has_budget:
                # 0 until the first refresh from the store (at start-up), so a panel is never empty.
                day, month = d.metrics.spent.get(name, (0.0, 0.0))
                spent.add_metric([name, "day"], day)
                spent.add_metric([name, "month"], month)
        yield limits
        yield spent

        yield GaugeMetricFamily("claudepool_sessions_active", "Conversations holding a worker on this daemon.",
                                value=d.sessions.counts()["active_here"])
        yield GaugeMetricFamily("claudepool_session_transcript_bytes",
                                "Disk used by conversation transcripts at rest (as of the last sweep).",
                                value=d.sessions.transcript_bytes)
        events = CounterMetricFamily("claudepool_session_events", "Conversation lifecycle events.",
                                     labels=["event"])
        for event in SESSION_EVENTS:
            events.add_metric([event], d.sessions.events[event])
        yield events

        info = GaugeMetricFamily("claudepool_store_info", "The store backend in use.", labels=["backend"])
        info.add_metric([d.store.backend], 1)
        yield info
        yield GaugeMetricFamily("claudepool_store_up", "1 unless the last store operation failed.",
                                value=int(d.store.up))
        yield CounterMetricFamily("claudepool_rate_limit_fallbacks", "Rate-limit checks made locally: store down.",
                                  value=d.limiter.fallbacks)
        yield GaugeMetricFamily("claudepool_metering_backlog_records", "Usage records waiting for the store.",
                                value=d.meter.backlog)
        yield CounterMetricFamily("claudepool_metering_dropped_records",
                                  "Usage records dropped because the store stayed down past the buffer.",
                                  value=d.meter.dropped)
        yield CounterMetricFamily("claudepool_price_mismatches", "Turns whose cost the price table disagrees with.",
                                  value=d.meter.price_mismatches)
        yield GaugeMetricFamily("claudepool_scrape_timestamp_seconds", "When this scrape was computed.",
                                value=time.time())
