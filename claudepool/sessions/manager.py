"""Conversations: sessions with worker affinity, parking, resume, limits and retention.

A session belongs to one tenant, one profile and one system prompt (`claudepool.sessions.pools`).
While it is *active* it holds one worker of its session-capable pool (workers that keep
transcripts; stateless workers never do), so a follow-up turn goes straight to the warm process
that already holds its context: no reset, no queue, a warm prompt cache. One turn at a time: a
second concurrent turn on the same session waits behind the first (within its own deadline).

After every turn the CLI's transcript is checkpointed to ``<sessions dir>/<tenant>/<session>.jsonl``.
When the worker is needed elsewhere (the session sat idle for ``park_idle_s``, or other sessions wait
for a worker: least recently used first) the session is *parked*: its worker gives up the transcript
and is reset for others. The next turn *resumes* it on any free worker (``--resume`` from the
checkpoint), here, after a restart, or on another daemon sharing the store and the directory.

A tenant holds at most ``max_sessions`` open sessions (checked atomically with the insert). Limits
(turns, age, context tokens; per tenant, else profile, else ``[sessions]``) close a session, or roll
it over into a fresh one. Idle sessions expire after ``ttl_s``; closed transcripts go after ``retention_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from claudepool.errors import (
    ClaudepoolError,
    NotFound,
    SessionCheckpointFailed,
    SessionClosed,
    SessionElsewhere,
    SessionLimitReached,
    SessionUnavailable,
    TooManySessions,
)
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.pool.shares import Priority, TenantShare
from claudepool.pool.worker import TurnResult, Worker
from claudepool.sessions.files import SessionFiles
from claudepool.sessions.pools import Binding, SessionPools, new_session_system_prompt, pool_of
from claudepool.sessions.settings import LimitOverrides, SessionOptions, SessionSettings
from claudepool.sessions.workspaces import SessionWorkspaces
from claudepool.store.base import SessionRecord, Store
from claudepool.tenancy.metering import RequestContext
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

_SESSION_ID = re.compile(r"^s_[A-Za-z0-9_-]{8,64}$")
# How long past its last turn an active session still belongs to the daemon holding it. After that
# (a crashed daemon), another daemon may resume it from its checkpoint.
_OWNERSHIP_GRACE_S = 30.0
_T = TypeVar("_T")


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(18)


class SessionManager:
    def __init__(self, store: Store, pools: SessionPools, options: SessionOptions, *,
                 daemon_id: str | None = None, max_system_prompt_bytes: int = 64 * 1024) -> None:
        self.store = store
        self.pools = pools
        self.max_system_prompt_bytes = max_system_prompt_bytes
        self.config: SessionSettings = options.settings
        self._options = options
        self.daemon_id = daemon_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.files = SessionFiles(options.dir)
        self.dir = self.files.dir  # where transcripts rest
        self.events: Counter[str] = Counter()
        self.workspaces = SessionWorkspaces(self.files, self.config, self.events)
        self._bindings: dict[str, Binding] = {}
        self._bound = asyncio.Event()  # a session took a worker: maintenance has something to watch
        self._locks: dict[str, asyncio.Lock] = {}  # per session, also while it has no worker
        self.turns_begun: Counter[str] = Counter()  # per session: turns handed a worker on this daemon
        self.transcript_bytes = 0

    # -- records ---------------------------------------------------------------------------------

    async def create(self, tenant: Tenant, profile: str | None = None, *, system: str | None = None,
                     conversation: bool = False) -> SessionRecord:
        """A new session; ``system``: its system prompt (`new_session_system_prompt`); ``conversation``:
        started by a front door from a chat history (`claudepool.sessions.conversations`)."""
        name = profile or tenant.profile
        return await self._new(tenant, name, new_session_system_prompt(
            self.pools, tenant, name, system, max_bytes=self.max_system_prompt_bytes), conversation=conversation)

    async def _new(self, tenant: Tenant, profile: str, system_prompt: str | None, *,
                   conversation: bool = False) -> SessionRecord:
        now = time.time()
        record = SessionRecord(id=new_session_id(), tenant=tenant.name, profile=profile, created_at=now,
                               last_used_at=now, state="new", system_prompt=system_prompt,
                               conversation=conversation)
        bound = tenant.max_sessions if tenant.max_sessions is not None else self.config.max_sessions
        if not await self.store.session_create(record, max_open=bound):
            raise TooManySessions(f"this tenant has {bound} open sessions, its limit: delete one (or let one "
                                  "expire) first")
        self.events["created"] += 1
        return record

    async def get(self, tenant: str, session_id: str) -> SessionRecord:
        """The tenant's session. Anything else (another tenant's id, a malformed id) is 404."""
        if not _SESSION_ID.match(session_id):
            raise NotFound("unknown session")
        record = await self.store.session_get(tenant, session_id)
        if record is None:
            record = self.files.read_meta(tenant, session_id)
            if record is None:
                raise NotFound("unknown session")
            # A restart with the in-memory store forgot it; its checkpoint remembers.
            await self.store.session_put(record)
        return record

    async def list(self, tenant: str | None) -> list[SessionRecord]:
        return await self.store.session_list(tenant)

    async def delete(self, tenant: str, session_id: str) -> None:
        """Close now and delete the transcript now (an explicit delete does not wait for retention)."""
        record = await self.get(tenant, session_id)
        async with self._lock(session_id):
            self._unbind(session_id)
            self.files.remove(record)
            await self.store.session_delete(tenant, session_id)
        self._forget(session_id)
        self.events["deleted"] += 1

    def view(self, record: SessionRecord) -> dict[str, Any]:
        """What the API shows of a session: counters, age, and where it lives."""
        binding = self._bindings.get(record.id)
        where: dict[str, Any] = {"state": record.state}
        if record.state == "active":
            where["daemon"] = record.owner
            if binding is not None:
                where["worker_slot"] = binding.lease.worker.slot
        body = record.to_dict()
        for private in ("cli_session_id", "transcript", "owner", "state", "system_prompt"):
            body.pop(private)
        body["custom_system_prompt"] = record.system_prompt is not None
        return {**body, "age_s": round(time.time() - record.created_at, 3), "where": where}

    # -- turns -----------------------------------------------------------------------------------

    async def run_turn(self, tenant: Tenant, session_id: str, *, share: TenantShare, priority: Priority,
                       wait_s: float, drive: Callable[[Lease, SessionRecord], Awaitable[TurnResult | None]],
                       ) -> tuple[SessionRecord, TurnResult | None]:
        """Run one turn of the session (``drive`` runs it on the lease); returns the session the turn
        ran in (a fresh one after a rollover) and its result."""
        record = await self.get(tenant.name, session_id)
        async with self._lock(record.id):
            record = await self.get(tenant.name, session_id)  # it may have changed while we waited
            record = await self._check_limits(tenant, record)
            binding = await self._bind(record, tenant, share=share, priority=priority, wait_s=wait_s)
            lease = binding.lease
            if lease.worker.in_turn():
                # The previous turn's client went away mid-answer: finish it before writing again.
                await lease.worker.finish_abandoned_turn()
            self.turns_begun[record.id] += 1  # before: a turn that fails mid-way has begun all the same
            result = await drive(lease, binding.record)
            await self._after_turn(binding, result)
            return binding.record, result

    async def _bind(self, record: SessionRecord, tenant: Tenant, *, share: TenantShare, priority: Priority,
                    wait_s: float) -> Binding:
        binding = self._bindings.get(record.id)
        if binding is not None and binding.lease.worker.is_alive():
            return binding
        if binding is not None:
            self._unbind(record.id)  # its worker died: resume from the checkpoint
        self.check_not_elsewhere(record)
        pool = pool_of(self.pools, record)  # made again if it was closed; acquired before any await
        resume = bool(record.cli_session_id)
        if resume and not self.files.transcript(record).exists():
            raise SessionUnavailable(f"session {record.id}'s transcript is not in this daemon's sessions directory "
                                     f"({self.dir}); share that directory between daemons to resume it here")
        lease = await pool.acquire(tenant.name, timeout_s=wait_s, share=share, priority=priority)
        try:
            if resume:
                await self._resume(record, pool, lease)
            await self.workspaces.restore(record, lease.worker.cwd)
        except BaseException:
            lease.release()
            raise
        record.state, record.owner = "active", self.daemon_id
        binding = Binding(record, lease, self._lock(record.id), pool)
        self._bindings[record.id] = binding
        self._bound.set()
        await self.store.session_put(record)
        return binding

    async def _resume(self, record: SessionRecord, pool: Pool, lease: Lease) -> None:
        """Swap the lease's worker for one started with ``--resume``, its HOME holding the checkpoint.
        The copy is made in a thread beforehand, next to the worker directories; at spawn it is only
        renamed into place."""
        cli_id = record.cli_session_id
        try:
            staged = await self.files.stage(record, pool.config.workdir or Path(tempfile.gettempdir()))
        except OSError as exc:
            raise SessionUnavailable(f"session {record.id}'s transcript cannot be read "
                                     f"({exc.strerror or type(exc).__name__})") from None

        def put_transcript(worker: Worker) -> None:
            target = worker.transcript_path(cli_id)
            assert target is not None
            self.files.place(staged, target)

        try:
            await pool.respawn_leased(lease, extra_args=("--resume", cli_id), prepare=put_transcript)
        finally:
            staged.unlink(missing_ok=True)  # placed: gone already; else not needed any more
        self.events["resumed"] += 1

    async def _after_turn(self, binding: Binding, result: TurnResult | None) -> None:
        record = binding.record
        record.last_used_at = time.time()
        if result is not None:
            record.turns += 1
            record.cli_session_id = result.session_id or record.cli_session_id
            record.input_tokens += result.usage.input_tokens
            record.output_tokens += result.usage.output_tokens
            record.cache_read_input_tokens += result.usage.cache_read_input_tokens
            record.cache_creation_input_tokens += result.usage.cache_creation_input_tokens
            ctx = binding.lease.context
            record.cost_usd += ctx.billed_cost_usd(result.cost_usd) if isinstance(ctx, RequestContext) else (
                result.cost_usd)
            record.context_tokens = result.context_tokens
            try:
                await self._checkpoint(binding)
            except SessionCheckpointFailed:
                await self.store.session_put(record)  # the turn happened: count it
                raise
        await self.store.session_put(record)
        if not binding.lease.worker.is_alive():
            self._unbind(record.id)
        elif result is not None:
            await self._park_if_recycle_due(binding)

    async def _checkpoint(self, binding: Binding) -> None:
        """Copy the CLI's transcript to the session's file at rest (atomically: write, then rename),
        in a thread: a long conversation's transcript must not hold up every other tenant's turn."""
        record = binding.record
        source = binding.lease.worker.transcript_path(record.cli_session_id)
        if source is None or not source.exists():
            log.warning("session %s: no transcript to checkpoint", record.id)
            return
        record.transcript = str(self.files.transcript(record).relative_to(self.dir))
        meta = orjson.dumps({**record.to_dict(), "state": "parked", "owner": ""})
        try:
            await self.files.checkpoint(source, record, meta)
        except OSError as exc:
            binding.unsaved = True
            self.events["checkpoint_failed"] += 1
            log.error("session %s: transcript not saved: %s", record.id, exc.strerror or exc)
            raise SessionCheckpointFailed(
                f"the turn ran, was billed and stays in session {record.id}, but its transcript could not be "
                f"saved ({exc.strerror or type(exc).__name__}); the session keeps its worker until a save "
                "succeeds") from None
        binding.unsaved = False

    def limit_reached(self, tenant: Tenant, record: SessionRecord) -> str | None:
        """Which limit the session's next turn would be refused (or rolled over) at, if any."""
        own = LimitOverrides(tenant.max_session_turns, tenant.max_session_age_s, tenant.max_session_context_tokens)
        return self._options.limits_for(record.profile, own).reached(
            record.turns, time.time() - record.created_at, record.context_tokens)

    async def _check_limits(self, tenant: Tenant, record: SessionRecord) -> SessionRecord:
        if record.state == "closed":
            raise SessionClosed(f"session {record.id} is closed ({record.close_reason})")
        reached = self.limit_reached(tenant, record)
        if reached is None:
            return record
        self._unbind(record.id)  # the worker, and its copy of the conversation, go back to the pool
        await self._close(record, f"limit: {reached}")
        if not self.config.rollover:
            raise SessionLimitReached(f"session {record.id} reached {reached} and is closed")
        fresh = await self._new(tenant, record.profile, record.system_prompt)  # the same system prompt
        self.events["rolled_over"] += 1
        return fresh

    # -- parking, expiry, retention ----------------------------------------------------------------

    async def park(self, session_id: str) -> bool:
        """Give the session's worker back (its checkpoint stays). False if it is mid-turn, or if
        its last turns could not be saved (it keeps its worker)."""
        binding = self._bindings.get(session_id)
        if binding is None or binding.lock.locked():
            return False
        async with binding.lock:
            return await self._park(binding)

    async def _park(self, binding: Binding) -> bool:
        record = binding.record
        worker = binding.lease.worker
        if worker.in_turn():
            with contextlib.suppress(ClaudepoolError):
                await worker.finish_abandoned_turn()
                binding.unsaved = True
        if binding.unsaved and worker.is_alive():
            try:
                await self._checkpoint(binding)
            except SessionCheckpointFailed:
                return False  # the worker holds turns the disk does not: keep it
        if worker.is_alive():
            await self.workspaces.save(record, worker.cwd)  # before the reset empties it for others
        self._unbind(record.id)
        if record.state == "active":
            record.state, record.owner = "parked", ""
            await self.store.session_put(record)
        self.events["parked"] += 1
        return True

    async def _park_if_recycle_due(self, binding: Binding) -> None:
        """Give the worker back when its pool would recycle it (the caller holds the session lock);
        the next turn resumes the conversation on a fresh process."""
        if self._bindings.get(binding.record.id) is not binding:
            return  # parked meanwhile
        reason = binding.pool.recycle_due(binding.lease.worker)
        if reason is None:
            return
        log.info("session %s: its worker is due for recycling (%s); parking it", binding.record.id, reason)
        if await self._park(binding):
            self.events["recycled"] += 1

    async def park_all(self) -> None:
        """At shutdown: every session keeps its checkpoint and can resume after a restart."""
        for session_id in list(self._bindings):
            binding = self._bindings.get(session_id)
            if binding is None:
                continue
            try:
                async with asyncio.timeout(10):
                    async with binding.lock:
                        if not await self._park(binding):
                            log.error("session %s: its last turns could not be saved and are lost at shutdown",
                                      session_id)
            except (ClaudepoolError, TimeoutError, OSError) as exc:
                # Its last checkpoint stays; the rest of shutdown must go on.
                log.warning("session %s: not parked cleanly at shutdown: %r", session_id, exc)

    async def maintain(self) -> None:
        """Park idle sessions and sessions others wait for (every ``maintenance_interval_s``); expire,
        delete and bound the disk (every ``sweep_interval_s``). Forever."""
        last_sweep = 0.0
        while True:
            self._bound.clear()
            if self._bindings:
                await asyncio.sleep(self.config.maintenance_interval_s)
            else:  # parking only moves a bound session: with none, an idle daemon wakes for the sweep alone
                due_s = max(last_sweep + self.config.sweep_interval_s - time.monotonic(),
                            self.config.maintenance_interval_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due_s):
                        await self._bound.wait()
            try:
                await self.park_some()
                if time.monotonic() - last_sweep >= self.config.sweep_interval_s:
                    last_sweep = time.monotonic()
                    await self.sweep()
            except (ClaudepoolError, OSError) as exc:  # a full disk or a racing delete: try again next round
                log.warning("session maintenance failed: %r", exc)

    async def park_some(self) -> None:
        now = time.time()
        for binding in list(self._bindings.values()):
            if now - binding.record.last_used_at >= self.config.park_idle_s:
                await self.park(binding.record.id)
            elif not binding.lock.locked():
                # Memory readings and the pool's hard limit arrive between turns.
                async with binding.lock:
                    await self._park_if_recycle_due(binding)
        for pool in self.pools.session_pools():
            needed = pool.unserved
            idle_bound = sorted((b for b in self._bindings.values() if b.pool is pool and not b.lock.locked()),
                                key=lambda b: b.record.last_used_at)
            for binding in idle_bound[:max(0, needed)]:
                await self.park(binding.record.id)

    async def close_idle(self, record: SessionRecord, reason: str) -> bool:
        """Close the session ``record`` (from a listing) unless a turn holds it or it was used since."""
        lock = self._lock(record.id)
        if lock.locked():
            return False
        async with lock:
            fresh = await self.store.session_get(record.tenant, record.id)
            if fresh is None or fresh.state == "closed" or fresh.last_used_at > record.last_used_at:
                return False
            self._unbind(record.id)
            await self._close(fresh, reason)
        return True

    async def sweep(self) -> None:
        now = time.time()
        for record in await self.store.session_list(None):
            ttl_s = self.config.conversation_idle_ttl_s if record.conversation else self.config.ttl_s
            if record.state != "closed" and now - record.last_used_at >= ttl_s:
                # The listing may be stale by now: closed only if still unused since (and not mid-turn).
                if await self.close_idle(record, "expired"):
                    self.events["expired"] += 1
            elif record.state == "closed" and record.closed_at is not None and (
                    now - record.closed_at >= self.config.retention_s):
                self.files.remove(record)
                await self.store.session_delete(record.tenant, record.id)
                self._forget(record.id)
                self.events["deleted"] += 1
        self.transcript_bytes = await self.files.disk_usage()
        if self.config.max_disk_bytes and self.transcript_bytes > self.config.max_disk_bytes:
            await self.shrink(self.transcript_bytes - self.config.max_disk_bytes)

    async def shrink(self, excess: int, listing: Sequence[SessionRecord] | None = None) -> None:
        """Free ``excess`` bytes of transcripts: closed sessions' first, then the least recently used
        parked sessions are closed. ``listing`` is the store's listing of every session (read now if
        None); it may be stale by the time a session is acted on, which each step checks."""
        records = await self.store.session_list(None) if listing is None else listing
        closed = sorted((r for r in records if r.state == "closed"), key=lambda r: r.closed_at or 0)
        parked = sorted((r for r in records if r.state == "parked"), key=lambda r: r.last_used_at)
        for record in [*closed, *parked]:
            if excess <= 0:
                break
            if record.state == "parked":
                lock = self._lock(record.id)
                if lock.locked() or record.id in self._bindings:
                    continue  # resuming or active here: an active session is never evicted
                async with lock:
                    fresh = await self.store.session_get(record.tenant, record.id)
                    if fresh is None or fresh.state != "parked":
                        continue  # resumed (here or on another daemon) since the listing
                    await self._close(fresh, "disk")
            excess -= self.files.drop_data(record)  # its transcript and its saved workspace

    async def _close(self, record: SessionRecord, reason: str) -> None:
        record.state, record.owner = "closed", ""
        record.closed_at, record.close_reason = time.time(), reason
        await self.store.session_put(record)
        if self.config.retention_s == 0:
            self.files.remove(record)
        else:
            self.files.write_meta(record)  # a restart must not revive it

    async def read_workspace(self, tenant: str, session_id: str, live: Callable[[Path], _T],
                             parked: Callable[[Path], _T]) -> _T:
        """Read the tenant's session's workspace, in a thread: ``live`` on its worker's cwd while it is
        active here, else ``parked`` on its saved archive (`SessionFiles.workspace`)."""
        record = await self.get(tenant, session_id)
        binding = self._bindings.get(record.id)
        if binding is not None and binding.lease.worker.is_alive() and (cwd := binding.lease.worker.cwd):
            result = await asyncio.to_thread(live, cwd)
            if self._bindings.get(record.id) is binding:
                return result  # else parked meanwhile: its worker may hold another lease's files by now
        self.check_not_elsewhere(record)
        return await asyncio.to_thread(parked, self.files.workspace(record))

    # -- internals --------------------------------------------------------------------------------

    def check_not_elsewhere(self, record: SessionRecord) -> None:  # SessionElsewhere: another daemon holds it
        if (record.state == "active" and record.owner and record.owner != self.daemon_id
                and time.time() < record.last_used_at + self.config.park_idle_s + _OWNERSHIP_GRACE_S):
            raise SessionElsewhere(f"session {record.id} is active on daemon {record.owner}")

    def bound_worker(self, session_id: str) -> Worker | None:
        """The worker an active session holds on this daemon, if any."""
        binding = self._bindings.get(session_id)
        return binding.lease.worker if binding is not None else None

    def counts(self) -> dict[str, int]:
        return {"active_here": len(self._bindings)}

    def _lock(self, session_id: str) -> asyncio.Lock:
        """The session's one lock, whether or not it holds a worker right now."""
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _forget(self, session_id: str) -> None:
        self._locks.pop(session_id, None)
        self.turns_begun.pop(session_id, None)

    def _unbind(self, session_id: str) -> None:
        """Give the worker back. Its copy of the transcript goes first: the worker is reset and lent
        to other tenants next, and only the checkpoint at rest may keep this conversation."""
        binding = self._bindings.pop(session_id, None)
        if binding is None:
            return
        cli_id = binding.record.cli_session_id
        copy = binding.lease.worker.transcript_path(cli_id) if cli_id else None
        if copy is not None:
            copy.unlink(missing_ok=True)
        binding.lease.release()
