"""The I/O the planner asks for: start, clean and retire workers, as tasks that report back.

Each operation runs as a task of its own, records its outcome in the pool's state (the worker's
record moves to its next phase, or leaves), counts it, tells the observer, and calls the pool's
step so the planner decides what follows. The boot breaker is fed here, where starts end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from claudepool.errors import WorkerError
from claudepool.pool import priority
from claudepool.pool.config import PoolConfig
from claudepool.pool.events import PoolObserver, PoolStats, exit_reason
from claudepool.pool.lease import Lease, Waiter
from claudepool.pool.planner import Phase, PoolState
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import Reaper
from claudepool.pool.sizing import PoolSizing
from claudepool.pool.worker import Worker, WorkerCredentials, WorkerState

log = logging.getLogger("claudepool.pool.pool")


class WorkerOperations:
    def __init__(self, profile: Profile, config: PoolConfig, state: PoolState[Worker, Lease, Waiter],
                 stats: PoolStats, *, reaper: Reaper | None, sizing: PoolSizing, observer: PoolObserver | None,
                 step: Callable[[], None], settle: Callable[[Lease | None], None],
                 credentials: WorkerCredentials | None = None) -> None:
        self._profile, self._config, self._state, self._stats = profile, config, state, stats
        self._reaper, self._sizing, self._observer = reaper, sizing, observer
        self._credentials = credentials
        self._step, self._settle = step, settle
        self.tasks: set[asyncio.Task[None]] = set()
        self._breaker_timer: asyncio.TimerHandle | None = None
        # Background cleaning only where a worker's priority can be put back (see pool/priority.py).
        self._baseline_nice = priority.own_nice()
        self._reset_nice: int | None = None
        if config.reset_nice > self._baseline_nice:
            if priority.can_restore(self._baseline_nice):
                self._reset_nice = config.reset_nice
            else:
                log.info("pool %s: resets run at normal priority: lowering a worker's nice value back needs "
                         "CAP_SYS_NICE or RLIMIT_NICE (systemd LimitNICE=)", profile.name)

    def new_worker(self, profile: Profile, *, slot: int, prepare: Callable[[Worker], None] | None = None) -> Worker:
        worker = Worker(profile, timeouts=self._config.timeouts, max_line_bytes=self._config.max_line_bytes,
                        workdir_root=self._config.workdir, reaper=self._reaper,
                        on_failure=self._on_worker_failure, prepare=prepare, credentials=self._credentials)
        worker.slot = slot
        return worker

    def run(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def spawn(self, slot: int, turn_limit: int) -> None:
        worker = self.new_worker(self._profile, slot=slot)
        self._state.add(worker, Phase.STARTING, turn_limit)
        self.run(self._spawn(worker), f"spawn-{worker.id}")

    def clean(self, worker: Worker) -> None:
        self.run(self._clean(worker), f"clean-{worker.id}")

    def retire(self, worker: Worker, reason: str) -> None:
        self._stats.retired[reason] += 1
        if self._observer is not None:
            self._observer.worker_exited(self._profile.name, exit_reason(worker, reason))
        self.run(self._close_worker(worker, reason), f"retire-{worker.id}")

    async def cancel_all(self) -> None:
        """At close: stop every operation in flight (bounded; their workers are closed next anyway)."""
        if self._breaker_timer is not None:
            self._breaker_timer.cancel()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._config.timeouts.close_kill_timeout_s)

    async def _spawn(self, worker: Worker) -> None:
        ok = False
        started = time.monotonic()
        try:
            await worker.start()
            ok = True
            spawn_s = time.monotonic() - started
            log.info("worker ready", extra={"fields": {"profile": self._profile.name, "worker": worker.id,
                                                       "slot": worker.slot, "pid": worker.pid,
                                                       "spawn_ms": round(spawn_s * 1000, 1)}})
            if self._observer is not None:
                self._observer.worker_spawned(self._profile.name, spawn_s)
        except Exception as exc:
            self.boot_failed(exc)
            if self._observer is not None:
                self._observer.worker_exited(self._profile.name, "boot_failure")
        finally:
            record = self._state.records.get(worker)
            if record is not None:
                if ok:
                    self.boot_succeeded()
                    self._state.move(record, Phase.RETURNED)
                elif worker.state is WorkerState.CLOSED:
                    self._state.remove(worker)
                else:
                    # A cancelled start may still be closing: the pool's close joins it through the records.
                    self._state.move(record, Phase.CLOSING)
            self._step()
        if ok:
            await self.measure_ready(worker)

    async def measure_ready(self, worker: Worker) -> None:
        """A worker's first PSS/RSS reading as soon as it is ready (off the event loop, after it joined
        the pool, so no request waits for it): its memory gauges need not wait for maintenance."""
        if worker.pid is None:
            return
        await self._sizing.measure([worker])
        if worker.is_alive() and not self._state.closed:
            self._state.memory = self._sizing.plan(self._state.records)
            self._state.seat.capacity.replan()
            self._step()  # as after a maintenance pass: the limits see the new reading

    async def _clean(self, worker: Worker) -> None:
        lowered: list[int] = []
        try:
            if self._reset_nice is not None:
                lowered = worker.process_ids()
                priority.set_nice(lowered, self._reset_nice)
            if worker.in_turn():
                self._stats.abandoned_turns += 1
                await worker.finish_abandoned_turn()
            await worker.reset()
            if lowered:
                # Before the worker counts as clean: one lent at the background priority would serve
                # its next caller slowly; one that cannot be put back is retired.
                try:
                    priority.set_nice(lowered, self._baseline_nice)
                except OSError as exc:
                    worker.failure = WorkerError(f"worker {worker.id}: its priority cannot be restored: {exc}")
                    raise
                lowered = []
            self._stats.resets += 1
            if self._observer is not None:
                self._observer.worker_reset(self._profile.name)
        except Exception as exc:
            # Unconfirmed: the worker may still hold the last tenant's context. The failed exchange
            # poisoned it, so the planner retires it.
            self._stats.reset_failures += 1
            log.warning("pool %s: cleaning %s failed: %s", self._profile.name, worker.id, exc)
        finally:
            if lowered:
                # Cleaning failed or was cancelled: the worker is retired, but back at its priority
                # first, so its shutdown is not starved.
                with contextlib.suppress(OSError):
                    priority.set_nice(lowered, self._baseline_nice)
            worker.on_result = None
            self._finish(worker, Phase.RETURNED)

    async def _close_worker(self, worker: Worker, reason: str) -> None:
        log.info("worker retired", extra={"fields": {"profile": self._profile.name, "worker": worker.id,
                                                     "slot": worker.slot, "reason": exit_reason(worker, reason),
                                                     "turns": worker.turns, "age_s": round(worker.age_s(), 1)}})
        try:
            await worker.close(graceful=reason != "failed")
        finally:
            worker.on_result = None
            self._finish(worker, None if worker.state is WorkerState.CLOSED else Phase.CLOSING)

    def _finish(self, worker: Worker, phase: Phase | None) -> None:
        """An operation on ``worker`` ended: settle the lease it drained, move it on (None: forget it)."""
        record = self._state.records.get(worker)
        if record is None:
            return  # the pool closed meanwhile, and settled everything
        self._settle(record.unsettled)
        record.unsettled = None
        if phase is None:
            self._state.remove(worker)
        else:
            self._state.move(record, phase)
        self._step()

    def _on_worker_failure(self, worker: Worker) -> None:
        # An idle worker died on its own: take it out now rather than at the next lease.
        record = self._state.records.get(worker)
        if record is not None and record.phase is Phase.IDLE:
            self._state.move(record, Phase.RETURNED)
            self._step()

    def boot_succeeded(self) -> None:
        self._stats.spawned += 1
        self._state.breaker.record_success()

    def boot_failed(self, exc: Exception) -> None:
        self._stats.boot_failures += 1
        log.warning("pool %s: worker failed to start: %s", self._profile.name, exc)
        breaker = self._state.breaker
        cooldown_s = breaker.record_failure(time.monotonic())
        if cooldown_s is None:
            return
        self._stats.breaker_trips += 1
        log.error("pool %s: %d workers in a row failed to start; pausing spawns for %.0fs",
                  self._profile.name, breaker.consecutive_failures, cooldown_s)
        if self._breaker_timer is not None:
            self._breaker_timer.cancel()
        self._breaker_timer = asyncio.get_running_loop().call_later(cooldown_s, self._step)
