"""The pool's planner on its own: stub workers, a synthetic clock, no process and no event loop.

Each test builds a `PoolState`, calls `plan(state, now)` and checks the actions it returned and the
phases it moved records to. The pool's behaviour through real processes is in test_pool.py; these
pin down the decisions one by one, including the orderings a process-level test cannot reach.
"""

from __future__ import annotations

import doctest
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from claudepool.pool import breaker as breaker_module
from claudepool.pool.breaker import Breaker, BreakerState
from claudepool.pool.config import PoolConfig
from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.memory import MemoryPlan
from claudepool.pool.planner import (
    Assign,
    Clean,
    Phase,
    PoolState,
    Record,
    Refuse,
    Retire,
    Spawn,
    counts,
    plan,
    spawn_room,
    unserved,
)
from claudepool.pool.shares import Priority, TenantShare, TenantSlots

GiB = 1024**3
EQUAL = TenantShare()


@dataclass(eq=False)
class StubWorker:
    """What the planner reads of a worker, set by hand."""

    slot: int = 0
    turns: int = 0
    dirty: bool = False
    pss_bytes: int | None = None
    context_tokens: int = 0
    last_active_at: float = 0.0
    created_at: float = 0.0
    alive: bool = True
    busy: bool = False
    frozen: bool = False

    def is_alive(self) -> bool:
        return self.alive

    def is_idle(self) -> bool:
        return self.alive and not self.busy

    def in_turn(self) -> bool:
        return self.busy

    def age_s(self, now: float | None = None) -> float:
        return (now or 0.0) - self.created_at

    def idle_s(self, now: float | None = None) -> float:
        return (now or 0.0) - self.last_active_at


@dataclass(eq=False)
class StubWaiter:
    tenant: str
    priority: Priority = Priority.INTERACTIVE
    cancelled: bool = False

    def gone(self) -> bool:
        return self.cancelled


