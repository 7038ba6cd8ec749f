"""What only the memory store has to prove: no operation does more work as the daemon ages or as
other tenants add data, and what it keeps stays bounded (issue: the store must not slow down with
uptime; `settle` used to rebuild its settled-id map on every call past 10,000 ids).

Work is counted, not timed: `opcodes` counts the Python bytecodes the store's own code executes
during one call (a Python loop over n entries executes O(n) of them), and `cost` adds the peak of
what the call allocates (a rebuild or copy of n entries, even one done in C, allocates O(n)). Memory
kept is measured with tracemalloc. Memory store operations never await, so a call runs to
completion in `now`.
"""

from __future__ import annotations

import doctest
import gc
import math
import random
import sys
import tracemalloc
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import pytest

from claudepool.store import memory_ledger
from claudepool.store.base import SessionRecord, UsageRecord, UsageTotals, Window
from claudepool.store.factory import build_store
from claudepool.store.memory import MemoryStore
from claudepool.store.settings import StoreSettings

T = TypeVar("T")
STORE_CODE = str(memory_ledger.__file__).rsplit("/", 1)[0]  # claudepool/store/
NOW = 1_800_000_000.0  # a fixed instant (2027-01-15): nothing ages unless a test moves the clock
DAY = 86400.0


def now(call: Coroutine[Any, Any, T]) -> T:
    """Run a memory store operation, which never awaits, to completion."""
    try:
        call.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    call.close()
    raise AssertionError("a memory store operation awaited")


def opcodes(call: Coroutine[Any, Any, T]) -> tuple[int, T]:
    """The bytecodes executed in claudepool/store/ while ``call`` runs, and its result."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.startswith(STORE_CODE):
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        result = now(call)
    finally:
        sys.settrace(None)
    return count, result


def cost(call: Coroutine[Any, Any, T]) -> tuple[int, int, T]:
    """`opcodes`, and the most memory the call held allocated at once (bytes)."""
    tracemalloc.start()
    try:
        count, result = opcodes(call)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return count, peak, result


def kept_bytes() -> int:
    """Memory allocated by the store's code or by this file, and still alive: what the store keeps.
    (Not the process total: pytest-xdist's thread allocates as it likes meanwhile.)"""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, f"{STORE_CODE}/*"), tracemalloc.Filter(True, __file__)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


class Clock:
    def __init__(self, at: float = NOW) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def record(i: int, tenant: str = "acme", *, at: float = NOW, cost: float = 0.001,
           reservation_id: str | None = None) -> UsageRecord:
    return UsageRecord(record_id=f"rec-{tenant}-{i}", request_id=f"req-{i}", tenant=tenant, profile="default",
                       model="claude-sonnet-4-5", outcome="ok", at=at, input_tokens=10, output_tokens=5,
                       cost_usd=cost, reservation_id=reservation_id)


def reserve(store: MemoryStore, tenant: str, rid: str, amount: float, *, daily: float = 0.0,
            ttl_s: float = 900.0) -> None:
    now(store.reserve(tenant, rid, amount, daily_limit_usd=daily, monthly_limit_usd=0.0, ttl_s=ttl_s))


def test_the_ledger_module_doctest_passes() -> None:
    assert doctest.testmod(memory_ledger).failed == 0


# -- settled record ids ---------------------------------------------------------------------------


def test_settle_does_the_same_work_at_any_uptime() -> None:
    store = MemoryStore(clock=Clock())  # every default bound; no id is old enough to age out
    early: list[tuple[int, int]] = []
    late: list[tuple[int, int]] = []
    for i in range(15_000):
        if 500 <= i < 520 or i >= 14_980:
            work, peak, settled = cost(store.settle(record(i)))
            assert settled
            (early if i < 520 else late).append((work, peak))
        else:
            assert now(store.settle(record(i)))
    # The same path each time: no rebuild, no scan of the ids (or anything else) already settled.
    assert max(w for w, _ in late) <= max(w for w, _ in early), (early, late)
    # And no copy: what a settle allocates (the median; a list or dict grows now and then) is the same.
    assert sorted(p for _, p in late)[10] <= sorted(p for _, p in early)[10] + 256, (early, late)


def test_settle_does_the_same_work_once_every_bound_is_reached() -> None:
    # Past its bounds each settle also forgets the oldest id and drops the oldest ledger record: a
    # few steps more than before the bounds, the same at any uptime, and no copy of what is kept.
    store = MemoryStore(clock=Clock(), settled_max_ids=1000, ledger_max_records=1000)
    work: dict[int, int] = {}
    peaks: dict[int, int] = {}
    for i in range(15_000):
        if 500 <= i < 550 or 3000 <= i < 3050 or i >= 14_950:
            work[i], peaks[i], _ = cost(store.settle(record(i, f"t{i % 3}")))
        else:
            now(store.settle(record(i, f"t{i % 3}")))

    def window(values: dict[int, int], start: int) -> list[int]:
        return sorted(v for i, v in values.items() if start <= i < start + 50)

    before, past, late = window(work, 500), window(work, 3000), window(work, 14_950)
    assert past[25] <= before[25] + 200, (before, past)  # forgetting one id, dropping one record
    # Then the same path (the median), and the same total but for a cut of the ledger's dropped
    # slots, which happens every ~1000 settles and is a constant number of steps too.
    assert late[25] <= past[25] and sum(late) <= sum(past) + 100 and late[-1] < 2 * past[-1], (past, late)
    for start in (3000, 14_950):
        assert window(peaks, start)[25] <= window(peaks, 500)[25] + 256, (window(peaks, 500), window(peaks, start))


def test_the_settled_ids_are_bounded_by_count_and_the_newest_are_remembered() -> None:
    store = MemoryStore(clock=Clock(), settled_max_ids=100)
    for i in range(1000):
        assert now(store.settle(record(i)))
    # The newest 100 are still known: settling one of them again counts nothing.
    assert not any(now(store.settle(record(i))) for i in range(900, 1000))
    # The older ones were forgotten (a settle of one counts again): the map holds 100 ids, not 1000.
    assert now(store.settle(record(0)))
    assert now(store.settle(record(899)))


def test_the_settled_ids_bound_is_the_store_setting() -> None:
    store = build_store(StoreSettings(settled_max_ids=10))
    for i in range(20):
        assert now(store.settle(record(i)))
    assert not now(store.settle(record(19)))
    assert now(store.settle(record(9)))  # past the configured bound: forgotten


def test_the_settled_ids_are_bounded_by_age() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, settled_memory_s=3600)
    assert now(store.settle(record(1)))
    clock.at += 1800
    assert now(store.settle(record(2)))
    clock.at += 1801  # record 1 is now over an hour old, record 2 half an hour
    assert now(store.settle(record(1)))
    assert not now(store.settle(record(2)))


