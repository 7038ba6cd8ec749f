"""The shared capacity at the planner level: stub pools over real `PoolState`s and `plan`, no process.

Each `StubPool` is what `Pool` is around its planner, reduced to bookkeeping: it applies the actions
its plan returns (a spawn adds a starting record, an eviction asks the capacity, a retirement leaves
the record closing until the test says the process is gone), and the capacity wakes it as it wakes a
pool. The room, the eviction order and the wake order are pinned down here; test_capacity_pool.py
drives the same through real processes.
"""

from __future__ import annotations

import doctest
import random
from dataclasses import dataclass
from typing import Any

import pytest

from claudepool.pool import capacity as capacity_module
from claudepool.pool.breaker import Breaker
from claudepool.pool.capacity import Capacity, Need
from claudepool.pool.config import CapacityConfig, PoolConfig
from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.memory import MemoryPlan, MiB
from claudepool.pool.planner import Assign, Evict, Phase, PoolState, Retire, Spawn, plan, retire, unserved
from claudepool.pool.shares import TenantShare, TenantSlots
from claudepool.pool.sizing import UNBOUNDED
from tests.test_planner import StubWaiter, StubWorker

EQUAL = TenantShare()


@dataclass(eq=False)
class StubPool:
    """A pool's shell around its planner, without processes (the capacity's `Member`)."""

    name: str
    capacity: Capacity
    min_idle: int = 0
    max_workers: int = 0
    spawn_limit: int = 8

    def __post_init__(self) -> None:
        self.config = PoolConfig(min_idle=self.min_idle, max_workers=self.max_workers,
                                 max_concurrent_spawns=self.spawn_limit, max_turns_jitter=0)
        self.slots = TenantSlots()
        queue: FairQueue[StubWaiter] = FairQueue(self.slots, batch_max_running=lambda: 1,
                                                 batch_running=lambda: 0)
        memory = MemoryPlan(self.max_workers or UNBOUNDED, UNBOUNDED, UNBOUNDED, 0)
        self.state: PoolState[StubWorker, object, StubWaiter] = PoolState(
            self.config, queue, self.slots, Breaker(5, 30.0, 600.0), memory, seat=self.capacity.join(self))
        self.now = 0.0
        self.log: list[object] = []  # every action applied, in order
        self.tenant_of: dict[StubWorker, str] = {}
        self.steps = 0

    # -- the capacity's Member -----------------------------------------------------------------

    def floor(self) -> int:
        return self.min_idle

    def idle_workers(self) -> list[StubWorker]:
        return [] if self.state.closed else [r.worker for r in self.state.in_phase(Phase.IDLE)]

    def resetting(self) -> int:
        return 0 if self.state.closed else self.count(Phase.CLEANING, Phase.RETURNED)

    def serving(self) -> int:
        return 0 if self.state.closed else len(self.state.records) - self.count(Phase.CLOSING)

    def pss_sizes(self) -> list[int]:
        return [w.pss_bytes for w in self.state.records if w.pss_bytes]

    def evict(self, worker: Any, reason: str) -> None:
        self.log.append(retire(self.state, self.state.records[worker], reason))

    def wake(self) -> None:
        self.step()

    # -- the shell ---------------------------------------------------------------------------

    def step(self) -> list[object]:
        self.steps += 1
        actions: list[object] = list(plan(self.state, self.now))
        for action in actions:
            if isinstance(action, Spawn):
                self.state.add(StubWorker(slot=action.slot), Phase.STARTING, action.turn_limit)
            elif isinstance(action, Evict):
                self.state.seat.evict(action.count, action.need)
            elif isinstance(action, Assign):
                self.tenant_of[action.worker] = action.waiter.tenant
        self.log.extend(actions)
        if self.state.count(Phase.IDLE):
            self.state.seat.offer()  # as Pool._step does
        return actions

    def ready(self) -> None:
        """Every starting worker answered its initialize."""
        for record in self.state.in_phase(Phase.STARTING):
            self.state.move(record, Phase.RETURNED)
        self.step()

    def wait(self, tenant: str = "t") -> StubWaiter:
        waiter = StubWaiter(tenant)
        self.state.queue.push(waiter, tenant, EQUAL)
        self.step()
        return waiter

    def release(self, worker: StubWorker) -> None:
        record = self.state.records[worker]
        self.state.move(record, Phase.RETURNED)
        self.slots.release(self.tenant_of.pop(worker))
        self.step()

    def gone(self, worker: StubWorker) -> None:
        """A retired worker's process is gone: as `WorkerOperations._finish`, remove then step."""
        self.state.remove(worker)
        self.step()

    def closing(self) -> list[StubWorker]:
        return [r.worker for r in self.state.in_phase(Phase.CLOSING)]

    def count(self, *phases: Phase) -> int:
        return self.state.count(*phases)

    def assigned(self) -> list[StubWorker]:
        return [a.worker for a in self.log if isinstance(a, Assign)]


