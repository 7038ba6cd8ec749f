"""What every `JobStore` must do, one suite for every backend: SQLite, Redis, yours.

claudepool's own tests run it against `SqliteJobStore` and a real Redis (tests/test_job_store.py).
A third backend runs it the same way, one test per check::

    import pytest
    from claudepool.testing import job_conformance as conformance

    async def make_store() -> MyJobStore:
        store = MyJobStore(...)
        await store.start()
        return store

    @pytest.mark.parametrize("check", conformance.CHECKS, ids=str)
    async def test_my_store(check: conformance.JobCheck) -> None:
        await conformance.run(check, make_store)

or all at once, with no test framework: ``await conformance.run_all(make_store)``.

``make_store()`` returns a new, started store that holds no jobs; every check closes the store it
was given. Time is moved with ``claim(now=...)`` where the interface allows (deadlines); a claim's
expiry waits real time, a fraction of a second (`SHORT_VT_S`), because a store may keep visibility
on its server's clock (the Redis store keeps it as a stream entry's idle time).
"""

from __future__ import annotations

import asyncio
import time

from claudepool.errors import JobNotFound
from claudepool.jobs.model import JobFailure, Outcome, WebhookDelivery
from claudepool.jobs.store import JobStore
from claudepool.testing import job_conformance_bounds, job_conformance_claims
from claudepool.testing.conformance_kit import raises
from claudepool.testing.job_conformance_kit import (
    CHECKS,
    JobCheck,
    JobStoreFactory,
    check,
    claim_one,
    job,
    ok,
    run,
    run_all,
    submit_one,
)

__all__ = ["CHECKS", "JobCheck", "JobStoreFactory", "job_conformance_bounds", "job_conformance_claims", "run",
           "run_all"]

# -- submit, get, list ---------------------------------------------------------------------------


@check
async def submitted_jobs_are_got_and_listed_oldest_first(store: JobStore) -> None:
    mine = [job(metadata={"n": str(i)}) for i in range(3)]
    theirs = job("beta")
    replies = await store.submit([mine[0], theirs, mine[1], mine[2]])
    assert replies == [(mine[0], True), (theirs, True), (mine[1], True), (mine[2], True)]
    for record in mine:
        assert await store.get("acme", record.id) == record
    assert await store.list_jobs("acme") == mine
    assert await store.list_jobs("beta") == [theirs]
    assert await store.list_jobs("nobody") == []
    assert await store.list_jobs("acme", limit=2) == mine[:2]
    assert await store.list_jobs("acme", since=mine[1].created_at) == mine[1:]
    assert await store.list_jobs("acme", limit=0) == []


@check
async def list_jobs_filters_on_status(store: JobStore) -> None:
    first, second, third = job(), job(), job()
    await store.submit([first, second, third])
    await store.cancel("acme", second.id)
    assert [j.id for j in await store.list_jobs("acme", status="queued")] == [first.id, third.id]
    assert [j.id for j in await store.list_jobs("acme", status="cancelled")] == [second.id]
    assert [j.id for j in await store.list_jobs("acme", status="queued", limit=1)] == [first.id]
    assert await store.list_jobs("acme", status="succeeded") == []


@check
async def another_tenants_job_is_not_found(store: JobStore) -> None:
    record = await submit_one(store, job("acme"))
    with raises(JobNotFound):
        await store.get("beta", record.id)
    with raises(JobNotFound):
        await store.get("acme", "no-such-job")
    with raises(JobNotFound):
        await store.cancel("beta", record.id)
    with raises(JobNotFound):
        await store.settle("beta", record.id, ok())
    with raises(JobNotFound):
        await store.set_webhook("beta", record.id, WebhookDelivery(state="pending"))
    assert (await store.get("acme", record.id)).status == "queued"  # none of those touched it


# -- idempotency -------------------------------------------------------------------------------


@check
async def the_same_idempotency_key_gives_the_same_job(store: JobStore) -> None:
    first = await submit_one(store, job(idempotency_key="k1"))
    again = job(idempotency_key="k1", metadata={"other": "request"})
    assert await store.submit([again]) == [(first, False)]
    with raises(JobNotFound):
        await store.get("acme", again.id)
    assert await store.list_jobs("acme") == [first]


@check
async def an_idempotency_key_belongs_to_its_tenant(store: JobStore) -> None:
    a, b = job("acme", idempotency_key="shared"), job("beta", idempotency_key="shared")
    assert await store.submit([a, b]) == [(a, True), (b, True)]
    assert await store.get("beta", b.id) == b


@check
async def an_idempotency_key_repeated_within_one_submit_is_one_job(store: JobStore) -> None:
    a, b, c = job(idempotency_key="k"), job(idempotency_key="k"), job()
    assert await store.submit([a, b, c]) == [(a, True), (a, False), (c, True)]
    assert [j.id for j in await store.list_jobs("acme")] == [a.id, c.id]


# -- settle, cancel ----------------------------------------------------------------------------


@check
async def the_first_settle_wins(store: JobStore) -> None:
    record = await submit_one(store, job())
    assert await claim_one(store, "c1") is not None
    first, settled_now = await store.settle("acme", record.id, ok("first", cost_usd=0.5))
    assert settled_now
    assert (first.status, first.result, first.cost_usd) == ("succeeded", {"text": "first"}, 0.5)
    assert first.attempt_token is None and first.finished_at is not None
    failure = Outcome(status="failed", error=JobFailure(code="worker_crashed", message="x"), cost_usd=9.0)
    for late in (ok("second", cost_usd=2.0), failure):
        again, settled_again = await store.settle("acme", record.id, late)
        assert (again, settled_again) == (first, False)
    assert await store.get("acme", record.id) == first