def test_memory_stays_bounded_however_many_records_are_settled() -> None:
    store = MemoryStore(clock=Clock(), ledger_max_records=100, settled_max_ids=100)
    tenants = [f"t{i}" for i in range(4)]

    def settle_many(start: int, count: int) -> None:
        for i in range(start, start + count):
            tenant = tenants[i % 4]
            reserve(store, tenant, f"res-{i}", 0.01)
            assert now(store.settle(record(i, tenant, reservation_id=f"res-{i}")))

    tracemalloc.start()
    try:
        settle_many(0, 2_000)  # every bound reached
        before = kept_bytes()
        settle_many(2_000, 5_000)
        grown = kept_bytes() - before
    finally:
        tracemalloc.stop()
    # Settled ids, ledger, reservations: all at their bound. 5,000 more remembered ids would be ~0.5 MB.
    assert grown < 64 * 1024, grown


# -- reservations ---------------------------------------------------------------------------------


def test_reserve_and_budget_do_not_add_up_every_reservation_held() -> None:
    store = MemoryStore(clock=Clock())
    for i in range(10):
        reserve(store, "acme", f"r{i}", 0.5)
    few, _ = opcodes(store.reserve("acme", "probe-1", 0.5, daily_limit_usd=1e6, monthly_limit_usd=0, ttl_s=900))
    few_budget, _ = opcodes(store.budget("acme"))
    for i in range(10, 3000):
        reserve(store, "acme", f"r{i}", 0.5)
    many, _ = opcodes(store.reserve("acme", "probe-2", 0.5, daily_limit_usd=1e6, monthly_limit_usd=0, ttl_s=900))
    many_budget, state = opcodes(store.budget("acme"))
    assert state.reserved_usd == 0.5 * 3002
    # A heap push or pop is O(log n): a few more steps with 300 times the reservations, not 300 times.
    assert many <= few + 40, (few, many)
    assert many_budget <= few_budget, (few_budget, many_budget)