def capacity(max_workers: int) -> Capacity:
    return Capacity(CapacityConfig(max_workers=max_workers), memory_probe=lambda: 64 * 1024 * MiB)


def warm(pool: StubPool, n: int) -> list[StubWorker]:
    """Give ``pool`` ``n`` idle workers by leasing and releasing them (its LRU key moves on)."""
    waiters = [pool.wait() for _ in range(n)]
    pool.ready()
    workers = pool.assigned()[-n:]
    assert len(workers) == n and len(waiters) == n
    for worker in workers:
        pool.release(worker)
    assert pool.count(Phase.IDLE) >= n
    return workers


def test_capacity_doctests_pass() -> None:
    result = doctest.testmod(capacity_module)
    assert result.attempted > 0 and result.failed == 0


def test_pools_spawn_only_within_the_shared_room() -> None:
    cap = capacity(3)
    a, b = StubPool("a", cap, min_idle=2), StubPool("b", cap, min_idle=2)
    a.step()
    b.step()
    assert (a.count(Phase.STARTING), b.count(Phase.STARTING)) == (2, 1)
    assert cap.live == 3
    b.ready()
    a.ready()
    assert cap.live == 3 and b.state.seat.need is Need.FLOOR  # b's floor waits for room

    # Negative control: each pool alone (a capacity of its own) would have started four.
    alone = [StubPool(name, Capacity(), min_idle=2) for name in "ab"]
    for pool in alone:
        pool.step()
    assert sum(p.count(Phase.STARTING) for p in alone) == 4


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_on_many_pools_never_exceeds_the_ceiling(seed: int) -> None:
    rng = random.Random(seed)
    cap = capacity(4)
    pools = [StubPool(f"p{i}", cap, min_idle=rng.choice([0, 0, 1]), spawn_limit=2) for i in range(6)]
    for _ in range(400):
        pool = rng.choice(pools)
        event = rng.random()
        if event < 0.35:
            pool.wait(f"t{rng.randrange(3)}")
        elif event < 0.55:
            pool.ready()
        elif event < 0.75 and pool.count(Phase.LEASED):
            pool.release(rng.choice(pool.state.in_phase(Phase.LEASED)).worker)
        elif pool.closing():
            pool.gone(rng.choice(pool.closing()))
        live = sum(len(p.state.records) for p in pools)
        assert live == cap.live <= 4
    # Every waiter is served once the traffic stops and the pools settle.
    for _ in range(40):
        for pool in pools:
            for worker in pool.closing():
                pool.gone(worker)
            pool.ready()
            for record in pool.state.in_phase(Phase.LEASED):
                pool.release(record.worker)
    assert sum(len(p.state.queue) for p in pools) == 0


