"""The in-memory store: the default for one daemon. Nothing survives a restart.

Every method runs to completion without awaiting, so each is atomic on the event loop, which is
what the Lua scripts give the Redis store.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict, deque
from collections.abc import Callable

from claudepool.errors import BudgetExhausted
from claudepool.store.base import (
    BudgetState,
    SessionRecord,
    Usage,
    UsageRecord,
    UsageTotals,
    Window,
    day_key,
    month_key,
)

# Settled record ids are remembered this long for idempotency (a retried flush arrives much sooner).
_SETTLED_MEMORY_S = 3 * 86400.0
_DAY_KEEP_S = 40 * 86400.0
_MONTH_KEEP_S = 400 * 86400.0


class MemoryStore:
    backend = "memory"

    def __init__(self, *, ledger_max_records: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # tenant -> reservation id -> (amount, expires_at)
        self._reservations: dict[str, dict[str, tuple[float, float]]] = {}
        self._spend: dict[tuple[str, str], float] = defaultdict(float)  # (tenant, "d:KEY"|"m:KEY")
        self._usage: dict[tuple[str, str], dict[str, UsageTotals]] = defaultdict(dict)
        self._settled: dict[str, float] = {}
        self._ledger: deque[UsageRecord] = deque(maxlen=ledger_max_records)
        self._sessions: dict[tuple[str, str], SessionRecord] = {}
        self._open_sessions: dict[str, set[str]] = defaultdict(set)  # tenant -> ids not closed
        self._last_pruned_at = 0.0

    async def reserve(self, tenant: str, reservation_id: str, amount_usd: float, *, daily_limit_usd: float,
                      monthly_limit_usd: float, ttl_s: float) -> None:
        now = self._clock()
        held = self._live_reservations(tenant, now)
        reserved = sum(amount for rid, (amount, _) in held.items() if rid != reservation_id)
        for limit, spent, name in (
            (daily_limit_usd, self._spend.get((tenant, f"d:{day_key(now)}"), 0.0), "daily"),
            (monthly_limit_usd, self._spend.get((tenant, f"m:{month_key(now)}"), 0.0), "monthly"),
        ):
            if limit > 0 and spent + reserved + amount_usd > limit:
                raise BudgetExhausted(
                    f"the {name} budget of ${limit:g} cannot cover this request "
                    f"(spent ${spent:.4f}, reserved ${reserved:.4f}, needs up to ${amount_usd:.4f})"
                )
        self._reservations[tenant] = held
        held[reservation_id] = (amount_usd, now + ttl_s)

    async def settle(self, record: UsageRecord) -> bool:
        now = self._clock()
        self._forget_old_settlements(now)
        if record.record_id in self._settled:
            return False
        self._settled[record.record_id] = now
        self._forget_old_buckets(now)
        if record.reservation_id is not None:
            self._reservations.get(record.tenant, {}).pop(record.reservation_id, None)
        for bucket in (f"d:{day_key(record.at)}", f"m:{month_key(record.at)}"):
            self._spend[(record.tenant, bucket)] += record.cost_usd
            self._usage[(record.tenant, bucket)].setdefault(record.model, UsageTotals()).add(record)
        self._ledger.append(record)
        return True

    async def release(self, tenant: str, reservation_id: str) -> None:
        self._reservations.get(tenant, {}).pop(reservation_id, None)

    async def budget(self, tenant: str) -> BudgetState:
        now = self._clock()
        return BudgetState(
            day_spent_usd=self._spend.get((tenant, f"d:{day_key(now)}"), 0.0),
            month_spent_usd=self._spend.get((tenant, f"m:{month_key(now)}"), 0.0),
            reserved_usd=sum(amount for amount, _ in self._live_reservations(tenant, now).values()),
        )

    async def usage(self, window: Window, tenants: list[str] | None = None) -> Usage:
        bucket = f"{window.kind[0]}:{window.key}"
        out: Usage = {}
        for (tenant, key), by_model in self._usage.items():
            if key == bucket and (tenants is None or tenant in tenants):
                out[tenant] = {model: UsageTotals(**totals.to_dict()) for model, totals in by_model.items()}
        return out

    async def ledger(self, tenant: str | None = None, *, since: float | None = None,
                     limit: int = 1000) -> list[UsageRecord]:
        if limit <= 0:
            return []
        picked = (r for r in self._ledger
                  if (tenant is None or r.tenant == tenant) and (since is None or r.at >= since))
        return list(itertools.islice(picked, limit))  # stops at the limit-th match, not at the ledger's end

    async def session_put(self, record: SessionRecord) -> None:
        self._sessions[(record.tenant, record.id)] = SessionRecord.from_dict(record.to_dict())
        if record.state == "closed":
            self._open_sessions[record.tenant].discard(record.id)
        else:
            self._open_sessions[record.tenant].add(record.id)

    async def session_create(self, record: SessionRecord, *, max_open: int) -> bool:
        if max_open > 0 and len(self._open_sessions[record.tenant]) >= max_open:
            return False
        await self.session_put(record)  # returns without suspending: atomic with the count
        return True

    async def session_get(self, tenant: str, session_id: str) -> SessionRecord | None:
        found = self._sessions.get((tenant, session_id))
        return SessionRecord.from_dict(found.to_dict()) if found is not None else None

    async def session_list(self, tenant: str | None = None) -> list[SessionRecord]:
        picked = [r for (t, _), r in self._sessions.items() if tenant is None or t == tenant]
        return [SessionRecord.from_dict(r.to_dict()) for r in sorted(picked, key=lambda r: r.created_at)]

    async def session_delete(self, tenant: str, session_id: str) -> None:
        self._sessions.pop((tenant, session_id), None)
        self._open_sessions[tenant].discard(session_id)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _live_reservations(self, tenant: str, now: float) -> dict[str, tuple[float, float]]:
        held = self._reservations.get(tenant, {})
        for rid in [rid for rid, (_, expires_at) in held.items() if expires_at <= now]:
            del held[rid]
        return held

    def _forget_old_buckets(self, now: float) -> None:
        """Keep ~40 days of day buckets and ~400 of month buckets, as the Redis store's TTLs do."""
        if now - self._last_pruned_at < 3600:
            return
        self._last_pruned_at = now
        oldest_day, oldest_month = day_key(now - _DAY_KEEP_S), month_key(now - _MONTH_KEEP_S)
        for store in (self._spend, self._usage):
            stale = [k for k in store if (k[1][0] == "d" and k[1][2:] < oldest_day)
                     or (k[1][0] == "m" and k[1][2:] < oldest_month)]
            for k in stale:
                del store[k]

    def _forget_old_settlements(self, now: float) -> None:
        if len(self._settled) > 10_000:
            cutoff = now - _SETTLED_MEMORY_S
            self._settled = {rid: at for rid, at in self._settled.items() if at >= cutoff}
