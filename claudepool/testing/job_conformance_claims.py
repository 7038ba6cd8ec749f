"""The job conformance checks of claiming: order, exclusivity, expiry, heartbeats, the delivery cap,
deadlines, and many consumers at once (see `claudepool.testing.job_conformance`)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from claudepool.jobs.model import JobRecord
from claudepool.jobs.store import JobStore
from claudepool.testing.job_conformance_kit import (
    HELD_VT_S,
    LONG_VT_S,
    SHORT_VT_S,
    WAIT_S,
    check,
    claim_one,
    claim_when_expired,
    job,
    ok,
    submit_one,
    wait_until,
)

# -- order ---------------------------------------------------------------------------------------


@check
async def interactive_jobs_are_claimed_before_batch_ones_within_their_lane(store: JobStore) -> None:
    old_batch = job(priority="batch")
    other_lane = job(lane="batch_api")
    newer_interactive = job(priority="interactive")
    newest_batch = job(priority="batch", tenant="beta")
    await store.submit([old_batch, other_lane, newer_interactive, newest_batch])
    got = await store.claim("pool", "c1", visibility_timeout_s=LONG_VT_S, limit=10)
    assert [j.id for j in got] == [newer_interactive.id, old_batch.id, newest_batch.id]
    assert all(j.status == "running" and j.claimed_by == "c1" and j.attempts == 1 for j in got)
    assert [j.id for j in await store.claim("batch_api", "c1", visibility_timeout_s=LONG_VT_S, limit=10)] == [
        other_lane.id]
    assert await store.claim("pool", "c2", visibility_timeout_s=LONG_VT_S, limit=10) == []


@check
async def jobs_are_claimed_oldest_first(store: JobStore) -> None:
    records = [job() for _ in range(5)]
    await store.submit(records)
    order = []
    for _ in records:
        got = await claim_one(store, "c1")
        assert got is not None
        order.append(got.id)
    assert order == [r.id for r in records]
    assert await claim_one(store, "c1") is None


@check
async def a_claim_carries_a_fresh_token_and_visibility(store: JobStore) -> None:
    record = await submit_one(store, job())
    now = time.time()
    got = await claim_one(store, "c1", vt_s=30.0, now=now)
    assert got is not None and got.attempt_token
    assert got.visible_at == now + 30.0
    assert await store.get("acme", record.id) == got


# -- exclusivity and expiry ----------------------------------------------------------------------


@check
async def two_consumers_never_claim_the_same_job(store: JobStore) -> None:
    records = [job(priority="batch" if i % 3 else "interactive") for i in range(50)]
    await store.submit(records)
    claimed: Counter[str] = Counter()

    async def consume(name: str) -> None:
        while True:
            got = await store.claim("pool", name, visibility_timeout_s=LONG_VT_S, limit=3)
            if not got:
                return
            claimed.update(j.id for j in got)
            await asyncio.sleep(0)

    await asyncio.gather(consume("c1"), consume("c2"))
    assert claimed == Counter({r.id: 1 for r in records}), [k for k, n in claimed.items() if n != 1]


@check
async def an_expired_claim_is_taken_over_and_the_old_token_is_refused(store: JobStore) -> None:
    record = await submit_one(store, job())
    # A longer visibility than the taker's: its claims see the job held (not merely idle) at first.
    first = await claim_one(store, "c1", vt_s=HELD_VT_S)
    assert first is not None and first.attempt_token is not None
    assert await claim_one(store, "c2", vt_s=SHORT_VT_S) is None  # held by a live claim
    second = await claim_when_expired(store, "c2")
    assert second is not None, "the expired claim was not taken over"
    assert (second.id, second.attempts, second.claimed_by) == (record.id, 2, "c2")
    assert second.attempt_token not in (None, first.attempt_token)
    assert not await store.heartbeat("acme", record.id, first.attempt_token, visibility_timeout_s=LONG_VT_S)
    assert not await store.note_batch("acme", record.id, first.attempt_token, "batch-old")
    assert second.attempt_token is not None
    assert await store.heartbeat("acme", record.id, second.attempt_token, visibility_timeout_s=LONG_VT_S)
    assert (await store.get("acme", record.id)).attempt_token == second.attempt_token


@check
async def heartbeats_keep_the_claim(store: JobStore) -> None:
    record = await submit_one(store, job())
    held = await claim_one(store, "c1", vt_s=HELD_VT_S)
    assert held is not None and held.attempt_token is not None
    # Well past one visibility timeout, a heartbeat every fifth of one (a slow machine has margin).
    until = time.monotonic() + 4 * HELD_VT_S
    while time.monotonic() < until:
        assert await store.heartbeat("acme", record.id, held.attempt_token, visibility_timeout_s=HELD_VT_S)
        assert await claim_one(store, "c2", vt_s=HELD_VT_S) is None
        await asyncio.sleep(HELD_VT_S / 5)
    after = await store.get("acme", record.id)
    assert (after.attempt_token, after.attempts, after.claimed_by) == (held.attempt_token, 1, "c1")
    # Unattended, it expires as usual.
    taken = await claim_when_expired(store, "c2", vt_s=HELD_VT_S)
    assert taken is not None and taken.attempts == 2


@check
async def a_job_past_its_delivery_cap_is_dead_lettered(store: JobStore) -> None:
    record = await submit_one(store, job(max_attempts=2))
    first = await claim_one(store, "c1", vt_s=SHORT_VT_S)
    second = await claim_when_expired(store, "c2")
    assert first is not None and second is not None and second.attempts == 2
    assert second.attempt_token is not None

    async def dead() -> bool:
        assert await claim_one(store, "c3", vt_s=SHORT_VT_S) is None  # never returned: dead-lettered
        return (await store.get("acme", record.id)).status == "dead"

    await wait_until(dead, "the third delivery did not dead-letter the job")
    final = await store.get("acme", record.id)
    assert final.error is not None and final.error.code == "delivery_limit"
    assert final.finished_at is not None and final.attempt_token is None and final.attempts == 2
    assert [j.id for j in await store.dead_letters()] == [record.id]
    assert not await store.heartbeat("acme", record.id, second.attempt_token, visibility_timeout_s=LONG_VT_S)
    assert await store.settle("acme", record.id, ok()) == (final, False)


@check
async def dead_letters_are_listed_oldest_first(store: JobStore) -> None:
    # No delivery allowed at all: the first claim dead-letters each.
    records = [job(max_attempts=0, tenant=tenant) for tenant in ("acme", "beta", "acme")]
    await store.submit(records)
    ended: list[JobRecord] = []
    for _ in records:
        assert await store.claim("pool", "c1", visibility_timeout_s=LONG_VT_S, ended=ended) == []
    assert [(j.id, j.status) for j in ended] == [(r.id, "dead") for r in records]
    assert [j.id for j in await store.dead_letters()] == [r.id for r in records]
    assert [j.id for j in await store.dead_letters(limit=2)] == [r.id for r in records[:2]]


@check
async def a_job_past_its_deadline_fails_instead_of_running(store: JobStore) -> None:
    now = time.time()
    late = job(deadline_at=now + 100)
    fine = job()
    await store.submit([late, fine])
    ended: list[JobRecord] = []
    got = await store.claim("pool", "c1", visibility_timeout_s=LONG_VT_S, limit=1, now=now + 200, ended=ended)
    assert [j.id for j in got] == [fine.id]  # the late one ended, and the claim went on to the next
    assert [(j.id, j.status) for j in ended] == [(late.id, "failed")]  # told, so its tenant can be
    failed = await store.get("acme", late.id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "deadline_exceeded"
    assert failed.finished_at == now + 200
    assert await store.dead_letters() == []
    assert await store.claim("pool", "c1", visibility_timeout_s=LONG_VT_S, limit=5, now=now + 200) == []


@check
async def a_job_before_its_deadline_runs(store: JobStore) -> None:
    now = time.time()
    record = await submit_one(store, job(deadline_at=now + 100))
    got = await claim_one(store, "c1", now=now + 50)
    assert got is not None and got.id == record.id and got.status == "running"


# -- many consumers ------------------------------------------------------------------------------


@check
async def many_consumers_settle_each_job_exactly_once(store: JobStore) -> None:
    records = [job(lane="pool", priority="batch" if i % 2 else "interactive", tenant=f"t{i % 3}")
               for i in range(200)]
    for start in range(0, len(records), 50):
        await store.submit(records[start:start + 50])
    settled: Counter[str] = Counter()
    delivered: Counter[str] = Counter()

    async def consume(name: str) -> None:
        while True:
            got = await store.claim("pool", name, visibility_timeout_s=LONG_VT_S, limit=5)
            if not got:
                return
            for claimed in got:
                delivered[claimed.id] += 1
                _, first = await store.settle(claimed.tenant, claimed.id, ok(name))
                if first:
                    settled[claimed.id] += 1

    async with asyncio.timeout(WAIT_S * 6):
        await asyncio.gather(*(consume(f"c{i}") for i in range(4)))
    # No claim expired (a minute's visibility): one delivery each, and one first settle each.
    assert delivered == Counter({r.id: 1 for r in records}), [k for k, n in delivered.items() if n != 1]
    assert settled == Counter({r.id: 1 for r in records})
    for record in records[::20]:
        final = await store.get(record.tenant, record.id)
        assert final.status == "succeeded" and final.attempts == 1
