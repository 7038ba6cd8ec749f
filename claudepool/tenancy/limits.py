"""Per-tenant requests-per-minute and tokens-per-minute limits, on the `limits` library.

`limits` gives sliding-window counters with weighted hits on in-process memory or on Redis (shared
by every daemon), which is what both limits need; only the token limit needs a twist. Tokens are
known only after a turn, so they are *recorded* after it (a hit weighted by the real usage) and
*checked* before the next request. `limits` refuses a hit that would cross its limit, which would
drop exactly the usage that crossed it, so tokens are counted on an item with an unreachable limit
and compared with the tenant's own limit here.

Fail open: when the shared storage is unreachable, both limits fall back to a local in-memory
limiter (per daemon, so a tenant may get up to N times its limit across N daemons for the outage),
and each fallback is logged and counted. Budgets, which cost money, fail closed instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.util import WindowStats

from claudepool.errors import RateLimited

log = logging.getLogger(__name__)

_COUNTING_LIMIT = 10**15  # tokens are counted against this, then compared with the tenant's limit
_RETRYABLE = (StorageError, ConnectionError, TimeoutError, OSError)
T = TypeVar("T")


def limits_storage_uri(store_url: str) -> str:
    """``redis://…`` / ``rediss://…`` / ``unix:///path`` as `limits` spells its async Redis URIs."""
    if store_url.startswith("unix://"):
        return "async+redis+unix://" + store_url.removeprefix("unix://")
    return "async+" + store_url


class RateLimiter:
    """``RateLimiter()`` limits in this process; ``RateLimiter(redis_url)`` limits across every
    daemon on that Redis (call `close` to drop its connections)."""

    def __init__(self, store_url: str = "", *, key_prefix: str = "cp", socket_timeout_s: float = 2.0) -> None:
        self._deadline_s = 2 * socket_timeout_s
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._pool: redis.asyncio.ConnectionPool | None = None
        if store_url:
            # Our own pool, closed by `close`: `limits` would otherwise open one nobody closes. No
            # socket_timeout (see RedisStore: it makes redis-py drop cancellations); `_shared_call`
            # bounds each call instead.
            self._pool = redis.asyncio.ConnectionPool.from_url(store_url, socket_timeout=None,
                                                               socket_connect_timeout=socket_timeout_s)
            storage = RedisStorage(limits_storage_uri(store_url), implementation="redispy", wrap_exceptions=True,
                                   key_prefix=f"{key_prefix}:limits", connection_pool=self._pool)  # type: ignore[arg-type]  # documented, typed as scalars
            self._shared = SlidingWindowCounterRateLimiter(storage)
        self.fallbacks = 0
        self._last_fallback_log = 0.0

    async def check(self, tenant: str, *, requests_per_minute: int, tokens_per_minute: int) -> None:
        """Count this request and raise `RateLimited` if either limit is spent (0 = no limit)."""
        if requests_per_minute:
            item = RateLimitItemPerMinute(requests_per_minute)
            if not await self._hit(item, tenant, "rpm", cost=1):
                await self._reject(tenant, "requests_per_minute", item, "rpm",
                                   f"more than {requests_per_minute} requests per minute")
        if tokens_per_minute:
            counting = RateLimitItemPerMinute(_COUNTING_LIMIT)
            used = _COUNTING_LIMIT - (await self._stats(counting, tenant, "tpm")).remaining
            if used >= tokens_per_minute:
                await self._reject(tenant, "tokens_per_minute", counting, "tpm",
                                   f"{used} of {tokens_per_minute} tokens per minute used")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    async def record_tokens(self, tenant: str, tokens: int) -> None:
        """Add a settled turn's tokens to the tenant's per-minute count."""
        if tokens > 0:
            await self._hit(RateLimitItemPerMinute(_COUNTING_LIMIT), tenant, "tpm", cost=tokens)

    # -- internals -------------------------------------------------------------------------------

    def _ids(self, tenant: str, kind: str) -> tuple[str, str]:
        return f"{{{tenant}}}", kind  # the hash tag keeps a tenant's keys in one Redis Cluster slot

    async def _hit(self, item: RateLimitItem, tenant: str, kind: str, *, cost: int) -> bool:
        if self._shared is not None:
            try:
                return await self._shared_call(self._shared.hit(item, *self._ids(tenant, kind), cost=cost))
            except _RETRYABLE as exc:
                self._fell_back(exc)
        return await self._local.hit(item, *self._ids(tenant, kind), cost=cost)

    async def _stats(self, item: RateLimitItem, tenant: str, kind: str) -> WindowStats:
        if self._shared is not None:
            try:
                return await self._shared_call(self._shared.get_window_stats(item, *self._ids(tenant, kind)))
            except _RETRYABLE as exc:
                self._fell_back(exc)
        return await self._local.get_window_stats(item, *self._ids(tenant, kind))

    async def _shared_call(self, call: Awaitable[T]) -> T:
        """A call to the shared storage, bounded: a Redis that accepts and never answers is an outage."""
        async with asyncio.timeout(self._deadline_s):
            return await call

    async def _reject(self, tenant: str, kind: str, item: RateLimitItem, key: str, why: str) -> None:
        stats = await self._stats(item, tenant, key)
        wait_s = max(1.0, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(f"rate limited: {why}", kind=kind, retry_after_s=wait_s)

    def _fell_back(self, exc: BaseException) -> None:
        self.fallbacks += 1
        now = time.monotonic()
        if now - self._last_fallback_log > 10:
            self._last_fallback_log = now
            log.warning("rate-limit store unreachable (%s); limiting locally per daemon (fail open)", exc)
