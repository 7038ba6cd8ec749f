"""Which waiting request gets the next free worker: weighted fair queuing across tenants.

A pool keeps its waiting requests in a `FairQueue` and asks it, from its await-free `_plan` step,
which one to serve next. Each tenant has a FIFO per priority; tenants are interleaved by
self-clocked fair queueing (SCFQ), so a tenant that floods the pool delays a quiet one by at most
its weighted share, and a tenant that was idle earns no credit it could later spend in a burst.

The queue never takes a lease itself: `FairQueue.pop` picks a request, and the caller calls
`TenantSlots.acquire` (`claudepool.pool.shares`) once it has a worker for it.

Everything here is synchronous: decisions never straddle an ``await``.

>>> slots = TenantSlots()
>>> queue: FairQueue[str] = FairQueue(slots, batch_max_running=lambda: 1)
>>> for i in range(3):
...     _ = queue.push(f"noisy-{i}", "noisy", TenantShare())
>>> _ = queue.push("quiet-0", "quiet", TenantShare())
>>> [item for item, _tenant, _priority in iter(queue.pop, None)]
['noisy-0', 'quiet-0', 'noisy-1', 'noisy-2']
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from claudepool.pool.shares import PRIORITIES, Priority, TenantShare, TenantSlots

T = TypeVar("T")

# No tag yet: the next request of an empty lane is tagged from the virtual clock alone.
_NO_TAG = float("-inf")
# Lazy deletion leaves dead heap entries and dead lane entries behind; rebuild once they outnumber
# the live ones (plus this slack), which keeps every operation O(log n) amortized and memory O(n).
_COMPACT_SLACK = 64



@dataclass(eq=False)
class Ticket:
    """A queued request, returned by `FairQueue.push`; pass it to `FairQueue.cancel` to withdraw it.

    ``tag`` is the request's virtual finish time (smaller is served sooner) and ``seq`` its arrival
    order in its queue, which breaks ties. ``dead`` becomes true once the request has left the queue:
    cancelled, served by `FairQueue.pop`, or removed by `FairQueue.drain`.
    """

    tenant: str
    priority: Priority
    tag: float
    seq: int
    dead: bool = False
    _lane: _Lane[Any] | None = field(default=None, repr=False)


class _Lane(Generic[T]):
    """One tenant's FIFO of one priority, with its SCFQ bookkeeping."""

    __slots__ = ("dead", "entries", "heap_seq", "index", "last_tag", "live", "tenant")

    # The tenant by name, not by reference: no lane/tenant cycle, so an emptied tenant is freed at
    # once rather than by the cyclic GC.
    def __init__(self, tenant: str, index: int) -> None:
        self.tenant = tenant
        self.index = index  # of its priority in PRIORITIES
        self.entries: deque[tuple[Ticket, T]] = deque()
        self.live = 0
        self.dead = 0  # cancelled entries still sitting in `entries`
        # Finish tag of the lane's latest request; the next one starts from max(V, last_tag).
        self.last_tag = _NO_TAG
        # `seq` of the heap entry that currently represents this lane, or -1 when the lane is not in
        # the heap (empty, or parked because its tenant is at its concurrency cap).
        self.heap_seq = -1

    def head(self) -> tuple[Ticket, T]:
        """The first live entry (dropping cancelled ones before it). Only called when ``live > 0``."""
        entries = self.entries
        while entries[0][0].dead:
            entries.popleft()
            self.dead -= 1
        return entries[0]

    def reset(self) -> None:
        """Forget everything once no live entry is left. Dropping ``last_tag`` too means a tenant
        that cancelled its backlog is not pushed back for requests that were never served, and one
        that went idle restarts from the virtual clock: no penalty and no credit."""
        self.entries.clear()
        self.dead = 0
        self.last_tag = _NO_TAG
        self.heap_seq = -1


class _Tenant(Generic[T]):
    """A tenant with something queued: its lanes, latest share and cached eligible counts."""

    __slots__ = ("eligible_batch", "eligible_interactive", "lanes", "name", "share")

    def __init__(self, name: str, share: TenantShare) -> None:
        self.name = name
        self.share = share
        self.lanes: tuple[_Lane[T], _Lane[T]] = (_Lane(name, 0), _Lane(name, 1))
        self.eligible_interactive = 0
        self.eligible_batch = 0

    def live(self) -> int:
        return self.lanes[0].live + self.lanes[1].live


class _Clock(Generic[T]):
    """The virtual clock and tenant heap of one priority class. The classes are kept apart so a
    tenant's BATCH backlog does not push its INTERACTIVE requests back, and vice versa."""

    __slots__ = ("heap", "stale", "virtual_time")

    def __init__(self) -> None:
        self.virtual_time = 0.0
        # (head tag, head seq, lane): one live entry per schedulable lane; seq is unique, so the
        # lane itself is never compared.
        self.heap: list[tuple[float, int, _Lane[T]]] = []
        self.stale = 0  # entries whose lane was emptied or rescheduled since they were pushed


