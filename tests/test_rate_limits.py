"""Rate limits hold in every real window, whatever the burst pattern, on memory and on Redis.

Issue item 10: a tenant with ``requests_per_minute = 600`` got 980 in one real minute (a full burst,
then a steady trickle) because the old limiter weighted the previous calendar minute. These tests
sweep burst patterns and phases across the window's calendar boundary in real time, with a 1 s
window (a parameter of the limiter; production uses 60 s), and check every admission with a sliding
check over the timestamps the client saw. The same sweep on the old limiter is the negative control.

Each attempt is stamped before and after its call; the limiter decides somewhere in between. The
checks only use what those bounds make certain, so scheduling delays cannot fail a correct limiter:
an *overflow* is ``limit + 1`` admissions whose outer stamps span less than one window, and a
refusal is *justified* when at least ``limit`` admissions may have fallen in the window and one bucket
before it (the one-bucket slack the limiter documents).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from claudepool.errors import RateLimited
from claudepool.store import keys
from claudepool.tenancy.limits import REQUESTS, TOKENS, LocalWindows, RateLimiter, RedisWindows

WINDOW_S = 1.0
BUCKETS = 60
BUCKET_S = WINDOW_S / BUCKETS
LIMIT = 20
PHASES = (0.0, 0.25, 0.5, 0.75, 0.9)  # where in the calendar window each run starts
# Redis stamps with its own clock, the test with the monotonic one: allow for the two drifting apart.
CLOCK_SLACK_S = 0.002

Check = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class Attempt:
    before: float
    after: float
    admitted: bool
    weight: int = 1


def overflows(attempts: list[Attempt], limit: int, window_s: float) -> list[tuple[Attempt, Attempt]]:
    """Pairs of admissions ``limit`` apart that certainly fell inside one window of ``window_s``."""
    admitted = [a for a in attempts if a.admitted]
    return [(admitted[i], admitted[i + limit]) for i in range(len(admitted) - limit)
            if admitted[i + limit].after - admitted[i].before < window_s - CLOCK_SLACK_S]


def unjustified_refusals(attempts: list[Attempt], limit: int, window_s: float) -> list[Attempt]:
    """Refusals with fewer than ``limit`` admissions in the window plus one bucket before them."""
    out = []
    for k, attempt in enumerate(attempts):
        if attempt.admitted:
            continue
        horizon = attempt.before - window_s - BUCKET_S - CLOCK_SLACK_S
        if sum(1 for a in attempts[:k] if a.admitted and a.after > horizon) < limit:
            out.append(attempt)
    return out


def patterns(limit: int, seed: int) -> dict[str, list[float]]:
    """Send times over three windows, in windows from the run's start."""

    def burst(at: float, count: float) -> list[float]:
        return [at] * int(count)

    def trickle(start: float, end: float, per_window: float) -> list[float]:
        return [start + i / per_window for i in range(int((end - start) * per_window))]

    rng = random.Random(seed)
    random_bursts: list[float] = []
    for _ in range(8):
        random_bursts += burst(rng.uniform(0, 3), rng.randint(1, limit))
    return {
        # The reported pattern: a full burst, then a steady trickle above the limit's rate.
        "burst_then_trickle": burst(0, 2 * limit) + trickle(0.05, 3, 1.5 * limit),
        "burst_at_start": burst(0, 1.5 * limit) + burst(1, 1.5 * limit) + burst(2, 1.5 * limit),
        "burst_at_end": burst(0.9, 1.5 * limit) + trickle(0.95, 3, 1.2 * limit),
        "straddling": burst(0.97, limit) + burst(1.03, limit) + burst(1.97, limit) + burst(2.03, limit),
        "even": trickle(0, 3, 2 * limit),
        "random": sorted(rng.uniform(0, 3) for _ in range(4 * limit)),
        "random_bursts": sorted(random_bursts),
    }


async def at_phase(phase: float, window_s: float) -> float:
    """Sleep until ``phase`` of a calendar window (where the old limiter's windows turn); monotonic now."""
    await asyncio.sleep((phase * window_s - time.time() % window_s) % window_s)
    return time.monotonic()


async def run_pattern(check: Check, tenant: str, offsets: list[float], phase: float) -> list[Attempt]:
    start = await at_phase(phase, WINDOW_S)
    attempts = []
    for offset in offsets:
        await asyncio.sleep(max(0.0, start + offset * WINDOW_S - time.monotonic()))
        before = time.monotonic()
        admitted = await check(tenant)
        attempts.append(Attempt(before, time.monotonic(), admitted))
    return attempts


async def sweep(check: Check, seed: int = 1) -> dict[str, list[Attempt]]:
    """Every pattern at every phase, each on its own tenant, all at once."""
    runs = {f"{name}@{phase}": (offsets, phase) for name, offsets in patterns(LIMIT, seed).items()
            for phase in PHASES}
    results = await asyncio.gather(*(run_pattern(check, tenant, offsets, phase)
                                     for tenant, (offsets, phase) in runs.items()))
    return dict(zip(runs, results, strict=True))


