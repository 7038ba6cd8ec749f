"""A `Store` wrapper that times every operation and remembers whether the store answered."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from claudepool.errors import StoreError
from claudepool.store.base import BudgetState, SessionRecord, Store, Usage, UsageRecord, Window

T = TypeVar("T")
CallObserver = Callable[[str, float, bool], None]


class InstrumentedStore:
    """Delegates to ``inner``; ``up`` is False after a failed operation until one succeeds."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.up = True
        self.observer: CallObserver | None = None

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return await call
        except StoreError:
            failed = True
            raise
        finally:
            self.up = not failed
            if self.observer is not None:
                self.observer(operation, time.perf_counter() - started, failed)

    async def reserve(self, tenant: str, reservation_id: str, amount_usd: float, *, daily_limit_usd: float,
                      monthly_limit_usd: float, ttl_s: float, min_usd: float | None = None) -> float:
        return await self._timed("reserve", self.inner.reserve(tenant, reservation_id, amount_usd,
                                                               daily_limit_usd=daily_limit_usd,
                                                               monthly_limit_usd=monthly_limit_usd, ttl_s=ttl_s,
                                                               min_usd=min_usd))

    async def settle(self, record: UsageRecord) -> bool:
        return await self._timed("settle", self.inner.settle(record))

    async def release(self, tenant: str, reservation_id: str) -> None:
        await self._timed("release", self.inner.release(tenant, reservation_id))

    async def budget(self, tenant: str) -> BudgetState:
        return await self._timed("budget", self.inner.budget(tenant))

    async def usage(self, window: Window, tenants: list[str] | None = None) -> Usage:
        return await self._timed("usage", self.inner.usage(window, tenants))

    async def ledger(self, tenant: str | None = None, *, since: float | None = None,
                     limit: int = 1000) -> list[UsageRecord]:
        return await self._timed("ledger", self.inner.ledger(tenant, since=since, limit=limit))

    async def session_put(self, record: SessionRecord) -> None:
        await self._timed("session", self.inner.session_put(record))

    async def session_create(self, record: SessionRecord, *, max_open: int) -> bool:
        return await self._timed("session", self.inner.session_create(record, max_open=max_open))

    async def session_get(self, tenant: str, session_id: str) -> SessionRecord | None:
        return await self._timed("session", self.inner.session_get(tenant, session_id))

    async def session_list(self, tenant: str | None = None) -> list[SessionRecord]:
        return await self._timed("session", self.inner.session_list(tenant))

    async def session_delete(self, tenant: str, session_id: str) -> None:
        await self._timed("session", self.inner.session_delete(tenant, session_id))

    async def conversation_put(self, tenant: str, digest: str, session_id: str, ttl_s: float) -> None:
        await self._timed("conversation", self.inner.conversation_put(tenant, digest, session_id, ttl_s))

    async def conversation_claim(self, tenant: str, digest: str) -> str | None:
        return await self._timed("conversation", self.inner.conversation_claim(tenant, digest))

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
