"""Per-tenant requests-per-minute and tokens-per-minute limits that hold in every real minute.

**The window.** Time is cut into ``buckets`` sub-buckets per window (60 one-second buckets for the
production minute). A limit counts what was admitted in the newest ``buckets + 1`` of them, the
current one included: a span that always covers at least the last full window. So in *any* real
window of ``window_s`` the limit is never exceeded, whatever the burst pattern and wherever the
window falls (no over-admission slack at all). The price is on the other side and bounded: what was
admitted between one window and one window plus one bucket ago (60-61 s) still counts, so a tenant
may be refused up to one bucket early, and ``Retry-After`` says exactly when the oldest counts leave.

**Tokens** are known only after a turn, so they are *recorded* after it (weighted by the real
usage, input, output, cache reads and writes) and *checked* before the next request: a request is
refused while the tokens recorded in the window reach the limit. Turns admitted before that point
are not stopped, so the tokens of one window can exceed the limit by what the turns in flight at
that moment use; every admission, though, saw fewer tokens than the limit in its last window.

**Why this and not a library.** We replaced `limits`' `SlidingWindowCounterRateLimiter`, which
weights the previous calendar window by the time left in it: an approximation that admits up to
twice the limit in a real window (a burst at the end of one calendar minute, then a steady trickle).
Exact alternatives, weighed on exactness, memory per tenant, cost per check and atomicity across
daemons:

* a sliding log (`limits`' `MovingWindowRateLimiter`, `pyrate-limiter`'s buckets) is exact but
  keeps one entry per unit of cost: a turn of 12 000 tokens is 12 000 list entries, and a limit of
  N requests keeps N timestamps per tenant. Both libraries also stamp entries with the client's
  clock, so daemons with skewed clocks disagree on the window.
* GCRA keeps one timestamp, but with a burst of b it admits b + rate x window in a window; holding
  "N per any minute" means b + rate x 60 s <= N: no burst, or a lower sustained rate than N/minute.
* sub-buckets (this module): exact upper bound, at most ``buckets + 1`` counters per tenant and
  limit (a Redis HASH of <= 61 small integers, ~1 KB, listpack-encoded), O(buckets) additions per
  check, weighted hits at no extra cost, and on Redis one Lua script (store/scripts/rate_limit.lua)
  per check that reads Redis's clock, checks both limits and counts the request atomically, for
  every daemon sharing the Redis. The same algorithm runs in memory (`LocalWindows`).

**Fail open.** When the shared store is unreachable, both limits fall back to the local windows
(per daemon, so a tenant may get up to N times its limit across N daemons for the outage), and each
fallback is logged and counted. Budgets, which cost money, fail closed instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions

from claudepool.errors import ConfigError, RateLimited
from claudepool.store import keys
from claudepool.store.redis import connect, redact_url, script_source

log = logging.getLogger(__name__)

REQUESTS = "requests_per_minute"
TOKENS = "tokens_per_minute"
_RETRYABLE = (redis.exceptions.RedisError, ConnectionError, TimeoutError, OSError)
T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    """A check's answer: admitted (``refused`` is None), or which limit refused and for how long."""

    refused: str | None = None
    used: int = 0
    retry_after_s: float = 0.0


class _Window:
    """One tenant's counts for one limit: (bucket index, count) oldest first, and their total."""

    __slots__ = ("buckets", "used")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.used = 0

    def prune(self, oldest: int) -> None:
        while self.buckets and self.buckets[0][0] < oldest:
            self.used -= self.buckets.popleft()[1]

    def add(self, index: int, count: int) -> None:
        if self.buckets and self.buckets[-1][0] == index:
            self.buckets[-1][1] += count
        else:
            self.buckets.append([index, count])
        self.used += count

    def wait_us(self, excess: int, now_us: int, width_us: int, buckets: int) -> int:
        """Until enough of the oldest buckets leave the window to free ``excess``."""
        freed = 0
        for index, count in self.buckets:
            freed += count
            if freed >= excess:
                return (index + buckets + 1) * width_us - now_us
        return width_us


