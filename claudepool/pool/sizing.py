"""A pool's memory accounting: read its workers' PSS and RSS, and derive its memory plan from them.

Sizing uses the largest measured worker (the estimate until one is measured), so one worker that
grew makes the pool count every further worker at its size: conservative on purpose. The daemon's
`claudepool.pool.capacity.Capacity` sizes the shared ceiling with the same rule over all pools; a
pool sharing it (``caps_only``) keeps only its own configured caps, unset ones unbounded.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable, Collection

from claudepool.pool.config import CapacityConfig, PoolConfig
from claudepool.pool.memory import MemoryPlan, ProcessMemory, measure_trees, plan_memory
from claudepool.pool.worker import Worker

# A cap left unset (0) in a pool that shares a capacity: the capacity's ceiling binds instead.
UNBOUNDED = sys.maxsize


class PoolSizing:
    def __init__(self, config: PoolConfig | CapacityConfig, memory_probe: Callable[[], int], *,
                 caps_only: bool = False) -> None:
        self._config = config
        self._memory_probe = memory_probe
        self._caps_only = caps_only

    def initial(self) -> MemoryPlan:
        """The plan before any worker has been measured."""
        return self._plan(pool_pss_bytes=0, per_worker_bytes=self._config.worker_pss_estimate_bytes)

    def measure_now(self, pool: Collection[Worker]) -> MemoryPlan:
        """Read every live worker of ``pool`` (blocking: ~1 ms per real worker), then re-plan."""
        workers = self.measurable(pool)
        self._store(workers, measure_trees([w.pid for w in workers if w.pid is not None]))
        return self.plan(pool)

    async def measure(self, workers: list[Worker]) -> None:
        """Read ``workers`` (live, with a pid) off the event loop; `plan` then sees the readings."""
        readings = await asyncio.to_thread(measure_trees, [w.pid for w in workers if w.pid is not None])
        self._store(workers, readings)

    def plan(self, pool: Collection[Worker]) -> MemoryPlan:
        return self.plan_sizes([w.pss_bytes for w in pool if w.pss_bytes])

    def plan_sizes(self, sizes: list[int]) -> MemoryPlan:
        """The plan for workers of these measured PSS sizes (the not yet measured left out)."""
        sizes = [size for size in sizes if size]
        per_worker = max(sizes) if sizes else self._config.worker_pss_estimate_bytes
        return self._plan(pool_pss_bytes=sum(sizes), per_worker_bytes=per_worker)

    @staticmethod
    def measurable(pool: Collection[Worker]) -> list[Worker]:
        return [w for w in pool if w.pid is not None and w.is_alive()]

    @staticmethod
    def _store(workers: list[Worker], readings: list[ProcessMemory | None]) -> None:
        for worker, reading in zip(workers, readings, strict=True):
            if reading is not None:
                worker.pss_bytes, worker.rss_bytes = reading.pss_bytes, reading.rss_bytes

    def _plan(self, *, pool_pss_bytes: int, per_worker_bytes: int) -> MemoryPlan:
        c = self._config
        if self._caps_only:
            # The shared capacity holds the RAM budget: a pool keeps what it was configured with.
            soft = c.memory_soft_limit_bytes or UNBOUNDED
            hard = c.memory_hard_limit_bytes or (math.ceil(soft * 1.25) if c.memory_soft_limit_bytes else UNBOUNDED)
            return MemoryPlan(max_workers=c.max_workers or UNBOUNDED, soft_limit_bytes=soft, hard_limit_bytes=hard,
                              per_worker_bytes=per_worker_bytes)
        return plan_memory(available_bytes=self._memory_probe(), pool_pss_bytes=pool_pss_bytes,
                           memory_fraction=c.memory_fraction, per_worker_bytes=per_worker_bytes,
                           configured_max_workers=c.max_workers, soft_limit_bytes=c.memory_soft_limit_bytes,
                           hard_limit_bytes=c.memory_hard_limit_bytes)
