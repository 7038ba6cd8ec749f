"""Scrape-time collectors: each reads one component's state when /metrics is asked for.

As prometheus_client's ``GCCollector``, a collector is given the registry and registers itself, so
the composition root decides what is exported and no collector reads anything but the component it
was given. Values come from what the components already hold (the pool's last memory measurement,
the meter's backlog): a scrape reads no ``/proc`` file per worker, only the daemon's own RSS and CPU and
the host's available memory.

>>> registry = CollectorRegistry()
>>> _ = ProcessCollector(registry)
>>> registry.get_sample_value("claudepool_daemon_rss_bytes") > 0
True
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from claudepool.daemon.metrics import SESSION_EVENTS, WORKER_STATES
from claudepool.daemon.pools import PoolRegistry
from claudepool.daemon.service import PromptService
from claudepool.pool.capacity import Capacity
from claudepool.pool.memory import available_memory_bytes, plan_memory
from claudepool.pool.pool import Pool
from claudepool.pool.profile import pool_label
from claudepool.sessions.manager import SessionManager
from claudepool.store.instrumented import InstrumentedStore
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter


class PoolCollector(Collector):
    """Workers by state, worker ceilings, breakers, memory per worker and per pool, queue depth."""

    def __init__(self, pools: Mapping[str, Pool], registry: CollectorRegistry) -> None:
        self._pools = pools
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
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
        waiting = {"interactive": 0, "batch": 0}
        # Pools made on demand count together under their profile's label (PROFILE~custom): one
        # series per profile however many system prompts arrive. Their workers' own PSS and RSS
        # series are left out (their slots repeat across those pools); the totals include them.
        by_label: dict[str, list[tuple[str, Pool]]] = {}
        for pool_name, pool in list(self._pools.items()):
            by_label.setdefault(pool_label(pool_name), []).append((pool_name, pool))
        for name, named in by_label.items():
            pools = [pool for _, pool in named]
            own = named[0][0] == name  # one pool, of that very name: its workers have their own series
            counts = {state: sum(p.counts()[state] for p in pools) for state in WORKER_STATES}
            for state in WORKER_STATES:
                workers.add_metric([name, state], counts[state])
            ram_derived = soft = hard = 0
            for pool in pools:
                plan = pool.memory
                ram_derived += plan_memory(available_bytes=available, pool_pss_bytes=pool.total_pss_bytes(),
                                           memory_fraction=pool.config.memory_fraction,
                                           per_worker_bytes=plan.per_worker_bytes).max_workers
                # A pool without limits of its own is held by the shared capacity's.
                soft += min(plan.soft_limit_bytes, pool.capacity.plan.soft_limit_bytes)
                hard += min(plan.hard_limit_bytes, pool.capacity.plan.hard_limit_bytes)
                for worker in pool.workers():
                    in_turn += worker.in_turn()
                    if own:
                        if worker.pss_bytes is not None:
                            pss.add_metric([name, str(worker.slot)], worker.pss_bytes)
                        if worker.rss_bytes is not None:
                            rss.add_metric([name, str(worker.slot)], worker.rss_bytes)
                for priority, count in pool.waiting_by_priority().items():
                    waiting[priority] += count
            max_workers.add_metric([name, "configured"], sum(p.config.max_workers for p in pools))
            max_workers.add_metric([name, "ram_derived"], ram_derived)
            max_workers.add_metric([name, "effective"], sum(p.max_workers for p in pools))
            breaker.add_metric([name], int(any(str(p.breaker_state) != "closed" for p in pools)))
            total_pss.add_metric([name], sum(p.total_pss_bytes() for p in pools))
            budget.add_metric([name, "soft"], soft)
            budget.add_metric([name, "hard"], hard)
        yield from (workers, max_workers, breaker, pss, rss, total_pss, budget)
        queue = GaugeMetricFamily("claudepool_queue_depth", "Requests waiting for a worker.", labels=["priority"])
        for priority, count in waiting.items():
            queue.add_metric([priority], count)
        yield queue
        yield GaugeMetricFamily("claudepool_in_flight_turns", "Workers running a turn.", value=in_turn)


class OnDemandPoolCollector(Collector):
    """Pools made on demand for other system prompts: how many live, and how many were made, closed
    for room and reaped once idle (`claudepool.daemon.pools`)."""

    def __init__(self, pools: PoolRegistry, registry: CollectorRegistry) -> None:
        self._pools = pools
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        p = self._pools
        yield GaugeMetricFamily("claudepool_on_demand_pools", "Pools made on demand, alive now.",
                                value=len(p.on_demand))
        events = CounterMetricFamily("claudepool_on_demand_pool_events", "Pools made on demand: made, "
                                     "evicted (closed for room at the bound), reaped (closed once idle).",
                                     labels=["event"])
        for event, count in (("made", p.made), ("evicted", p.evicted), ("reaped", p.reaped)):
            events.add_metric([event], count)
        yield events


class CapacityCollector(Collector):
    """The worker ceiling and RAM budget all pools share: ceiling, live workers, evictions by pool."""

    def __init__(self, capacity: Capacity, registry: CollectorRegistry) -> None:
        self._capacity = capacity
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        capacity = self._capacity
        yield GaugeMetricFamily("claudepool_capacity_max_workers", "Worker ceiling shared by all pools.",
                                value=capacity.max_workers)
        yield GaugeMetricFamily("claudepool_capacity_workers",
                                "Live workers of all pools (closing ones count until gone).", value=capacity.live)
        yield GaugeMetricFamily("claudepool_capacity_pools", "Pools sharing the capacity.", value=capacity.pools)
        budget = GaugeMetricFamily("claudepool_capacity_memory_limit_bytes",
                                   "Total-PSS limits of all pools together.", labels=["limit"])
        budget.add_metric(["soft"], capacity.plan.soft_limit_bytes)
        budget.add_metric(["hard"], capacity.plan.hard_limit_bytes)
        yield budget
        evictions = CounterMetricFamily("claudepool_evictions", "Idle workers retired to make room for another "
                                        "pool (or past the shared hard memory limit), by the victim's pool.",
                                        labels=["pool"])
        by_label: Counter[str] = Counter()
        for pool, count in capacity.evictions.items():
            by_label[pool_label(pool)] += count  # pools made on demand: one series per profile
        for label, count in sorted(by_label.items()):
            evictions.add_metric([label], count)
        yield evictions


class ServiceCollector(Collector):
    """Requests being served, and whether the daemon drains."""

    def __init__(self, service: PromptService, registry: CollectorRegistry) -> None:
        self._service = service
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("claudepool_in_flight_requests", "Requests being served.",
                                value=self._service.in_flight)
        yield GaugeMetricFamily("claudepool_draining", "1 while shutting down.", value=int(self._service.draining))


class ProcessCollector(Collector):
    """The daemon's own memory, the memory available to it, and when the scrape was computed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._self = psutil.Process()
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("claudepool_daemon_rss_bytes", "RSS of the daemon process itself.",
                                value=self._self.memory_info().rss)
        # One event loop: near 1 s/s the daemon is the bottleneck, and a second daemon on the same
        # port (server.reuse_port) adds throughput. Its workers' CPU is theirs, not counted here.
        times = self._self.cpu_times()
        yield CounterMetricFamily("claudepool_daemon_cpu_seconds", "CPU (user + system) of the daemon process "
                                  "itself, without its workers.", value=times.user + times.system)
        yield GaugeMetricFamily("claudepool_memory_available_bytes",
                                "Memory available to the daemon (host, capped by its cgroup).",
                                value=available_memory_bytes())
        yield GaugeMetricFamily("claudepool_scrape_timestamp_seconds", "When this scrape was computed.",
                                value=time.time())


