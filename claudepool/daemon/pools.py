"""The daemon's pools: one stateless and one session-capable pool per configured profile, and pools
made on demand for system prompts other than their profile's.

The CLI fixes a worker's system prompt when it starts, so a request, a session or a tenant's persona
with another system prompt needs workers started with it. `PoolRegistry.pool_for` finds (or makes)
the pool of the profile's spawn settings with that system prompt. Pools are keyed by a digest of
those settings (`spawn_key`), not by tenant: two tenants sending the same system prompt share one
pool, which holds nothing of theirs but the prompt both sent (every worker is reset between leases).

An on-demand pool keeps no warm floor (``min_idle`` 0): it starts a worker when a request waits for
one, its idle workers retire after ``max_idle_s`` like any pool's, and once it has had no worker, no
waiter and no admitted request for ``pool.on_demand_idle_s`` it is closed and forgotten (`reap`).
At most ``pool.max_on_demand_pools`` live at once: making one more closes the least recently used
one with nothing leased or waiting, and when there is none the request is refused (`TooManyPools`).
Those decisions are synchronous, with no await, like the pool's own; the closing runs as a task.

The registry is a mapping of every live pool by name, read afresh on every use, so the consumers
that look pools up (the gateway's attribution, the metrics collector, the status page) see pools
made after start. An on-demand pool's name carries its key, never its prompt
(`claudepool.pool.profile.pool_label`); metrics show it as ``PROFILE~custom``.

Every pool is built by `PoolRegistry.build`: the one place that knows how.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from claudepool.config import Settings
from claudepool.errors import TooManyPools
from claudepool.pool.config import PoolConfig
from claudepool.pool.events import PoolObserver
from claudepool.pool.pool import Pool
from claudepool.pool.profile import ON_DEMAND_MARK, Profile, pool_label

log = logging.getLogger(__name__)


def spawn_key(profile: Profile) -> str:
    """The hex SHA-256 of a profile's canonical settings (its name, the base profile's, included: it
    decides the upstream and the limits): equal settings, one pool."""
    return hashlib.sha256(orjson.dumps(profile.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


class _Labelled:
    """The pools' observer, told every pool by its bounded label (`pool_label`)."""

    def __init__(self, inner: PoolObserver) -> None:
        self._inner = inner

    def worker_spawned(self, profile: str, seconds: float) -> None:
        self._inner.worker_spawned(pool_label(profile), seconds)

    def worker_exited(self, profile: str, reason: str) -> None:
        self._inner.worker_exited(pool_label(profile), reason)

    def worker_reset(self, profile: str) -> None:
        self._inner.worker_reset(pool_label(profile))


@dataclass(eq=False)
class _OnDemand:
    pool: Pool
    key: tuple[str, bool]  # the spawn key, and whether it is the session-capable variant
    last_used: float  # the LRU key at the bound: a request admitted to it, or released
    maintenance: asyncio.Task[None]
    # Requests admitted to this pool that hold no lease yet (`PoolRegistry.pin`).
    pins: int = 0
    # When it last had a worker, a waiter or a pin (seen by `reap`): apart from the LRU key, which
    # an idle worker sitting in the pool must not refresh.
    last_busy: float = 0.0

    def busy(self) -> bool:
        counts = self.pool.counts()
        return self.pins > 0 or any(counts.values())

    def evictable(self) -> bool:
        counts = self.pool.counts()
        return self.pins == 0 and counts["leased"] == 0 and counts["waiting"] == 0


