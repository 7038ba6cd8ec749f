"""A RAM-sized pool of warm workers for one profile: the async shell around the planner.

Every change (a lease requested or returned, a worker started, reset, failed or closed, a timer)
calls `_step`, which runs `planner.plan`, the one synchronous, await-free function that decides,
then applies what it returned: spawns, cleanings and retirements run as tasks that report back
through `_step`; leases are handed to their waiters at once. No decision is ever taken across an
``await``, so no two decisions can interleave. The policy lives in `planner.py`; this module does
only I/O, bookkeeping of events, and reporting.

>>> async def demo(profile):                                   # doctest: +SKIP
...     async with Pool(profile, PoolConfig(min_idle=2)) as pool:
...         async with pool.lease("acme", timeout_s=5) as lease:
...             async for item in lease.run_turn("hello"):
...                 ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from claudepool.errors import PoolClosed, PoolTimeout, PoolUnhealthy
from claudepool.pool import planner
from claudepool.pool.breaker import Breaker, BreakerState
from claudepool.pool.capacity import Capacity, Need
from claudepool.pool.config import PoolConfig
from claudepool.pool.events import PoolObserver, PoolStats, status_rows
from claudepool.pool.fair_queue import FairQueue
from claudepool.pool.lease import Lease, Waiter
from claudepool.pool.membership import PoolMember
from claudepool.pool.memory import MemoryPlan, available_memory_bytes
from claudepool.pool.operations import WorkerOperations
from claudepool.pool.planner import Phase
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import Reaper
from claudepool.pool.shares import Priority, TenantShare, TenantSlots
from claudepool.pool.sizing import PoolSizing
from claudepool.pool.worker import TurnResult, Worker, WorkerCredentials

log = logging.getLogger(__name__)

_EQUAL_SHARE = TenantShare()


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
        run_maintenance: bool = True,
        credentials: WorkerCredentials | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.profile = profile
        self.config = config = config or PoolConfig()
        self.stats = PoolStats()
        # The daemon's pools share one capacity (one ceiling, one RAM budget); then this pool's own
        # max_workers and memory limits are only caps within it. Alone, the pool sizes itself from
        # its own config, as a capacity of its own would.
        self.capacity = capacity or Capacity()
        self._sizing = PoolSizing(config, memory_probe, caps_only=self.capacity.bounded)
        # Every settled turn, including one drained after its consumer left; then, once per lease,
        # the moment no further result can come (metering settles the request there).
        self._on_turn_result = on_turn_result
        self._on_lease_done = on_lease_done
        self._observer = observer
        # False when the owner runs `maintain` itself (the daemon does, in its task group, so a
        # crash there stops the daemon instead of silently ending the measurements).
        self._run_maintenance = run_maintenance
        # Leases held per tenant, shared by every pool of a daemon (max_concurrency spans profiles).
        self._slots = slots = slots or TenantSlots()
        queue: FairQueue[Waiter] = FairQueue(slots, batch_max_running=self._batch_room,
                                              batch_running=lambda: self._state.batch_leased)
        breaker = Breaker(config.boot_failure_threshold, config.breaker_cooldown_s, config.breaker_max_cooldown_s)
        member = PoolMember(profile.name, config, apply=self._apply, step=self._step)
        self._state: planner.PoolState[Worker, Lease, Waiter] = planner.PoolState(
            config, queue, slots, breaker, self._sizing.initial(), seat=self.capacity.join(member))
        member.state = self._state
        slots.add_listener(self._on_tenant_released)

        # Each worker's own credential for the gateway (None: workers use the profile's upstream
        # variables directly, as a pool used without the daemon does).
        self._ops = WorkerOperations(profile, config, self._state, self.stats, reaper=reaper, sizing=self._sizing,
                                     observer=observer, step=self._step, settle=self._settle_lease,
                                     credentials=credentials)
        self._changed = asyncio.Event()
        # Steps the pool when the next idle worker becomes due to be frozen (nothing else may).
        self._freeze_timer: asyncio.TimerHandle | None = None
        self._freeze_timer_at: float | None = None
        self._started = False
        self._close_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"<Pool {self.profile.name}: {c['leased']} leased, {c['idle']} idle, {c['starting']} starting, "
            f"{c['cleaning']} cleaning, {c['closing']} closing | {c['waiting']} waiting | "
            f"max {self.max_workers} | breaker {self.breaker_state}>"
        )

    # -- public state ------------------------------------------------------------------------

    @property
    def memory(self) -> MemoryPlan:
        return self._state.memory

    @property
    def max_workers(self) -> int:
        """The ceiling in force: this pool's own cap, within the shared capacity's."""
        return min(self._state.memory.max_workers, self.capacity.max_workers)

    @property
    def last_lease_at(self) -> float:
        """When this pool last handed out a lease (monotonic; 0 = never): the capacity's LRU key."""
        return self._state.seat.last_lease_at

    @property
    def waiting(self) -> int:
        return len(self._state.queue)

    @property
    def idle_count(self) -> int:
        return self._state.count(Phase.IDLE)

    @property
    def unserved(self) -> int:
        """Waiters that only a worker given back (a parked session) can serve."""
        return planner.unserved(self._state)

    @property
    def breaker_state(self) -> BreakerState:
        return self._state.breaker.state(time.monotonic())

    @property
    def healthy(self) -> bool:
        return self.breaker_state is BreakerState.CLOSED and not self._state.closed

    def counts(self) -> dict[str, int]:
        """Workers per phase, and waiting requests (what `repr` shows, as data)."""
        return planner.counts(self._state)

    def snapshot(self) -> list[dict[str, object]]:
        """One row per worker, with the pool's view of its state (for status pages)."""
        return status_rows(self._state.records.values(), self.profile.name, time.monotonic())

    def waiting_by_priority(self) -> dict[str, int]:
        batch = self._state.queue.batch_queued()
        return {"interactive": self.waiting - batch, "batch": batch}

    def workers(self) -> list[Worker]:
        """Every worker the pool holds, in any state (for status pages and tests)."""
        return sorted(self._state.records, key=lambda w: w.created_at)

    def lease_of(self, worker: Worker) -> Lease | None:
        """The lease ``worker`` serves: the one holding it, else one released mid-turn whose last
        turn is still being drained (it still owns what that turn does). None when it serves none."""
        record = self._state.records.get(worker)
        if record is None:
            return None
        return record.lease if record.lease is not None else record.unsettled

    def total_pss_bytes(self) -> int:
        return self._state.total_pss_bytes()

    def recycle_due(self, worker: Worker) -> str | None:
        """Why the pool would retire this leased worker when it comes back (turns, age, memory), or
        None. A conversation holding its worker between turns asks after each turn and gives the
        worker back, so a long conversation is no exception to recycling. Context is not a reason:
        the resumed conversation would carry the same context (sessions have their own limit)."""
        record = self._state.records.get(worker)
        if record is None:
            return None
        reason = planner.retire_reason(record, self.config, time.monotonic())
        return None if reason in (None, "failed", "context") else reason

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin warming ``min_idle`` workers; returns at once (see `wait_ready`). Unless the owner
        said it runs `maintain` itself, the pool starts it as a task of its own."""
        if self._started:
            return
        self._started = True
        if self._run_maintenance:
            self._ops.run(self.maintain(), f"pool-{self.profile.name}-maintenance")
        self._step()

    async def maintain(self) -> None:
        """Measure every worker's memory each ``maintenance_interval_s`` and re-plan; runs until
        cancelled. /proc reads take ~1 ms per real worker, so they run off the event loop."""
        while not self._state.closed:
            await asyncio.sleep(self.config.maintenance_interval_s)
            await self._sizing.measure(self._sizing.measurable(self._state.records))
            self._state.memory = self._sizing.plan(self._state.records)
            self.capacity.replan()
            self._step()

    async def wait_ready(self, timeout_s: float | None = None, *, idle: int | None = None) -> None:
        """Wait until ``idle`` (default ``min_idle``, capped by ``max_workers``) warm workers are idle."""
        target = min(self.config.min_idle if idle is None else idle, self.max_workers)
        async with asyncio.timeout(timeout_s):
            # A shared ceiling smaller than the pools' floors together leaves some floors short.
            while self._state.count(Phase.IDLE) < target and not self.ceiling_full:
                if self._state.closed:
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
        state = self._state
        state.closed = True
        state.seat.want(Need.NONE)
        self._set_freeze_timer(None)
        self._slots.remove_listener(self._on_tenant_released)
        for waiter in state.queue.drain():
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed(f"pool {self.profile.name} is closing"))
        await self._ops.cancel_all()
        records = list(state.records.values())
        if self._observer is not None:
            for record in records:
                if record.phase is not Phase.CLOSING:
                    self._observer.worker_exited(self.profile.name, "shutdown")
        if records:
            await asyncio.gather(*(r.worker.close(graceful=r.worker.is_idle()) for r in records),
                                 return_exceptions=True)
        for record in records:
            state.remove(record.worker)
        # Its workers are gone (each freed its place as it went): the pool leaves the capacity.
        state.seat.leave()
        for record in records:
            self._settle_lease(record.unsettled)
            self._settle_lease(record.lease)
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
        if self._state.closed:
            raise PoolClosed(f"pool {self.profile.name} is closed")
        if not self._started:
            await self.start()
        if planner.cannot_serve(self._state, time.monotonic()):
            raise PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start; spawning is paused")
        timeout_s = self.config.lease_timeout_s if timeout_s is None else timeout_s
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        queue = self._state.queue
        ticket = queue.push(Waiter(tenant, future, time.monotonic(), priority), tenant, share, priority)
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
                queue.cancel(ticket)
                self._step()  # what the pool waits for may have changed (a claim on shared room)
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
        state = self._state
        old = lease.worker
        if lease.released or old.in_turn() or old.dirty:
            raise PoolClosed("only a fresh lease's worker can be replaced")
        while True:
            if state.closed:
                # `_close` has already listed the workers to stop: a process started now would outlive it.
                raise PoolClosed(f"pool {self.profile.name} is closed")
            if self.breaker_state is BreakerState.OPEN:
                raise PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start; spawning is paused")
            if planner.spawn_room(state, time.monotonic()) > 0:
                break
            self._changed.clear()
            await self._changed.wait()
        new = self._ops.new_worker(self.profile.with_args(*extra_args), slot=old.slot, prepare=prepare)
        old_record = state.records[old]
        record = state.add(new, Phase.LEASED, old_record.turn_limit)
        record.lease, old_record.lease = lease, None
        record.respawning = True
        lease.worker = new
        new.on_result = lease.record
        old.on_result = None
        self._apply(planner.retire(state, old_record, "respawn"), time.monotonic())
        started = time.monotonic()
        try:
            await new.start()
        except Exception as exc:
            # The lease holds a dead worker, which its release retires (as a boot failure).
            self._ops.boot_failed(exc)
            raise
        finally:
            record.respawning = False
            self._step()
        self._ops.boot_succeeded()
        if self._observer is not None:
            self._observer.worker_spawned(self.profile.name, time.monotonic() - started)
        # Measured in the background: the resumed conversation's turn does not wait for /proc.
        self._ops.run(self._ops.measure_ready(new), f"measure-{new.id}")

    def release_lease(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        if lease.priority is Priority.BATCH:
            self._state.batch_leased -= 1
        worker = lease.worker
        record = self._state.records.get(worker)
        if record is not None and record.phase is Phase.LEASED:
            record.lease = None
            self._state.move(record, Phase.RETURNED)
        try:
            if worker.in_turn() and record is not None:
                record.unsettled = lease  # its result may still arrive, drained by _clean
            else:
                self._settle_lease(lease)  # runs the lease-done callback
            self._step()
        finally:
            # Whatever a callback raised, the tenant's slot is given back (or it stays capped for good);
            # every pool sharing the slots steps again: this tenant may now be under its cap elsewhere.
            self._slots.release(lease.tenant, lease.priority)

    def record_result(self, lease: Lease, result: TurnResult) -> None:
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

    # -- the decision step, and applying what it decided -----------------------------------------

    def _step(self) -> None:
        if self._state.closed:
            return
        now = time.monotonic()
        for action in planner.plan(self._state, now):
            self._apply(action, now)
        if self._state.count(Phase.IDLE):
            self._state.seat.offer()
        self._set_freeze_timer(planner.next_freeze_at(self._state))
        self._changed.set()

    def _set_freeze_timer(self, at: float | None) -> None:
        if at == self._freeze_timer_at:
            return
        if self._freeze_timer is not None:
            self._freeze_timer.cancel()
        self._freeze_timer, self._freeze_timer_at = None, at
        if at is not None:
            # A hair late, so the step finds the worker due.
            delay_s = max(0.0, at - time.monotonic()) + 0.001
            self._freeze_timer = asyncio.get_running_loop().call_later(delay_s, self._on_freeze_timer)

    def _on_freeze_timer(self) -> None:
        self._freeze_timer = self._freeze_timer_at = None
        self._step()

    def _apply(self, action: planner.Action[Worker, Waiter], now: float) -> None:
        if isinstance(action, planner.Assign):
            waiter, worker = action.waiter, action.worker
            lease = Lease(self, worker, waiter.tenant, now - waiter.enqueued_at, waiter.priority)
            worker.on_result = lease.record
            self._state.records[worker].lease = lease
            self.stats.leases += 1
            waiter.future.set_result(lease)
        elif isinstance(action, planner.Refuse):
            action.waiter.future.set_exception(
                PoolUnhealthy(f"pool {self.profile.name}: workers keep failing to start"))
        elif isinstance(action, planner.Spawn):
            self._ops.spawn(action.slot, action.turn_limit)
        elif isinstance(action, planner.Clean):
            self._ops.clean(action.worker)
        elif isinstance(action, planner.Evict):
            self._state.seat.evict(action.count, action.need)
        elif isinstance(action, planner.Freeze):
            action.worker.freeze()
        elif isinstance(action, planner.Thaw):
            action.worker.thaw()
        else:
            self._ops.retire(action.worker, action.reason)

    @property
    def ceiling_full(self) -> bool:
        """The shared ceiling is reached and none of this pool's workers is on its way to idle."""
        return (self.capacity.bounded and self.capacity.live >= self.capacity.max_workers
                and not self._state.count(Phase.STARTING, Phase.CLEANING, Phase.RETURNED))

    def _batch_room(self) -> int:
        return max(1, int(self.max_workers * self.config.batch_max_share))

    def _on_tenant_released(self, tenant: str) -> None:
        if self._state.queue.waiting(tenant):
            self._step()

    # -- memory --------------------------------------------------------------------------------

    def refresh_memory(self) -> MemoryPlan:
        """Measure every worker's PSS and RSS now, re-derive the memory plan, and act on it."""
        self._state.memory = self._sizing.measure_now(self._state.records)
        self.capacity.replan()
        self._step()
        return self._state.memory
