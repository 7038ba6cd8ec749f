"""One worker ceiling and one RAM budget for every pool of a daemon.

Each pool takes a `Seat` in the daemon's `Capacity` (as every pool shares one `TenantSlots`). The
capacity counts live workers across all seats (starting, idle, leased, cleaning, returned, and
closing ones until they are gone: a closing process still holds its memory), owns the daemon-wide
ceiling (configured, or derived from RAM with the pools' own sizing rule: available memory ×
``memory_fraction`` ÷ the largest measured worker PSS), and the daemon-wide total-PSS limits.

A pool's planner reads its seat's room in its synchronous step; the spawns it decides are added to
the pool's records before that step returns, so two pools can never both take the last place.

When a pool's waiters (or, at lower priority, its warm floor) find the ceiling reached, its step
asks for evictions: the capacity retires idle workers of other pools, least recently used pool
first by LRU-2 (the pool whose last-but-one lease is oldest: pools used once go before any used
twice, see `Seat.previous_lease_at`; a pool's last worker after every other pool's spare ones),
never a leased or cleaning one (a less recently leased pool's worker still being reset is waited
for, not passed over), and only once no idle worker outside a warm floor is left does it
touch a floor (``min_idle`` of a configured pool). A floor's refill may evict only workers outside
floors. Victims in flight are counted daemon-wide against the shortfalls of the waiting seats.
When a worker of any pool is gone, the seats waiting for room are woken (the longest waiting
first) in the same call, so the freed place goes to them and not to whichever pool happens to
step next; while some pool's waiters wait for room, no floor refill may take a freed place. When a
pool's step leaves it idle workers, the seats waiting for room are woken to evict one.

>>> cap = Capacity(CapacityConfig(max_workers=2), memory_probe=lambda: 0)
>>> seat = cap.join(None)
>>> seat.room(Need.WAITERS)
2
>>> seat.added(); seat.added(); seat.room(Need.WAITERS)
0
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from claudepool.pool.config import CapacityConfig
from claudepool.pool.memory import MemoryPlan, available_memory_bytes
from claudepool.pool.sizing import UNBOUNDED, PoolSizing


class Need(enum.IntEnum):
    """Why a seat waits for room; a higher need is served first."""

    NONE = 0
    FLOOR = 1  # below its warm floor (min_idle)
    WAITERS = 2  # requests wait that no worker of the pool will serve


class Member(Protocol):
    """What the capacity asks of a pool (the pool's shell, or a stub in the unit tests)."""

    @property
    def name(self) -> str: ...

    def floor(self) -> int:
        """Idle workers this pool keeps warm (its ``min_idle``): evicted last."""
        ...

    def idle_workers(self) -> Sequence[Any]:
        """Its idle workers, the longest idle first (none once it is closing)."""
        ...

    def resetting(self) -> int:
        """Its workers being reset after a lease (idle soon, unless its own waiters take them)."""
        ...

    def serving(self) -> int:
        """Its workers not closing: starting, idle, leased or being reset."""
        ...

    def pss_sizes(self) -> list[int]:
        """The measured PSS of each of its workers (not measured yet: left out)."""
        ...

    def evict(self, worker: Any, reason: str) -> None:
        """Retire this idle worker now (it keeps counting until it is gone)."""
        ...

    def wake(self) -> None:
        """Step the pool: room may have freed."""
        ...


@dataclass(eq=False)
class Seat:
    """One pool's place in the capacity: its live count, LRU key and what it waits for."""

    capacity: Capacity
    member: Member | None
    live: int = 0
    # The eviction key (LRU-2): when this pool handed out its last and its last-but-one lease
    # (monotonic; 0 = never). Ranked by the last-but-one first, a pool used once is evicted before
    # any pool used again, however recent that one use: 200 prompts seen once each (a scan) cannot
    # push out the busy pools, as plain LRU lets them when a newcomer's lease starts after a busy
    # pool's (it waits for a spawn).
    last_lease_at: float = 0.0
    previous_lease_at: float = 0.0
    need: Need = Need.NONE
    # Orders seats waiting at the same need: the one that began waiting first is woken first.
    need_since: int = 0
    # Places the ceiling denies this seat now (what its step could start with them).
    short: int = 0

    @property
    def name(self) -> str:
        return self.member.name if self.member is not None else "?"

    def added(self) -> None:
        self.live += 1
        self.capacity.live += 1

    def removed(self, worker: Any) -> None:
        self.live -= 1
        self.capacity._gone(worker)

    def room(self, need: Need) -> int:
        return self.capacity.room(self, need)

    def want(self, need: Need, short: int = 0) -> None:
        """What this seat waits for after its step, and for how many places (NONE: it has all the
        room it can use now)."""
        self.short = short if need is not Need.NONE else 0
        if need is not self.need:
            self.capacity.waiting += (need is not Need.NONE) - (self.need is not Need.NONE)
            self.need, self.need_since = need, next(self.capacity._clock)

    def leased(self, now: float) -> None:
        self.previous_lease_at, self.last_lease_at = self.last_lease_at, now

    def evict(self, count: int, need: Need) -> int:
        return self.capacity.evict(self, count, need)

    def to_evict(self) -> int:
        """Victims to ask for now: this seat's shortfall less the victims already closing for the
        seats waiting before it, or for it. The count is daemon-wide, not per seat, because a freed
        place goes to the longest waiting seat, whichever seat's eviction freed it."""
        return self.capacity._to_evict(self)

    def offer(self) -> None:
        """After a step that left this pool with idle workers: a pool waiting for room may evict one."""
        if self.capacity.waiting:
            self.capacity._offer(self)

    def leave(self) -> None:
        self.want(Need.NONE)
        self.capacity._leave(self)


@dataclass(frozen=True)
class Victim:
    """``worker`` None: a worker of ``seat`` still being reset ranks here; it is waited for (its
    pool offers it once idle) rather than passed over for a more recently used pool's idle one."""

    seat: Seat
    worker: Any


def pick_victims(seats: Sequence[Seat], requester: Seat, count: int, need: Need) -> list[Victim]:
    """Up to ``count`` idle workers to evict for ``requester``: outside warm floors first, each tier
    in least-recently-leased pool order (within a pool the longest idle first, then the ones being
    reset, as ``worker`` None); floors only for waiters, never for another floor."""
    outside: list[tuple[bool, float, float, int, Victim]] = []
    floors: list[tuple[bool, float, float, int, Victim]] = []
    for order, seat in enumerate(seats):
        if seat is requester or seat.member is None:
            continue
        idle = [*seat.member.idle_workers(), *[None] * seat.member.resetting()]
        spare = max(0, len(idle) - seat.member.floor())
        for i, worker in enumerate(idle):
            # A pool's last worker goes after every other pool's spare one: a pool kept warm with one
            # worker beats one with two (evicting both would make its next request a cold start).
            last = i == len(idle) - 1 and seat.member.serving() <= len(idle)
            key = (last, seat.previous_lease_at, seat.last_lease_at, order * 1_000_000 + i, Victim(seat, worker))
            (outside if i < spare else floors).append(key)
    ranked = sorted(outside, key=lambda k: k[:4])
    if need is Need.WAITERS:
        ranked += sorted(floors, key=lambda k: k[:4])
    return [victim for *_, victim in ranked[:max(0, count)]]


@dataclass
class _Unbounded:
    """The plan of a capacity without a ceiling of its own (a pool used alone sizes itself)."""

    plan: MemoryPlan = field(default_factory=lambda: MemoryPlan(UNBOUNDED, UNBOUNDED, UNBOUNDED, 0))


class Capacity:
    """The daemon-wide worker ceiling, its live count, and the seats of the pools sharing it.

    ``config`` None: no ceiling of its own (a `Pool` built without a capacity gets one of these,
    and its own memory plan, from its own config, sizes it as before)."""

    def __init__(self, config: CapacityConfig | None = None, *,
                 memory_probe: Callable[[], int] = available_memory_bytes) -> None:
        self.config = config
        self._sizing = PoolSizing(config, memory_probe) if config is not None else None
        self.plan: MemoryPlan = self._sizing.initial() if self._sizing is not None else _Unbounded().plan
        self.live = 0
        self.waiting = 0  # seats whose need is not NONE
        self.evictions: Counter[str] = Counter()  # by the victim's pool
        self._seats: list[Seat] = []
        self._victims: set[Any] = set()  # evicted, still closing
        self._clock: Iterator[int] = itertools.count(1)
        self._waking = False
        self._wake_again = False
        self._offering = False

    def __repr__(self) -> str:
        return f"<Capacity {self.live}/{self.max_workers} workers, {len(self._seats)} pools>"

    @property
    def bounded(self) -> bool:
        return self.config is not None

    @property
    def max_workers(self) -> int:
        return self.plan.max_workers

    @property
    def pools(self) -> int:
        """Pools holding a seat (the daemon bounds those made on demand: ``pool.max_on_demand_pools``)."""
        return len(self._seats)

    def join(self, member: Member | None) -> Seat:
        seat = Seat(self, member)
        self._seats.append(seat)
        return seat

    def _leave(self, seat: Seat) -> None:
        if seat in self._seats:
            self._seats.remove(seat)
        self._wake()

    # -- room --------------------------------------------------------------------------------

    def total_pss_bytes(self) -> int:
        return sum(sum(s.member.pss_sizes()) for s in self._seats if s.member is not None)

    def free(self) -> int:
        """Places left under the ceiling (none past the soft memory limit)."""
        free = self.plan.max_workers - self.live
        if free > 0 and self.live and self.plan.soft_limit_bytes < UNBOUNDED \
                and self.total_pss_bytes() >= self.plan.soft_limit_bytes:
            return 0
        return max(0, free)

    def room(self, seat: Seat, need: Need) -> int:
        """Places ``seat`` may take now for ``need``: a floor takes none while another pool's
        waiters wait for room (waiters beat floors)."""
        if need is Need.FLOOR and any(s.need is Need.WAITERS for s in self._seats if s is not seat):
            return 0
        return self.free()

    # -- eviction ----------------------------------------------------------------------------

    def evict(self, requester: Seat, count: int, need: Need) -> int:
        """Retire up to ``count`` idle workers of other pools for ``requester``; returns how many.
        Synchronous: each victim moves to closing in its pool before this returns."""
        victims = [v for v in pick_victims(self._seats, requester, count, need) if v.worker is not None]
        for victim in victims:
            assert victim.seat.member is not None  # pick_victims skips member-less seats
            self._victims.add(victim.worker)
            self.evictions[victim.seat.name] += 1
            victim.seat.member.evict(victim.worker, "evicted")
        return len(victims)

    @property
    def evicting(self) -> int:
        """Evicted workers still closing: their places are promised to the seats waiting for room."""
        return len(self._victims)

    def evictable(self, seat: Seat) -> int:
        """Idle workers of other pools that waiters of ``seat`` could evict (floors included)."""
        return sum(len(s.member.idle_workers()) for s in self._seats if s is not seat and s.member is not None)

    def _to_evict(self, seat: Seat) -> int:
        if not seat.short:
            return 0
        # Freed places go to waiters before floors, then to the longest waiting: the seats served first.
        ahead = sum(s.short for s in self._seats if s.need > seat.need
                    or (s.need is seat.need and s.need_since <= seat.need_since))
        return max(0, min(seat.short, ahead - len(self._victims)))

    def replan(self) -> MemoryPlan:
        """Re-derive the ceiling from the latest PSS readings of every pool's workers; past the hard
        limit, retire idle workers (largest first, never the daemon's last idle one). Pools call
        this after each memory measurement."""
        if self._sizing is None:
            return self.plan
        sizes = [size for s in self._seats if s.member is not None for size in s.member.pss_sizes()]
        self.plan = self._sizing.plan_sizes(sizes)
        # Workers already evicted still hold their memory until gone: what they free is counted
        # as freed, or every pool's next measurement would shed another one for the same excess.
        excess = sum(sizes) - sum(w.pss_bytes or 0 for w in self._victims) - self.plan.hard_limit_bytes
        if excess > 0:
            idle = [(w.pss_bytes or 0, s.member, w) for s in self._seats if s.member is not None
                    for w in s.member.idle_workers()]
            idle_left = len(idle)
            for pss_bytes, member, worker in sorted(idle, key=lambda v: v[0], reverse=True):
                if excess <= 0 or idle_left <= 1 or not pss_bytes:
                    break  # (one not measured yet frees nothing we know of)
                excess -= pss_bytes
                idle_left -= 1
                self._victims.add(worker)
                member.evict(worker, "memory_pressure")
        self._wake()
        return self.plan

    def _offer(self, seat: Seat) -> None:
        """``seat`` has idle workers: wake the seats that could evict one (any idle worker for
        waiters, one beyond the pool's floor for a floor). Without this, a pool whose waiters found
        every worker busy would wait until some worker is gone, while one sits idle elsewhere."""
        if self._offering or seat.member is None:
            return
        idle = len(seat.member.idle_workers())
        spare = idle - seat.member.floor()
        if not idle:
            return
        self._offering = True
        try:
            for other in sorted((s for s in self._seats if s is not seat and s.need is not Need.NONE),
                                key=lambda s: s.need_since):
                if other.member is not None and (other.need is Need.WAITERS or spare > 0):
                    other.member.wake()
        finally:
            self._offering = False

    # -- workers gone ------------------------------------------------------------------------

    def _gone(self, worker: Any) -> None:
        self.live -= 1
        self._victims.discard(worker)
        self._wake()

    def _wake(self) -> None:
        """Step the seats waiting for room, the longest waiting first, while room lasts (a floor
        woken while some pool's waiters wait takes nothing: see `room`). Re-entrant calls (a woken
        pool's step freeing or asking for room) fold into this loop."""
        if self._waking:
            self._wake_again = True
            return
        self._waking = True
        try:
            again = True
            while again:
                self._wake_again = False
                waiting = sorted((s for s in self._seats if s.need is not Need.NONE and s.member is not None),
                                 key=lambda s: s.need_since)
                for seat in waiting:
                    if self.free() <= 0:
                        break
                    assert seat.member is not None
                    seat.member.wake()
                again = self._wake_again and self.free() > 0
        finally:
            self._waking = False
