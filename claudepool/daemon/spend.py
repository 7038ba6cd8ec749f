"""Budgets and spend of the labelled tenants, as gauges.

The spend lives in the store (shared by every daemon on it), and a scrape must not wait on the
store: `TenantSpend.run` refreshes it every few seconds in the background, and the collector
exports the last values (0 until the first refresh, so a panel is never empty).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from claudepool.daemon.metrics import TenantLabels
from claudepool.errors import ClaudepoolError
from claudepool.store.base import Store
from claudepool.tenancy.tenants import TenantRegistry


class TenantSpend(Collector):
    """``claudepool_tenant_budget_usd`` and ``claudepool_tenant_spent_usd``, and the loop that keeps
    the spend current."""

    def __init__(self, tenants: TenantRegistry, store: Store, labels: TenantLabels,
                 registry: CollectorRegistry) -> None:
        self._tenants = tenants
        self._store = store
        self._labels = labels
        # tenant -> (spent today, spent this month), as of the last refresh.
        self.spent: dict[str, tuple[float, float]] = {}
        registry.register(self)

    async def run(self, interval_s: float = 15.0) -> None:
        """Refresh the spend of budgeted tenants every ``interval_s``, forever."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval_s)

    async def refresh(self) -> None:
        for name in sorted(self._labels.names):
            tenant = self._tenants.get(name)
            if tenant is None or not tenant.has_budget:
                continue
            try:
                state = await self._store.budget(name)
            except ClaudepoolError:
                return  # the store is down: keep the last values; store_up says why
            self.spent[name] = (state.day_spent_usd, state.month_spent_usd)

    def collect(self) -> Iterator[Metric]:
        limits = GaugeMetricFamily("claudepool_tenant_budget_usd", "Configured budgets (0 = none).",
                                   labels=["tenant", "period"])
        spent = GaugeMetricFamily("claudepool_tenant_spent_usd",
                                  "Spend this UTC day and month of tenants with a budget, from the store "
                                  "(shared by every daemon on it), refreshed every few seconds.",
                                  labels=["tenant", "period"])
        for name in sorted(self._labels.names):
            tenant = self._tenants.get(name)
            if tenant is not None:
                limits.add_metric([name, "day"], tenant.daily_budget_usd)
                limits.add_metric([name, "month"], tenant.monthly_budget_usd)
            if tenant is not None and tenant.has_budget:
                day, month = self.spent.get(name, (0.0, 0.0))
                spent.add_metric([name, "day"], day)
                spent.add_metric([name, "month"], month)
        yield limits
        yield spent
