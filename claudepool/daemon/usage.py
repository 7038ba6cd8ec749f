"""Usage reports and ledger reads: what the store says a tenant spent, and the bound on ledger reads."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from claudepool.errors import TooManyInFlight
from claudepool.store.base import Store, UsageTotals, Window
from claudepool.tenancy.tenants import TenantRegistry


async def usage_report(store: Store, tenants: TenantRegistry, span: Window, scope: list[str] | None) -> dict[str, Any]:
    """Usage per tenant and model over ``span``, with each configured tenant's budget state.

    ``scope`` is the tenants to report (None: every tenant the store knows)."""
    usage = await store.usage(span, scope)
    report: dict[str, Any] = {}
    for name in sorted(set(usage) | set(scope or [])):
        models = usage.get(name, {})
        total = UsageTotals()
        for totals in models.values():
            for field, value in totals.to_dict().items():
                setattr(total, field, getattr(total, field) + value)
        entry: dict[str, Any] = {"models": {m: t.to_dict() for m, t in models.items()}, "total": total.to_dict()}
        configured = tenants.get(name)
        if configured is not None:
            state = await store.budget(name)
            entry["budget"] = {
                "daily_limit_usd": configured.daily_budget_usd,
                "monthly_limit_usd": configured.monthly_budget_usd,
                "day_spent_usd": round(state.day_spent_usd, 10),
                "month_spent_usd": round(state.month_spent_usd, 10),
                "reserved_usd": round(state.reserved_usd, 10),
            }
        report[name] = entry
    return {"window": {"kind": span.kind, "key": span.label()}, "tenants": report}


class LedgerReads:
    """At most ``max_per_reader`` ledger reads in flight per reader (a tenant, or ``admin``), so a
    tenant cannot make the daemon build large answers for it over and over, at once."""

    def __init__(self, max_per_reader: int) -> None:
        self.max_per_reader = max_per_reader
        self._reads: Counter[str] = Counter()

    @contextlib.contextmanager
    def held(self, reader: str) -> Iterator[None]:
        """One read by ``reader`` for the duration of the block; `TooManyInFlight` past the bound."""
        if self._reads[reader] >= self.max_per_reader:
            raise TooManyInFlight(f"{self._reads[reader]} ledger reads of this tenant are in flight, its limit")
        self._reads[reader] += 1
        try:
            yield
        finally:
            self._reads[reader] -= 1
            if self._reads[reader] <= 0:
                del self._reads[reader]