def test_expired_reservations_go_once_each_and_stop_counting() -> None:
    clock = Clock()
    store, fresh = MemoryStore(clock=clock), MemoryStore(clock=clock)
    reserve(fresh, "acme", "long", 2.0, ttl_s=1000)
    for i in range(1000):
        reserve(store, "acme", f"short-{i}", 1.0, ttl_s=10)
    reserve(store, "acme", "long", 2.0, ttl_s=1000)
    clock.at += 10  # expiry is at or before now
    assert now(store.budget("acme")).reserved_usd == 2.0
    # Nothing left to expire: no step per reservation gone, as if they had never been.
    assert opcodes(store.budget("acme"))[0] <= opcodes(fresh.budget("acme"))[0]
    reserve(store, "acme", "next", 8.0, daily=10.0)


def test_replaced_and_settled_reservations_do_not_pile_up() -> None:
    # Every reservation pushes an expiry; those of settled or replaced ids are dropped lazily, and
    # the heap is rebuilt once they outnumber the live ones.
    store = MemoryStore(clock=Clock(), ledger_max_records=100, settled_max_ids=100)
    reserve(store, "acme", "kept", 1.0)

    def cycle(start: int, count: int) -> None:
        for i in range(start, start + count):
            reserve(store, "acme", f"r{i}", 0.25)
            reserve(store, "acme", f"r{i}", 0.5)  # replaced: its first expiry is stale at once
            assert now(store.settle(record(i, reservation_id=f"r{i}")))

    tracemalloc.start()
    try:
        cycle(0, 1000)
        before = kept_bytes()
        cycle(1000, 5_000)
        grown = kept_bytes() - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown  # 10,000 stale heap entries would be ~1 MB
    assert now(store.budget("acme")).reserved_usd == 1.0


def test_the_reserved_total_is_exact_once_nothing_is_held() -> None:
    # A running total of these leaves ~1e-9 behind after 50 rounds; none may survive the last reservation.
    clock, rng = Clock(), random.Random(7)
    store = MemoryStore(clock=clock)
    amounts = [0.1, 0.2, 0.3, 1 / 3, 1e-9, 7.25, 1e6 / 3]
    for _ in range(50):
        for i, amount in enumerate(amounts):
            reserve(store, "acme", f"r{i}", amount, ttl_s=10 if i % 2 else 1000)
        for i in rng.sample(range(0, len(amounts), 2), len(amounts) // 2 + 1):
            now(store.release("acme", f"r{i}"))
        clock.at += 10  # the rest expire
        assert now(store.budget("acme")).reserved_usd == 0.0


def test_an_infinite_reservation_does_not_poison_the_total_when_it_goes() -> None:
    store = MemoryStore(clock=Clock())
    reserve(store, "acme", "inf", math.inf)
    reserve(store, "acme", "one", 1.0)
    assert now(store.budget("acme")).reserved_usd == math.inf
    now(store.release("acme", "inf"))  # inf - inf is NaN: the rest is counted afresh
    assert now(store.budget("acme")).reserved_usd == 1.0
    reserve(store, "acme", "two", 2.0, daily=3.0)


# -- reads: one tenant's data, one window ---------------------------------------------------------


def test_a_tenants_reads_do_not_look_at_other_tenants_data() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    mine = [record(i, "acme", at=NOW - 100 + i) for i in range(5)]
    for r in mine:
        now(store.settle(r))
    now(store.session_put(SessionRecord(id="s_acme", tenant="acme", profile="default", created_at=NOW,
                                        last_used_at=NOW)))
    reads: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
        "ledger": lambda: store.ledger("acme"),
        "ledger since": lambda: store.ledger("acme", since=NOW - 97),
        "usage": lambda: store.usage(Window.current("day", NOW), ["acme"]),
        "sessions": lambda: store.session_list("acme"),
        "session": lambda: store.session_get("acme", "s_acme"),
        "budget": lambda: store.budget("acme"),
    }
    before = {name: opcodes(read()) for name, read in reads.items()}
    # Others: many tenants with records on many days, and sessions.
    for i in range(3000):
        tenant = f"other{i % 300}"
        now(store.settle(record(i, tenant, at=NOW - (i % 30) * DAY)))
        now(store.session_put(SessionRecord(id=f"s_{i}", tenant=tenant, profile="default", created_at=NOW,
                                            last_used_at=NOW)))
    for name, read in reads.items():
        work, result = opcodes(read())
        assert result == before[name][1], name
        assert work <= before[name][0] + 20, (name, before[name][0], work)


