"""A worker lent to one request of one tenant, the request waiting for one, and what a lease tells
the pool that lent it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from claudepool.errors import PoolClosed
from claudepool.pool.shares import Priority
from claudepool.pool.worker import TurnResult, Worker
from claudepool.protocol.cli_events import CliEvent, UserContent


class LeaseOwner(Protocol):
    """The pool a lease came from: it takes the worker back and hears of every settled turn."""

    def release_lease(self, lease: Lease) -> None: ...

    def record_result(self, lease: Lease, result: TurnResult) -> None: ...


class Lease:
    """One worker lent to one request of one tenant. Release it exactly once (the context manager
    of `Pool.lease` does); the pool then resets the worker before anyone else gets it."""

    def __init__(self, owner: LeaseOwner, worker: Worker, tenant: str, queued_s: float,
                 priority: Priority = Priority.INTERACTIVE) -> None:
        self.owner = owner
        self.worker = worker
        self.tenant = tenant
        self.priority = priority
        self.queued_s = queued_s
        self.acquired_at = time.monotonic()
        self.turns_started = 0
        self.released = False
        # Whatever the caller wants the turn-result and lease-done callbacks to see (the metering
        # context of the request this lease serves).
        self.context: Any = None
        self.settled = False

    def __repr__(self) -> str:
        return f"<Lease {self.tenant} on {self.worker.id}{' released' if self.released else ''}>"

    def run_turn(
        self, content: UserContent, *, idle_timeout_s: float | None = None
    ) -> AsyncIterator[CliEvent | TurnResult]:
        """Run one turn on the leased worker; see `Worker.run_turn`."""
        if self.released:
            raise PoolClosed("this lease was released")
        turn = self.worker.run_turn(content, idle_timeout_s=idle_timeout_s)
        self.turns_started += 1
        return turn

    async def interrupt(self) -> None:
        await self.worker.interrupt()

    def release(self) -> None:
        self.owner.release_lease(self)

    def record(self, result: TurnResult) -> None:
        """The worker's result callback while this lease holds it."""
        self.owner.record_result(self, result)


@dataclass
class Waiter:
    """A request waiting in a pool's fair queue; its future gets the lease (or the refusal)."""

    tenant: str
    future: asyncio.Future[Lease]
    enqueued_at: float
    priority: Priority

    def gone(self) -> bool:
        return self.future.done()
