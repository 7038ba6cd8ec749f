"""What every `Store` must do, one suite for every backend: the memory store, the Redis store, yours.

claudepool's own tests run it against `MemoryStore` and a real Redis (tests/test_store_conformance.py).
A third backend runs it the same way, one test per check::

    import pytest
    from claudepool.testing import store_conformance as conformance

    @pytest.mark.parametrize("check", conformance.CHECKS, ids=str)
    async def test_my_store(check: conformance.Check) -> None:
        await conformance.run(check, lambda **options: MyStore(**options))

or all at once, with no test framework: ``await conformance.run_all(make_store)``.

``make_store(**options)`` returns a new store that holds no data (on a shared server: flushed
first); every check closes the store it was given. The options are constructor keywords: today
only ``settled_max_ids`` (how many settled record ids the store remembers), which claudepool's
stores both take. The checks run on real time, the store's own clock (the memory store's
default clock, Redis's ``TIME``), as the stores do in production; two of them wait a fraction of
a second for a reservation's TTL to pass.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import replace

from claudepool.store.base import BudgetState, SessionRecord, Store, UsageRecord, UsageTotals, Window
from claudepool.testing import store_conformance_budgets, store_conformance_conversations
from claudepool.testing.conformance_kit import (
    CHECKS,
    DAY,
    MODEL,
    OTHER_MODEL,
    SEQ,
    Check,
    StoreFactory,
    another_day_this_month,
    check,
    record,
    reserve,
    run,
    run_all,
)

__all__ = ["CHECKS", "Check", "StoreFactory", "run", "run_all", "store_conformance_budgets",
           "store_conformance_conversations"]

# -- settle -------------------------------------------------------------------------------------


@check()
async def settle_frees_the_reservation_and_adds_the_spend(store: Store) -> None:
    await reserve(store, "r1", 5.0, daily=10.0)
    assert await store.settle(record(cost=1.25, reservation_id="r1"))
    assert await store.budget("acme") == BudgetState(day_spent_usd=1.25, month_spent_usd=1.25, reserved_usd=0.0)
    await reserve(store, "r2", 8.75, daily=10.0)


@check()
async def settle_is_idempotent_on_record_id(store: Store) -> None:
    first = record(cost=2.0, input_tokens=100, record_id="once")
    assert await store.settle(first) is True
    # Same id, different content: still a duplicate, and nothing of it counts.
    assert await store.settle(first) is False
    assert await store.settle(replace(first, cost_usd=50.0, input_tokens=7)) is False
    state = await store.budget("acme")
    assert (state.day_spent_usd, state.month_spent_usd) == (2.0, 2.0)
    usage = await store.usage(Window.current("day"))
    assert usage == {"acme": {MODEL: UsageTotals(requests=1, input_tokens=100, cost_usd=2.0)}}
    assert await store.ledger() == [first]


@check()
async def settle_counts_when_the_reservation_is_unknown_or_expired(store: Store) -> None:
    await reserve(store, "short", 3.0, daily=10.0, ttl_s=0.05)
    await asyncio.sleep(0.1)  # past the TTL, on the store's own clock
    assert await store.settle(record(cost=1.0, reservation_id="short"))
    assert await store.settle(record(cost=2.0, reservation_id="never-reserved"))
    assert await store.budget("acme") == BudgetState(day_spent_usd=3.0, month_spent_usd=3.0, reserved_usd=0.0)


@check()
async def settle_drops_only_its_own_reservation(store: Store) -> None:
    await reserve(store, "r1", 2.0)
    await reserve(store, "r2", 3.0)
    await reserve(store, "r1", 4.0, tenant="beta")
    await store.settle(record(reservation_id="r1"))
    assert (await store.budget("acme")).reserved_usd == 3.0
    assert (await store.budget("beta")).reserved_usd == 4.0


@check(settled_max_ids=50)
async def a_duplicate_is_rejected_while_among_the_newest_settled_ids(small_store: Store) -> None:
    first = record(cost=1.0, record_id="first")
    assert await small_store.settle(first)
    for _ in range(49):
        assert await small_store.settle(record())
    assert await small_store.settle(first) is False  # 49 settled since: still remembered
    assert (await small_store.budget("acme")).day_spent_usd == 1.0
    for _ in range(50):
        assert await small_store.settle(record())
    # Pushed out by 50 newer ids: the memory is bounded by count, so this one counts again.
    assert await small_store.settle(first) is True
    assert (await small_store.budget("acme")).day_spent_usd == 2.0


@check()
async def the_reserved_total_follows_every_reserve_replace_settle_and_release(store: Store) -> None:
    rng = random.Random(20261124)
    live: dict[str, float] = {}
    for _ in range(300):
        rid, roll = f"r{rng.randrange(30)}", rng.random()
        if roll < 0.5:
            amount = rng.choice([0.1, 0.25, 1 / 3, 2.0, 1e-6, 0.0, 123.456])
            await reserve(store, rid, amount)
            live[rid] = amount
        elif roll < 0.75:
            await store.release("acme", rid)
            live.pop(rid, None)
        else:
            assert await store.settle(record(reservation_id=rid))
            live.pop(rid, None)
        reserved = (await store.budget("acme")).reserved_usd
        assert math.isclose(reserved, math.fsum(live.values()), rel_tol=1e-12, abs_tol=1e-12), (reserved, live)
        if not live:
            assert reserved == 0.0
    for rid in list(live):
        await store.release("acme", rid)
    assert (await store.budget("acme")).reserved_usd == 0.0


@check()
async def nothing_is_reserved_once_every_reservation_is_gone(store: Store) -> None:
    # A running total of these amounts keeps ~1e-9 of rounding after 20 rounds: none may survive.
    rng = random.Random(7)
    amounts = [0.1, 0.2, 0.3, 1 / 3, 1e-9, 7.25, 1e6 / 3]
    for _ in range(20):
        for i, amount in enumerate(amounts):
            await reserve(store, f"r{i}", amount)
        for i in rng.sample(range(len(amounts)), len(amounts)):
            if i % 2:
                await store.release("acme", f"r{i}")
            else:
                assert await store.settle(record(reservation_id=f"r{i}"))
        assert (await store.budget("acme")).reserved_usd == 0.0


# -- usage --------------------------------------------------------------------------------------


@check()
async def usage_totals_are_the_exact_sums_of_the_records(store: Store) -> None:
    now = time.time()
    costs = [0.1, 0.2, 1 / 3, 1e-7, 0.000123456789, 2.5, 0.7]
    records = [record(cost=c, at=now, input_tokens=10 + i, output_tokens=1000 * i, cache_read_input_tokens=3 * i,
                      cache_creation_input_tokens=i * i, model=MODEL if i % 2 else OTHER_MODEL)
               for i, c in enumerate(costs)]
    for r in records:
        await store.settle(r)
    for window in (Window.current("day", now), Window.current("month", now)):
        usage = await store.usage(window)
        assert set(usage) == {"acme"}
        assert set(usage["acme"]) == {MODEL, OTHER_MODEL}
        for model, totals in usage["acme"].items():
            mine = [r for r in records if r.model == model]
            assert totals.requests == len(mine)
            assert totals.input_tokens == sum(r.input_tokens for r in mine)
            assert totals.output_tokens == sum(r.output_tokens for r in mine)
            assert totals.cache_read_input_tokens == sum(r.cache_read_input_tokens for r in mine)
            assert totals.cache_creation_input_tokens == sum(r.cache_creation_input_tokens for r in mine)
            assert isinstance(totals.input_tokens, int)
            assert math.isclose(totals.cost_usd, math.fsum(r.cost_usd for r in mine), rel_tol=0, abs_tol=1e-9)
    spent = (await store.budget("acme")).day_spent_usd
    assert math.isclose(spent, math.fsum(costs), rel_tol=0, abs_tol=1e-9)


@check()
async def a_record_counts_in_the_day_and_month_of_its_own_time(store: Store) -> None:
    now = time.time()
    then = now - 45 * DAY
    await store.settle(record(cost=1.0, at=now, input_tokens=1))
    await store.settle(record(cost=4.0, at=then, input_tokens=4))
    assert (await store.usage(Window.current("day", then)))["acme"][MODEL].input_tokens == 4
    assert (await store.usage(Window.current("month", then)))["acme"][MODEL].input_tokens == 4
    assert (await store.usage(Window.current("day", now)))["acme"][MODEL].input_tokens == 1
    assert (await store.usage(Window.current("month", now)))["acme"][MODEL].input_tokens == 1
    assert await store.usage(Window.current("day", now - DAY)) == {}
    assert await store.usage(Window.parse("day", "2001-01-01")) == {}
    assert await store.budget("acme") == BudgetState(day_spent_usd=1.0, month_spent_usd=1.0, reserved_usd=0.0)


@check()
async def a_late_record_from_earlier_this_month_counts_in_the_month_not_today(store: Store) -> None:
    now = time.time()
    other = another_day_this_month(now)
    await store.settle(record(cost=2.0, at=other, output_tokens=5))
    assert await store.usage(Window.current("day", now)) == {}
    assert (await store.usage(Window.current("day", other)))["acme"][MODEL].output_tokens == 5
    assert (await store.usage(Window.current("month", now)))["acme"][MODEL].output_tokens == 5


@check()
async def usage_filters_tenants_and_none_means_every_tenant_with_data(store: Store) -> None:
    await store.settle(record("acme", cost=1.0))
    await store.settle(record("beta", cost=2.0))
    await store.settle(record("gamma", cost=3.0, at=time.time() - 45 * DAY))  # data, but not in this window
    await reserve(store, "r1", 1.0, tenant="delta")  # a reservation is not usage
    day = Window.current("day")
    assert set(await store.usage(day)) == {"acme", "beta"}
    assert set(await store.usage(day, ["beta"])) == {"beta"}
    assert set(await store.usage(day, ["beta", "acme", "beta"])) == {"acme", "beta"}
    assert await store.usage(day, ["nobody", "gamma", "delta"]) == {}
    assert await store.usage(day, []) == {}


# -- ledger -------------------------------------------------------------------------------------


@check()
async def ledger_is_oldest_first_and_round_trips_records(store: Store) -> None:
    t0 = time.time() - 100
    full = UsageRecord(
        record_id="full", request_id="req-full", tenant="acme", profile="research", model=MODEL,
        outcome="interrupted", at=t0 + 0.123456789, input_tokens=1, output_tokens=2, cache_read_input_tokens=3,
        cache_creation_input_tokens=4, cost_usd=0.1 + 0.2, session="sess-1", reservation_id="r-full",
    )
    records = [full, record("beta", at=t0 + 1, cost=1 / 3), record("acme", at=t0 + 2), record("beta", at=t0 + 3)]
    for r in records:
        await store.settle(r)
    assert await store.ledger() == records
    assert await store.ledger("acme") == [records[0], records[2]]
    assert await store.ledger("beta") == [records[1], records[3]]
    assert await store.ledger("nobody") == []


@check()
async def ledger_since_and_limit(store: Store) -> None:
    t0 = time.time() - 100
    records = [record("acme" if i % 2 else "beta", at=t0 + i) for i in range(10)]
    for r in records:
        await store.settle(r)
    assert await store.ledger(since=t0 + 6) == records[6:]
    assert await store.ledger(since=t0 + 6.5) == records[7:]
    assert await store.ledger("acme", since=t0 + 4) == [records[5], records[7], records[9]]
    assert await store.ledger(limit=3) == records[:3]
    assert await store.ledger("beta", limit=2) == [records[0], records[2]]
    assert await store.ledger(since=t0 + 2, limit=2) == records[2:4]
    assert await store.ledger(limit=0) == []
    assert await store.ledger(since=t0 + 100) == []
    assert await store.ledger(since=0.0) == records


@check()
async def a_tenants_ledger_since_skips_late_records_and_keeps_settle_order(store: Store) -> None:
    t0 = time.time() - 1000
    records = [record("acme", at=t0 + i) for i in range(10)]
    records.insert(5, record("acme", at=t0 - 500))  # flushed late, between records 4 and 5
    for i, r in enumerate(records):
        await store.settle(r)
        await store.settle(record("beta", at=t0 + i))
    assert await store.ledger("acme", since=t0 + 3) == records[3:5] + records[6:]
    assert await store.ledger("acme", since=t0 - 600) == records
    assert await store.ledger("acme", since=t0 - 500, limit=7) == records[:7]
    assert await store.ledger("acme", since=t0 + 3, limit=3) == [records[3], records[4], records[6]]


@check()
async def ledger_since_filters_on_the_records_own_time(store: Store) -> None:
    now = time.time()
    late = record(at=now - 10 * DAY)  # flushed ten days late: settled now, counted then
    ahead = record(at=now + 600)  # from a daemon whose clock runs ten minutes ahead
    await store.settle(late)
    await store.settle(ahead)
    assert await store.ledger(since=now - 11 * DAY) == [late, ahead]
    assert await store.ledger(since=now - 9 * DAY) == [ahead]
    assert await store.ledger("acme", since=now + 300) == [ahead]
    assert await store.ledger(since=now + 601) == []


# -- sessions -----------------------------------------------------------------------------------


def session(tenant: str = "acme", state: str = "new") -> SessionRecord:
    SEQ[0] += 1
    now = time.time()
    return SessionRecord(id=f"s_conformance{SEQ[0]:06d}", tenant=tenant, profile="default", created_at=now,
                         last_used_at=now, state=state)


@check()
async def session_create_stops_at_max_open_and_only_open_sessions_count(store: Store) -> None:
    created = [session() for _ in range(3)]
    for record_ in created:
        assert await store.session_create(record_, max_open=3)
    refused = session()
    assert not await store.session_create(refused, max_open=3)
    assert await store.session_get("acme", refused.id) is None  # refused means not stored
    assert await store.session_create(session("beta"), max_open=3)  # the bound is per tenant
    # A closed session does not count; a deleted one neither; a parked or active one does.
    created[0].state = "closed"
    await store.session_put(created[0])
    assert await store.session_create(session(), max_open=3)
    assert not await store.session_create(session(), max_open=3)
    await store.session_delete("acme", created[1].id)
    created[2].state = "parked"
    await store.session_put(created[2])
    assert await store.session_create(session(), max_open=3)
    assert not await store.session_create(session(), max_open=3)
    # A closed session reopened by a put (a restart restoring it from disk) counts again.
    created[0].state = "parked"
    await store.session_put(created[0])
    created[2].state = "closed"
    await store.session_put(created[2])
    assert not await store.session_create(session(), max_open=3)
    assert await store.session_create(session(), max_open=0)  # 0 = no bound
    assert len([r for r in await store.session_list("acme") if r.state != "closed"]) == 4


@check()
async def fifty_concurrent_session_creates_never_overshoot(store: Store) -> None:
    attempts = [session() for _ in range(50)]
    stored = await asyncio.gather(*(store.session_create(r, max_open=10) for r in attempts))
    assert stored.count(True) == 10
    kept = {r.id for r in await store.session_list("acme")}
    assert kept == {r.id for r, ok in zip(attempts, stored, strict=True) if ok}


# -- isolation ----------------------------------------------------------------------------------


@check()
async def tenants_do_not_see_each_others_spend_usage_or_reservations(store: Store) -> None:
    await store.settle(record("acme", cost=9.0, input_tokens=9))
    await reserve(store, "r1", 1.0, tenant="acme")
    await reserve(store, "r1", 10.0, daily=10.0, monthly=10.0, tenant="beta")  # acme's $10 does not count here
    assert await store.budget("beta") == BudgetState(day_spent_usd=0.0, month_spent_usd=0.0, reserved_usd=10.0)
    assert await store.budget("acme") == BudgetState(day_spent_usd=9.0, month_spent_usd=9.0, reserved_usd=1.0)
    await store.settle(record("beta", cost=0.5, input_tokens=5))
    usage = await store.usage(Window.current("day"))
    assert usage["acme"][MODEL].input_tokens == 9
    assert usage["beta"][MODEL].input_tokens == 5
    assert await store.budget("nobody") == BudgetState(day_spent_usd=0.0, month_spent_usd=0.0, reserved_usd=0.0)


@check()
async def ping(store: Store) -> None:
    await store.ping()