def test_waiters_evict_the_idle_worker_of_the_least_recently_leased_pool() -> None:
    cap = capacity(3)
    old, recent, busy = StubPool("old", cap), StubPool("recent", cap), StubPool("busy", cap)
    old.now = 1.0
    (old_worker,) = warm(old, 1)
    recent.now = 2.0
    warm(recent, 1)
    busy.now = 0.5
    busy.wait()
    busy.ready()  # leased by busy since t=0.5: the least recent lease time, but never a victim
    assert cap.live == 3

    newcomer = StubPool("new", cap)
    newcomer.now = 3.0
    newcomer.wait()
    assert [a for a in newcomer.log if isinstance(a, Evict)] == [Evict(1, Need.WAITERS)]
    assert old.closing() == [old_worker] and recent.closing() == []
    assert old.log[-1] == Retire(old_worker, "evicted") and cap.evictions == {"old": 1}
    newcomer.step()
    assert newcomer.count(Phase.STARTING) == 0  # the victim still holds its place until it is gone
    assert sum(isinstance(a, Evict) for a in newcomer.log) == 1  # ...and is not asked for twice

    old.gone(old_worker)  # the capacity wakes the seat that waits for this place
    assert newcomer.count(Phase.STARTING) == 1
    newcomer.ready()
    assert len(newcomer.assigned()) == 1 and cap.live == 3


def lease_again(pool: StubPool, now: float) -> None:
    """Lease each of ``pool``'s idle workers once more at ``now`` and give them back."""
    pool.now = now
    idle = pool.count(Phase.IDLE)
    for _ in range(idle):
        pool.wait()
    for worker in pool.assigned()[-idle:]:
        pool.release(worker)


def test_a_pool_used_once_is_evicted_before_a_pool_used_again_however_recent_its_one_use() -> None:
    """LRU-2: ranked by the last-but-one lease, so prompts seen once (a scan) cannot push out the
    busy pools. Plain LRU would take busy's worker here: its last lease (t=2) is older than once's."""
    cap = capacity(2)
    busy, once = StubPool("busy", cap), StubPool("once", cap)
    busy.now = 1.0
    warm(busy, 1)
    lease_again(busy, 2.0)
    once.now = 3.0
    (once_worker,) = warm(once, 1)
    newcomer = StubPool("new", cap)
    newcomer.now = 4.0
    newcomer.wait()
    assert once.closing() == [once_worker] and busy.closing() == [] and cap.evictions == {"once": 1}


def test_a_pools_last_worker_goes_after_every_other_pools_spare_one() -> None:
    """Evicting a pool's only idle worker would make its next request a cold start: a more recently
    used pool gives up its second worker first."""
    cap = capacity(3)
    old, recent = StubPool("old", cap), StubPool("recent", cap)
    old.now = 1.0
    warm(old, 1)
    lease_again(old, 2.0)
    recent.now = 3.0
    warm(recent, 2)
    lease_again(recent, 4.0)
    newcomer = StubPool("new", cap)
    newcomer.now = 5.0
    newcomer.wait()
    assert old.closing() == [] and len(recent.closing()) == 1 and recent.count(Phase.IDLE) == 1
    assert cap.evictions == {"recent": 1}


def test_warm_floors_are_evicted_only_when_no_other_idle_worker_is_left() -> None:
    cap = capacity(3)
    floored = StubPool("floored", cap, min_idle=1)
    floored.step()
    floored.ready()  # its floor: one idle worker, never leased (the least recently used pool)
    spare = StubPool("spare", cap)
    spare.now = 5.0
    spare_workers = warm(spare, 2)
    assert cap.live == 3

    a = StubPool("a", cap)
    a.now = 6.0
    a.wait()
    assert sorted(w.slot for w in spare.closing()) == [spare_workers[0].slot]  # not the floor
    assert floored.closing() == []
    a.wait()
    assert len(spare.closing()) == 2 and floored.closing() == []
    a.wait()  # only the floor is left idle: waiters beat floors, so it goes last
    assert len(floored.closing()) == 1
    assert cap.evictions == {"spare": 2, "floored": 1}


def test_a_floor_refill_evicts_only_idle_workers_outside_floors() -> None:
    cap = capacity(2)
    f1, f2 = StubPool("f1", cap, min_idle=1), StubPool("f2", cap, min_idle=1)
    f1.step()
    f1.ready()
    other = StubPool("other", cap, min_idle=1)
    other.step()
    other.ready()
    assert cap.live == 2
    f2.step()  # below its floor, the ceiling reached, every idle worker is someone's floor
    assert f2.state.seat.need is Need.FLOOR
    assert not f1.closing() and not other.closing() and cap.evictions == {}

    free = StubPool("free", cap)
    free.wait()  # waiters beat floors: it evicts one (f1's, the least recently leased)
    (victim,) = f1.closing()
    f1.gone(victim)
    free.ready()
    (worker,) = free.assigned()
    free.release(worker)  # idle now, outside any floor: the waiting floor (f2 first) evicts it at once
    assert free.closing() == [worker] and cap.live == 2
    assert cap.evicting == 1


