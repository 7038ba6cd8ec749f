"""Who may hold how many workers: priorities, each tenant's share, and the leases held per tenant.

`TenantSlots` counts the leases each tenant holds across every pool of a daemon, so a tenant's
``max_concurrency`` holds across profiles; every `FairQueue` built on the slots hears of each change.

>>> slots = TenantSlots()
>>> slots.acquire("acme")
>>> slots.running("acme")
1
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class SlotsWatcher(Protocol):
    """What the slots tell a queue built on them (a `FairQueue`): a tenant's lease count changed."""

    def _slots_changed(self, tenant: str) -> None: ...


class Priority(enum.StrEnum):
    """INTERACTIVE requests are always served before BATCH ones; BATCH also has a pool-wide cap."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


PRIORITIES = (Priority.INTERACTIVE, Priority.BATCH)


@dataclass(frozen=True)
class TenantShare:
    """A tenant's claim on a pool's workers.

    ``weight`` is relative: two waiting tenants weighted 3 and 1 get workers in a 3:1 ratio.
    ``max_concurrency`` caps the leases the tenant holds at once across every pool sharing one
    `TenantSlots` (0 = no cap); a capped tenant's requests wait, in order, until a lease returns.
    """

    weight: float = 1.0
    max_concurrency: int = 0

    def __post_init__(self) -> None:
        # `not weight > 0` also rejects NaN, which would poison every tag comparison.
        if not self.weight > 0 or self.weight == float("inf"):
            raise ValueError(f"tenant weight must be a positive finite number, got {self.weight!r}")
        if self.max_concurrency < 0:
            raise ValueError(f"max_concurrency must be >= 0 (0 = unlimited), got {self.max_concurrency!r}")


class TenantSlots:
    """Leases held per tenant, shared by every pool of a daemon so ``max_concurrency`` holds across
    profiles.

    A lease returned in one pool can unblock a capped tenant queued in another, so `release` calls
    every listener (each pool re-runs its step). Queues built on these slots are told first, so
    their view of who is capped is current by the time a listener pops.

    >>> slots = TenantSlots()
    >>> slots.add_listener(lambda tenant: print("released", tenant))
    >>> slots.acquire("acme", Priority.BATCH)
    >>> (slots.running("acme"), slots.batch_running())
    (1, 1)
    >>> slots.release("acme", Priority.BATCH)
    released acme
    """

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._batch_running = 0
        self._listeners: list[Callable[[str], None]] = []
        # Weak: a pool that is closed and dropped must not be kept alive (or stepped) by the slots.
        self._queues: weakref.WeakSet[SlotsWatcher] = weakref.WeakSet()

    def __repr__(self) -> str:
        held = sum(self._running.values())
        return f"<TenantSlots {held} leases ({self._batch_running} batch) held by {len(self._running)} tenants>"

    def running(self, tenant: str) -> int:
        """Leases ``tenant`` holds now, across all pools."""
        return self._running.get(tenant, 0)

    def batch_running(self) -> int:
        """BATCH leases held now, across all tenants and pools."""
        return self._batch_running

    def acquire(self, tenant: str, priority: Priority = Priority.INTERACTIVE) -> None:
        """Count one more lease held by ``tenant``. Call it right after `FairQueue.pop` hands out a
        request and before the next pop, or the tenant's cap can be overshot."""
        self._running[tenant] = self._running.get(tenant, 0) + 1
        if priority is Priority.BATCH:
            self._batch_running += 1
        self._notify_queues(tenant)

    def release(self, tenant: str, priority: Priority = Priority.INTERACTIVE) -> None:
        """Count one lease fewer, then call every listener with ``tenant``.

        Releasing a lease that was never acquired is a caller bug and raises `ValueError`, as does
        releasing with a priority other than the one it was acquired with (when no BATCH lease is
        held). If a listener raises, the rest are still called and the first error is re-raised.
        """
        held = self._running.get(tenant, 0)
        if held <= 0:
            raise ValueError(f"tenant {tenant!r} holds no lease to release")
        if priority is Priority.BATCH and self._batch_running <= 0:
            raise ValueError(f"no batch lease is held (releasing one for tenant {tenant!r})")
        if held == 1:
            del self._running[tenant]  # keeps the dict as small as the set of active tenants
        else:
            self._running[tenant] = held - 1
        if priority is Priority.BATCH:
            self._batch_running -= 1
        self._notify_queues(tenant)
        first_error: BaseException | None = None
        for listener in list(self._listeners):
            try:
                listener(tenant)
            except Exception as exc:  # one broken pool must not leave the others waiting
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

    def add_listener(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(tenant)`` after each `release` (synchronously, in registration order)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str], None]) -> None:
        """Stop calling ``fn`` (a pool that closes); unknown listeners are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def _watch(self, queue: SlotsWatcher) -> None:
        self._queues.add(queue)

    def _notify_queues(self, tenant: str) -> None:
        for queue in list(self._queues):
            queue._slots_changed(tenant)