def checker(limiter: RateLimiter, *, limit: int = LIMIT) -> Check:
    async def check(tenant: str) -> bool:
        try:
            await limiter.check(tenant, requests_per_minute=limit, tokens_per_minute=0)
        except RateLimited:
            return False
        return True

    return check


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    made = RateLimiter(url, window_s=WINDOW_S, buckets=BUCKETS)
    try:
        yield made
    finally:
        await made.close()


# -- every real window --------------------------------------------------------------------------


async def test_no_window_ever_holds_more_than_the_limit(limiter: RateLimiter) -> None:
    runs = await sweep(checker(limiter))
    for tenant, attempts in runs.items():
        assert not overflows(attempts, LIMIT, WINDOW_S), tenant
        assert not unjustified_refusals(attempts, LIMIT, WINDOW_S), tenant
    # Not a limiter that refuses everything: a burst into an empty window gets the whole limit
    # (and, when it is sent within one window, which the overflow check sees, no more).
    for phase in PHASES:
        assert all(a.admitted for a in runs[f"burst_at_start@{phase}"][:LIMIT])
    assert limiter.fallbacks == 0


async def test_the_sweep_catches_the_old_calendar_window_limiter() -> None:
    # Negative control: the limiter this module replaced (`limits`' sliding-window counter, which
    # weights the previous calendar window by the time left in it), on the same 1 s window.
    old = SlidingWindowCounterRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(LIMIT, 1)

    async def check(tenant: str) -> bool:
        return await old.hit(item, tenant)

    runs = await sweep(check)
    over = {tenant for tenant, attempts in runs.items() if overflows(attempts, LIMIT, WINDOW_S)}
    assert any(tenant.startswith("burst_then_trickle@") for tenant in over), over
    assert len(over) >= 5, over


async def test_tokens_hold_in_every_window(limiter: RateLimiter) -> None:
    # Turns run concurrently: each checks, "runs" a little, then records what it used. An admission
    # must have seen fewer tokens than the limit in its window; a refusal must have seen the limit.
    limit, window_s = 2_000, WINDOW_S
    checks: dict[str, list[Attempt]] = {}
    records: dict[str, list[Attempt]] = {}

    async def client(tenant: str, rng: random.Random, start: float) -> None:
        while time.monotonic() < start + 3 * window_s:
            before = time.monotonic()
            try:
                await limiter.check(tenant, requests_per_minute=0, tokens_per_minute=limit)
                admitted = True
            except RateLimited:
                admitted = False
            checks[tenant].append(Attempt(before, time.monotonic(), admitted))
            if admitted:
                await asyncio.sleep(rng.uniform(0, 0.05))
                tokens = rng.choice((50, 200, 400, 900))
                before = time.monotonic()
                await limiter.record_tokens(tenant, tokens)
                records[tenant].append(Attempt(before, time.monotonic(), True, tokens))
            await asyncio.sleep(rng.uniform(0, 0.03))

    async def tenant_run(tenant: str, phase: float, seed: int) -> None:
        checks[tenant], records[tenant] = [], []
        start = await at_phase(phase, window_s)
        rng = random.Random(seed)
        await asyncio.gather(*(client(tenant, random.Random(rng.random()), start) for _ in range(4)))

    await asyncio.gather(*(tenant_run(f"t@{phase}", phase, i) for i, phase in enumerate(PHASES)))
    for tenant in checks:
        refused = 0
        for check in checks[tenant]:
            if check.admitted:  # tokens certainly recorded inside the window before this check
                seen = sum(r.weight for r in records[tenant]
                           if r.before >= check.after - window_s + CLOCK_SLACK_S and r.after <= check.before)
                assert seen < limit, (tenant, check, seen)
            else:  # tokens that may have been counted: the window and one bucket before the check
                refused += 1
                horizon = check.before - window_s - BUCKET_S - CLOCK_SLACK_S
                seen = sum(r.weight for r in records[tenant] if r.after > horizon and r.before <= check.after)
                assert seen >= limit, (tenant, check, seen)
        assert refused > 0, tenant  # the load does reach the limit


# -- concurrency and several daemons ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_concurrent_checks_at_the_edge_admit_exactly_the_limit(backend: str,
                                                                     request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    limiter = RateLimiter(url)  # the production minute: the whole test fits in one window
    try:
        check = checker(limiter, limit=50)
        assert all([await check("acme") for _ in range(45)])
        admitted = await asyncio.gather(*(check("acme") for _ in range(300)))
        assert admitted.count(True) == 5
        assert not await check("acme")
    finally:
        await limiter.close()


async def test_two_daemons_on_one_redis_share_one_limit(redis_url: str) -> None:
    a, b = RateLimiter(redis_url), RateLimiter(redis_url)
    try:
        checks = [checker(a, limit=40), checker(b, limit=40)]
        admitted = await asyncio.gather(*(checks[i % 2]("acme") for i in range(400)))
        assert admitted.count(True) == 40
        # Tokens recorded from both add up exactly: 100 turns of 7 tokens is 700.
        await asyncio.gather(*((a, b)[i % 2].record_tokens("beta", 7) for i in range(100)))
        await a.check("beta", requests_per_minute=0, tokens_per_minute=701)
        with pytest.raises(RateLimited, match="700 of 700 tokens"):
            await b.check("beta", requests_per_minute=0, tokens_per_minute=700)
        assert a.fallbacks == b.fallbacks == 0
    finally:
        await a.close()
        await b.close()