class LocalWindows:
    """The sliding windows in this process: the default, and the fallback when Redis is down.

    >>> windows = LocalWindows(window_s=60, buckets=60)
    >>> [windows.check("acme", requests_limit=2, tokens_limit=0).refused for _ in range(3)]
    [None, None, 'requests_per_minute']
    """

    def __init__(self, *, window_s: float, buckets: int,
                 clock_us: Callable[[], int] = lambda: time.monotonic_ns() // 1000) -> None:
        self.buckets = buckets
        self.width_us = max(1, round(window_s * 1_000_000 / buckets))
        self._clock_us = clock_us
        self._windows: dict[tuple[str, str], _Window] = {}

    def check(self, tenant: str, *, requests_limit: int, tokens_limit: int) -> Verdict:
        now_us = self._clock_us()
        current = now_us // self.width_us
        if tokens_limit > 0:
            tokens = self._live(tenant, TOKENS, current)
            if tokens is not None and tokens.used >= tokens_limit:
                wait_us = tokens.wait_us(tokens.used - tokens_limit + 1, now_us, self.width_us, self.buckets)
                return Verdict(TOKENS, tokens.used, wait_us / 1e6)
        if requests_limit > 0:
            requests = self._live(tenant, REQUESTS, current)
            used = requests.used if requests is not None else 0
            if used + 1 > requests_limit:
                assert requests is not None
                wait_us = requests.wait_us(used + 1 - requests_limit, now_us, self.width_us, self.buckets)
                return Verdict(REQUESTS, used, wait_us / 1e6)
            self._windows.setdefault((tenant, REQUESTS), _Window()).add(current, 1)
        return Verdict()

    def take(self, key: str, costs: Mapping[str, tuple[int, int]]) -> Verdict:
        """Count each kind's ``cost`` against its ``limit`` (0: none), all or nothing: when any would
        exceed its limit in the window, nothing is counted and the verdict names it, with how long
        until enough of its oldest counts leave. A cost over its limit on its own never fits: its
        verdict waits a whole window (the caller refuses it for good). The gateway's account caps
        (`claudepool.gateway.caps`) count a call's requests and its input-token bound with this.

        >>> windows = LocalWindows(window_s=60, buckets=60)
        >>> [windows.take("acct", {"requests": (1, 10), "input_tokens": (400, 1000)}).refused for _ in range(3)]
        [None, None, 'input_tokens']
        """
        now_us = self._clock_us()
        current = now_us // self.width_us
        for kind, (cost, limit) in costs.items():
            if limit <= 0:
                continue
            window = self._live(key, kind, current)
            used = window.used if window is not None else 0
            if used + cost > limit:
                wait_us = (window.wait_us(used + cost - limit, now_us, self.width_us, self.buckets)
                           if window is not None and cost <= limit else (self.buckets + 1) * self.width_us)
                return Verdict(kind, used, wait_us / 1e6)
        for kind, (cost, limit) in costs.items():
            if limit > 0 and cost > 0:
                self._windows.setdefault((key, kind), _Window()).add(current, cost)
        return Verdict()

    def record(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            current = self._clock_us() // self.width_us
            self._live(tenant, TOKENS, current)
            self._windows.setdefault((tenant, TOKENS), _Window()).add(current, tokens)

    def bucket_count(self, tenant: str, kind: str) -> int:
        """How many buckets a tenant's window holds now (its memory)."""
        window = self._windows.get((tenant, kind))
        return len(window.buckets) if window is not None else 0

    def _live(self, tenant: str, kind: str, current: int) -> _Window | None:
        window = self._windows.get((tenant, kind))
        if window is not None:
            window.prune(current - self.buckets)
            if not window.buckets:  # an idle tenant costs nothing
                del self._windows[(tenant, kind)]
                return None
        return window


class RedisWindows:
    """The same windows on Redis, shared by every daemon on it (store/scripts/rate_limit.lua)."""

    def __init__(self, url: str, *, key_prefix: str, window_s: float, buckets: int, socket_timeout_s: float) -> None:
        self.buckets = buckets
        self.width_us = max(1, round(window_s * 1_000_000 / buckets))
        self._prefix = key_prefix
        try:
            # A check whose reply was lost to a broken connection is retried once and then counts
            # twice, which only refuses more.
            self._redis = connect(url, socket_timeout_s=socket_timeout_s, client_name="claudepool-limits")
        except ValueError:
            raise ConfigError(f"invalid Redis URL {redact_url(url)}") from None
        self._script = self._redis.register_script(script_source("rate_limit"))

    async def check(self, tenant: str, *, requests_limit: int, tokens_limit: int) -> Verdict:
        reply: list[Any] = await self._script(keys=self._keys(tenant), args=[
            "check", self.width_us, self.buckets, requests_limit, tokens_limit])
        if reply[0] == "ok":
            return Verdict()
        return Verdict(str(reply[0]), int(reply[1]), int(reply[2]) / 1e6)

    async def record(self, tenant: str, tokens: int) -> None:
        if tokens > 0:
            await self._script(keys=self._keys(tenant), args=["record", self.width_us, self.buckets, tokens])

    async def close(self) -> None:
        await self._redis.aclose()

    def _keys(self, tenant: str) -> list[str]:
        return [keys.rate_requests(self._prefix, tenant), keys.rate_tokens(self._prefix, tenant)]


class RateLimiter:
    """``RateLimiter()`` limits in this process; ``RateLimiter(redis_url)`` limits across every
    daemon on that Redis (call `close` to drop its connections). ``window_s`` is the window the
    per-minute limits count over: 60 s in production, shorter in tests."""

    def __init__(self, store_url: str = "", *, key_prefix: str = keys.DEFAULT_PREFIX, socket_timeout_s: float = 2.0,
                 window_s: float = 60.0, buckets: int = 60) -> None:
        self._deadline_s = 2 * socket_timeout_s
        self._local = LocalWindows(window_s=window_s, buckets=buckets)
        self._shared = RedisWindows(store_url, key_prefix=key_prefix, window_s=window_s, buckets=buckets,
                                    socket_timeout_s=socket_timeout_s) if store_url else None
        self.fallbacks = 0
        self._last_fallback_log = 0.0

    async def check(self, tenant: str, *, requests_per_minute: int, tokens_per_minute: int) -> None:
        """Count this request and raise `RateLimited` if either limit is spent (0 = no limit).

        A request refused by either limit is not counted."""
        if not requests_per_minute and not tokens_per_minute:
            return
        verdict: Verdict | None = None
        if self._shared is not None:
            try:
                verdict = await self._bounded(self._shared.check(
                    tenant, requests_limit=requests_per_minute, tokens_limit=tokens_per_minute))
            except _RETRYABLE as exc:
                self._fell_back(exc)
        if verdict is None:
            verdict = self._local.check(tenant, requests_limit=requests_per_minute, tokens_limit=tokens_per_minute)
        if verdict.refused == REQUESTS:
            why = f"more than {requests_per_minute} requests per minute"
        elif verdict.refused == TOKENS:
            why = f"{verdict.used} of {tokens_per_minute} tokens per minute used"
        else:
            return
        raise RateLimited(f"rate limited: {why}", kind=verdict.refused,
                          retry_after_s=max(1.0, math.ceil(verdict.retry_after_s)))

    async def record_tokens(self, tenant: str, tokens: int) -> None:
        """Add a settled turn's tokens to the tenant's window."""
        if tokens <= 0:
            return
        if self._shared is not None:
            try:
                await self._bounded(self._shared.record(tenant, tokens))
                return
            except _RETRYABLE as exc:
                self._fell_back(exc)
        self._local.record(tenant, tokens)

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()

    async def _bounded(self, call: Awaitable[T]) -> T:
        """A call to the shared windows under a deadline: a Redis that never answers is an outage."""
        async with asyncio.timeout(self._deadline_s):
            return await call

    def _fell_back(self, exc: BaseException) -> None:
        self.fallbacks += 1
        now = time.monotonic()
        if now - self._last_fallback_log > 10:
            self._last_fallback_log = now
            log.warning("rate-limit store unreachable (%s); limiting locally per daemon (fail open)",
                        str(exc) or type(exc).__name__)
