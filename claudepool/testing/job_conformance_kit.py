"""The frame of the job store conformance suite (`claudepool.testing.job_conformance`): a `JobCheck`,
the registry the checks join, how they run, and the records and helpers they share."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from claudepool.jobs.model import JobPriority, JobRecord, Lane, Outcome
from claudepool.jobs.store import JobStore

# make_store() -> a new, started store that holds no jobs (on a shared server: flushed first).
JobStoreFactory = Callable[[], Awaitable[JobStore]]
Body = Callable[[JobStore], Awaitable[None]]

# Short enough that the checks of expiry wait a fraction of a second of real time: the Redis store's
# visibility is the idle time of a stream entry, Redis's own clock, which no ``now=`` moves.
SHORT_VT_S = 0.2
# A claim a check must see held while it works: room for a busy machine's pauses, still quick to expire.
HELD_VT_S = 0.5
LONG_VT_S = 60.0
# How long a check polls for something that must happen (a claim expiring) before it fails.
WAIT_S = 10.0


@dataclass(frozen=True)
class JobCheck:
    """One behaviour every job store must have."""

    name: str
    body: Body

    def __str__(self) -> str:
        return self.name


CHECKS: list[JobCheck] = []


def check(body: Body) -> Body:
    """Add the decorated coroutine function to `CHECKS`."""
    CHECKS.append(JobCheck(body.__name__, body))
    return body


async def run(one: JobCheck, make_store: JobStoreFactory) -> None:
    """Run one check on a fresh store, and close the store."""
    store = await make_store()
    try:
        await one.body(store)
    finally:
        await store.close()


async def run_all(make_store: JobStoreFactory) -> None:
    """Every check in turn; the first that fails raises `AssertionError` (or what the store raised)."""
    for one in CHECKS:
        await run(one, make_store)


_SEQ = itertools.count(1)


def job(tenant: str = "acme", *, lane: Lane = "pool", priority: JobPriority = "interactive",
        created_at: float | None = None, **fields: Any) -> JobRecord:
    """A new queued job with a fresh id; each one a little later than the last unless told."""
    n = next(_SEQ)
    at = time.time() + n * 1e-6 if created_at is None else created_at
    return JobRecord(id=f"job-{n}-{time.monotonic_ns()}", tenant=tenant, status="queued", lane=lane,
                     priority=priority, request={"prompt": f"task {n}"}, created_at=at, updated_at=at, **fields)


def ok(result: str = "done", cost_usd: float = 0.01) -> Outcome:
    return Outcome(status="succeeded", result={"text": result}, usage={"output_tokens": 3}, cost_usd=cost_usd)


async def submit_one(store: JobStore, record: JobRecord) -> JobRecord:
    [(stored, created)] = await store.submit([record])
    assert created, f"{record.id} was not created"
    return stored


async def claim_one(store: JobStore, consumer: str, *, lane: Lane = "pool", vt_s: float = LONG_VT_S,
                    now: float | None = None) -> JobRecord | None:
    got = await store.claim(lane, consumer, visibility_timeout_s=vt_s, limit=1, now=now)
    assert len(got) <= 1, got
    return got[0] if got else None


async def claim_when_expired(store: JobStore, consumer: str, *, lane: Lane = "pool",
                             vt_s: float = SHORT_VT_S) -> JobRecord | None:
    """Poll ``claim`` until it returns a job (an expired claim taken over): None after `WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = await claim_one(store, consumer, lane=lane, vt_s=vt_s)
        if got is not None:
            return got
        await asyncio.sleep(SHORT_VT_S / 10)
    return None


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S}s")
        await asyncio.sleep(SHORT_VT_S / 10)