class FairQueue(Generic[T]):
    """Waiting requests of one pool: per-tenant FIFOs served by weighted fair queuing.

    Self-clocked fair queueing: at push a request gets the finish tag
    ``max(V, tenant's last tag) + 1 / weight``; `pop` serves the eligible tenant whose head has the
    smallest tag (earliest push on a tie) and advances the virtual clock ``V`` to that tag. Tenants
    sit in a heap keyed by their head's tag, so push and pop are O(log n); cancel marks the entry
    dead in O(1) and it is dropped when it surfaces.

    ``batch_max_running()`` says how many BATCH leases may be held at once right now; the pool
    derives it from its size.

    >>> slots = TenantSlots()
    >>> queue: FairQueue[str] = FairQueue(slots, batch_max_running=lambda: 0)
    >>> _ = queue.push("report", "acme", TenantShare(), Priority.BATCH)
    >>> ticket = queue.push("chat", "acme", TenantShare())
    >>> (len(queue), queue.eligible())  # no room for batch work
    (2, 1)
    >>> queue.cancel(ticket)
    >>> queue.pop() is None
    True
    """

    def __init__(self, slots: TenantSlots, *, batch_max_running: Callable[[], int],
                 batch_running: Callable[[], int] | None = None) -> None:
        self._slots = slots
        self._batch_max_running = batch_max_running
        # What the cap counts: by default every BATCH lease on the slots; a pool passes its own.
        self._batch_running = batch_running or slots.batch_running
        self._tenants: dict[str, _Tenant[T]] = {}
        self._clocks: tuple[_Clock[T], _Clock[T]] = (_Clock(), _Clock())
        self._seq = itertools.count()
        self._live = 0
        self._live_batch = 0
        # Sums of the tenants' cached eligible counts, so `eligible` is O(1).
        self._eligible_interactive = 0
        self._eligible_batch = 0
        slots._watch(self)

    def __repr__(self) -> str:
        return (
            f"<FairQueue {self._live} queued ({self._live_batch} batch), {len(self._tenants)} tenants, "
            f"{self.eligible()} eligible>"
        )

    def __len__(self) -> int:
        """Live (not cancelled) queued requests."""
        return self._live

    # -- queries -------------------------------------------------------------------------------

    def batch_queued(self) -> int:
        """Live queued BATCH requests (the rest of `len` are INTERACTIVE)."""
        return self._live_batch

    def eligible(self) -> int:
        """How many queued requests `pop` could hand out now if enough workers were free: what
        tells the pool how many workers are worth spawning.

        A tenant counts for at most the leases its ``max_concurrency`` still allows (none when it is
        at its cap), its INTERACTIVE requests first; BATCH requests count only up to the room left
        under ``batch_max_running()``. O(1).
        """
        batch_room = max(0, self._batch_max_running() - self._batch_running())
        return self._eligible_interactive + min(self._eligible_batch, batch_room)

    def waiting(self, tenant: str) -> int:
        """Live queued requests of ``tenant``."""
        state = self._tenants.get(tenant)
        return 0 if state is None else state.live()

    def tenants_waiting(self) -> list[str]:
        """Tenants with at least one live queued request, in order of first arrival."""
        return list(self._tenants)

    # -- changes -------------------------------------------------------------------------------

    def push(
        self, item: T, tenant: str, share: TenantShare, priority: Priority = Priority.INTERACTIVE
    ) -> Ticket:
        """Queue ``item`` for ``tenant``. ``share`` tags this request and, being the tenant's most
        recent, decides its concurrency cap from now on."""
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(tenant, share)
        else:
            state.share = share
        index = PRIORITIES.index(priority)
        lane = state.lanes[index]
        clock = self._clocks[index]
        # max(V, last tag): a backlogged tenant queues behind its own backlog; an idle one restarts
        # from V and so cannot claim the service it did not use while away.
        tag = max(clock.virtual_time, lane.last_tag) + 1.0 / share.weight
        lane.last_tag = tag
        ticket = Ticket(tenant, priority, tag, next(self._seq))
        ticket._lane = lane
        lane.entries.append((ticket, item))
        lane.live += 1
        self._live += 1
        if priority is Priority.BATCH:
            self._live_batch += 1
        self._refresh(state)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a queued request. O(1): the entry is only marked dead and dropped when it
        surfaces, but every count reflects it at once. Cancelling a ticket that already left the
        queue (cancelled, served or drained) does nothing."""
        if ticket.dead:
            return
        lane = ticket._lane
        state = self._tenants.get(ticket.tenant)
        if lane is None or state is None or lane not in state.lanes:
            raise ValueError(f"{ticket!r} was not issued by this queue")
        ticket.dead = True
        lane.live -= 1
        lane.dead += 1
        self._live -= 1
        if ticket.priority is Priority.BATCH:
            self._live_batch -= 1
        if lane.live == 0:
            self._unschedule(lane)
            lane.reset()
        elif lane.dead > lane.live + _COMPACT_SLACK:
            # Mid-queue cancels would otherwise pile up behind a head that stays (a capped tenant).
            lane.entries = deque(entry for entry in lane.entries if not entry[0].dead)
            lane.dead = 0
        self._refresh(state)

    def pop(self) -> tuple[T, str, Priority] | None:
        """Take the next request to serve: ``(item, tenant, priority)``, or None.

        INTERACTIVE before BATCH; BATCH only when no INTERACTIVE request is eligible and fewer than
        ``batch_max_running()`` BATCH leases are held. A tenant holding ``max_concurrency`` leases
        is skipped; its requests keep their tags and their order. The caller takes the lease
        (`TenantSlots.acquire`) once it has a worker for the item.
        """
        served = self._pop_from(0)
        if served is None and self._batch_running() < self._batch_max_running():
            served = self._pop_from(1)
        if served is None:
            return None
        ticket, item = served
        return item, ticket.tenant, ticket.priority

    def drain(self) -> list[T]:
        """Remove and return every live item (the pool is shutting down), oldest first."""
        served: list[tuple[int, T]] = []
        for state in self._tenants.values():
            for lane in state.lanes:
                for ticket, item in lane.entries:
                    if not ticket.dead:
                        ticket.dead = True
                        served.append((ticket.seq, item))
                lane.heap_seq = -1
                lane.reset()
        self._tenants.clear()
        for clock in self._clocks:
            clock.heap.clear()
            clock.stale = 0
        self._live = self._live_batch = 0
        self._eligible_interactive = self._eligible_batch = 0
        served.sort(key=lambda pair: pair[0])
        return [item for _, item in served]

    # -- internals -----------------------------------------------------------------------------

    def _pop_from(self, index: int) -> tuple[Ticket, T] | None:
        clock = self._clocks[index]
        heap = clock.heap
        while heap:
            tag, seq, lane = heap[0]
            if lane.heap_seq != seq:
                heapq.heappop(heap)
                clock.stale -= 1
                continue
            head_ticket, _ = lane.head()
            if head_ticket.seq != seq:
                # The head this entry was keyed on was cancelled: re-key on the new head.
                lane.heap_seq = head_ticket.seq
                heapq.heapreplace(heap, (head_ticket.tag, head_ticket.seq, lane))
                continue
            state = self._tenants[lane.tenant]  # a lane in the heap has live entries: its tenant is here
            if self._at_cap(state):
                # Park the lane; `_slots_changed` puts it back, with its tags, when a lease returns.
                heapq.heappop(heap)
                lane.heap_seq = -1
                continue
            heapq.heappop(heap)
            lane.heap_seq = -1
            ticket, item = lane.entries.popleft()
            ticket.dead = True
            lane.live -= 1
            self._live -= 1
            if ticket.priority is Priority.BATCH:
                self._live_batch -= 1
            # max(): a lane parked at its cap can be served below V; the clock never runs back.
            clock.virtual_time = max(clock.virtual_time, tag)
            if lane.live == 0:
                lane.reset()
            self._refresh(state)
            return ticket, item
        return None

    def _at_cap(self, state: _Tenant[T]) -> bool:
        cap = state.share.max_concurrency
        return cap > 0 and self._slots.running(state.name) >= cap

    def _refresh(self, state: _Tenant[T]) -> None:
        """Recompute one tenant's eligible counts and heap membership after anything about it
        changed (a push, cancel or pop, a new share, a lease taken or returned)."""
        self._eligible_interactive -= state.eligible_interactive
        self._eligible_batch -= state.eligible_batch
        interactive, batch = state.lanes
        if state.live() == 0:
            del self._tenants[state.name]
            state.eligible_interactive = state.eligible_batch = 0
            return
        cap = state.share.max_concurrency
        if cap > 0:
            room = max(0, cap - self._slots.running(state.name))
            state.eligible_interactive = min(interactive.live, room)
            state.eligible_batch = min(batch.live, room - state.eligible_interactive)
        else:
            state.eligible_interactive, state.eligible_batch = interactive.live, batch.live
        self._eligible_interactive += state.eligible_interactive
        self._eligible_batch += state.eligible_batch
        if not self._at_cap(state):
            for index, lane in enumerate(state.lanes):
                if lane.live > 0 and lane.heap_seq < 0:
                    self._schedule(index, lane)

    def _schedule(self, index: int, lane: _Lane[T]) -> None:
        clock = self._clocks[index]
        ticket, _ = lane.head()
        lane.heap_seq = ticket.seq
        heapq.heappush(clock.heap, (ticket.tag, ticket.seq, lane))
        if clock.stale > len(clock.heap) // 2 + _COMPACT_SLACK:
            clock.heap = [entry for entry in clock.heap if entry[2].heap_seq == entry[1]]
            heapq.heapify(clock.heap)
            clock.stale = 0

    def _unschedule(self, lane: _Lane[T]) -> None:
        if lane.heap_seq >= 0:
            self._clocks[lane.index].stale += 1
            lane.heap_seq = -1

    def _slots_changed(self, tenant: str) -> None:
        """`TenantSlots` calls this when ``tenant`` took or returned a lease in any pool."""
        state = self._tenants.get(tenant)
        if state is not None:
            self._refresh(state)
