"""Which pool a session runs on: its profile's session-capable pool, or the one made on demand for
its system prompt (`claudepool.daemon.pools`), found from what its record carries, so a parked
session resumes on it after a restart too; and the binding of an active session to its worker."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from claudepool.errors import Forbidden, NotFound, PromptTooLarge
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.store.base import SessionRecord
from claudepool.tenancy.tenants import Tenant


class SessionPools(Protocol):
    """The pools sessions run on (`claudepool.daemon.pools.PoolRegistry`)."""

    @property
    def configured_sessions(self) -> Mapping[str, Pool]: ...

    def pool_for(self, profile: str, system_prompt: str | None, *, sessions: bool = False) -> Pool: ...

    def session_pools(self) -> list[Pool]: ...


def new_session_system_prompt(pools: SessionPools, tenant: Tenant, profile: str, system: str | None, *,
                              max_bytes: int) -> str | None:
    """What a new session of ``tenant`` on ``profile`` asking for ``system`` records as its system
    prompt: None for the profile's own, else the one its turns run with (the tenant's persona, or
    ``system`` if the tenant may send its own). Raises the error to answer."""
    base = pools.configured_sessions.get(profile)
    if base is None:
        raise NotFound(f"unknown profile {profile!r}")
    if profile not in tenant.profiles:
        raise Forbidden(f"profile {profile!r} is not allowed for this tenant")
    if system is not None and len(system.encode()) > max_bytes:
        raise PromptTooLarge(f"system prompt of {len(system.encode())} bytes exceeds the limit of {max_bytes}")
    own = base.profile.system_prompt
    effective = tenant.system_prompt_for(own, system)
    return effective if effective != own else None


def system_prompt_of(pools: SessionPools, record: SessionRecord) -> str | None:
    """The system prompt the session's turns run with."""
    if record.system_prompt is not None:
        return record.system_prompt
    base = pools.configured_sessions.get(record.profile)
    return base.profile.system_prompt if base is not None else None


def pool_of(pools: SessionPools, record: SessionRecord) -> Pool:
    """The session's pool, made again if it was closed (synchronous: acquire it before any await)."""
    return pools.pool_for(record.profile, system_prompt_of(pools, record), sessions=True)


@dataclass
class Binding:
    """An active session on this daemon: its worker and pool, and its lock (one turn at a time)."""

    record: SessionRecord
    lease: Lease
    lock: asyncio.Lock
    pool: Pool
    # Turns the checkpoint on disk lacks (its save failed): until a save succeeds they live only in
    # the worker, which therefore is not given back.
    unsaved: bool = False
