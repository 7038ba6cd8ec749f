"""Store conformance: budgets (reserve, release, partial reserves, concurrency). Part of the suite in
`claudepool.testing.store_conformance`, which registers these checks by importing this module."""

from __future__ import annotations

import asyncio
import math
import time

from claudepool.errors import BudgetExhausted
from claudepool.store.base import BudgetState, Store, Window
from claudepool.testing.conformance_kit import DAY, MODEL, another_day_this_month, check, raises, record, reserve

# -- reserve ------------------------------------------------------------------------------------


@check()
async def a_requests_calls_count_once_as_a_request_and_keep_their_call_fields(store: Store) -> None:
    first = record(cost=0.25, input_tokens=10, output_tokens=5, kind="call", requests=1, call_id="gwc_1",
                   upstream_request_id="req_p1", message_id="msg_1", status=200, duration_ms=12.5,
                   first_token_ms=3.0, cache_creation_input_tokens=30, cache_write_1h_input_tokens=20)
    second = record(cost=0.5, input_tokens=1, output_tokens=2, kind="call", requests=0, call_id="gwc_2")
    assert await store.settle(first) and await store.settle(second)
    totals = (await store.usage(Window.current("day"), ["acme"]))["acme"][MODEL]
    assert (totals.requests, totals.input_tokens, totals.output_tokens, totals.cost_usd) == (1, 11, 7, 0.75)
    assert await store.ledger("acme") == [first, second]  # every field, as settled


@check()
async def reserve_within_budget_holds_the_amount(store: Store) -> None:
    await reserve(store, "r1", 4.0, daily=10.0, monthly=100.0)
    await reserve(store, "r2", 6.0, daily=10.0, monthly=100.0)  # exactly the limit is allowed
    assert await store.budget("acme") == BudgetState(day_spent_usd=0.0, month_spent_usd=0.0, reserved_usd=10.0)


@check()
async def refusal_names_the_limit_spent_reserved_and_needed(store: Store) -> None:
    await store.settle(record(cost=8.0))
    await reserve(store, "r1", 1.5, daily=10.0)
    with raises(BudgetExhausted) as refused:
        await reserve(store, "r2", 3.0, daily=10.0)
    assert str(refused[0]) == ("the daily budget of $10 cannot cover this call "
                               "(spent $8.0000, reserved $1.5000, needs up to $3.0000)")
    assert (await store.budget("acme")).reserved_usd == 1.5  # the refused one holds nothing


@check()
async def zero_limits_mean_unlimited(store: Store) -> None:
    await store.settle(record(cost=1e6))
    await reserve(store, "r1", 1e9)
    await reserve(store, "r2", 1e9, daily=0.0, monthly=0.0)
    assert (await store.budget("acme")).reserved_usd == 2e9


@check()
async def daily_limit_is_enforced_on_todays_spend(store: Store) -> None:
    now = time.time()
    await store.settle(record(cost=8.0, at=now))
    await store.settle(record(cost=5.0, at=another_day_this_month(now)))  # this month, not today
    await store.settle(record(cost=50.0, at=now - 40 * DAY))  # another month
    with raises(BudgetExhausted, match=r"^the daily budget of \$10 cannot cover .*spent \$8\.0000"):
        await reserve(store, "r1", 2.5, daily=10.0, monthly=1000.0)
    await reserve(store, "r2", 2.0, daily=10.0, monthly=1000.0)


@check()
async def monthly_limit_is_enforced_on_this_months_spend(store: Store) -> None:
    await store.settle(record(cost=8.0, at=another_day_this_month(time.time())))
    assert (await store.budget("acme")).day_spent_usd == 0.0
    with raises(BudgetExhausted, match=r"^the monthly budget of \$10 cannot cover .*spent \$8\.0000"):
        await reserve(store, "r1", 2.5, daily=100.0, monthly=10.0)
    await reserve(store, "r2", 2.0, daily=100.0, monthly=10.0)


@check()
async def reservations_count_against_the_budget(store: Store) -> None:
    await reserve(store, "r1", 7.0, daily=10.0)
    with raises(BudgetExhausted, match=r"reserved \$7\.0000"):
        await reserve(store, "r2", 4.0, daily=10.0)
    with raises(BudgetExhausted, match=r"^the monthly budget"):
        await reserve(store, "r2", 4.0, monthly=10.0)


