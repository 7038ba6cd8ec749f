"""How one pool is sized, recycled and protected from failing starts (its settings, validated)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from claudepool.pool.memory import MiB
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.protocol.framing import DEFAULT_MAX_LINE_BYTES

# Past the gap between most requests of a busy pool (its hot workers, served LIFO, stay running),
# short next to the minutes a quiet pool idles; a thaw adds a few ms to one lease (bench/idle_bench.py).
FREEZE_IDLE_AFTER_S = 5.0

# Read once: the planner asks on every step, and os.cpu_count() reads /sys each time (~1.6% of the daemon).
_CPUS = os.cpu_count() or 1


class PoolConfig(BaseModel):
    """Sizing, recycling and failure policy of one pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_idle: int = Field(default=2, ge=0)
    # Above min_idle: the warm floor follows demand, up to this (the last min_idle_window_s's peak of
    # concurrent leases plus one, see pool/demand.py). 0 = a fixed floor of min_idle.
    min_idle_max: int = Field(default=0, ge=0)
    min_idle_window_s: float = Field(default=60.0, gt=0)
    # 0 derives the ceiling from RAM: available memory × memory_fraction ÷ measured PSS per worker.
    max_workers: int = Field(default=0, ge=0)
    memory_fraction: float = Field(default=0.5, gt=0, le=1)
    # Used for sizing until a worker has been measured (the real CLI: ~135-270 MB PSS).
    worker_pss_estimate_bytes: int = Field(default=250 * MiB, gt=0)
    # Total PSS of the pool: past the soft limit no worker is spawned; past the hard limit idle
    # workers are closed, largest first, and busy ones are recycled when released. 0 = derived.
    memory_soft_limit_bytes: int = Field(default=0, ge=0)
    memory_hard_limit_bytes: int = Field(default=0, ge=0)
    # Start-up is CPU-bound (~0.7 CPU-s): more parallel spawns than cores only slows them all.
    max_concurrent_spawns: int = Field(default=0, ge=0)
    lease_timeout_s: float = Field(default=30.0, gt=0)
    max_turns: int = Field(default=1000, ge=1)
    # Each worker's turn limit is max_turns plus a random share of this, so workers started together
    # are not all recycled together.
    max_turns_jitter: int = Field(default=100, ge=0)
    max_age_s: float = Field(default=3600.0, gt=0)
    max_idle_s: float = Field(default=600.0, gt=0)
    # An idle worker is stopped (SIGSTOP to its process tree) after this long unused, and continued
    # as it is lent or closed: an idle CLI wakes ~3 times a second (~9 ms CPU/s each). 0 = never.
    freeze_idle_after_s: float = Field(default=FREEZE_IDLE_AFTER_S, ge=0)
    max_worker_pss_bytes: int = Field(default=1024 * MiB, gt=0)
    max_context_tokens: int = Field(default=200_000, gt=0)
    maintenance_interval_s: float = Field(default=5.0, gt=0)
    boot_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    breaker_max_cooldown_s: float = Field(default=600.0, gt=0)
    max_line_bytes: int = Field(default=DEFAULT_MAX_LINE_BYTES, gt=0)
    # Batch requests run only on spare capacity and on at most this share of max_workers.
    batch_max_share: float = Field(default=0.5, gt=0, le=1)
    # A worker being cleaned runs at this nice value, so its reset takes only cores no turn is using,
    # and is put back before it is lent (see pool/priority.py). 0 (default) = at the daemon's own
    # priority: on 2 cores 19 changed no latency and cost the daemon ~0.3-0.5 ms CPU per request.
    reset_nice: int = Field(default=0, ge=0, le=19)
    workdir: Path | None = None
    timeouts: WorkerTimeouts = Field(default_factory=WorkerTimeouts)

    def spawn_limit(self) -> int:
        return self.max_concurrent_spawns or _CPUS


class CapacityConfig(BaseModel):
    """The worker ceiling and RAM budget shared by every pool of a daemon (``[capacity]``).

    A pool's own ``max_workers`` and memory limits are then caps of that pool within it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 0 derives the ceiling from RAM: available memory × memory_fraction ÷ the largest measured
    # worker PSS across all pools (worker_pss_estimate_bytes until one is measured).
    max_workers: int = Field(default=0, ge=0)
    memory_fraction: float = Field(default=0.5, gt=0, le=1)
    worker_pss_estimate_bytes: int = Field(default=250 * MiB, gt=0)
    # Total PSS of all pools' workers: past the soft limit no pool spawns; past the hard limit idle
    # workers are retired, largest first. 0 = derived (the RAM budget; hard = soft × 1.25).
    memory_soft_limit_bytes: int = Field(default=0, ge=0)
    memory_hard_limit_bytes: int = Field(default=0, ge=0)
