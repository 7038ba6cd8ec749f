"""The in-memory store: the default for one daemon. Nothing survives a restart.

Every method runs to completion without awaiting, so each is atomic on the event loop, which is
what the Lua scripts give the Redis store.

No operation costs more as the daemon ages or as other tenants add data, and everything kept is
bounded: settled record ids by count and age (`SettledIds`), each tenant's reservations by their
TTL (`HeldReservations`), spend and usage by bucket age, the ledger by ``ledger_max_records``.
State is laid out by what each read asks for: spend and usage by time bucket, then tenant;
reservations, ledger and sessions by tenant.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from claudepool.store.base import (
    SETTLED_MAX_IDS,
    SETTLED_MEMORY_S,
    BudgetState,
    SessionRecord,
    Usage,
    UsageRecord,
    UsageTotals,
    Window,
    day_key,
    grant,
    month_key,
)
from claudepool.store.memory_ledger import RecordLog

_DAY_KEEP_S = 40 * 86400.0
_MONTH_KEEP_S = 400 * 86400.0
_PRUNE_INTERVAL_S = 3600.0


class SettledIds:
    """The record ids settled recently: the newest ``max_ids``, none older than ``max_age_s``.

    Kept in settle order and forgotten from the front, so each settle does O(1) work at any uptime.
    """

    def __init__(self, *, max_ids: int, max_age_s: float) -> None:
        if max_ids <= 0:
            raise ValueError("max_ids must be positive")
        self.max_ids = max_ids
        self.max_age_s = max_age_s
        self._at: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._at

    def add(self, record_id: str, now: float) -> None:
        self._at[record_id] = now
        self.forget(now)

    def forget(self, now: float) -> None:
        """Drop ids past the count bound, and ids older than the age bound (from the oldest settled)."""
        settled, cutoff = self._at, now - self.max_age_s
        while settled and (len(settled) > self.max_ids or next(iter(settled.values())) < cutoff):
            settled.popitem(last=False)


class HeldReservations:
    """One tenant's reservations: amount and expiry by id, their total, and a heap of expiries.

    A reserve, settle or release is O(log n) in the tenant's own reservations. The heap may hold
    entries of ids since replaced or dropped (skipped when they surface); it is rebuilt once they
    outnumber the live ones, so it stays within twice the reservations held.
    """

    __slots__ = ("_by_id", "_expiries", "_total_usd")

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[float, float]] = {}  # id -> (amount USD, expires at)
        self._expiries: list[tuple[float, str]] = []  # heap of (expires at, id)
        self._total_usd = 0.0

    def __len__(self) -> int:
        return len(self._by_id)

    def expire(self, now: float) -> None:
        """Drop every reservation whose expiry is at or before ``now``."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, rid = heapq.heappop(heap)
            held = self._by_id.get(rid)
            if held is not None and held[1] == expires_at:
                self.drop(rid)

    def amount(self, rid: str) -> float:
        held = self._by_id.get(rid)
        return held[0] if held is not None else 0.0

    def total_usd(self) -> float:
        return max(self._total_usd, 0.0)  # no amount is negative: below 0 is rounding

    def hold(self, rid: str, amount_usd: float, expires_at: float) -> None:
        """Hold ``amount_usd`` under ``rid``, replacing what ``rid`` held before."""
        self.drop(rid)
        self._by_id[rid] = (amount_usd, expires_at)
        self._total_usd += amount_usd
        heapq.heappush(self._expiries, (expires_at, rid))

    def drop(self, rid: str) -> None:
        held = self._by_id.pop(rid, None)
        if held is None:
            return
        if not self._by_id:
            # Nothing held: exactly nothing reserved, whatever rounding the running total gathered.
            self._total_usd = 0.0
            self._expiries.clear()
            return
        self._total_usd -= held[0]
        if not math.isfinite(self._total_usd):  # an inf amount went (inf - inf): count the rest again
            self._total_usd = math.fsum(amount for amount, _ in self._by_id.values())
        if len(self._expiries) > 2 * len(self._by_id) + 16:
            self._expiries = [(expires_at, r) for r, (_, expires_at) in self._by_id.items()]
            heapq.heapify(self._expiries)