class PoolRegistry(Mapping[str, Pool]):
    """Every live pool, by pool name: the configured ones (``configured``, ``configured_sessions``,
    by profile) and those made on demand."""

    def __init__(self, settings: Settings, *, observer: PoolObserver | None = None,
                 clock: Callable[[], float] = time.monotonic, **hooks: Any) -> None:
        self._settings = settings
        self._observer = _Labelled(observer) if observer is not None else None
        self._hooks = hooks
        self._clock = clock
        self.max_on_demand = settings.pool.max_on_demand_pools
        self.idle_s = settings.pool.on_demand_idle_s
        self.configured: dict[str, Pool] = {
            name: self.build(settings.profile(name), settings.pool_config(name)) for name in settings.profiles}
        # Conversations run on each profile's session-capable twin: the same spawn settings, with
        # transcripts kept so a parked conversation can resume on any of its workers.
        sessions = settings.sessions
        self.configured_sessions: dict[str, Pool] = {
            name: self.build(settings.profile(name).session_variant(), settings.pool_config(name).model_copy(
                update={"min_idle": sessions.min_idle, "max_workers": sessions.max_workers, "min_idle_max": 0}))
            for name in settings.profiles}
        self._fixed = {p.profile.name: p for p in (*self.configured.values(), *self.configured_sessions.values())}
        self._on_demand: dict[str, _OnDemand] = {}  # by pool name
        self._by_key: dict[tuple[str, bool], _OnDemand] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.made = 0  # on-demand pools made since start
        self.evicted = 0  # closed to make room for another
        self.reaped = 0  # closed once idle

    def build(self, profile: Profile, config: PoolConfig) -> Pool:
        """A pool of the daemon's: its hooks (metering, tenant slots, worker credentials) and observer.
        Its memory measurements (`Pool.maintain`) are run by its owner: the daemon's task group for the
        configured pools, this registry for those made on demand (`maintain` raises what they raise)."""
        return Pool(profile, config, observer=self._observer, **{**self._hooks, "run_maintenance": False})

    # -- the mapping: every live pool ------------------------------------------------------------

    def __getitem__(self, name: str) -> Pool:
        found = self._fixed.get(name)
        if found is not None:
            return found
        return self._on_demand[name].pool

    def __iter__(self) -> Iterator[str]:
        return iter([*self._fixed, *self._on_demand])

    def __len__(self) -> int:
        return len(self._fixed) + len(self._on_demand)

    @property
    def on_demand(self) -> list[Pool]:
        return [entry.pool for entry in self._on_demand.values()]

    def session_pools(self) -> list[Pool]:
        """Every live session-capable pool, configured or on demand."""
        return [*self.configured_sessions.values(),
                *(entry.pool for entry in self._on_demand.values() if entry.key[1])]

    # -- finding, making, pinning ----------------------------------------------------------------

    def pool_for(self, profile: str, system_prompt: str | None, *, sessions: bool = False) -> Pool:
        """The pool of configured profile ``profile`` whose workers start with ``system_prompt``: the
        configured pool when it is the profile's own, else one made on demand (shared by every request
        with the same settings). Raises `KeyError` for an unknown profile, `TooManyPools` when no
        room can be made. Synchronous: what it decides holds until the caller's next await."""
        base = (self.configured_sessions if sessions else self.configured)[profile]
        if system_prompt == base.profile.system_prompt:
            return base
        spawn = self._settings.profile(profile).model_copy(update={"system_prompt": system_prompt})
        key = (spawn_key(spawn), sessions)
        now = self._clock()
        entry = self._by_key.get(key)
        if entry is not None:
            entry.last_used = now
            return entry.pool
        self._make_room()
        named = spawn.model_copy(update={"name": f"{profile}{ON_DEMAND_MARK}{key[0][:16]}"})
        pool = self.build(named.session_variant() if sessions else named, base.config.model_copy(
            update={"min_idle": 0, "min_idle_max": 0}))  # no floor, not even one following demand
        maintenance = asyncio.get_running_loop().create_task(pool.maintain(),
                                                             name=f"pool-{pool.profile.name}-maintenance")
        entry = _OnDemand(pool, key, now, maintenance)
        self._on_demand[pool.profile.name] = self._by_key[key] = entry
        self.made += 1
        log.info("pool made on demand", extra={"fields": {"pool": pool.profile.name, "base": profile,
                                                          "live": len(self._on_demand)}})
        return pool

    def pin(self, pool: Pool) -> Callable[[], None]:
        """Keep ``pool`` open (neither evicted nor reaped) until the returned release is called: for a
        request admitted to it that waits for no worker yet. Release is idempotent."""
        entry = self._on_demand.get(pool.profile.name)
        if entry is None or entry.pool is not pool:
            return _nothing
        entry.pins += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                entry.pins -= 1
                entry.last_used = self._clock()

        return release

    def _make_room(self) -> None:
        if len(self._on_demand) < self.max_on_demand:
            return
        idle = [entry for entry in self._on_demand.values() if entry.evictable()]
        if not idle:
            raise TooManyPools(f"all {len(self._on_demand)} pools made for other system prompts are serving "
                               f"(pool.max_on_demand_pools); retry shortly")
        victim = min(idle, key=lambda entry: entry.last_used)
        self._forget(victim, "evicted")
        self.evicted += 1

    # -- closing -----------------------------------------------------------------------------------

    def reap(self, now: float | None = None) -> int:
        """Close and forget every on-demand pool that has had no worker, no waiter and no admitted
        request for ``idle_s``; returns how many."""
        now = self._clock() if now is None else now
        reaped = 0
        for entry in list(self._on_demand.values()):
            if entry.busy():
                entry.last_busy = now
            elif now - max(entry.last_busy, entry.last_used) >= self.idle_s:
                self._forget(entry, "idle")
                reaped += 1
        self.reaped += reaped
        return reaped

    def _forget(self, entry: _OnDemand, why: str) -> None:
        del self._on_demand[entry.pool.profile.name]
        del self._by_key[entry.key]
        entry.maintenance.cancel()
        self._closing.add(entry.maintenance)
        entry.maintenance.add_done_callback(self._closing.discard)
        log.info("pool made on demand closed", extra={"fields": {"pool": entry.pool.profile.name, "why": why}})
        task = asyncio.get_running_loop().create_task(entry.pool.close(),
                                                      name=f"pool-{entry.pool.profile.name}-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def maintain(self) -> None:
        """Reap idle on-demand pools every ``maintenance_interval_s``; raise what an on-demand pool's own
        maintenance raised (the daemon stops on it, as on a configured pool's). Forever."""
        while True:
            await asyncio.sleep(self._settings.pool.maintenance_interval_s)
            for entry in list(self._on_demand.values()):
                task = entry.maintenance
                failure = task.exception() if task.done() and not task.cancelled() else None
                if failure is not None:
                    raise failure
            self.reap()

    async def close(self) -> None:
        """Close every pool, configured and on demand (at shutdown, after the sessions are parked)."""
        for entry in list(self._on_demand.values()):
            self._forget(entry, "shutdown")
        for pool in self._fixed.values():
            await pool.close()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


def _nothing() -> None:
    return None
