"""What the daemon's shared `claudepool.pool.capacity.Capacity` sees of one pool (its `Member`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from claudepool.pool import planner
from claudepool.pool.config import PoolConfig
from claudepool.pool.lease import Lease, Waiter
from claudepool.pool.planner import Phase, PoolState
from claudepool.pool.worker import Worker


class PoolMember:
    """A pool's side of its seat: its floor, its idle and resetting workers, their memory; an
    eviction retires through the pool's own `apply`, and a wake runs the pool's step."""

    def __init__(self, name: str, config: PoolConfig, *,
                 apply: Callable[[planner.Action[Worker, Waiter], float], None], step: Callable[[], None]) -> None:
        self.name = name
        self._config = config
        self._apply = apply
        self._step = step
        # Set by the pool once its state exists (the state holds the seat this member joined with).
        self.state: PoolState[Worker, Lease, Waiter] | None = None

    def floor(self) -> int:
        return self._config.min_idle

    def idle_workers(self) -> list[Worker]:
        state = self.state
        return [] if state is None or state.closed else [r.worker for r in state.in_phase(Phase.IDLE)]

    def resetting(self) -> int:
        state = self.state
        return 0 if state is None or state.closed else state.count(Phase.CLEANING, Phase.RETURNED)

    def serving(self) -> int:
        state = self.state
        return 0 if state is None or state.closed else len(state.records) - state.count(Phase.CLOSING)

    def pss_sizes(self) -> list[int]:
        return [] if self.state is None else [w.pss_bytes for w in self.state.records if w.pss_bytes]

    def evict(self, worker: Worker, reason: str) -> None:
        """The capacity takes this idle worker's place for another pool (or sheds memory)."""
        state = self.state
        record = state.records.get(worker) if state is not None else None
        if state is not None and record is not None and record.phase is Phase.IDLE and not state.closed:
            self._apply(planner.retire(state, record, reason), time.monotonic())

    def wake(self) -> None:
        self._step()