@check
async def a_queued_job_is_not_settled(store: JobStore) -> None:
    record = await submit_one(store, job())
    assert await store.settle("acme", record.id, ok()) == (record, False)
    assert await store.get("acme", record.id) == record


@check
async def a_settle_after_a_cancel_changes_nothing(store: JobStore) -> None:
    record = await submit_one(store, job())
    claim = await claim_one(store, "c1")
    assert claim is not None and claim.attempt_token is not None
    cancelled = await store.cancel("acme", record.id)
    assert cancelled.status == "cancelled"
    assert cancelled.error is not None and cancelled.error.code == "cancelled"
    assert await store.settle("acme", record.id, ok()) == (cancelled, False)
    assert not await store.heartbeat("acme", record.id, claim.attempt_token, visibility_timeout_s=60)
    assert not await store.note_batch("acme", record.id, claim.attempt_token, "batch-1")
    assert await store.get("acme", record.id) == cancelled


@check
async def a_cancelled_queued_job_is_never_claimed(store: JobStore) -> None:
    record, other = job(), job()
    await store.submit([record, other])
    cancelled = await store.cancel("acme", record.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    got = await store.claim("pool", "c1", visibility_timeout_s=60, limit=10)
    assert [j.id for j in got] == [other.id]
    # Cancelling an ended job returns it as it is.
    assert await store.cancel("acme", record.id) == cancelled
    await store.settle("acme", other.id, ok())
    settled = await store.get("acme", other.id)
    assert await store.cancel("acme", other.id) == settled


@check
async def a_cancelled_running_job_is_not_claimed_again(store: JobStore) -> None:
    record = await submit_one(store, job())
    claim = await claim_one(store, "c1", vt_s=0.2)
    assert claim is not None
    await store.cancel("acme", record.id)
    # Past the claim's visibility: an ended job is not redelivered.
    await asyncio.sleep(0.3)  # the store's clock must pass: nothing to wait on
    assert await store.claim("pool", "c2", visibility_timeout_s=0.2, limit=5) == []
    assert (await store.get("acme", record.id)).status == "cancelled"


# -- note_batch, set_webhook, purge --------------------------------------------------------------


@check
async def note_batch_needs_the_live_claim(store: JobStore) -> None:
    record = await submit_one(store, job(lane="batch_api"))
    claim = await claim_one(store, "c1", lane="batch_api")
    assert claim is not None and claim.attempt_token is not None
    assert not await store.note_batch("acme", record.id, "not-the-token", "batch-x")
    assert await store.note_batch("acme", record.id, claim.attempt_token, "batch-1")
    assert (await store.get("acme", record.id)).batch_id == "batch-1"
    await store.settle("acme", record.id, ok())
    assert not await store.note_batch("acme", record.id, claim.attempt_token, "batch-2")
    assert (await store.get("acme", record.id)).batch_id == "batch-1"


@check
async def set_webhook_is_kept_on_the_record(store: JobStore) -> None:
    record = await submit_one(store, job())
    await store.set_webhook("acme", record.id, WebhookDelivery(state="pending"))
    assert (await store.get("acme", record.id)).webhook == WebhookDelivery(state="pending")
    await store.cancel("acme", record.id)
    delivered = WebhookDelivery(state="delivered", attempts=2, last_status=200, delivered_at=time.time())
    await store.set_webhook("acme", record.id, delivered)  # an ended job's webhook still moves
    stored = await store.get("acme", record.id)
    assert (stored.webhook, stored.status) == (delivered, "cancelled")


@check
async def purge_deletes_ended_jobs_only_and_frees_their_keys(store: JobStore) -> None:
    done, gone, waiting, dead = (job(idempotency_key="k-done"), job(idempotency_key="k-gone"), job(),
                                 job(max_attempts=0))
    await store.submit([done, gone, waiting])
    running = await submit_one(store, job(lane="batch_api"))
    assert await claim_one(store, "c1", lane="batch_api") is not None
    assert (await claim_one(store, "c1")) is not None  # done
    await store.settle("acme", done.id, ok())
    await store.cancel("acme", gone.id)
    await submit_one(store, dead)
    assert await claim_one(store, "c1", lane="pool") is not None  # waiting; then dead is dead-lettered
    await store.settle("acme", waiting.id, ok())
    assert await store.claim("pool", "c1", visibility_timeout_s=60, limit=5) == []
    assert (await store.get("acme", dead.id)).status == "dead"
    before = time.time() - 3600
    assert await store.purge(before) == 0
    assert await store.purge(time.time() + 1) == 4
    for purged in (done, gone, waiting, dead):
        with raises(JobNotFound):
            await store.get("acme", purged.id)
    assert [j.id for j in await store.list_jobs("acme")] == [running.id]
    assert await store.dead_letters() == []
    assert await store.purge(time.time() + 1) == 0
    # The idempotency key of a purged job is free again.
    again = job(idempotency_key="k-done")
    assert await store.submit([again]) == [(again, True)]