def test_waiters_beat_a_floor_refill_to_a_freed_place() -> None:
    cap = capacity(2)
    floored = StubPool("floored", cap, min_idle=2)
    floored.step()
    floored.ready()
    assert cap.live == 2 and floored.count(Phase.IDLE) == 2
    needy = StubPool("needy", cap)
    needy.now = 1.0
    needy.wait()
    (victim,) = floored.closing()
    # The victim's pool is below its floor and steps first when its worker is gone (as the shell
    # does); the place must still go to the waiter.
    floored.gone(victim)
    assert needy.count(Phase.STARTING) == 1
    assert floored.count(Phase.STARTING) == 0 and floored.state.seat.need is Need.FLOOR
    needy.ready()
    assert len(needy.assigned()) == 1


def free_one_leased(pool: StubPool) -> None:
    """One of ``pool``'s leases comes back and its worker is retired (turns, say), then gone."""
    worker = pool.state.in_phase(Phase.LEASED)[0].worker
    pool.log.append(retire(pool.state, pool.state.records[worker], "turns"))
    pool.slots.release(pool.tenant_of.pop(worker))
    pool.gone(worker)


def test_a_floor_takes_no_freed_place_while_another_pools_waiters_wait() -> None:
    cap = capacity(2)
    leased = StubPool("leased", cap)
    leased.wait()
    leased.wait()
    leased.ready()  # both places leased: nothing to evict
    floored = StubPool("floored", cap, min_idle=1)
    floored.step()
    assert floored.state.seat.need is Need.FLOOR  # it began waiting first...
    needy = StubPool("needy", cap)
    needy.wait()
    assert needy.state.seat.need is Need.WAITERS
    assert cap.room(floored.state.seat, Need.FLOOR) == 0
    free_one_leased(leased)  # ...and is woken first, but the freed place goes to the waiter
    assert needy.count(Phase.STARTING) == 1 and floored.count(Phase.STARTING) == 0


def test_pools_whose_waiters_wait_for_room_are_served_in_the_order_they_began_to_wait() -> None:
    cap = capacity(1)
    leased = StubPool("leased", cap)
    leased.wait()
    leased.ready()
    first, second = StubPool("first", cap), StubPool("second", cap)
    first.wait()
    second.wait()
    free_one_leased(leased)
    assert (first.count(Phase.STARTING), second.count(Phase.STARTING)) == (1, 0)
    first.ready()
    free_one_leased(first)
    assert second.count(Phase.STARTING) == 1


def test_a_pools_own_cap_holds_within_the_shared_ceiling() -> None:
    cap = capacity(10)
    capped = StubPool("capped", cap, min_idle=5, max_workers=2)
    capped.step()
    assert capped.count(Phase.STARTING) == 2 and capped.state.seat.need is Need.NONE  # its own cap, no claim


def test_a_closed_pools_seat_leaves_and_its_idle_workers_are_no_victims() -> None:
    cap = capacity(1)
    pool = StubPool("p", cap)
    warm(pool, 1)
    pool.state.closed = True
    other = StubPool("o", cap)
    other.wait()
    assert pool.closing() == [] and other.state.seat.need is Need.WAITERS
    (worker,) = pool.state.records
    pool.state.remove(worker)
    pool.state.seat.leave()
    assert cap.pools == 1 and other.count(Phase.STARTING) == 1


