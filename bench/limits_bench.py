"""Rate limits under a flood: the most any real window holds, what a check costs, what a tenant keeps.

The soak of the issue, scaled in time: ``--clients`` concurrent clients hammer one tenant whose
limit is ``--limit`` per window, for three windows of ``--window-s`` (the production window is 60 s;
the algorithm only sees buckets of window/60, so a 6 s window is the same test ten times faster).
Every admission is stamped; the result is the most admissions any real window of that length held.
Run on the memory limiter, on Redis, and on the old one (`limits`' calendar-window counter) for
comparison. Then: the latency of one check, sequentially, and the Redis memory of a tenant whose
window is full (60 buckets of requests and of tokens).

    python -m bench.limits_bench [--clients 300] [--limit 600] [--window-s 6]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import redis.asyncio
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from claudepool.errors import RateLimited
from claudepool.store import keys
from claudepool.tenancy.limits import RateLimiter
from tests.redis_server import RedisServer

Check = Callable[[], Awaitable[bool]]


def busiest_window(stamps: list[float], window_s: float) -> int:
    stamps = sorted(stamps)
    best, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] >= window_s:
            first += 1
        best = max(best, last - first + 1)
    return best


async def soak(check: Check, clients: int, window_s: float) -> tuple[int, int]:
    """(admitted, the most admitted in one real window) for ``clients`` clients over three windows."""
    stamps: list[float] = []
    end = time.monotonic() + 3 * window_s

    async def client() -> None:
        while time.monotonic() < end:
            if await check():
                stamps.append(time.monotonic())
            await asyncio.sleep(0.005)  # a client that retries at once after its answer

    await asyncio.gather(*(client() for _ in range(clients)))
    return len(stamps), busiest_window(stamps, window_s)


def ours(limiter: RateLimiter, limit: int, tenant: str) -> Check:
    async def check() -> bool:
        try:
            await limiter.check(tenant, requests_per_minute=limit, tokens_per_minute=0)
        except RateLimited:
            return False
        return True

    return check


async def latency_us(check: Check, count: int = 2000) -> tuple[float, float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        await check()
        took.append(time.perf_counter() - started)
    took.sort()
    return statistics.median(took) * 1e6, took[int(len(took) * 0.99)] * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--window-s", type=float, default=6.0)
    args = parser.parse_args()
    server = RedisServer()
    server.start()
    memory = RateLimiter(window_s=args.window_s)
    shared = RateLimiter(server.url, window_s=args.window_s)
    old = SlidingWindowCounterRateLimiter(MemoryStorage())
    old_item = RateLimitItemPerSecond(args.limit, round(args.window_s))

    async def old_check() -> bool:
        return await old.hit(old_item, "acme")

    try:
        print(f"{args.clients} clients, limit {args.limit} per {args.window_s:g} s window, 3 windows")
        for name, check in (("memory", ours(memory, args.limit, "acme")), ("redis", ours(shared, args.limit, "acme")),
                            ("old (limits' counter)", old_check)):
            admitted, busiest = await soak(check, args.clients, args.window_s)
            print(f"  {name:<22} admitted {admitted:>5}, busiest real window {busiest:>5} "
                  f"({busiest / args.limit:.2f}x the limit)")
        for name, limiter in (("memory", memory), ("redis", shared)):
            p50, p99 = await latency_us(ours(limiter, 10**9, "lat"))
            print(f"check latency, {name}: p50 {p50:.1f} us, p99 {p99:.1f} us (one client, sequential)")
        # A full window on Redis: a request and a turn's tokens in each of the 60 buckets.
        started = time.monotonic()
        while time.monotonic() - started < args.window_s:
            await shared.check("full", requests_per_minute=10**9, tokens_per_minute=10**12)
            await shared.record_tokens("full", 12_000)
            await asyncio.sleep(args.window_s / 240)
        raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        try:
            sizes = [await raw.memory_usage(key) or 0 for key in (keys.rate_requests("cp", "full"),
                                                                     keys.rate_tokens("cp", "full"))]
            fields = [await raw.hlen(key) for key in (keys.rate_requests("cp", "full"), keys.rate_tokens("cp", "full"))]
        finally:
            await raw.aclose()
        print(f"redis memory of a full window: {sum(sizes)} bytes (requests {sizes[0]}, tokens {sizes[1]}; "
              f"{fields[0]} and {fields[1]} buckets)")
    finally:
        await memory.close()
        await shared.close()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
