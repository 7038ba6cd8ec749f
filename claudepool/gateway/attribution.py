"""Who a model call is billed to: the request the calling worker serves, as the pool says.

The gateway knows a call's worker from its credential alone, then asks the worker's pool which lease
that worker serves (`Pool.lease_of`: the lease holding it, or one released mid-turn whose last turn
is still draining). Nothing the worker sends, no header and no body field, enters the attribution.

>>> class NoLeases:
...     def lease_of(self, worker): return None
>>> attribute = from_leases({"default": NoLeases()})
>>> class W:
...     class profile: name = "default"
>>> attribute(W()) is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from claudepool.pool.lease import Lease
from claudepool.pool.shares import Priority
from claudepool.pool.worker import Worker
from claudepool.tenancy.metering import RequestContext


@dataclass(frozen=True)
class Attribution:
    """The request a call was made for. ``request_id`` and ``session`` are None for a lease whose
    request context is not set yet, or for a caller that has none (``claudepool check``)."""

    tenant: str
    profile: str  # the configured profile
    pool: str  # the pool the worker belongs to: the profile, or its ``.sessions`` twin
    worker: str
    slot: int
    request_id: str | None = None
    session: str | None = None
    # The lease's: batch calls yield to interactive ones under the account's caps.
    priority: Priority = Priority.INTERACTIVE
    # The meter's record of the request, which the call is billed to (None: nothing bills it).
    context: RequestContext | None = field(default=None, compare=False, repr=False)


# A worker to the request it serves now; None when it serves none (idle, being reset, gone).
Attribute = Callable[[Worker], Attribution | None]


class LeaseHolder(Protocol):
    """A pool, as attribution reads it."""

    def lease_of(self, worker: Worker) -> Lease | None: ...


def from_leases(pools: Mapping[str, LeaseHolder]) -> Attribute:
    """The daemon's attribution: each worker's pool, found by the worker's profile name (a pool's
    name; a respawned worker keeps it), says which lease the worker serves."""

    def attribute(worker: Worker) -> Attribution | None:
        pool = pools.get(worker.profile.name)
        lease = pool.lease_of(worker) if pool is not None else None
        if lease is None:
            return None
        context = lease.context if isinstance(lease.context, RequestContext) else None
        return Attribution(
            tenant=lease.tenant,
            profile=context.profile if context is not None else worker.profile.name,
            pool=worker.profile.name,
            worker=worker.id,
            slot=worker.slot,
            request_id=context.request_id if context is not None else None,
            session=context.session if context is not None else None,
            priority=lease.priority,
            context=context,
        )

    return attribute
