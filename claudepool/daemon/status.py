"""Readiness and the admin's view of the pools, read from the pools and the prompt service."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from claudepool.daemon.service import PromptService
from claudepool.pool.capacity import Capacity
from claudepool.pool.pool import Pool


class Status:
    """``pools`` are the stateless pools (they decide readiness); ``all_pools`` adds the
    session-capable ones, by pool name. ``warm`` is set by the daemon once every pool has warmed up."""

    def __init__(self, pools: Mapping[str, Pool], all_pools: Mapping[str, Pool], service: PromptService,
                 capacity: Capacity | None = None) -> None:
        self._pools = pools
        self._capacity = capacity
        self._all_pools = all_pools
        self._service = service
        self.warm = False
        self.started_at = time.monotonic()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        pools: dict[str, Any] = {}
        ready = self.warm and not self._service.draining
        for name, pool in self._pools.items():
            counts = pool.counts()
            warm = counts["idle"] + counts["leased"] + counts["cleaning"]
            pools[name] = {"healthy": pool.healthy, "warm": warm, "idle": counts["idle"]}
            # A profile started on demand (min_idle 0) is ready with no warm worker, and so is one
            # whose floor the shared ceiling leaves empty (its first request evicts for room).
            ready = ready and pool.healthy and (warm > 0 or pool.config.min_idle == 0 or pool.ceiling_full)
        return ready, {"ready": ready, "draining": self._service.draining, "pools": pools}

    def pool_status(self) -> dict[str, Any]:
        pools = {}
        for name, pool in self._all_pools.items():
            pools[name] = {
                "max_workers": pool.max_workers,
                "breaker": str(pool.breaker_state),
                "counts": pool.counts(),
                "total_pss_bytes": pool.total_pss_bytes(),
                "workers": pool.snapshot(),
            }
        capacity = self._capacity
        return {
            "capacity": None if capacity is None else {
                "max_workers": capacity.max_workers, "workers": capacity.live, "pools": capacity.pools,
                "total_pss_bytes": capacity.total_pss_bytes(),
                "memory_soft_limit_bytes": capacity.plan.soft_limit_bytes,
                "memory_hard_limit_bytes": capacity.plan.hard_limit_bytes,
                "evictions": dict(capacity.evictions)},
            "pools": pools,
            "queue": {"waiting": sum(p.waiting for p in self._all_pools.values())},
            "in_flight": self._service.in_flight,
            "draining": self._service.draining,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }
