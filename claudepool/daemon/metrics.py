"""Prometheus event metrics, each group on the registry it is given, and the label vocabulary.

Events (requests, tokens, spawns, exits, store calls) are counters and histograms updated where they
happen: each group below belongs to the component that reports those events and registers itself on
the injected ``CollectorRegistry``, as prometheus_client's own collectors do. State (pools, queues,
memory, sessions, the store) is read at scrape time by the collectors in
`claudepool.daemon.collectors`.

Label rules: one ``claudepool_`` prefix, base units, ``_total`` on counters, known series set to 0
at start, never a pid, request or session id. ``tenant`` is a configured tenant's name (the first
``max_tenant_labels`` of them, sorted) or ``__other__``, or ``__unauthenticated__`` for a request
refused before any tenant was known; ``model`` is one of the first ``max_model_labels`` models seen,
or ``__other__``; ``slot`` is a small per-pool worker index.

>>> registry = CollectorRegistry()
>>> requests = RequestMetrics(registry, TenantLabels(["acme"], max_labels=100))
>>> requests.request_done("acme", "ok", duration_s=0.2, queue_s=0.01)
>>> registry.get_sample_value("claudepool_requests_total", {"tenant": "acme", "outcome": "ok"})
1.0
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from claudepool.errors import ClaudepoolError
from claudepool.store.base import UsageRecord

OTHER = "__other__"
# The tenant label of a request refused before any tenant was known (no or a wrong key, a socket
# frame that could not be read): never the key it presented.
UNAUTHENTICATED = "__unauthenticated__"
WORKER_STATES = ("starting", "idle", "leased", "cleaning", "closing")
EXIT_REASONS = ("recycle_turns", "recycle_age", "recycle_memory", "recycle_context", "watchdog", "crash",
                "reset_failed", "boot_failure", "memory_pressure", "idle", "unclean", "shutdown", "respawn",
                "workspace_full", "evicted")
OUTCOMES = ("ok", "model_error", "cancelled", "draining", "timeout", "turn_stalled", "worker_died",
            "worker_error", "pool_timeout", "pool_unhealthy", "too_many_pools", "rate_limited", "budget_exhausted",
            "queue_full",
            "store_unavailable", "session_closed", "session_limit_reached", "session_elsewhere",
            "session_unavailable", "bad_request", "unauthorized", "forbidden", "not_found", "prompt_too_large",
            "frame_too_large", "session_checkpoint_failed", "too_many_in_flight", "unknown_kind",
            "request_budget_exhausted", "error")
# What a request can end in before its tenant is known.
UNAUTHENTICATED_OUTCOMES = ("unauthorized", "bad_request", "prompt_too_large", "frame_too_large")
REJECTION_KINDS = ("requests_per_minute", "tokens_per_minute", "budget", "queue_full")
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")
# Upstream HTTP statuses the CLI reports on a retry or a failed turn, every one present from the start;
# ``none`` when it gave no status (a connection failure), ``other`` for anything not listed.
# Why the CLI moved a turn to a fallback model, as its model_fallback event says; others count as "other".
FALLBACK_TRIGGERS = ("overloaded", "unavailable", "rate_limited", "not_found")
UPSTREAM_STATUSES = ("400", "401", "403", "404", "408", "409", "413", "429", "500", "502", "503", "504", "529",
                     "none", "other")
SESSION_EVENTS = ("created", "parked", "recycled", "resumed", "rolled_over", "expired", "deleted",
                  "checkpoint_failed", "conversation_started", "conversation_continued", "conversation_evicted",
                  "conversation_dropped")
STORE_OPERATIONS = ("reserve", "settle", "release", "budget", "usage", "ledger", "session", "conversation")
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


class TenantLabels:
    """The bounded ``tenant`` label: the first ``max_labels`` configured tenants (sorted), else ``__other__``."""

    def __init__(self, tenants: Iterable[str], *, max_labels: int) -> None:
        self.names = frozenset(sorted(tenants)[:max_labels])

    def __call__(self, tenant: str) -> str:
        return tenant if tenant in self.names else OTHER


class RequestMetrics:
    """What the prompt service reports: one count per request (admitted or refused), its timings,
    the rejections by limit, and the upstream retries and errors its turns saw."""

    def __init__(self, registry: CollectorRegistry, tenants: TenantLabels) -> None:
        self._tenant = tenants
        r = registry
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
        self.rejections = Counter("claudepool_rejections", "Requests refused by a limit, budget or queue bound.",
                                  ["tenant", "kind"], registry=r)
        self.upstream_retries = Counter("claudepool_upstream_retries", "Upstream retries the CLI reported.",
                                        ["status"], registry=r)
        self.upstream_errors = Counter("claudepool_upstream_errors", "Turns that ended in an upstream error.",
                                       ["status"], registry=r)
        self.model_fallbacks = Counter("claudepool_model_fallbacks", "Turns the CLI moved to a profile's "
                                       "fallback model, by profile and trigger (overloaded, …).",
                                       ["profile", "trigger"], registry=r)
        for tenant in (*sorted(tenants.names), OTHER):
            for outcome in OUTCOMES:
                self.requests.labels(tenant, outcome)
            for kind in REJECTION_KINDS:
                self.rejections.labels(tenant, kind)
        for outcome in UNAUTHENTICATED_OUTCOMES:
            self.requests.labels(UNAUTHENTICATED, outcome)
        for status in UPSTREAM_STATUSES:
            self.upstream_retries.labels(status)
            self.upstream_errors.labels(status)

    def request_done(self, tenant: str | None, outcome: str, duration_s: float | None, queue_s: float | None) -> None:
        """One answered request; ``tenant`` None when it was refused before authentication."""
        label = UNAUTHENTICATED if tenant is None else self._tenant(tenant)
        self.requests.labels(label, outcome if outcome in OUTCOMES else "error").inc()
        if duration_s is not None:
            self.request_seconds.observe(duration_s)
        if queue_s is not None:
            self.queue_seconds.observe(queue_s)

    def rejected(self, tenant: str, kind: str) -> None:
        self.rejections.labels(self._tenant(tenant), kind).inc()

    def first_text(self, seconds: float) -> None:
        self.ttft_seconds.observe(seconds)

    def model_fallback(self, profile: str, trigger: str) -> None:
        # The trigger is the CLI's word (a few fixed values); bounded all the same against a new one.
        self.model_fallbacks.labels(profile, trigger if trigger in FALLBACK_TRIGGERS else "other").inc()

    def upstream_retry(self, status: int | None) -> None:
        self.upstream_retries.labels(upstream_status(status)).inc()

    def upstream_error(self, status: int | None) -> None:
        self.upstream_errors.labels(upstream_status(status)).inc()


class WorkerMetrics:
    """What the pools report (a `claudepool.pool.events.PoolObserver`): spawns, exits by reason, resets."""

    def __init__(self, registry: CollectorRegistry, pools: Iterable[str]) -> None:
        r = registry
        self.spawns = Counter("claudepool_worker_spawns", "Workers started and ready.", ["profile"], registry=r)
        self.exits = Counter("claudepool_worker_exits", "Workers that left the pool, by reason.",
                             ["profile", "reason"], registry=r)
        self.spawn_seconds = Histogram("claudepool_worker_spawn_seconds", "Spawn to ready (initialize answered).",
                                       ["profile"], buckets=_SPAWN_SECONDS, registry=r)
        self.resets = Counter("claudepool_worker_resets", "Confirmed /clear resets.", ["profile"], registry=r)
        for profile in pools:
            self.spawns.labels(profile)
            self.resets.labels(profile)
            self.spawn_seconds.labels(profile)
            for reason in EXIT_REASONS:
                self.exits.labels(profile, reason)

    def worker_spawned(self, profile: str, seconds: float) -> None:
        self.spawns.labels(profile).inc()
        self.spawn_seconds.labels(profile).observe(seconds)

    def worker_exited(self, profile: str, reason: str) -> None:
        self.exits.labels(profile, reason if reason in EXIT_REASONS else "crash").inc()

    def worker_reset(self, profile: str) -> None:
        self.resets.labels(profile).inc()


class UsageMetrics:
    """What the meter reports: tokens and cost of every billed turn, by tenant and model."""

    def __init__(self, registry: CollectorRegistry, tenants: TenantLabels, *, max_model_labels: int) -> None:
        self._tenant = tenants
        self._max_models = max_model_labels
        self._models: set[str] = set()
        self.tokens = Counter("claudepool_tokens", "Tokens billed, by tenant, model and type.",
                              ["tenant", "model", "type"], registry=registry)
        self.cost = Counter("claudepool_cost_usd", "Cost billed in USD (the CLI's figure).", ["tenant", "model"],
                            registry=registry)

    def model(self, name: str) -> str:
        if name in self._models:
            return name
        if len(self._models) < self._max_models:
            self._models.add(name)
            return name
        return OTHER

    def turn_billed(self, record: UsageRecord) -> None:
        tenant, model = self._tenant(record.tenant), self.model(record.model)
        for kind, count in (("input", record.input_tokens), ("output", record.output_tokens),
                            ("cache_read", record.cache_read_input_tokens),
                            ("cache_write", record.cache_creation_input_tokens)):
            self.tokens.labels(tenant, model, kind).inc(count)
        self.cost.labels(tenant, model).inc(record.cost_usd)


class StoreMetrics:
    """What the instrumented store reports: each operation's latency, and its failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.store_errors = Counter("claudepool_store_errors", "Store operations that failed.", ["operation"],
                                    registry=registry)
        self.store_seconds = Histogram("claudepool_store_operation_seconds", "Store operation latency.",
                                       ["operation"], buckets=_SECONDS, registry=registry)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
            self.store_seconds.labels(operation)

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self.store_seconds.labels(operation).observe(seconds)
        if failed:
            self.store_errors.labels(operation).inc()


JOB_LANES = ("pool", "batch_api")
JOB_ENDS = ("succeeded", "failed", "cancelled", "dead")
WEBHOOK_STATES = ("delivered", "failed")


class JobMetrics:
    """Jobs as this daemon saw them: submitted here, ended here (settled, cancelled, or ended in a
    claim), by lane and end; webhook deliveries by how they ended. No tenant label: a tenant's own
    jobs are in its API, and a flood of them must not grow the series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.submitted = Counter("claudepool_jobs_submitted_total", "Jobs stored by this daemon, by lane.",
                                 ["lane"], registry=r)
        self.ended = Counter("claudepool_jobs_ended_total", "Jobs this daemon ended, by lane and how they ended.",
                             ["lane", "status"], registry=r)
        self.webhooks = Counter("claudepool_job_webhooks_total", "Webhook deliveries that ended, by state.",
                                ["state"], registry=r)
        for lane in JOB_LANES:
            self.submitted.labels(lane)
            for status in JOB_ENDS:
                self.ended.labels(lane, status)
        for state in WEBHOOK_STATES:
            self.webhooks.labels(state)