class MemoryStore:
    backend = "memory"

    def __init__(self, *, ledger_max_records: int = 100_000, clock: Callable[[], float] = time.time,
                 settled_max_ids: int = SETTLED_MAX_IDS, settled_memory_s: float = SETTLED_MEMORY_S) -> None:
        self._clock = clock
        self._reservations: dict[str, HeldReservations] = {}
        self._spend: dict[str, dict[str, float]] = {}  # bucket ("d:YYYYMMDD" | "m:YYYYMM") -> tenant -> USD
        self._usage: dict[str, dict[str, dict[str, UsageTotals]]] = {}  # bucket -> tenant -> model -> totals
        self._settled = SettledIds(max_ids=settled_max_ids, max_age_s=settled_memory_s)
        self._ledger = RecordLog(ledger_max_records)
        self._sessions: dict[str, dict[str, SessionRecord]] = {}  # tenant -> session id -> record
        self._open_sessions: dict[str, set[str]] = {}  # tenant -> ids not closed
        # tenant -> digest -> (session id, expiry in unix s); expired entries go at the next put
        self._conversations: dict[str, dict[str, tuple[str, float]]] = {}
        self._last_pruned_at = 0.0

    async def reserve(self, tenant: str, reservation_id: str, amount_usd: float, *, daily_limit_usd: float,
                      monthly_limit_usd: float, ttl_s: float, min_usd: float | None = None) -> float:
        now = self._clock()
        held = self._reservations.get(tenant)
        if held is None:
            held = HeldReservations()
        held.expire(now)
        # Reserving again under the same id replaces, never doubles.
        reserved = max(held.total_usd() - held.amount(reservation_id), 0.0)
        granted = grant(amount_usd, min_usd, reserved, (
            (daily_limit_usd, self._spend_in(tenant, f"d:{day_key(now)}"), "daily"),
            (monthly_limit_usd, self._spend_in(tenant, f"m:{month_key(now)}"), "monthly"),
        ))
        self._reservations[tenant] = held
        held.hold(reservation_id, granted, now + ttl_s)
        return granted

    async def settle(self, record: UsageRecord) -> bool:
        now = self._clock()
        self._settled.forget(now)
        if record.record_id in self._settled:
            return False
        self._settled.add(record.record_id, now)
        self._forget_old_buckets(now)
        if record.reservation_id is not None:
            self._release(record.tenant, record.reservation_id)
        for bucket in (f"d:{day_key(record.at)}", f"m:{month_key(record.at)}"):
            spend = self._spend.setdefault(bucket, {})
            spend[record.tenant] = spend.get(record.tenant, 0.0) + record.cost_usd
            by_model = self._usage.setdefault(bucket, {}).setdefault(record.tenant, {})
            by_model.setdefault(record.model, UsageTotals()).add(record)
        self._ledger.append(record)
        return True

    async def release(self, tenant: str, reservation_id: str) -> None:
        self._release(tenant, reservation_id)

    async def budget(self, tenant: str) -> BudgetState:
        now = self._clock()
        held = self._reservations.get(tenant)
        if held is not None:
            held.expire(now)
        return BudgetState(
            day_spent_usd=self._spend_in(tenant, f"d:{day_key(now)}"),
            month_spent_usd=self._spend_in(tenant, f"m:{month_key(now)}"),
            reserved_usd=held.total_usd() if held is not None else 0.0,
        )

    async def usage(self, window: Window, tenants: list[str] | None = None) -> Usage:
        in_window = self._usage.get(f"{window.kind[0]}:{window.key}", {})
        names = in_window if tenants is None else [t for t in dict.fromkeys(tenants) if t in in_window]
        return {tenant: {model: UsageTotals(**totals.to_dict()) for model, totals in in_window[tenant].items()}
                for tenant in names}

    async def ledger(self, tenant: str | None = None, *, since: float | None = None,
                     limit: int = 1000) -> list[UsageRecord]:
        if since is not None and not since < math.inf:  # +inf or NaN: nothing is that late
            return []
        return self._ledger.select(tenant, since=since, limit=limit)

    async def session_put(self, record: SessionRecord) -> None:
        self._sessions.setdefault(record.tenant, {})[record.id] = SessionRecord.from_dict(record.to_dict())
        if record.state == "closed":
            self._forget_open(record.tenant, record.id)
        else:
            self._open_sessions.setdefault(record.tenant, set()).add(record.id)

    async def session_create(self, record: SessionRecord, *, max_open: int) -> bool:
        if max_open > 0 and len(self._open_sessions.get(record.tenant, ())) >= max_open:
            return False
        await self.session_put(record)  # returns without suspending: atomic with the count
        return True

    async def session_get(self, tenant: str, session_id: str) -> SessionRecord | None:
        found = self._sessions.get(tenant, {}).get(session_id)
        return SessionRecord.from_dict(found.to_dict()) if found is not None else None

    async def session_list(self, tenant: str | None = None) -> list[SessionRecord]:
        if tenant is None:
            picked = [r for mine in self._sessions.values() for r in mine.values()]
        else:
            picked = list(self._sessions.get(tenant, {}).values())
        return [SessionRecord.from_dict(r.to_dict()) for r in sorted(picked, key=lambda r: r.created_at)]

    async def session_delete(self, tenant: str, session_id: str) -> None:
        mine = self._sessions.get(tenant)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                del self._sessions[tenant]
        self._forget_open(tenant, session_id)

    async def conversation_put(self, tenant: str, digest: str, session_id: str, ttl_s: float) -> None:
        now = self._clock()
        mine = self._conversations.setdefault(tenant, {})
        for old in [d for d, (_, expires_at) in mine.items() if expires_at <= now]:
            del mine[old]  # O(the tenant's digests), which its conversation bound keeps small
        mine[digest] = (session_id, now + ttl_s)

    async def conversation_claim(self, tenant: str, digest: str) -> str | None:
        found = self._conversations.get(tenant, {}).pop(digest, None)  # no await: atomic
        if found is None or found[1] <= self._clock():
            return None
        return found[0]

    def _forget_open(self, tenant: str, session_id: str) -> None:
        open_ids = self._open_sessions.get(tenant)
        if open_ids is not None:
            open_ids.discard(session_id)
            if not open_ids:
                del self._open_sessions[tenant]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _spend_in(self, tenant: str, bucket: str) -> float:
        return self._spend.get(bucket, {}).get(tenant, 0.0)

    def _release(self, tenant: str, reservation_id: str) -> None:
        held = self._reservations.get(tenant)
        if held is not None:
            held.drop(reservation_id)
            if not held:
                del self._reservations[tenant]

    def _forget_old_buckets(self, now: float) -> None:
        """Keep ~40 days of day buckets and ~400 of month buckets, as the Redis store's TTLs do.

        Hourly, over the buckets alone (about 55 of them), not over every tenant's data."""
        if now - self._last_pruned_at < _PRUNE_INTERVAL_S:
            return
        self._last_pruned_at = now
        oldest_day, oldest_month = day_key(now - _DAY_KEEP_S), month_key(now - _MONTH_KEEP_S)
        for store in (self._spend, self._usage):
            stale = [b for b in store if (b[0] == "d" and b[2:] < oldest_day) or (b[0] == "m" and b[2:] < oldest_month)]
            for bucket in stale:
                del store[bucket]
