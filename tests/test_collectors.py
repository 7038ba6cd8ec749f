"""Each component's metrics on a registry of its own (issue 11): the collectors read one component
each, with no daemon around it and no process, and the label bounds hold."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from claudepool.config import MeteringSettings, load_settings
from claudepool.daemon import collectors, metrics
from claudepool.daemon.app import Daemon
from claudepool.daemon.collectors import (
    LimiterCollector,
    MeterCollector,
    PoolCollector,
    ServiceCollector,
    SessionCollector,
    StoreCollector,
)
from claudepool.daemon.metrics import OTHER, TenantLabels, UsageMetrics, WorkerMetrics
from claudepool.daemon.spend import TenantSpend
from claudepool.errors import StoreError
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.store.base import BudgetState, UsageRecord
from claudepool.store.instrumented import InstrumentedStore
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.tenants import Tenant, TenantRegistry
from tests.helpers import closed_port_url
from tests.test_facade import daemon

__all__ = ["daemon"]


def test_the_module_doctests_pass() -> None:
    import doctest

    assert doctest.testmod(metrics).failed == 0
    assert doctest.testmod(collectors).failed == 0


class FlakyStore(MemoryStore):
    """The memory store, with budget reads that fail while ``down``: an outage to inject."""

    down = False

    async def budget(self, tenant: str) -> BudgetState:
        if self.down:
            raise StoreError("the store is down")
        return await super().budget(tenant)


def record(tenant: str, model: str, *, output_tokens: int = 10, cost_usd: float = 0.5) -> UsageRecord:
    return UsageRecord(record_id=f"{tenant}-{model}-{time.monotonic_ns()}", request_id="r", tenant=tenant,
                       profile="default", model=model, outcome="ok", at=time.time(), output_tokens=output_tokens,
                       cost_usd=cost_usd)


def test_tenant_and_model_labels_are_bounded() -> None:
    registry = CollectorRegistry()
    labels = TenantLabels(["c", "a", "b"], max_labels=2)
    assert labels.names == {"a", "b"}
    assert (labels("a"), labels("c"), labels("unknown")) == ("a", OTHER, OTHER)
    usage = UsageMetrics(registry, labels, max_model_labels=1)
    usage.turn_billed(record("a", "sonnet"))
    usage.turn_billed(record("c", "haiku"))
    value = registry.get_sample_value
    assert value("claudepool_tokens_total", {"tenant": "a", "model": "sonnet", "type": "output"}) == 10
    assert value("claudepool_cost_usd_total", {"tenant": OTHER, "model": OTHER}) == 0.5


def test_worker_series_exist_at_zero_and_an_unknown_reason_counts_as_a_crash() -> None:
    registry = CollectorRegistry()
    workers = WorkerMetrics(registry, ["default", "default.sessions"])
    value = registry.get_sample_value
    assert value("claudepool_worker_exits_total", {"profile": "default.sessions", "reason": "idle"}) == 0
    workers.worker_exited("default", "a reason nobody planned")
    workers.worker_spawned("default", 0.4)
    assert value("claudepool_worker_exits_total", {"profile": "default", "reason": "crash"}) == 1
    assert value("claudepool_worker_spawn_seconds_count", {"profile": "default"}) == 1


async def test_pool_state_before_any_worker(make_pool: Callable[..., Pool], fake_profile: Profile) -> None:
    registry = CollectorRegistry(auto_describe=True)
    pool = make_pool(fake_profile, min_idle=1, max_workers=3)  # never started: no process
    PoolCollector({"default": pool}, registry)
    value = registry.get_sample_value
    for state in metrics.WORKER_STATES:
        assert value("claudepool_workers", {"profile": "default", "state": state}) == 0
    assert value("claudepool_max_workers", {"profile": "default", "kind": "configured"}) == 3
    assert value("claudepool_pool_breaker_open", {"profile": "default"}) == 0
    assert value("claudepool_queue_depth", {"priority": "batch"}) == 0
    assert value("claudepool_in_flight_turns") == 0


async def test_store_limiter_and_meter_state() -> None:
    registry = CollectorRegistry(auto_describe=True)

    flaky = FlakyStore()
    store = InstrumentedStore(flaky)
    StoreCollector(store, registry)
    value = registry.get_sample_value
    assert (value("claudepool_store_up"), value("claudepool_store_info", {"backend": "memory"})) == (1, 1)
    flaky.down = True
    with pytest.raises(StoreError):
        await store.budget("acme")
    assert value("claudepool_store_up") == 0

    with closed_port_url() as url:
        limiter = RateLimiter(url.replace("http://", "redis://"), socket_timeout_s=0.5)
        LimiterCollector(limiter, registry)
        await limiter.check("acme", requests_per_minute=10, tokens_per_minute=0)
        await limiter.close()
    assert value("claudepool_rate_limit_fallbacks_total") == 1

    meter = Meter(store, RateLimiter(), PricingTable.of(load_settings(None).pricing), MeteringSettings())
    MeterCollector(meter, registry)
    assert value("claudepool_metering_backlog_records") == 0
    meter.release("acme", "r1")
    assert value("claudepool_metering_backlog_records") == 1  # the flusher is not running: it waits
    assert value("claudepool_metering_dropped_records_total") == 0


async def test_spend_gauges_follow_the_store_and_keep_the_last_values_through_an_outage() -> None:
    registry = CollectorRegistry(auto_describe=True)
    every = frozenset({"default"})
    tenants = TenantRegistry([
        Tenant(name="acme", key_sha256="0" * 64, profile="default", profiles=every, daily_budget_usd=5.0),
        Tenant(name="beta", key_sha256="1" * 64, profile="default", profiles=every)])
    flaky = FlakyStore()
    store = InstrumentedStore(flaky)
    spend = TenantSpend(tenants, store, TenantLabels(tenants.names(), max_labels=10), registry)
    value = registry.get_sample_value
    assert value("claudepool_tenant_spent_usd", {"tenant": "acme", "period": "day"}) == 0  # before a refresh
    assert value("claudepool_tenant_spent_usd", {"tenant": "beta", "period": "day"}) is None  # no budget
    assert value("claudepool_tenant_budget_usd", {"tenant": "beta", "period": "day"}) == 0
    await store.settle(record("acme", "m", cost_usd=1.25))
    await spend.refresh()
    assert value("claudepool_tenant_spent_usd", {"tenant": "acme", "period": "month"}) == 1.25
    assert value("claudepool_tenant_budget_usd", {"tenant": "acme", "period": "day"}) == 5.0
    flaky.down = True
    await spend.refresh()
    assert value("claudepool_tenant_spent_usd", {"tenant": "acme", "period": "day"}) == 1.25


async def test_service_and_session_state(daemon: Daemon) -> None:
    registry = CollectorRegistry(auto_describe=True)
    ServiceCollector(daemon.service, registry)
    SessionCollector(daemon.sessions, registry)
    value = registry.get_sample_value
    assert (value("claudepool_draining"), value("claudepool_in_flight_requests")) == (0, 0)
    daemon.service.draining = True
    assert value("claudepool_draining") == 1
    acme = daemon.tenants.get("acme")
    assert acme is not None
    await daemon.sessions.create(acme)
    assert value("claudepool_session_events_total", {"event": "created"}) == 1
    assert value("claudepool_sessions_active") == 0  # created, not yet holding a worker


def test_a_series_exported_twice_is_refused() -> None:
    """Each name belongs to one collector: registering a second one for it fails at start-up."""
    registry = CollectorRegistry(auto_describe=True)
    collectors.ProcessCollector(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        collectors.ProcessCollector(registry)
