"""The pool's decisions: one synchronous, await-free step over one record per worker.

`plan(state, now)` is the pool's whole policy, in the style of httpcore's
``_assign_requests_to_connections``: it reads the records, the fair queue, the breaker, the
memory plan and the room its seat in the daemon's shared `Capacity` leaves, moves records between
phases, pops the waiters it serves, and returns the I/O to do (`Spawn`, `Clean`, `Retire`,
`Evict` idle workers of other pools) and the answers to give (`Assign`, `Refuse`). It never awaits, calls
back, starts a process or reads a clock: the pool's async shell (`pool.py`) applies the actions, and
the unit tests drive it with stub workers and a synthetic clock.

Phases (each worker's record is in exactly one):
  starting   spawned, waiting for its ``initialize`` reply
  idle       warm and clean (reset since its last tenant); served last-in first-out; stopped
             (SIGSTOP, ``frozen``) once idle ``freeze_idle_after_s``, continued before it is lent
  leased     serving one request of one tenant (``respawning``: its process is being replaced)
  returned   handed back, waiting for the next step to decide: clean, recycle or keep
  cleaning   interrupting an abandoned turn and/or resetting with ``/clear``
  closing    being stopped (recycled, failed, or the pool is closing)
"""

from __future__ import annotations

import enum
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from claudepool.pool.breaker import Breaker, BreakerState
from claudepool.pool.capacity import Capacity, Need, Seat
from claudepool.pool.config import PoolConfig
from claudepool.pool.demand import DemandWindow, warm_floor
from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.memory import MemoryPlan
from claudepool.pool.shares import Priority, TenantSlots


class WorkerView(Protocol):
    """What the planner reads of a worker (a `Worker`, or a stub in the unit tests)."""

    @property
    def slot(self) -> int: ...

    @property
    def turns(self) -> int: ...

    @property
    def dirty(self) -> bool: ...

    @property
    def pss_bytes(self) -> int | None: ...

    @property
    def context_tokens(self) -> int: ...

    last_active_at: float

    @property
    def frozen(self) -> bool: ...

    def is_alive(self) -> bool: ...

    def is_idle(self) -> bool: ...

    def in_turn(self) -> bool: ...

    def age_s(self, now: float | None = None) -> float: ...

    def idle_s(self, now: float | None = None) -> float: ...


class Waiter(Protocol):
    """A request waiting in the fair queue for a worker."""

    @property
    def tenant(self) -> str: ...

    @property
    def priority(self) -> Priority: ...

    def gone(self) -> bool:
        """True once the request stopped waiting (timed out or cancelled)."""
        ...


W = TypeVar("W", bound=WorkerView)
L = TypeVar("L")
T = TypeVar("T", bound=Waiter)