@check()
async def release_frees_the_budget(store: Store) -> None:
    await reserve(store, "r1", 7.0, daily=10.0)
    await store.release("acme", "r1")
    await store.release("acme", "never-reserved")  # a no-op, not an error
    assert (await store.budget("acme")).reserved_usd == 0.0
    await reserve(store, "r2", 10.0, daily=10.0)


@check()
async def reserving_again_under_the_same_id_replaces(store: Store) -> None:
    await reserve(store, "r1", 5.0, daily=10.0)
    await reserve(store, "r1", 5.0, daily=10.0)
    assert (await store.budget("acme")).reserved_usd == 5.0
    await reserve(store, "r1", 8.0, daily=10.0)  # 8 fits only if the old 5 no longer counts
    assert (await store.budget("acme")).reserved_usd == 8.0
    with raises(BudgetExhausted):
        await reserve(store, "r2", 3.0, daily=10.0)


@check()
async def a_reservation_expires_after_its_ttl(store: Store) -> None:
    await reserve(store, "r1", 8.0, daily=10.0, ttl_s=0.3)
    await reserve(store, "long", 1.0, daily=10.0, ttl_s=60)
    with raises(BudgetExhausted):
        await reserve(store, "r2", 5.0, daily=10.0)
    await asyncio.sleep(0.5)  # the TTL passes on the store's own clock: the behaviour checked, not a wait for a task
    assert (await store.budget("acme")).reserved_usd == 1.0
    await reserve(store, "r2", 5.0, daily=10.0)
    assert (await store.budget("acme")).reserved_usd == 6.0


@check()
async def fifty_concurrent_reserves_never_overbook(store: Store) -> None:
    results = await asyncio.gather(
        *(reserve(store, f"r{i}", 1.0, daily=10.0, monthly=100.0) for i in range(50)), return_exceptions=True
    )
    won = [f"r{i}" for i, result in enumerate(results) if result == 1.0]
    refused = [result for result in results if isinstance(result, BudgetExhausted)]
    assert (len(won), len(refused)) == (10, 40), results
    assert (await store.budget("acme")).reserved_usd == 10.0
    for rid in won:
        assert await store.settle(record(cost=0.9, reservation_id=rid))
    state = await store.budget("acme")
    assert math.isclose(state.month_spent_usd, 9.0, rel_tol=0, abs_tol=1e-9)
    assert math.isclose(state.day_spent_usd, 9.0, rel_tol=0, abs_tol=1e-9)
    assert state.reserved_usd == 0.0


@check()
async def a_reserve_with_a_least_amount_holds_what_is_left(store: Store) -> None:
    await store.settle(record(cost=6.0))
    assert await reserve(store, "r1", 1.0, daily=10.0, least=0.5) == 1.0  # it fits: all of it
    assert await reserve(store, "r2", 5.0, daily=10.0, monthly=100.0, least=2.0) == 3.0  # the room left
    assert (await store.budget("acme")).reserved_usd == 4.0
    with raises(BudgetExhausted) as refused:
        await reserve(store, "r3", 5.0, daily=10.0, least=0.01)  # nothing is left
    assert str(refused[0]) == ("the daily budget of $10 cannot cover this call "
                               "(spent $6.0000, reserved $4.0000, needs at least $0.0100)")
    await store.release("acme", "r2")
    with raises(BudgetExhausted, match=r"needs at least \$3\.5000"):
        await reserve(store, "r3", 5.0, daily=10.0, least=3.5)  # 3 left, under the least amount
    assert (await store.budget("acme")).reserved_usd == 1.0


@check()
async def the_tighter_limit_bounds_a_partial_reserve(store: Store) -> None:
    await store.settle(record(cost=9.0, at=another_day_this_month(time.time())))
    assert await reserve(store, "r1", 5.0, daily=10.0, monthly=12.0, least=1.0) == 3.0  # the month has 3 left
    with raises(BudgetExhausted, match=r"^the monthly budget of \$12 "):
        await reserve(store, "r2", 5.0, daily=10.0, monthly=12.0, least=0.1)


@check()
async def fifty_concurrent_partial_reserves_hold_exactly_the_budget(store: Store) -> None:
    results = await asyncio.gather(
        *(reserve(store, f"r{i}", 0.75, daily=10.0, least=0.1) for i in range(50)), return_exceptions=True
    )
    granted = [result for result in results if isinstance(result, float)]
    assert len(granted) == 14 and sorted(granted)[0] == 0.25, results  # 13 x 0.75, then the 0.25 left
    assert all(isinstance(r, BudgetExhausted) for r in results if not isinstance(r, float))
    assert (await store.budget("acme")).reserved_usd == 10.0