def test_past_the_shared_soft_limit_no_pool_spawns_and_past_the_hard_limit_idle_workers_go() -> None:
    cap = Capacity(CapacityConfig(max_workers=10, memory_soft_limit_bytes=1000 * MiB,
                                  memory_hard_limit_bytes=1200 * MiB), memory_probe=lambda: 64 * 1024 * MiB)
    a, b = StubPool("a", cap), StubPool("b", cap)
    small, large = warm(a, 2)
    (other,) = warm(b, 1)
    small.pss_bytes, large.pss_bytes, other.pss_bytes = 300 * MiB, 600 * MiB, 400 * MiB
    assert cap.replan().max_workers == 10
    # 1300 MiB in all: over the hard limit by 100, so the largest idle worker goes (whatever its pool).
    assert a.closing() == [large] and b.closing() == [] and cap.evictions == {}
    assert a.log[-1] == Retire(large, "memory_pressure")
    cap.replan()  # another pool's measurement before the victim is gone: nothing more to shed
    assert a.closing() == [large] and b.closing() == []
    newcomer = StubPool("c", cap)
    newcomer.wait()
    assert newcomer.count(Phase.STARTING) == 0 and cap.free() == 0  # over the soft limit: no spawn
    a.gone(large)  # 700 MiB left, under the soft limit: the waiting pool is woken and spawns
    assert newcomer.count(Phase.STARTING) == 1


def test_the_shared_ceiling_is_derived_from_ram_by_the_largest_worker_of_any_pool() -> None:
    cap = Capacity(CapacityConfig(memory_fraction=0.5, worker_pss_estimate_bytes=250 * MiB),
                   memory_probe=lambda: 2000 * MiB)
    assert cap.max_workers == 4  # 1000 MiB budget ÷ the 250 MiB estimate
    a, b = StubPool("a", cap), StubPool("b", cap)
    (wa,) = warm(a, 1)
    (wb,) = warm(b, 1)
    wa.pss_bytes, wb.pss_bytes = 100 * MiB, 200 * MiB
    # What the pools hold counts as available to them: (2000 + 300) × 0.5 ÷ 200 (the largest).
    assert cap.replan().max_workers == 5


def test_a_pool_waiting_for_room_evicts_a_worker_as_soon_as_it_turns_idle_elsewhere() -> None:
    cap = capacity(1)
    busy = StubPool("busy", cap)
    busy.wait()
    busy.ready()
    needy = StubPool("needy", cap)
    needy.wait()
    assert needy.state.seat.need is Need.WAITERS and cap.evictions == {}  # nothing idle to evict yet
    (worker,) = busy.assigned()
    busy.release(worker)  # idle again: the waiting pool is offered it in the same step
    assert busy.closing() == [worker] and cap.evictions == {"busy": 1}
    busy.gone(worker)
    assert needy.count(Phase.STARTING) == 1


def test_a_worker_of_an_older_pool_still_resetting_is_waited_for_not_passed_over() -> None:
    cap = capacity(2)
    old, recent = StubPool("old", cap), StubPool("recent", cap)
    old.now = 1.0
    (old_worker,) = warm(old, 1)
    recent.now = 2.0
    (recent_worker,) = warm(recent, 1)
    old.state.move(old.state.records[old_worker], Phase.CLEANING)  # (its reset after a lease, say)
    needy = StubPool("needy", cap)
    needy.now = 3.0
    needy.wait()
    assert recent.closing() == [] and needy.state.seat.need is Need.WAITERS  # the LRU pool's is coming
    old.state.move(old.state.records[old_worker], Phase.RETURNED)
    old.step()  # clean again, idle: offered to the waiting pool, which takes the LRU victim
    assert old.closing() == [old_worker] and recent.idle_workers() == [recent_worker]


def test_waiters_another_pools_idle_worker_will_serve_are_not_unserved() -> None:
    # (A session pool parks idle-bound conversations for its unserved waiters: not for these.)
    cap = capacity(1)
    other = StubPool("other", cap)
    other.wait()
    other.ready()
    sessions = StubPool("sessions", cap)
    sessions.state.queue.push(StubWaiter("t"), "t", EQUAL)
    assert unserved(sessions.state) == 1  # the one place is leased: only a parked session helps
    (worker,) = other.assigned()
    other.state.move(other.state.records[worker], Phase.IDLE)
    assert unserved(sessions.state) == 0  # its step would evict the idle worker