class SessionCollector(Collector):
    """Conversations held here, their transcripts' disk use, and their lifecycle events."""

    def __init__(self, sessions: SessionManager, registry: CollectorRegistry) -> None:
        self._sessions = sessions
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        s = self._sessions
        yield GaugeMetricFamily("claudepool_sessions_active", "Conversations holding a worker on this daemon.",
                                value=s.counts()["active_here"])
        yield GaugeMetricFamily("claudepool_session_transcript_bytes",
                                "Disk used by conversation transcripts at rest (as of the last sweep).",
                                value=s.transcript_bytes)
        events = CounterMetricFamily("claudepool_session_events", "Conversation lifecycle events.",
                                     labels=["event"])
        for event in SESSION_EVENTS:
            events.add_metric([event], s.events[event])
        yield events


class StoreCollector(Collector):
    """Which store backend is in use, and whether it answered last."""

    def __init__(self, store: InstrumentedStore, registry: CollectorRegistry) -> None:
        self._store = store
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("claudepool_store_info", "The store backend in use.", labels=["backend"])
        info.add_metric([self._store.backend], 1)
        yield info
        yield GaugeMetricFamily("claudepool_store_up", "1 unless the last store operation failed.",
                                value=int(self._store.up))


class LimiterCollector(Collector):
    """Rate-limit checks made locally because the store was down."""

    def __init__(self, limiter: RateLimiter, registry: CollectorRegistry) -> None:
        self._limiter = limiter
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("claudepool_rate_limit_fallbacks", "Rate-limit checks made locally: store down.",
                                  value=self._limiter.fallbacks)


class MeterCollector(Collector):
    """Usage records on their way to the store, those lost, and turns whose price disagrees."""

    def __init__(self, meter: Meter, registry: CollectorRegistry) -> None:
        self._meter = meter
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        m = self._meter
        yield GaugeMetricFamily("claudepool_metering_backlog_records", "Usage records waiting for the store.",
                                value=m.backlog)
        yield CounterMetricFamily("claudepool_metering_dropped_records",
                                  "Usage records dropped because the store stayed down past the buffer.",
                                  value=m.dropped)
        yield CounterMetricFamily("claudepool_price_mismatches", "Turns whose cost the price table disagrees with.",
                                  value=m.price_mismatches)
        yield CounterMetricFamily("claudepool_call_mismatches",
                                  "Turns whose tokens as the CLI reports them differ from the sum of their calls.",
                                  value=m.call_mismatches)