@dataclass
class Harness:
    config: PoolConfig
    slots: TenantSlots = field(default_factory=TenantSlots)
    batch_room: int = 1
    state: PoolState[StubWorker, object, StubWaiter] = field(init=False)

    def __post_init__(self) -> None:
        queue: FairQueue[StubWaiter] = FairQueue(self.slots, batch_max_running=lambda: self.batch_room,
                                                 batch_running=lambda: self.state.batch_leased)
        breaker = Breaker(self.config.boot_failure_threshold, self.config.breaker_cooldown_s,
                          self.config.breaker_max_cooldown_s)
        memory = MemoryPlan(max_workers=self.config.max_workers or 4, soft_limit_bytes=8 * GiB,
                            hard_limit_bytes=10 * GiB, per_worker_bytes=GiB // 4)
        self.state = PoolState(self.config, queue, self.slots, breaker, memory, rng=random.Random(7))

    def worker(self, phase: Phase, *, turn_limit: int = 1000, **fields: Any) -> StubWorker:
        worker = StubWorker(slot=len(self.state.records), **fields)
        self.state.add(worker, phase, turn_limit)
        return worker

    def record(self, worker: StubWorker) -> Record[StubWorker, object]:
        return self.state.records[worker]

    def wait(self, tenant: str, share: TenantShare = EQUAL,
             priority: Priority = Priority.INTERACTIVE) -> StubWaiter:
        waiter = StubWaiter(tenant, priority)
        self.state.queue.push(waiter, tenant, share, priority)
        return waiter


@pytest.fixture(autouse=True)
def no_process_is_started() -> Iterator[None]:
    """The planner decides and starts nothing: a test here that spawned a process would be wrong."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def make(**config: Any) -> Harness:
    # No freezing unless a test asks (test_planner_freeze.py): the exact action lists here leave it out.
    defaults: dict[str, Any] = {"min_idle": 0, "max_workers": 4, "max_concurrent_spawns": 2, "max_turns_jitter": 0,
                                "freeze_idle_after_s": 0}
    return Harness(PoolConfig(**(defaults | config)))


def of_type(actions: Sequence[object], kind: type) -> list[object]:
    return [a for a in actions if isinstance(a, kind)]


def test_breaker_doctests_pass() -> None:
    result = doctest.testmod(breaker_module)
    assert result.attempted > 0 and result.failed == 0


def test_a_returned_worker_is_kept_if_clean_and_cleaned_if_dirty_or_mid_turn() -> None:
    h = make(min_idle=3)
    clean = h.worker(Phase.RETURNED)
    dirty = h.worker(Phase.RETURNED, dirty=True)
    mid_turn = h.worker(Phase.RETURNED, busy=True)
    actions = plan(h.state, now=5.0)
    assert [h.record(w).phase for w in (clean, dirty, mid_turn)] == [Phase.IDLE, Phase.CLEANING, Phase.CLEANING]
    assert of_type(actions, Clean) == [Clean(dirty), Clean(mid_turn)]
    assert clean.last_active_at == 5.0  # a lease without a turn still counts as use


@pytest.mark.parametrize(("fields", "record_flag", "reason"), [
    ({"alive": False}, False, "failed"),
    ({}, True, "memory_pressure"),
    ({"turns": 10}, False, "turns"),
    ({"created_at": -4000.0}, False, "age"),
    ({"pss_bytes": 2 * GiB}, False, "memory"),
    ({"context_tokens": 300_000}, False, "context"),
])
def test_a_returned_worker_past_a_limit_is_retired_with_its_reason(
    fields: dict[str, Any], record_flag: bool, reason: str
) -> None:
    h = make()
    worker = h.worker(Phase.RETURNED, turn_limit=10, **fields)
    h.record(worker).recycle_on_release = record_flag
    assert plan(h.state, now=0.0) == [Retire(worker, reason)]
    assert h.record(worker).phase is Phase.CLOSING


def test_idle_workers_past_max_idle_are_retired_down_to_min_idle_longest_waiting_first() -> None:
    h = make(min_idle=1, max_idle_s=10.0)
    oldest = h.worker(Phase.IDLE, last_active_at=0.0)
    older = h.worker(Phase.IDLE, last_active_at=1.0)
    recent = h.worker(Phase.IDLE, last_active_at=95.0)
    actions = plan(h.state, now=100.0)
    assert actions == [Retire(oldest, "idle"), Retire(older, "idle")]
    assert h.record(recent).phase is Phase.IDLE
    assert plan(h.state, now=1000.0) == []  # the last one is min_idle: kept however long it idles


def test_the_most_recently_used_idle_worker_is_lent_first() -> None:
    h = make(min_idle=0)
    first = h.worker(Phase.RETURNED)
    second = h.worker(Phase.RETURNED)
    plan(h.state, now=0.0)
    waiter = h.wait("acme")
    assert plan(h.state, now=1.0) == [Assign(second, waiter)]
    assert (h.record(second).phase, h.record(first).phase) == (Phase.LEASED, Phase.IDLE)
    assert h.slots.running("acme") == 1


def test_a_worker_that_is_not_provably_clean_is_never_lent() -> None:
    h = make()
    clean = h.worker(Phase.IDLE)
    died = h.worker(Phase.IDLE)
    dirty = h.worker(Phase.IDLE)
    # Became so after the idle pass (a crash or a stray event between steps): caught at lending.
    plan(h.state, now=0.0)
    died.alive, dirty.dirty = False, True
    waiter = h.wait("acme")
    # The idle pass retires the dead one first; the lending pass catches the dirty one on top.
    assert plan(h.state, now=0.0) == [Retire(died, "failed"), Retire(dirty, "unclean"), Assign(clean, waiter)]


def test_a_waiter_that_left_is_skipped_and_the_worker_goes_to_the_next() -> None:
    h = make()
    worker = h.worker(Phase.IDLE)
    gone, present = h.wait("acme"), h.wait("acme")
    gone.cancelled = True
    assert plan(h.state, now=0.0) == [Assign(worker, present)]


def test_a_tenant_at_its_cap_waits_while_another_tenant_is_served() -> None:
    h = make()
    workers = [h.worker(Phase.IDLE) for _ in range(3)]
    capped = TenantShare(max_concurrency=1)
    a1, a2 = h.wait("a", capped), h.wait("a", capped)
    b1 = h.wait("b")
    assigned = [a.waiter for a in plan(h.state, now=0.0) if isinstance(a, Assign)]
    assert assigned == [a1, b1]
    assert (h.slots.running("a"), h.slots.running("b")) == (1, 1)
    assert h.state.count(Phase.IDLE) == 1 and len(h.state.queue) == 1
    h.slots.release("a")
    assert [a.waiter for a in plan(h.state, now=0.0) if isinstance(a, Assign)] == [a2]
    assert len(workers) == 3


def test_batch_runs_only_within_its_share_and_is_counted() -> None:
    h = make(max_workers=4)
    h.batch_room = 1
    for _ in range(3):
        h.worker(Phase.IDLE)
    batch = [h.wait("a", priority=Priority.BATCH) for _ in range(2)]
    assigned = [a.waiter for a in plan(h.state, now=0.0) if isinstance(a, Assign)]
    assert assigned == batch[:1]
    assert h.state.batch_leased == 1


def test_spawns_cover_waiters_and_min_idle_within_the_ceiling_and_the_spawn_limit() -> None:
    h = make(min_idle=2, max_workers=4, max_concurrent_spawns=8)
    h.wait("a")
    h.wait("b")
    h.wait("c")
    spawns = of_type(plan(h.state, now=0.0), Spawn)
    assert len(spawns) == 4  # 3 waiters + 2 idle wanted, but only 4 workers fit
    h2 = make(min_idle=2, max_workers=4, max_concurrent_spawns=1)
    assert len(of_type(plan(h2.state, now=0.0), Spawn)) == 1  # start-up is CPU-bound: one at a time


def test_spawns_take_the_lowest_free_slots_and_a_jittered_turn_limit() -> None:
    h = make(min_idle=4, max_workers=6, max_concurrent_spawns=4, max_turns=10, max_turns_jitter=1000)
    for slot in (0, 2):
        h.state.add(StubWorker(slot=slot), Phase.IDLE, 10)
    spawns = [a for a in plan(h.state, now=0.0) if isinstance(a, Spawn)]
    assert [s.slot for s in spawns] == [1, 3]
    limits = {s.turn_limit for s in spawns}
    assert all(10 <= n <= 1010 for n in limits) and len(limits) == 2  # not all recycled at once


def test_starting_workers_count_as_ready_soon_and_against_the_spawn_limit() -> None:
    h = make(min_idle=2, max_concurrent_spawns=2)
    h.worker(Phase.STARTING)
    assert len(of_type(plan(h.state, now=0.0), Spawn)) == 1
    leased = h.worker(Phase.LEASED)
    h.record(leased).respawning = True  # a resumed conversation's process, starting
    assert spawn_room(h.state, now=0.0) == 0


def test_past_the_soft_memory_limit_nothing_spawns() -> None:
    h = make(min_idle=2)
    h.worker(Phase.LEASED, pss_bytes=9 * GiB)  # soft limit 8 GiB, hard 10
    h.wait("a")
    assert of_type(plan(h.state, now=0.0), Spawn) == []
    assert unserved(h.state) == 1  # only a worker given back can serve it


def test_past_the_hard_limit_idle_workers_go_largest_first_and_leased_ones_on_release() -> None:
    h = make(min_idle=0, max_worker_pss_bytes=64 * GiB)  # no single worker is past its own limit
    small = h.worker(Phase.IDLE, pss_bytes=3 * GiB)
    large = h.worker(Phase.IDLE, pss_bytes=4 * GiB)
    leased = h.worker(Phase.LEASED, pss_bytes=5 * GiB)  # 12 GiB in all, 2 over the hard limit
    assert plan(h.state, now=0.0) == [Retire(large, "memory_pressure")]
    assert h.record(small).phase is Phase.IDLE and not h.record(leased).recycle_on_release

    h2 = make(min_idle=0, max_worker_pss_bytes=64 * GiB)
    busy = h2.worker(Phase.LEASED, pss_bytes=11 * GiB)
    other = h2.worker(Phase.LEASED, pss_bytes=1 * GiB)
    assert plan(h2.state, now=0.0) == []  # a leased worker is never taken from its tenant...
    assert h2.record(busy).recycle_on_release and not h2.record(other).recycle_on_release
    h2.state.move(h2.record(busy), Phase.RETURNED)
    assert plan(h2.state, now=0.0) == [Retire(busy, "memory_pressure")]  # ...it is retired once back


def test_the_last_ready_worker_is_never_shed() -> None:
    h = make(min_idle=1, max_worker_pss_bytes=64 * GiB)
    last = h.worker(Phase.IDLE, pss_bytes=20 * GiB)
    assert plan(h.state, now=0.0) == []
    assert h.record(last).phase is Phase.IDLE


def test_an_open_breaker_stops_spawning_and_refuses_waiters_no_worker_can_serve() -> None:
    h = make(min_idle=1, boot_failure_threshold=2, breaker_cooldown_s=30.0)
    h.state.breaker.record_failure(now=0.0)
    h.state.breaker.record_failure(now=0.0)
    waiter = h.wait("a")
    assert plan(h.state, now=1.0) == [Refuse(waiter)]
    assert len(h.state.queue) == 0
    # Half open once the cooldown is over: one probe start, whatever min_idle and the spawn limit say.
    h.wait("b")
    assert h.state.breaker.state(31.0) is BreakerState.HALF_OPEN
    assert [type(a) for a in plan(h.state, now=31.0)] == [Spawn]


def test_an_open_breaker_keeps_waiters_while_a_live_worker_may_come_back() -> None:
    h = make(boot_failure_threshold=1)
    h.worker(Phase.LEASED)
    h.state.breaker.record_failure(now=0.0)
    h.wait("a")
    assert plan(h.state, now=1.0) == []
    assert len(h.state.queue) == 1


def test_a_closed_pool_decides_nothing() -> None:
    h = make(min_idle=2)
    h.worker(Phase.RETURNED, alive=False)
    h.state.closed = True
    assert plan(h.state, now=0.0) == []


def test_a_second_step_with_nothing_changed_does_nothing() -> None:
    h = make(min_idle=2)
    h.worker(Phase.RETURNED)
    dirty = h.worker(Phase.RETURNED, dirty=True)
    first = plan(h.state, now=0.0)
    assert first == [Clean(dirty)] and plan(h.state, now=0.0) == []
    # The one being cleaned counts towards min_idle: it will be idle soon, so nothing spawns.
    assert counts(h.state) == {"starting": 0, "idle": 1, "leased": 0, "cleaning": 1, "closing": 0, "waiting": 0}


@given(st.lists(st.tuples(st.sampled_from(["add", "move", "remove"]), st.integers(0, 5),
                          st.sampled_from(list(Phase))), max_size=60))
def test_phase_counts_always_match_the_records(ops: list[tuple[str, int, Phase]]) -> None:
    h = make()
    workers = [StubWorker(slot=i) for i in range(6)]
    for op, i, phase in ops:
        worker = workers[i]
        if op == "add" and worker not in h.state.records:
            h.state.add(worker, phase, 10)
        elif op == "move" and worker in h.state.records:
            h.state.move(h.state.records[worker], phase)
        elif op == "remove":
            h.state.remove(worker)
    for phase in Phase:
        recount = [r for r in h.state.records.values() if r.phase is phase]
        assert h.state.count(phase) == len(recount)
        assert h.state.in_phase(phase) == sorted(recount, key=lambda r: r.since)
