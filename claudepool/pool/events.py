"""What a pool reports: its counters, its observer, why a worker left, and one status row per worker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from claudepool.errors import PromptRanAsCommand, ResetFailed, TurnStalled, WorkerStartError, WorkspaceFull
from claudepool.pool.planner import Phase, Record
from claudepool.pool.worker import Worker


class PoolObserver(Protocol):
    """Receives the pool's events (the metrics layer implements it)."""

    def worker_spawned(self, profile: str, seconds: float) -> None: ...

    def worker_exited(self, profile: str, reason: str) -> None: ...

    def worker_reset(self, profile: str) -> None: ...


@dataclass
class PoolStats:
    """Counters since the pool started (the metrics layer reads them)."""

    spawned: int = 0
    boot_failures: int = 0
    leases: int = 0
    lease_timeouts: int = 0
    turns: int = 0
    resets: int = 0
    reset_failures: int = 0
    abandoned_turns: int = 0
    breaker_trips: int = 0
    retired: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0


_EXIT_REASONS = {"turns": "recycle_turns", "age": "recycle_age", "memory": "recycle_memory",
                 "context": "recycle_context"}


def exit_reason(worker: Worker, reason: str) -> str:
    """The metrics name of why a worker left: recycled, idle, or how it failed."""
    if reason == "failed":
        if isinstance(worker.failure, WorkerStartError):
            return "boot_failure"  # a resumed conversation's process that never became ready
        if isinstance(worker.failure, TurnStalled):
            return "watchdog"
        if isinstance(worker.failure, ResetFailed):
            return "reset_failed"
        if isinstance(worker.failure, PromptRanAsCommand):
            return "unclean"
        if isinstance(worker.failure, WorkspaceFull):
            return "workspace_full"
        return "crash"
    return _EXIT_REASONS.get(reason, reason)


def status_rows(records: Iterable[Record[Worker, Any]], profile: str, now: float) -> list[dict[str, object]]:
    """One row per worker, by id: its phase as the status page names it, counters, age, memory."""
    rows: list[dict[str, object]] = []
    for r in records:
        w = r.worker
        phase = Phase.CLEANING if r.phase is Phase.RETURNED else r.phase
        rows.append({"id": w.id, "slot": w.slot, "state": str(phase), "pid": w.pid, "profile": profile,
                     "turns": w.turns, "turn_limit": r.turn_limit, "resets": w.resets,
                     "age_s": round(w.age_s(now), 3), "idle_s": round(w.idle_s(now), 3),
                     "pss_bytes": w.pss_bytes, "context_tokens": w.context_tokens, "frozen": w.frozen})
    rows.sort(key=lambda row: str(row["id"]))
    return rows
