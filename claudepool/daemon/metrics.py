"""Prometheus metrics on a private registry. Pool state is read at scrape time by a collector.

Only the series the daemon needs to be operated are here so far; the observability release adds the
memory, throughput and tenant series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from claudepool.daemon.app import Daemon

WORKER_STATES = ("starting", "idle", "leased", "cleaning", "closing")
REQUEST_OUTCOMES = ("ok", "model_error", "error", "cancelled", "draining")


class Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_DaemonCollector(daemon))


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("claudepool_workers", "Workers by pool state.", labels=["profile", "state"])
        max_workers = GaugeMetricFamily("claudepool_max_workers", "Worker ceiling in force.", labels=["profile"])
        waiting = GaugeMetricFamily("claudepool_waiting_requests", "Requests waiting for a worker.",
                                    labels=["profile"])
        healthy = GaugeMetricFamily("claudepool_pool_healthy", "1 unless the boot breaker is open.",
                                    labels=["profile"])
        for name, pool in self.daemon.pools.items():
            counts = pool.counts()
            for state in WORKER_STATES:
                workers.add_metric([name, state], counts[state])
            max_workers.add_metric([name], pool.max_workers)
            waiting.add_metric([name], counts["waiting"])
            healthy.add_metric([name], 1 if pool.healthy else 0)
        yield from (workers, max_workers, waiting, healthy)

        requests = CounterMetricFamily("claudepool_requests", "Requests answered, by outcome.", labels=["outcome"])
        counted = self.daemon.service.requests_by_outcome
        for outcome in REQUEST_OUTCOMES:
            requests.add_metric([outcome], counted.get(outcome, 0))
        yield requests
        yield GaugeMetricFamily("claudepool_in_flight_requests", "Requests being served.",
                                value=self.daemon.service.in_flight)
        yield GaugeMetricFamily("claudepool_draining", "1 while shutting down.",
                                value=1 if self.daemon.service.draining else 0)