async def test_a_refusal_by_the_token_limit_takes_no_request(limiter: RateLimiter) -> None:
    await limiter.record_tokens("acme", 500)
    for _ in range(5):
        with pytest.raises(RateLimited) as refused:
            await limiter.check("acme", requests_per_minute=2, tokens_per_minute=500)
        assert refused.value.kind == TOKENS
    for _ in range(2):  # both requests of the window are still there
        await limiter.check("acme", requests_per_minute=2, tokens_per_minute=501)
    with pytest.raises(RateLimited) as refused:
        await limiter.check("acme", requests_per_minute=2, tokens_per_minute=501)
    assert refused.value.kind == REQUESTS


# -- what a window costs, and what Retry-After says --------------------------------------------------


def test_local_windows_keep_at_most_one_window_of_buckets_and_say_when_room_frees() -> None:
    now_us = [1_000_000_000]
    windows = LocalWindows(window_s=60, buckets=60, clock_us=lambda: now_us[0])
    assert windows.width_us == 1_000_000
    for _ in range(600):  # a request every 0.25 s for 150 s, at a limit it never reaches
        assert windows.check("acme", requests_limit=10_000, tokens_limit=0).refused is None
        windows.record("acme", 1_000)
        now_us[0] += 250_000
        assert windows.bucket_count("acme", REQUESTS) <= 61
        assert windows.bucket_count("acme", TOKENS) <= 61
    # A fresh tenant: 3 requests at t=0.5 s into a bucket, 2 more 10 s later; the limit is 5.
    now_us[0] = 5_000_500_000
    for _ in range(3):
        assert windows.check("beta", requests_limit=5, tokens_limit=0).refused is None
    now_us[0] += 10_000_000
    for _ in range(2):
        assert windows.check("beta", requests_limit=5, tokens_limit=0).refused is None
    verdict = windows.check("beta", requests_limit=5, tokens_limit=0)
    # The first three leave when their bucket (5000 s) is 61 buckets old: at 5061 s, 50.5 s from now.
    assert (verdict.refused, verdict.used, verdict.retry_after_s) == (REQUESTS, 5, 50.5)
    now_us[0] = 5_061_000_000 - 1
    assert windows.check("beta", requests_limit=5, tokens_limit=0).refused == REQUESTS
    now_us[0] += 1
    assert windows.check("beta", requests_limit=5, tokens_limit=0).refused is None
    # An idle tenant's windows are dropped once they empty.
    now_us[0] += 120_000_000
    windows.check("acme", requests_limit=0, tokens_limit=1)
    assert windows.bucket_count("acme", TOKENS) == 0


async def test_redis_windows_are_bounded_expire_and_say_when_room_frees(redis_url: str) -> None:
    window_s, buckets = 0.3, 30
    windows = RedisWindows(redis_url, key_prefix="cp", window_s=window_s, buckets=buckets, socket_timeout_s=2)
    raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        requests_key, tokens_key = keys.rate_requests("cp", "acme"), keys.rate_tokens("cp", "acme")
        started = time.monotonic()
        while time.monotonic() - started < 3 * window_s:
            assert (await windows.check("acme", requests_limit=10**9, tokens_limit=10**12)).refused is None
            await windows.record("acme", 1_000)
            assert await raw.hlen(requests_key) <= buckets + 1
            assert await raw.hlen(tokens_key) <= buckets + 1
            await asyncio.sleep(0.003)
        assert 0 < await raw.pttl(requests_key) <= (buckets + 2) * window_s / buckets * 1000 + 1
        # Hash-tagged per tenant: both keys in one Redis Cluster slot, as every key of the tenant.
        assert keys.tenant_prefix("cp", "acme") == "cp:{acme}:"
        assert requests_key.startswith("cp:{acme}:") and tokens_key.startswith("cp:{acme}:")

        first = time.monotonic()
        for _ in range(3):
            assert (await windows.check("beta", requests_limit=3, tokens_limit=0)).refused is None
        verdict = await windows.check("beta", requests_limit=3, tokens_limit=0)
        refused = time.monotonic()
        assert verdict.refused == REQUESTS and verdict.used == 3
        # Room frees when the first request's bucket leaves: one window and at most a bucket after it.
        assert window_s - (refused - first) - CLOCK_SLACK_S < verdict.retry_after_s <= window_s + window_s / buckets
        await asyncio.sleep(verdict.retry_after_s)
        assert (await windows.check("beta", requests_limit=3, tokens_limit=0)).refused is None
        await asyncio.sleep(window_s + 3 * window_s / buckets)
        assert await raw.exists(requests_key, tokens_key) == 0  # a tenant that stopped leaves nothing
    finally:
        await windows.close()
        await raw.aclose()