def test_a_ledger_read_since_a_time_starts_near_it() -> None:
    store = MemoryStore(clock=Clock())
    for i in range(20_000):
        now(store.settle(record(i, at=NOW - 20_000 + i)))
    work, recent = opcodes(store.ledger("acme", since=NOW - 5))
    assert [r.record_id for r in recent] == [f"rec-acme-{i}" for i in range(19_995, 20_000)]
    work_all, _ = opcodes(store.ledger(since=NOW - 5))
    # A binary search (~15 steps) and the five records, not a pass over the 19,995 older ones.
    assert work < 1000 and work_all < 1000, (work, work_all)
    limited, first = opcodes(store.ledger("acme", limit=3))
    assert [r.record_id for r in first] == ["rec-acme-0", "rec-acme-1", "rec-acme-2"]
    assert limited < 1000, limited


def test_the_ledger_keeps_no_more_records_alive_than_its_bound() -> None:
    store = MemoryStore(clock=Clock(), ledger_max_records=1000)
    for i in range(5500):
        now(store.settle(record(i, f"bound-{i % 3}")))
    gc.collect()
    alive = sum(isinstance(o, UsageRecord) and o.tenant.startswith("bound-") for o in gc.get_objects())
    assert alive == 1000


def test_the_ledger_index_agrees_with_a_plain_scan() -> None:
    """Random tenants, late and early records, eviction at the bound: every read equals a brute-force scan."""
    rng = random.Random(20261124)
    store = MemoryStore(clock=Clock(), ledger_max_records=300)
    kept: list[UsageRecord] = []
    tenants = ["acme", "beta", "gamma"]
    for i in range(3000):
        # Mostly in order, some flushed late (an hour earlier), a few from a clock running ahead.
        at = NOW + i + rng.choice([0.0, 0.0, 0.0, -3600.0 * rng.random(), 600.0 * rng.random()])
        r = record(i, rng.choice(tenants[: 1 + i % 3]), at=at)
        now(store.settle(r))
        kept = [*kept, r][-300:]
        if i % 37 == 0:
            for tenant in (None, *tenants, "nobody"):
                since = rng.choice([None, NOW + i - rng.uniform(0, 400), NOW - 10_000.0, NOW + i + 1000])
                limit = rng.choice([1, 5, 1000])
                expected = [k for k in kept if (tenant is None or k.tenant == tenant)
                            and (since is None or k.at >= since)][:limit]
                assert now(store.ledger(tenant, since=since, limit=limit)) == expected, (i, tenant, since, limit)


def test_old_buckets_are_forgotten_hourly_and_recent_ones_kept() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    now(store.settle(record(1, cost=1.0)))
    clock.at += 41 * DAY
    now(store.settle(record(2, cost=2.0, at=clock.at)))  # the hourly prune runs here: day of record 1 is 41 days old
    assert now(store.usage(Window.current("day", NOW))) == {}
    assert now(store.usage(Window.current("day", clock.at))) == {
        "acme": {"claude-sonnet-4-5": UsageTotals(requests=1, input_tokens=10, output_tokens=5, cost_usd=2.0)}}
    month = now(store.usage(Window.current("month", NOW)))  # 400 days for months
    assert month["acme"]["claude-sonnet-4-5"].requests == 1


@pytest.mark.parametrize("limit", [0, -1])
def test_a_ledger_limit_of_zero_or_less_reads_nothing(limit: int) -> None:
    store = MemoryStore(clock=Clock())
    now(store.settle(record(1)))
    assert now(store.ledger(limit=limit)) == []
    assert now(store.ledger("acme", limit=limit)) == []