class Phase(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    LEASED = "leased"
    RETURNED = "returned"
    CLEANING = "cleaning"
    CLOSING = "closing"


@dataclass(eq=False)
class Record(Generic[W, L]):
    """Everything the pool knows about one worker beyond the worker itself."""

    worker: W
    phase: Phase
    turn_limit: int
    # When the record entered its phase (a step counter): orders the idle stack and the returned queue.
    since: int = 0
    # Past the hard memory limit: retire this leased worker when it comes back.
    recycle_on_release: bool = False
    # A leased worker whose process is being replaced (a resumed conversation): it counts against
    # the spawn limit like a start.
    respawning: bool = False
    lease: L | None = None
    # A lease released mid-turn: its last result may still arrive, drained by the cleaning.
    unsettled: L | None = None


@dataclass(frozen=True)
class Spawn:
    slot: int
    turn_limit: int


@dataclass(frozen=True)
class Clean(Generic[W]):
    worker: W


@dataclass(frozen=True)
class Retire(Generic[W]):
    worker: W
    reason: str


@dataclass(frozen=True)
class Freeze(Generic[W]):
    """Stop an idle worker's processes (SIGSTOP): an idle CLI still wakes ~3 times a second."""

    worker: W


@dataclass(frozen=True)
class Thaw(Generic[W]):
    """Continue a frozen worker's processes; always just before the `Assign` that lends it."""

    worker: W


@dataclass(frozen=True)
class Assign(Generic[W, T]):
    worker: W
    waiter: T


@dataclass(frozen=True)
class Refuse(Generic[T]):
    """The breaker is open and no worker is left that could serve this waiter."""

    waiter: T


@dataclass(frozen=True)
class Evict:
    """The shared ceiling is reached: ask the capacity to retire ``count`` idle workers of other
    pools for ``need`` (their places come back to this pool's seat when they are gone)."""

    count: int
    need: Need


Action = Spawn | Clean[W] | Retire[W] | Assign[W, T] | Refuse[T] | Evict | Freeze[W] | Thaw[W]


def _private_seat() -> Seat:
    return Capacity().join(None)


@dataclass
class PoolState(Generic[W, L, T]):
    """What the planner decides over; the pool's shell owns it and changes it only through events."""

    config: PoolConfig
    queue: FairQueue[T]
    slots: TenantSlots
    breaker: Breaker
    memory: MemoryPlan
    records: dict[W, Record[W, L]] = field(default_factory=dict)
    batch_leased: int = 0
    closed: bool = False
    rng: random.Random = field(default_factory=random.Random)
    # This pool's place in the daemon's shared capacity (default: a capacity of its own, no ceiling
    # beyond ``memory``). Every record added or removed is counted there.
    seat: Seat = field(default_factory=_private_seat)
    # Concurrent leases over the last min_idle_window_s, for a floor that follows demand (min_idle_max).
    demand: DemandWindow = field(init=False)
    _clock: Iterator[int] = field(default_factory=itertools.count)
    # Records per phase, kept by add/move/remove (the only writers), so counting is O(1): the
    # planner counts phases a dozen times per step, and a step runs several times per request.
    _phase_counts: dict[Phase, int] = field(default_factory=lambda: dict.fromkeys(Phase, 0))

    def __post_init__(self) -> None:
        self.demand = DemandWindow(self.config.min_idle_window_s)

    def add(self, worker: W, phase: Phase, turn_limit: int) -> Record[W, L]:
        record: Record[W, L] = Record(worker, phase, turn_limit, since=next(self._clock))
        self.records[worker] = record
        self._phase_counts[phase] += 1
        self.seat.added()
        return record

    def move(self, record: Record[W, L], phase: Phase) -> None:
        self._phase_counts[record.phase] -= 1
        self._phase_counts[phase] += 1
        record.phase = phase
        record.since = next(self._clock)

    def remove(self, worker: W) -> Record[W, L] | None:
        record = self.records.pop(worker, None)
        if record is not None:
            self._phase_counts[record.phase] -= 1
            self.seat.removed(worker)  # may step other pools: a place under the ceiling is free
        return record

    def in_phase(self, phase: Phase) -> list[Record[W, L]]:
        """The records in ``phase``, oldest entry first."""
        if not self._phase_counts[phase]:
            return []
        return sorted((r for r in self.records.values() if r.phase is phase), key=lambda r: r.since)

    def count(self, *phases: Phase) -> int:
        return sum(self._phase_counts[p] for p in phases)

    def total_pss_bytes(self) -> int:
        return sum(r.worker.pss_bytes or 0 for r in self.records.values())


def plan(state: PoolState[W, L, T], now: float) -> list[Action[W, T]]:
    """Decide everything that can be decided now."""
    actions: list[Action[W, T]] = []
    if state.closed:
        return actions  # the pool's close stops every worker it still holds; nothing new starts
    config = state.config

    # Workers coming back from a lease or an operation.
    for record in state.in_phase(Phase.RETURNED):
        worker = record.worker
        worker.last_active_at = now  # a lease without a turn still counts as use
        reason = retire_reason(record, config, now)
        if reason is not None:
            actions.append(retire(state, record, reason))
        elif worker.dirty or worker.in_turn():
            state.move(record, Phase.CLEANING)
            actions.append(Clean(worker))
        else:
            state.move(record, Phase.IDLE)

    # Idle workers that died, aged, grew or sat unused for too long.
    idle: list[Record[W, L]] = []
    for record in state.in_phase(Phase.IDLE):
        reason = retire_reason(record, config, now)
        if reason is not None:
            actions.append(retire(state, record, reason))
        else:
            idle.append(record)
    surplus = len(idle) - warm_floor(config, state.demand, state.count(Phase.LEASED), now)
    for record in list(idle):  # the bottom of the stack has waited longest
        if surplus <= 0:
            break
        if record.worker.idle_s(now) >= config.max_idle_s:
            actions.append(retire(state, record, "idle"))
            idle.remove(record)
            surplus -= 1
    shed = shed_memory(state)
    if shed:
        actions.extend(shed)
        idle = state.in_phase(Phase.IDLE)

    # Hand idle workers to waiters, in the fair queue's order, the most recently used first.
    while idle:
        record = idle[-1]
        worker = record.worker
        if worker.dirty or not worker.is_idle():
            # Defence in depth: a worker that is not provably clean is never lent.
            idle.pop()
            actions.append(retire(state, record, "failed" if not worker.is_alive() else "unclean"))
            continue
        popped = state.queue.pop()
        if popped is None:
            break
        waiter = popped[0]
        if waiter.gone():
            continue
        idle.pop()
        state.move(record, Phase.LEASED)
        state.seat.leased(now)  # the capacity's LRU key: pools leased longest ago are evicted first
        state.demand.leased(state.count(Phase.LEASED), now=now)
        # Before the next pop: the queue must see this tenant's new count against its cap.
        state.slots.acquire(waiter.tenant, waiter.priority)
        if waiter.priority is Priority.BATCH:
            state.batch_leased += 1
        if worker.frozen:
            actions.append(Thaw(worker))  # a stopped process would never read its prompt
        actions.append(Assign(worker, waiter))
    actions.extend(Freeze(r.worker) for r in idle if freeze_due(r.worker, config, now))

    if cannot_serve(state, now):
        actions.extend(Refuse(waiter) for waiter in state.queue.drain() if not waiter.gone())

    spawns, evict = spawn_count(state, now)
    if evict is not None:
        actions.append(evict)
    used = {r.worker.slot for r in state.records.values()} if spawns else set()
    free_slots = (i for i in itertools.count() if i not in used)
    for slot in itertools.islice(free_slots, spawns):
        turn_limit = config.max_turns + state.rng.randint(0, config.max_turns_jitter)
        actions.append(Spawn(slot, turn_limit))
    return actions


def freeze_due(worker: WorkerView, config: PoolConfig, now: float) -> bool:
    return (config.freeze_idle_after_s > 0 and not worker.frozen
            and worker.idle_s(now) >= config.freeze_idle_after_s)


def next_freeze_at(state: PoolState[W, L, T]) -> float | None:
    """When the next idle worker becomes due to be frozen (monotonic), or None: the shell's timer,
    since no event may come to step the pool then."""
    after_s = state.config.freeze_idle_after_s
    if after_s <= 0 or state.closed:
        return None
    due = [r.worker.last_active_at + after_s for r in state.in_phase(Phase.IDLE) if not r.worker.frozen]
    return min(due, default=None)


def retire(state: PoolState[W, L, T], record: Record[W, L], reason: str) -> Retire[W]:
    state.move(record, Phase.CLOSING)
    return Retire(record.worker, reason)


def retire_reason(record: Record[W, L], config: PoolConfig, now: float) -> str | None:
    """Why this worker should not serve again, or None."""
    worker = record.worker
    if not worker.is_alive():
        return "failed"
    if record.recycle_on_release:
        return "memory_pressure"
    if worker.turns >= record.turn_limit:
        return "turns"
    if worker.age_s(now) >= config.max_age_s:
        return "age"
    if worker.pss_bytes is not None and worker.pss_bytes > config.max_worker_pss_bytes:
        return "memory"
    if worker.context_tokens > config.max_context_tokens:
        return "context"
    return None


def shed_memory(state: PoolState[W, L, T]) -> list[Action[W, T]]:
    """Past the hard limit: close idle workers, largest first; recycle leased ones on release.

    Never the last ready worker: with none, the pool spawns one at once (it may past the soft
    limit too), so shedding it would only churn processes, one start-up's CPU each time. Workers
    still starting do not count: their memory is not known yet, and they may not boot."""
    excess = state.total_pss_bytes() - state.memory.hard_limit_bytes
    actions: list[Action[W, T]] = []
    if excess <= 0:
        return actions
    idle, leased = state.in_phase(Phase.IDLE), state.in_phase(Phase.LEASED)
    flagged = sum(1 for r in leased if r.recycle_on_release)
    live = len(idle) + state.count(Phase.CLEANING) + len(leased) - flagged
    for record in sorted(idle, key=lambda r: r.worker.pss_bytes or 0, reverse=True):
        pss_bytes = record.worker.pss_bytes
        if excess <= 0 or live <= 1 or not pss_bytes:
            break  # (one not measured yet frees nothing we know of: it is measured once ready)
        excess -= pss_bytes
        live -= 1
        actions.append(retire(state, record, "memory_pressure"))
    for record in sorted(leased, key=lambda r: r.worker.pss_bytes or 0, reverse=True):
        pss_bytes = record.worker.pss_bytes
        if excess <= 0 or live <= 1 or not pss_bytes:
            break
        if not record.recycle_on_release:
            record.recycle_on_release = True
            live -= 1
        excess -= pss_bytes
    return actions


def spawn_count(state: PoolState[W, L, T], now: float) -> tuple[int, Evict | None]:
    """Workers to start now: enough for the eligible waiters plus the warm floor, within the pool's
    own cap, the shared capacity's room, the spawn limit and the soft memory limit; and the idle
    workers of other pools to evict when the shared ceiling is what stops it.

    Tells the seat what it waits for: waiters the ceiling keeps from being served (they beat every
    floor's refill), or a floor the ceiling keeps from being refilled."""
    seat = state.seat
    if state.breaker.state(now) is BreakerState.OPEN:
        seat.want(Need.NONE)  # a pool that may not start workers claims no room
        return 0, None
    ready_soon = state.count(Phase.IDLE, Phase.STARTING, Phase.CLEANING)
    eligible = state.queue.eligible()
    for_waiters = max(0, eligible - ready_soon)
    floor = warm_floor(state.config, state.demand, state.count(Phase.LEASED), now)
    for_floor = max(0, eligible + floor - ready_soon) - for_waiters
    if for_waiters + for_floor == 0:
        seat.want(Need.NONE)
        return 0, None
    live = ready_soon + state.count(Phase.LEASED)
    own_room = max(0, state.memory.max_workers - live)
    if live and state.total_pss_bytes() >= state.memory.soft_limit_bytes:
        own_room = 0
    cpu_room = max(0, spawn_room(state, now))
    # What the shared ceiling is asked for: within the pool's own cap and what can start now.
    want_w = min(for_waiters, own_room, cpu_room)
    take_w = min(want_w, seat.room(Need.WAITERS))
    want_f = min(for_floor, own_room - take_w, cpu_room - take_w)
    take_f = max(0, min(want_f, seat.room(Need.FLOOR) - take_w))
    short_w, short_f = want_w - take_w, want_f - take_f
    need = Need.WAITERS if short_w else Need.FLOOR if short_f else Need.NONE
    seat.want(need, short_w or short_f)
    evict = seat.to_evict()
    return take_w + take_f, Evict(evict, need) if evict > 0 else None


def spawn_room(state: PoolState[W, L, T], now: float) -> int:
    """Starts that may begin now: start-up is CPU-bound, and a half-open breaker allows one probe."""
    starting = state.count(Phase.STARTING) + sum(1 for r in state.records.values() if r.respawning)
    half_open = state.breaker.state(now) is BreakerState.HALF_OPEN
    return (1 if half_open else state.config.spawn_limit()) - starting


def cannot_serve(state: PoolState[W, L, T], now: float) -> bool:
    """The breaker is open and no worker exists that could come back to serve a waiter."""
    return state.breaker.state(now) is BreakerState.OPEN and state.count(
        Phase.IDLE, Phase.LEASED, Phase.CLEANING, Phase.RETURNED, Phase.STARTING) == 0


def unserved(state: PoolState[W, L, T]) -> int:
    """Waiters that no idle, starting or resetting worker, and no room to spawn one (nor to make by
    evicting another pool's idle worker), will serve: only a worker given back (a parked session)
    can serve them."""
    ready_soon = state.count(Phase.IDLE, Phase.STARTING, Phase.CLEANING, Phase.RETURNED)
    live = ready_soon + state.count(Phase.LEASED)
    shared = state.seat.room(Need.WAITERS) + state.seat.capacity.evictable(state.seat)
    room = max(0, min(state.memory.max_workers - live, shared))
    if live and state.total_pss_bytes() >= state.memory.soft_limit_bytes:
        room = 0
    return max(0, state.queue.eligible() - ready_soon - room)


def counts(state: PoolState[W, L, T]) -> dict[str, int]:
    """Workers per phase (a returned worker counts as cleaning: it is about to be), and waiters."""
    count = state.count
    return {"starting": count(Phase.STARTING), "idle": count(Phase.IDLE), "leased": count(Phase.LEASED),
            "cleaning": count(Phase.CLEANING, Phase.RETURNED), "closing": count(Phase.CLOSING),
            "waiting": len(state.queue)}
