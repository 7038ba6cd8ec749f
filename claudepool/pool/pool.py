"""A RAM-sized pool of warm workers for one profile.

The pool is a small state machine in the style of httpcore's connection pool. Every change (a lease
requested or returned, a worker started, reset, failed or closed, a timer) calls `_step`, which runs
`_plan`: one synchronous, await-free function that moves workers between explicit sets and returns
the I/O to perform (spawn, clean, retire). The I/O then runs as tasks and reports back through
`_step`. No decision is ever taken across an ``await``, so no two decisions can interleave.

Worker sets (each worker is in exactly one):
  starting   spawned, waiting for its ``initialize`` reply
  idle       warm and clean (reset since its last tenant); a LIFO stack
  leased     serving one request of one tenant
  returned   handed back, waiting for `_plan` to decide: clean, recycle or keep
  cleaning   interrupting an abandoned turn and/or resetting with ``/clear``
  closing    being stopped (recycled, failed, or the pool is closing)

>>> async def demo(profile):                                   # doctest: +SKIP
...     async with Pool(profile, PoolConfig(min_idle=2)) as pool:
...         async with pool.lease("acme", timeout_s=5) as lease:
...             async for item in lease.run_turn("hello"):
...                 ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from claudepool.errors import (
    PoolClosed,
    PoolTimeout,
    PoolUnhealthy,
    PromptRanAsCommand,
    ResetFailed,
    TurnStalled,
    WorkerStartError,
)
from claudepool.pool.memory import (
    MemoryPlan,
    MiB,
    ProcessMemory,
    available_memory_bytes,
    measure_trees,
    plan_memory,
)
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import Reaper
from claudepool.pool.worker import TurnResult, Worker, WorkerState, WorkerTimeouts
from claudepool.protocol.cli_events import CliEvent, UserContent
from claudepool.protocol.framing import DEFAULT_MAX_LINE_BYTES
from claudepool.tenancy.scheduler import FairQueue, Priority, TenantShare, TenantSlots

log = logging.getLogger(__name__)

_EQUAL_SHARE = TenantShare()
# Read once: `_plan` asks on every step, and os.cpu_count() reads /sys each time (~1.6% of the daemon).
_CPUS = os.cpu_count() or 1


class PoolConfig(BaseModel):
    """Sizing, recycling and failure policy of one pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_idle: int = Field(default=2, ge=0)
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
    max_worker_pss_bytes: int = Field(default=1024 * MiB, gt=0)
    max_context_tokens: int = Field(default=200_000, gt=0)
    maintenance_interval_s: float = Field(default=5.0, gt=0)
    boot_failure_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=30.0, gt=0)
    breaker_max_cooldown_s: float = Field(default=600.0, gt=0)
    max_line_bytes: int = Field(default=DEFAULT_MAX_LINE_BYTES, gt=0)
    # Batch requests run only on spare capacity and on at most this share of max_workers.
    batch_max_share: float = Field(default=0.5, gt=0, le=1)
    workdir: Path | None = None
    timeouts: WorkerTimeouts = Field(default_factory=WorkerTimeouts)

    def spawn_limit(self) -> int:
        return self.max_concurrent_spawns or _CPUS


class PoolObserver(Protocol):
    """Receives the pool's events (the metrics layer implements it)."""

    def worker_spawned(self, profile: str, seconds: float) -> None: ...

    def worker_exited(self, profile: str, reason: str) -> None: ...

    def worker_reset(self, profile: str) -> None: ...


_EXIT_REASONS = {"turns": "recycle_turns", "age": "recycle_age", "memory": "recycle_memory",
                 "context": "recycle_context"}


def _exit_reason(worker: Worker, reason: str) -> str:
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
        return "crash"
    return _EXIT_REASONS.get(reason, reason)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


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


@dataclass(frozen=True)
class _Spawn:
    worker: Worker


@dataclass(frozen=True)
class _Clean:
    worker: Worker


