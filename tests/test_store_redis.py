"""What only the Redis store has: outages, secrets in URLs, the key layout, TTLs, the Lua calendar."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
import redis.asyncio
from pydantic import SecretStr
from redis.crc import key_slot

from claudepool.errors import BudgetExhausted, ConfigError, StoreError
from claudepool.store import keys
from claudepool.store.base import SessionRecord, UsageRecord, Window, day_key, month_key
from claudepool.store.factory import build_store
from claudepool.store.redis import RedisStore, script_file
from claudepool.store.settings import StoreSettings
from claudepool.tenancy.limits import RateLimiter
from tests.redis_server import RedisServer

DAY = 86400


def record(record_id: str, tenant: str = "acme", *, cost: float = 1.0, at: float | None = None,
           reservation_id: str | None = None) -> UsageRecord:
    return UsageRecord(record_id=record_id, request_id=f"req-{record_id}", tenant=tenant, profile="default",
                       model="claude-sonnet-4-5", outcome="ok", at=time.time() if at is None else at,
                       input_tokens=10, cost_usd=cost, reservation_id=reservation_id)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the test's Redis, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url)
    try:
        yield s
    finally:
        await s.close()


def closed_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def operations(store: RedisStore) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "reserve": lambda: store.reserve("acme", "r-out", 1.0, daily_limit_usd=10, monthly_limit_usd=0, ttl_s=60),
        "settle": lambda: store.settle(record("during-outage")),
        "release": lambda: store.release("acme", "r-out"),
        "budget": lambda: store.budget("acme"),
        "usage": lambda: store.usage(Window.current("day")),
        "ledger": lambda: store.ledger(),
        "ping": lambda: store.ping(),
    }


# -- outages --------------------------------------------------------------------------------------


async def test_an_outage_raises_store_error_quickly_and_the_store_recovers_with_its_data() -> None:
    with RedisServer(persistent=True) as server:
        store = RedisStore(server.url, socket_timeout_s=1.0)
        try:
            assert await store.settle(record("before"))
            await store.reserve("acme", "held", 2.0, daily_limit_usd=10, monthly_limit_usd=0, ttl_s=60)
            server.stop()
            for name, op in operations(store).items():
                started = time.monotonic()
                with pytest.raises(StoreError, match=r"Redis at unix://.* is unavailable") as failed:
                    await op()
                assert time.monotonic() - started < 3.0, name
                assert name in str(failed.value)
                assert failed.value.retryable
            server.start()
            # The pooled connections died with the old server: the first command reconnects.
            await store.ping()
            assert await store.settle(record("before")) is False  # settled ids survived the restart
            assert await store.settle(record("after"))
            state = await store.budget("acme")
            assert (state.day_spent_usd, state.reserved_usd) == (2.0, 2.0)
            assert [r.record_id for r in await store.ledger("acme")] == ["before", "after"]
            # A restart between two calls: the pooled connection is dead but looks idle; one retry heals it.
            server.restart()
            assert (await store.budget("acme")).day_spent_usd == 2.0
            # A crash, not a clean stop: appendfsync=always loses nothing the store was told is done.
            server.kill()
            with pytest.raises(StoreError):
                await store.ping()
            server.start()
            assert (await store.usage(Window.current("day")))["acme"]["claude-sonnet-4-5"].requests == 2
        finally:
            await store.close()


async def test_a_store_on_a_server_that_never_ran_fails_fast() -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_tcp_port()}/0", socket_timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"^Redis at redis://127\.0\.0\.1:\d+/0 is unavailable \(ping\)"):
            await store.ping()
        assert time.monotonic() - started < 3.0
    finally:
        await store.close()


# -- secrets --------------------------------------------------------------------------------------


async def test_the_password_never_appears_in_errors_or_repr() -> None:
    secret, wrong = "s3cr3t-pw-7f2a", "wr0ng-pw-91c4"
    with RedisServer(extra_args=["--requirepass", secret]) as server:
        good = RedisStore(f"unix://:{secret}@{server.socket}")
        try:
            await good.ping()  # the password in the URL is really used
            assert secret not in repr(good)
        finally:
            await good.close()
        port = closed_tcp_port()
        urls = [
            f"redis://:{secret}@127.0.0.1:{port}/0",  # refused before any AUTH
            f"redis://admin:{secret}@127.0.0.1:{port}/0",
            f"unix://:{wrong}@{server.socket}",  # AUTH refused by the server
            f"unix://{server.socket}?password={wrong}",
            f"unix://{server.socket}",  # NOAUTH: the server wants a password
        ]
        for url in urls:
            store = RedisStore(url, socket_timeout_s=0.5)
            try:
                assert secret not in repr(store)
                assert wrong not in repr(store)
                # Every operation for the first URL; after that, one read and one script are enough.
                ops = operations(store)
                for name, op in ops.items() if url == urls[0] else [("ping", ops["ping"]), ("reserve", ops["reserve"])]:
                    with pytest.raises(StoreError) as failed:
                        await op()
                    for text in (str(failed.value), str(failed.value.__cause__)):
                        assert secret not in text, (url, name, text)
                        assert wrong not in text, (url, name, text)
            finally:
                await store.close()


def test_an_unusable_url_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError) as failed:
        RedisStore("http://:hunter2-secret@example.com/")
    assert "hunter2-secret" not in str(failed.value)
    assert "http://example.com/" in str(failed.value)


# -- key layout and lifetimes ---------------------------------------------------------------------


async def test_every_key_of_a_tenant_carries_its_hash_tag(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    for tenant in ("acme", "beta"):
        await store.reserve(tenant, "r1", 1.0, daily_limit_usd=10, monthly_limit_usd=100, ttl_s=60)
        await store.reserve(tenant, "r2", 1.0, daily_limit_usd=10, monthly_limit_usd=100, ttl_s=60)
        await store.settle(record(f"{tenant}-1", tenant, reservation_id="r1"))
        await store.settle(record(f"{tenant}-2", tenant, at=time.time() - 45 * DAY))
    found = [key async for key in raw.scan_iter(count=1000)]
    assert "cp:tenants" in found
    per_tenant = {tenant: [k for k in found if tenant in k] for tenant in ("acme", "beta")}
    assert set(found) == {"cp:tenants", *per_tenant["acme"], *per_tenant["beta"]}
    for tenant, tenant_keys in per_tenant.items():
        # res, res:amt, res:sum, settled, ledger, and spend + usage for two days and two months
        assert len(tenant_keys) == 13, sorted(tenant_keys)
        assert all(k.startswith(f"cp:{{{tenant}}}:") for k in tenant_keys), tenant_keys
        assert {key_slot(k.encode()) for k in tenant_keys} == {key_slot(tenant.encode())}
    assert await raw.smembers("cp:tenants") == {"acme", "beta"}


async def test_day_month_settled_and_reservation_keys_expire(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    now = time.time()
    await store.reserve("acme", "r1", 1.0, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=30)
    await store.settle(record("one", at=now))
    day, month = day_key(now), month_key(now)
    for key, lifetime in [
        (keys.spend("cp", "acme", "day", day), keys.DAY_TTL_S), (keys.usage("cp", "acme", "day", day), keys.DAY_TTL_S),
        (keys.spend("cp", "acme", "month", month), keys.MONTH_TTL_S),
        (keys.usage("cp", "acme", "month", month), keys.MONTH_TTL_S),
        (keys.settled("cp", "acme"), keys.SETTLED_TTL_S),
    ]:
        assert lifetime - 5 <= await raw.ttl(key) <= lifetime, key
    assert (keys.DAY_TTL_S, keys.MONTH_TTL_S, keys.SETTLED_TTL_S) == (40 * DAY, 400 * DAY, 3 * DAY)
    for key in (keys.reservations("cp", "acme"), keys.reservation_amounts("cp", "acme"),
                keys.reservation_total("cp", "acme")):
        assert 30 < await raw.ttl(key) <= 30 + keys.RESERVATION_GRACE_S, key
    # The ledger is bounded by length, the tenants set is tiny: neither expires.
    assert await raw.ttl(keys.ledger("cp", "acme")) == -1
    assert await raw.ttl(keys.tenants("cp")) == -1


async def test_costs_are_stored_as_exact_decimal_strings(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    now = time.time()
    await store.settle(record("a", cost=0.1, at=now))
    await store.settle(record("b", cost=0.2, at=now))
    spent = await raw.get(keys.spend("cp", "acme", "day", day_key(now)))
    assert spent is not None
    assert abs(float(spent) - 0.3) < 1e-15  # Redis sums in long double: no 14-digit Lua rounding
    cost = await raw.hget(keys.usage("cp", "acme", "day", day_key(now)),
                          keys.usage_field("claude-sonnet-4-5", "cost_usd"))
    assert cost is not None
    assert abs(float(cost) - 0.3) < 1e-15


async def test_the_ledger_is_trimmed_near_its_maximum(redis_url: str, raw: redis.asyncio.Redis) -> None:
    store = RedisStore(redis_url, ledger_max_records=10)
    try:
        for i in range(300):
            await store.settle(record(f"r{i}"))
        length = await raw.xlen(keys.ledger("cp", "acme"))
        # MAXLEN ~ trims whole stream nodes (100 entries by default): near 10, far below 300.
        assert 10 <= length <= 110
        assert (await store.ledger("acme"))[-1].record_id == "r299"
    finally:
        await store.close()


async def test_the_settled_set_keeps_only_the_newest_ids(redis_url: str, raw: redis.asyncio.Redis) -> None:
    # Built from the settings, as the daemon builds it: store.settled_max_ids reaches the store.
    store = build_store(StoreSettings(url=SecretStr(redis_url), settled_max_ids=20))
    assert isinstance(store, RedisStore)
    try:
        for i in range(100):
            assert await store.settle(record(f"r{i}"))
        kept = await raw.zrange(keys.settled("cp", "acme"), 0, -1)
        assert kept == [f"r{i}" for i in range(80, 100)]
        await store.settle(record("other", "beta"))  # the bound is per tenant
        assert await raw.zcard(keys.settled("cp", "acme")) == 20
    finally:
        await store.close()


async def test_reserve_and_budget_read_one_sum_not_every_reservation(store: RedisStore,
                                                                     raw: redis.asyncio.Redis) -> None:
    for i in range(300):
        await store.reserve("acme", f"held-{i}", 0.5, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=600)
    await raw.config_resetstat()
    for i in range(50):
        await store.reserve("acme", f"r{i}", 0.5, daily_limit_usd=1e6, monthly_limit_usd=0, ttl_s=600)
        await store.budget("acme")
    await store.release("acme", "r0")
    await store.settle(record("s1", reservation_id="r1"))
    stats = await raw.info("commandstats")
    # Reading every amount held (HGETALL, HVALS) on each call is O(reservations): none was sent.
    assert not {"cmdstat_hgetall", "cmdstat_hvals"} & set(stats), sorted(stats)
    assert stats["cmdstat_hget"]["calls"] >= 50  # what the scripts call is counted, as it should be
    assert (await store.budget("acme")).reserved_usd == 0.5 * 348


async def test_reservations_written_by_a_daemon_that_keeps_no_sum_still_count(store: RedisStore,
                                                                              raw: redis.asyncio.Redis) -> None:
    # During an upgrade, a daemon of the previous version reserves and settles without the sum.
    res, amounts = keys.reservations("cp", "acme"), keys.reservation_amounts("cp", "acme")

    async def old_reserve(rid: str, amount: float) -> None:
        await raw.zadd(res, {rid: time.time() + 600})
        await raw.hset(amounts, rid, repr(amount))

    async def old_release(rid: str) -> None:
        await raw.zrem(res, rid)
        await raw.hdel(amounts, rid)

    await old_reserve("old-1", 3.0)  # before any sum was kept
    await store.reserve("acme", "new-1", 1.0, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=600)
    await old_reserve("old-2", 4.0)
    with pytest.raises(BudgetExhausted, match=r"reserved \$8\.0000"):
        await store.reserve("acme", "new-2", 4.0, daily_limit_usd=10, monthly_limit_usd=0, ttl_s=600)
    await old_release("old-1")
    await old_release("new-1")
    assert (await store.budget("acme")).reserved_usd == 4.0
    await store.reserve("acme", "new-2", 6.0, daily_limit_usd=10, monthly_limit_usd=0, ttl_s=600)
    assert await raw.hgetall(keys.reservation_total("cp", "acme")) == {"n": "2", "usd": "10"}


async def test_expired_reservations_leave_the_sum(store: RedisStore, raw: redis.asyncio.Redis) -> None:
    await store.reserve("acme", "short", 8.0, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=0.2)
    await store.reserve("acme", "long", 1.0, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=600)
    await asyncio.sleep(0.3)
    assert (await store.budget("acme")).reserved_usd == 1.0  # budget drops what expired, as reserve does
    assert await raw.hkeys(keys.reservation_amounts("cp", "acme")) == ["long"]
    await store.release("acme", "long")
    for key in (keys.reservations("cp", "acme"), keys.reservation_amounts("cp", "acme"),
                keys.reservation_total("cp", "acme")):
        assert not await raw.exists(key), key


async def test_key_prefixes_separate_stores_on_one_redis(redis_url: str, raw: redis.asyncio.Redis) -> None:
    a, b = RedisStore(redis_url), RedisStore(redis_url, key_prefix="other")
    try:
        await a.settle(record("x", cost=5.0))
        await b.reserve("acme", "r1", 10.0, daily_limit_usd=10, monthly_limit_usd=10, ttl_s=60)
        assert await b.usage(Window.current("day")) == {}
        assert await b.ledger() == []
        assert (await a.budget("acme")).reserved_usd == 0.0
        found = [key async for key in raw.scan_iter()]
        assert {k.split(":", 1)[0] for k in found} == {"cp", "other"}
    finally:
        await a.close()
        await b.close()


async def test_two_daemons_share_one_budget(redis_url: str) -> None:
    stores = [RedisStore(redis_url) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *(stores[i % 3].reserve("acme", f"r{i}", 1.0, daily_limit_usd=10, monthly_limit_usd=0, ttl_s=60)
              for i in range(30)),
            return_exceptions=True,
        )
        assert sum(r == 1.0 for r in results) == 10
        assert sum(isinstance(r, BudgetExhausted) for r in results) == 20
        assert (await stores[2].budget("acme")).reserved_usd == 10.0
    finally:
        for s in stores:
            await s.close()


# -- the clock in Lua -----------------------------------------------------------------------------


async def test_the_lua_calendar_agrees_with_python(raw: redis.asyncio.Redis) -> None:
    """``utc_day_month`` in clock.lua against datetime, for every day from 1968 to 2060 and some far ones."""
    # 1900-01-01, 2100-02-28 and 2100-03-01 (no leap day), 2399-12-31, 2400-02-29 (a leap day), 2400-03-01
    days = [*range(-730, 33_000), -25567, 47_540, 47_541, 157_053, 157_113, 157_114]
    stamps: list[float] = []
    for d in days:  # the first and last instant of each day, and one in between
        stamps += [d * DAY, d * DAY + (d * 7919) % DAY + 0.5, d * DAY + DAY - 0.25]
    script = raw.register_script(script_file("clock.lua") + """
        local out = {}
        for i = 1, #ARGV do
          local day, month = utc_day_month(tonumber(ARGV[i]))
          out[i] = day .. ' ' .. month
        end
        local now = now_s()
        out[#out + 1] = fmt(now)
        return out
    """)
    before = time.time()
    reply = await script(args=[repr(s) for s in stamps])
    after = time.time()
    assert before - 1 <= float(reply[-1]) <= after + 1  # TIME, to the microsecond, as a float
    expected = [f"{datetime.fromtimestamp(s, UTC):%Y%m%d %Y%m}" for s in stamps]
    mismatched = [(s, got, want) for s, got, want in zip(stamps, reply[:-1], expected, strict=True) if got != want]
    assert not mismatched, mismatched[:5]


# -- cancellation ---------------------------------------------------------------------------------

async def test_a_cancelled_task_stops_in_the_store_and_the_shared_rate_limiter(store: RedisStore,
                                                                               redis_url: str) -> None:
    # Background loops and request handlers end by cancellation; a client library that drops a cancel
    # (redis-py 8 does on Python 3.11: it sends through asyncio.wait_for) leaves them running forever.
    limiter = RateLimiter(redis_url)
    await store.session_put(SessionRecord(id="s_x", tenant="acme", profile="default", created_at=0, last_used_at=0))

    async def forever() -> None:
        while True:
            await store.budget("acme")
            await store.session_list(None)
            await limiter.check("acme", requests_per_minute=1_000_000, tokens_per_minute=1_000_000)

    kept_running = 0
    try:
        for _ in range(200):
            task = asyncio.create_task(forever())
            await asyncio.sleep(random.uniform(0, 0.003))
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if not done:
                kept_running += 1
                while not task.done():  # cancel until one is not swallowed, so nothing outlives the test
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.05)
    finally:
        await limiter.close()
    assert kept_running == 0


async def test_a_redis_that_never_answers_is_an_outage_within_the_deadline() -> None:
    # Accepts connections and reads, never replies: only our own per-operation deadlines end the wait.
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2)
    limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="did not answer budget"):
            await store.budget("acme")
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        await limiter.check("acme", requests_per_minute=10, tokens_per_minute=0)  # fails open, locally
        assert time.monotonic() - started < 2.0
        assert limiter.fallbacks == 1
    finally:
        await store.close()
        await limiter.close()
        server.close()


async def test_a_flood_of_operations_waits_for_a_connection_instead_of_failing(store: RedisStore) -> None:
    # Issue 10 (found with the rate limiter): redis-py's pool refuses a connection past its cap with
    # "Too many connections", which budgets (failing closed) answered 503 store_unavailable to a flood.
    async def one(i: int) -> None:
        await store.reserve("flood", f"r{i}", 0.001, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=60)
        await store.budget("flood")

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i) for i in range(600)), return_exceptions=True)
    assert [r for r in results if r is not None] == []
    assert (await store.budget("flood")).reserved_usd == pytest.approx(0.6)