@dataclass(frozen=True)
class _Retire:
    worker: Worker
    reason: str


_Action = _Spawn | _Clean | _Retire


@dataclass
class _Waiter:
    tenant: str
    future: asyncio.Future[Lease]
    enqueued_at: float
    priority: Priority


class Lease:
    """One worker lent to one request of one tenant. Release it exactly once (the context manager
    of `Pool.lease` does); the pool then resets the worker before anyone else gets it."""

    def __init__(self, pool: Pool, worker: Worker, tenant: str, queued_s: float,
                 priority: Priority = Priority.INTERACTIVE) -> None:
        self.pool = pool
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
        self.pool._release(self)

    def _record(self, result: TurnResult) -> None:
        self.pool._on_result(self, result)


class Pool:
    """Warm workers of one profile, leased one request at a time."""

    def __init__(
        self,
        profile: Profile,
        config: PoolConfig | None = None,
        *,
        reaper: Reaper | None = None,
        memory_probe: Callable[[], int] = available_memory_bytes,
        on_turn_result: Callable[[Lease, TurnResult], None] | None = None,
        on_lease_done: Callable[[Lease], None] | None = None,
        slots: TenantSlots | None = None,
        observer: PoolObserver | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or PoolConfig()
        self.stats = PoolStats()
        self._reaper = reaper
        self._memory_probe = memory_probe
        # Every settled turn, including one drained after its consumer left; then, once per lease,
        # the moment no further result can come (metering settles the request there).
        self._on_turn_result = on_turn_result
        self._on_lease_done = on_lease_done
        self._unsettled: dict[Worker, Lease] = {}
        self._observer = observer

        self._workers: set[Worker] = set()
        self._starting: set[Worker] = set()
        # Processes started for a lease that already holds its place (a resumed conversation): they
        # count against the spawn limit, but will not become idle.
        self._respawning: set[Worker] = set()
        self._idle: list[Worker] = []
        self._leased: dict[Worker, Lease] = {}
        self._returned: deque[Worker] = deque()
        self._cleaning: set[Worker] = set()
        self._closing: set[Worker] = set()
        # Leases held per tenant, shared by every pool of a daemon (max_concurrency spans profiles).
        self._slots = slots or TenantSlots()
        # batch_max_share is of this pool: count this pool's batch leases, not every pool's.
        self._batch_leased = 0
        self._queue: FairQueue[_Waiter] = FairQueue(self._slots, batch_max_running=self._batch_room,
                                                    batch_running=lambda: self._batch_leased)
        self._slots.add_listener(self._on_tenant_released)
        self._turn_limits: dict[Worker, int] = {}
        self._recycle_on_release: set[Worker] = set()

        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._maintenance: asyncio.Task[None] | None = None
        self._breaker_timer: asyncio.TimerHandle | None = None
        self._consecutive_boot_failures = 0
        self._breaker_open_until: float | None = None
        self._breaker_trips_in_row = 0
        self._started = False
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self.memory = self._plan_memory(pool_pss_bytes=0, per_worker_bytes=self.config.worker_pss_estimate_bytes)

    def __repr__(self) -> str:
        return (
            f"<Pool {self.profile.name}: {len(self._leased)} leased, {len(self._idle)} idle, "
            f"{len(self._starting)} starting, {len(self._cleaning) + len(self._returned)} cleaning, "
            f"{len(self._closing)} closing | {self.waiting} waiting | max {self.max_workers} | "
            f"breaker {self.breaker_state}>"
        )

    # -- public state ------------------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        return self.memory.max_workers

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def unserved(self) -> int:
        """Waiters that no idle, starting or resetting worker, and no room to spawn one, will serve:
        only a worker given back (a parked session) can serve them."""
        ready_soon = len(self._idle) + len(self._starting) + len(self._cleaning) + len(self._returned)
        live = ready_soon + len(self._leased)
        room = max(0, self.max_workers - live)
        if live and self.total_pss_bytes() >= self.memory.soft_limit_bytes:
            room = 0
        return max(0, self._queue.eligible() - ready_soon - room)

    @property
    def breaker_state(self) -> BreakerState:
        if self._breaker_open_until is None:
            return BreakerState.CLOSED
        if time.monotonic() < self._breaker_open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    @property
    def healthy(self) -> bool:
        return self.breaker_state is BreakerState.CLOSED and not self._closed

    def counts(self) -> dict[str, int]:
        """Workers per set, and waiting requests (what `repr` shows, as data)."""
        return {
            "starting": len(self._starting),
            "idle": len(self._idle),
            "leased": len(self._leased),
            "cleaning": len(self._cleaning) + len(self._returned),
            "closing": len(self._closing),
            "waiting": self.waiting,
        }

    def snapshot(self) -> list[dict[str, object]]:
        """One row per worker, with the pool's view of its state (for status pages)."""
        now = time.monotonic()
        placed = [("starting", self._starting), ("idle", self._idle), ("leased", self._leased),
                  ("cleaning", self._cleaning), ("cleaning", self._returned), ("closing", self._closing)]
        rows: list[dict[str, object]] = []
        for state, workers in placed:
            for w in workers:
                rows.append({"id": w.id, "slot": w.slot, "state": state, "pid": w.pid, "profile": self.profile.name,
                             "turns": w.turns, "resets": w.resets, "age_s": round(w.age_s(now), 3),
                             "idle_s": round(w.idle_s(now), 3), "pss_bytes": w.pss_bytes,
                             "context_tokens": w.context_tokens})
        rows.sort(key=lambda r: str(r["id"]))
        return rows

    def waiting_by_priority(self) -> dict[str, int]:
        batch = self._queue.batch_queued()
        return {"interactive": len(self._queue) - batch, "batch": batch}

    def workers(self) -> list[Worker]:
        """Every worker the pool holds, in any state (for status pages and tests)."""
        return sorted(self._workers, key=lambda w: w.created_at)

    def total_pss_bytes(self) -> int:
        return sum(w.pss_bytes or 0 for w in self._workers)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin warming ``min_idle`` workers; returns at once (see `wait_ready`)."""
        if self._started:
            return
        self._started = True
        self._maintenance = asyncio.create_task(self._maintain(), name=f"pool-{self.profile.name}-maintenance")
        self._step()

    async def wait_ready(self, timeout_s: float | None = None, *, idle: int | None = None) -> None:
        """Wait until ``idle`` (default ``min_idle``, capped by ``max_workers``) warm workers are idle."""
        target = min(self.config.min_idle if idle is None else idle, self.max_workers)
        async with asyncio.timeout(timeout_s):
            while len(self._idle) < target:
                if self._closed:
                    raise PoolClosed(f"pool {self.profile.name} is closed")
                if self.breaker_state is BreakerState.OPEN:
                    raise PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start")
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        """Stop everything: fail waiters, cancel pending work, close every worker.

        Idempotent, bounded by the workers' close timeouts, and shielded: cancelling the caller
        does not stop the shutdown, and a second call joins it.
        """
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(), name=f"pool-{self.profile.name}-close")
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closed = True
        if self._breaker_timer is not None:
            self._breaker_timer.cancel()
        self._slots.remove_listener(self._on_tenant_released)
        for waiter in self._queue.drain():
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed(f"pool {self.profile.name} is closing"))
        tasks = list(self._tasks)
        if self._maintenance is not None:
            tasks.append(self._maintenance)
        for task in tasks:
            task.cancel()
        if tasks:
            # Cancelled spawns and cleanings end fast; their workers are closed just below anyway.
            await asyncio.wait(tasks, timeout=self.config.timeouts.close_kill_timeout_s)
        workers = list(self._workers)
        if self._observer is not None:
            for worker in workers:
                if worker not in self._closing:
                    self._observer.worker_exited(self.profile.name, "shutdown")
        if workers:
            await asyncio.gather(*(w.close(graceful=w.is_idle()) for w in workers), return_exceptions=True)
        for worker in workers:
            self._forget(worker)
        for lease in [*self._unsettled.values(), *self._leased.values()]:
            self._settle_lease(lease)
        self._unsettled.clear()
        self._changed.set()
        log.info("pool %s closed: %s", self.profile.name, self.stats)

    # -- leasing -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, tenant: str, *, timeout_s: float | None = None, share: TenantShare = _EQUAL_SHARE,
                    priority: Priority = Priority.INTERACTIVE) -> AsyncIterator[Lease]:
        """Borrow a clean warm worker for one request of ``tenant``; it is reset after release."""
        lease = await self.acquire(tenant, timeout_s=timeout_s, share=share, priority=priority)
        try:
            yield lease
        finally:
            lease.release()

    async def acquire(self, tenant: str, *, timeout_s: float | None = None, share: TenantShare = _EQUAL_SHARE,
                      priority: Priority = Priority.INTERACTIVE) -> Lease:
        """Wait for a worker (up to ``timeout_s``, default ``lease_timeout_s``). Prefer `lease`.

        Waiting requests are served by weighted fair queuing across tenants (``share.weight``), at most
        ``share.max_concurrency`` at once per tenant, batch only on spare capacity.
        """
        if self._closed:
            raise PoolClosed(f"pool {self.profile.name} is closed")
        if not self._started:
            await self.start()
        if self._cannot_serve():
            raise PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start; spawning is paused")
        timeout_s = self.config.lease_timeout_s if timeout_s is None else timeout_s
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        ticket = self._queue.push(_Waiter(tenant, future, time.monotonic(), priority), tenant, share, priority)
        self._step()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Cancelled or timed out just as a worker was assigned: hand it straight back.
                future.result().release()
            else:
                future.cancel()
                self._queue.cancel(ticket)
            if isinstance(exc, TimeoutError):
                self.stats.lease_timeouts += 1
                raise PoolTimeout(
                    f"no {self.profile.name} worker became free within {timeout_s:g}s ({self!r})"
                ) from None
            raise

    async def respawn_leased(self, lease: Lease, *, extra_args: tuple[str, ...],
                             prepare: Callable[[Worker], None] | None = None) -> None:
        """Swap the lease's (clean, idle) worker for a new process started with ``extra_args``
        (``--resume ID``). The lease keeps its place in the pool's accounting, so a resumed
        conversation waits its fair turn for capacity like any request, then for a spawn slot like
        any start; a start that fails counts towards the boot breaker. Raises `WorkerStartError`, or
        `PoolUnhealthy` while the breaker is open."""
        old = lease.worker
        if lease.released or old.in_turn() or old.dirty:
            raise PoolClosed("only a fresh lease's worker can be replaced")
        while True:
            if self._closed:
                # `_close` has already listed the workers to stop: a process started now would outlive it.
                raise PoolClosed(f"pool {self.profile.name} is closed")
            if self.breaker_state is BreakerState.OPEN:
                raise PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start; spawning is paused")
            if self._spawn_room() > 0:
                break
            self._changed.clear()
            await self._changed.wait()
        new = Worker(
            self.profile.with_args(*extra_args),
            timeouts=self.config.timeouts,
            max_line_bytes=self.config.max_line_bytes,
            workdir_root=self.config.workdir,
            reaper=self._reaper,
            on_failure=self._on_worker_failure,
            prepare=prepare,
        )
        new.slot = old.slot
        self._workers.add(new)
        self._turn_limits[new] = self._turn_limits.get(old, self.config.max_turns)
        del self._leased[old]
        self._leased[new] = lease
        lease.worker = new
        new.on_result = lease._record
        old.on_result = None
        self._launch(self._retire(old, "respawn"))
        started = time.monotonic()
        self._respawning.add(new)
        try:
            await new.start()
        except Exception as exc:
            # The lease holds a dead worker, which its release retires (as a boot failure).
            self._on_boot_failure(exc)
            raise
        finally:
            self._respawning.discard(new)
            if not self._closed:
                self._step()
        self._on_boot_success()
        if self._observer is not None:
            self._observer.worker_spawned(self.profile.name, time.monotonic() - started)
        # Measured in the background: the resumed conversation's turn does not wait for /proc.
        measuring = asyncio.create_task(self._measure_ready(new), name=f"measure-{new.id}")
        self._tasks.add(measuring)
        measuring.add_done_callback(self._tasks.discard)

    def _release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if lease.priority is Priority.BATCH:
            self._batch_leased -= 1
        worker = lease.worker
        if self._leased.pop(worker, None) is not None:
            self._returned.append(worker)
        try:
            if worker.in_turn():
                self._unsettled[worker] = lease  # its result may still arrive, drained by _clean
            else:
                self._settle_lease(lease)  # runs the lease-done callback
            self._step()
        finally:
            # Whatever a callback raised, the tenant's slot is given back (or it stays capped for good);
            # every pool sharing the slots steps again: this tenant may now be under its cap elsewhere.
            self._slots.release(lease.tenant, lease.priority)

    def _on_result(self, lease: Lease, result: TurnResult) -> None:
        self.stats.turns += 1
        self.stats.cost_usd += result.cost_usd
        if self._on_turn_result is not None:
            self._on_turn_result(lease, result)

    def _settle_lease(self, lease: Lease | None) -> None:
        if lease is None or lease.settled:
            return
        lease.settled = True
        if self._on_lease_done is not None:
            self._on_lease_done(lease)

    # -- the decision step ---------------------------------------------------------------------

    def _step(self) -> None:
        for action in self._plan(time.monotonic()):
            self._launch(action)
        self._changed.set()

    def _plan(self, now: float) -> list[_Action]:
        """Decide everything that can be decided now. Synchronous and await-free by design."""
        actions: list[_Action] = []
        if self._closed:
            # `close` stops every worker it still holds; nothing new starts.
            self._returned.clear()
            return actions

        # Workers coming back from a lease or an operation.
        while self._returned:
            worker = self._returned.popleft()
            worker.last_active_at = now  # a lease without a turn still counts as use
            reason = self._retire_reason(worker, now)
            if reason is not None:
                actions.append(self._retire(worker, reason))
            elif worker.dirty or worker.in_turn():
                self._cleaning.add(worker)
                actions.append(_Clean(worker))
            else:
                self._idle.append(worker)

        # Idle workers that died, aged, grew or sat unused for too long.
        for worker in list(self._idle):
            reason = self._retire_reason(worker, now)
            if reason is not None:
                self._idle.remove(worker)
                actions.append(self._retire(worker, reason))
        surplus = len(self._idle) - self.config.min_idle
        for worker in list(self._idle):  # the bottom of the LIFO stack has waited longest
            if surplus <= 0:
                break
            if worker.idle_s(now) >= self.config.max_idle_s:
                self._idle.remove(worker)
                actions.append(self._retire(worker, "idle"))
                surplus -= 1
        actions.extend(self._shed_memory())

        # Hand idle workers to waiters, in the fair queue's order.
        while self._idle:
            worker = self._idle[-1]
            if worker.dirty or not worker.is_idle():
                # Defence in depth: a worker that is not provably clean is never lent.
                self._idle.pop()
                actions.append(self._retire(worker, "failed" if not worker.is_alive() else "unclean"))
                continue
            popped = self._queue.pop()
            if popped is None:
                break
            waiter = popped[0]
            if waiter.future.done():
                continue
            self._idle.pop()
            lease = Lease(self, worker, waiter.tenant, now - waiter.enqueued_at, waiter.priority)
            worker.on_result = lease._record
            self._leased[worker] = lease
            self._slots.acquire(waiter.tenant, waiter.priority)
            if waiter.priority is Priority.BATCH:
                self._batch_leased += 1
            self.stats.leases += 1
            waiter.future.set_result(lease)

        if self._cannot_serve():
            for waiter in self._queue.drain():
                if not waiter.future.done():
                    waiter.future.set_exception(
                        PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start")
                    )

        for _ in range(self._spawn_count()):
            worker = Worker(
                self.profile,
                timeouts=self.config.timeouts,
                max_line_bytes=self.config.max_line_bytes,
                workdir_root=self.config.workdir,
                reaper=self._reaper,
                on_failure=self._on_worker_failure,
            )
            used = {w.slot for w in self._workers}
            worker.slot = next(i for i in range(len(used) + 1) if i not in used)
            self._workers.add(worker)
            self._starting.add(worker)
            self._turn_limits[worker] = self.config.max_turns + random.randint(0, self.config.max_turns_jitter)
            actions.append(_Spawn(worker))
        return actions

    def _retire_reason(self, worker: Worker, now: float) -> str | None:
        if not worker.is_alive():
            return "failed"
        if worker in self._recycle_on_release:
            return "memory_pressure"
        if worker.turns >= self._turn_limits.get(worker, self.config.max_turns):
            return "turns"
        if worker.age_s(now) >= self.config.max_age_s:
            return "age"
        if worker.pss_bytes is not None and worker.pss_bytes > self.config.max_worker_pss_bytes:
            return "memory"
        if worker.context_tokens > self.config.max_context_tokens:
            return "context"
        return None

    def recycle_due(self, worker: Worker) -> str | None:
        """Why the pool would retire this leased worker when it comes back (turns, age, memory), or
        None. A conversation holding its worker between turns asks after each turn and gives the
        worker back, so a long conversation is no exception to recycling. Context is not a reason:
        the resumed conversation would carry the same context (sessions have their own limit)."""
        reason = self._retire_reason(worker, time.monotonic())
        return None if reason in (None, "failed", "context") else reason

    def _retire(self, worker: Worker, reason: str) -> _Retire:
        self._closing.add(worker)
        self.stats.retired[reason] += 1
        if self._observer is not None:
            self._observer.worker_exited(self.profile.name, _exit_reason(worker, reason))
        return _Retire(worker, reason)

    def _shed_memory(self) -> list[_Action]:
        """Past the hard limit: close idle workers, largest first; recycle leased ones on release.

        Never the last ready worker: with none, the pool spawns one at once (it may past the soft
        limit too), so shedding it would only churn processes, one start-up's CPU each time. Workers
        still starting do not count: their memory is not known yet, and they may not boot."""
        excess = self.total_pss_bytes() - self.memory.hard_limit_bytes
        actions: list[_Action] = []
        if excess <= 0:
            return actions
        live = len(self._idle) + len(self._cleaning) + len(self._leased) - len(self._recycle_on_release)
        for worker in sorted(self._idle, key=lambda w: w.pss_bytes or 0, reverse=True):
            if excess <= 0 or live <= 1 or not worker.pss_bytes:
                break  # (one not measured yet frees nothing we know of: it is measured once ready)
            self._idle.remove(worker)
            excess -= worker.pss_bytes or 0
            live -= 1
            actions.append(self._retire(worker, "memory_pressure"))
        for worker in sorted(self._leased, key=lambda w: w.pss_bytes or 0, reverse=True):
            if excess <= 0 or live <= 1 or not worker.pss_bytes:
                break
            if worker not in self._recycle_on_release:
                self._recycle_on_release.add(worker)
                live -= 1
            excess -= worker.pss_bytes or 0
        return actions

    def _spawn_count(self) -> int:
        if self.breaker_state is BreakerState.OPEN:
            return 0
        waiting = self._queue.eligible()
        ready_soon = len(self._idle) + len(self._starting) + len(self._cleaning)
        need = waiting + self.config.min_idle - ready_soon
        live = ready_soon + len(self._leased)
        room = min(self.max_workers - live, self._spawn_room())
        if live and self.total_pss_bytes() >= self.memory.soft_limit_bytes:
            room = 0
        return max(0, min(need, room))

    def _spawn_room(self) -> int:
        """Starts that may begin now: start-up is CPU-bound, and a half-open breaker allows one probe."""
        starting = len(self._starting) + len(self._respawning)
        limit = 1 if self.breaker_state is BreakerState.HALF_OPEN else self.config.spawn_limit()
        return limit - starting

    def _cannot_serve(self) -> bool:
        """The breaker is open and no worker exists that could come back to serve a waiter."""
        return self.breaker_state is BreakerState.OPEN and not (
            self._idle or self._leased or self._cleaning or self._returned or self._starting
        )

    # -- I/O, run as tasks that report back through _step ----------------------------------------

    def _launch(self, action: _Action) -> None:
        if isinstance(action, _Spawn):
            coro, name = self._spawn(action.worker), f"spawn-{action.worker.id}"
        elif isinstance(action, _Clean):
            coro, name = self._clean(action.worker), f"clean-{action.worker.id}"
        else:
            coro, name = self._close_worker(action.worker, action.reason), f"retire-{action.worker.id}"
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, worker: Worker) -> None:
        ok = False
        started = time.monotonic()
        try:
            await worker.start()
            ok = True
            spawn_s = time.monotonic() - started
            log.info("worker ready", extra={"fields": {"profile": self.profile.name, "worker": worker.id,
                                                       "slot": worker.slot, "pid": worker.pid,
                                                       "spawn_ms": round(spawn_s * 1000, 1)}})
            if self._observer is not None:
                self._observer.worker_spawned(self.profile.name, spawn_s)
        except Exception as exc:
            self._on_boot_failure(exc)
            if self._observer is not None:
                self._observer.worker_exited(self.profile.name, "boot_failure")
        finally:
            self._starting.discard(worker)
            if ok:
                self._on_boot_success()
                self._returned.append(worker)
            elif worker.state is WorkerState.CLOSED:
                # A cancelled start may still be closing: `close` joins it through _workers.
                self._forget(worker)
            if not self._closed:
                self._step()
        if ok:
            await self._measure_ready(worker)

    async def _measure_ready(self, worker: Worker) -> None:
        """A worker's first PSS/RSS reading as soon as it is ready (off the event loop, after it joined
        the pool, so no request waits for it): its memory gauges need not wait for maintenance."""
        if worker.pid is None:
            return
        readings = await asyncio.to_thread(measure_trees, [worker.pid])
        if worker.pss_bytes is None and worker.is_alive() and not self._closed:
            self._apply_readings([worker], readings)
            self._step()  # as after a maintenance pass: the limits see the new reading

    async def _clean(self, worker: Worker) -> None:
        try:
            if worker.in_turn():
                self.stats.abandoned_turns += 1
                await worker.finish_abandoned_turn()
            await worker.reset()
            self.stats.resets += 1
            if self._observer is not None:
                self._observer.worker_reset(self.profile.name)
        except Exception as exc:
            # Unconfirmed: the worker may still hold the last tenant's context. The failed exchange
            # poisoned it, so _plan retires it.
            self.stats.reset_failures += 1
            log.warning("pool %s: cleaning %s failed: %s", self.profile.name, worker.id, exc)
        finally:
            worker.on_result = None
            self._settle_lease(self._unsettled.pop(worker, None))
            self._cleaning.discard(worker)
            if not self._closed:
                self._returned.append(worker)
                self._step()

    async def _close_worker(self, worker: Worker, reason: str) -> None:
        log.info("worker retired", extra={"fields": {"profile": self.profile.name, "worker": worker.id,
                                                     "slot": worker.slot, "reason": _exit_reason(worker, reason),
                                                     "turns": worker.turns, "age_s": round(worker.age_s(), 1)}})
        try:
            await worker.close(graceful=reason != "failed")
        finally:
            worker.on_result = None
            self._settle_lease(self._unsettled.pop(worker, None))
            self._closing.discard(worker)
            if worker.state is WorkerState.CLOSED:
                self._forget(worker)
            if not self._closed:
                self._step()

    def _batch_room(self) -> int:
        return max(1, int(self.max_workers * self.config.batch_max_share))

    def _on_tenant_released(self, tenant: str) -> None:
        if not self._closed and self._queue.waiting(tenant):
            self._step()

    def _forget(self, worker: Worker) -> None:
        self._workers.discard(worker)
        self._turn_limits.pop(worker, None)
        self._recycle_on_release.discard(worker)

    def _on_worker_failure(self, worker: Worker) -> None:
        # An idle worker died on its own: take it out now rather than at the next lease.
        if worker in self._idle:
            self._idle.remove(worker)
            self._returned.append(worker)
            if not self._closed:
                self._step()

    def _on_boot_success(self) -> None:
        self.stats.spawned += 1
        self._consecutive_boot_failures = 0
        self._breaker_trips_in_row = 0
        self._breaker_open_until = None

    def _on_boot_failure(self, exc: Exception) -> None:
        self.stats.boot_failures += 1
        self._consecutive_boot_failures += 1
        log.warning("pool %s: worker failed to start: %s", self.profile.name, exc)
        if self._consecutive_boot_failures < self.config.boot_failure_threshold:
            return
        cooldown_s = min(self.config.breaker_cooldown_s * 2**self._breaker_trips_in_row,
                         self.config.breaker_max_cooldown_s)
        self._breaker_trips_in_row += 1
        self.stats.breaker_trips += 1
        self._breaker_open_until = time.monotonic() + cooldown_s
        log.error("pool %s: %d workers in a row failed to start; pausing spawns for %.0fs",
                  self.profile.name, self._consecutive_boot_failures, cooldown_s)
        if self._breaker_timer is not None:
            self._breaker_timer.cancel()
        self._breaker_timer = asyncio.get_running_loop().call_later(cooldown_s, self._step)

    # -- memory --------------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval_s)
            # /proc reads take ~1 ms per real worker: off the event loop.
            workers = self._measurable()
            readings = await asyncio.to_thread(measure_trees, [w.pid for w in workers if w.pid is not None])
            self._apply_readings(workers, readings)
            self._step()

    def refresh_memory(self) -> MemoryPlan:
        """Measure every worker's PSS and RSS now and re-derive the memory plan from them."""
        workers = self._measurable()
        return self._apply_readings(workers, measure_trees([w.pid for w in workers if w.pid is not None]))

    def _measurable(self) -> list[Worker]:
        return [w for w in self._workers if w.pid is not None and w.is_alive()]

    def _apply_readings(self, workers: list[Worker], readings: list[ProcessMemory | None]) -> MemoryPlan:
        for worker, reading in zip(workers, readings, strict=True):
            if reading is not None:
                worker.pss_bytes, worker.rss_bytes = reading.pss_bytes, reading.rss_bytes
        measured = [w.pss_bytes for w in self._workers if w.pss_bytes]
        per_worker = max(measured) if measured else self.config.worker_pss_estimate_bytes
        self.memory = self._plan_memory(pool_pss_bytes=sum(measured), per_worker_bytes=per_worker)
        return self.memory

    def _plan_memory(self, *, pool_pss_bytes: int, per_worker_bytes: int) -> MemoryPlan:
        return plan_memory(
            available_bytes=self._memory_probe(),
            pool_pss_bytes=pool_pss_bytes,
            memory_fraction=self.config.memory_fraction,
            per_worker_bytes=per_worker_bytes,
            configured_max_workers=self.config.max_workers,
            soft_limit_bytes=self.config.memory_soft_limit_bytes,
            hard_limit_bytes=self.config.memory_hard_limit_bytes,
        )
