"""The job conformance checks of ``max_open_per_tenant``: a tenant's queued and running jobs are
bounded in the same atomic step that stores them, so concurrent submissions cannot pass the bound."""

from __future__ import annotations

import asyncio

from claudepool.errors import TooManyJobs
from claudepool.jobs.store import JobStore
from claudepool.testing.conformance_kit import raises
from claudepool.testing.job_conformance_kit import check, claim_one, job, ok


@check
async def open_jobs_are_bounded_per_tenant_and_all_or_none(store: JobStore) -> None:
    await store.submit([job(), job()], max_open_per_tenant=3)
    with raises(TooManyJobs):
        await store.submit([job(), job()], max_open_per_tenant=3)  # two more would be four: neither is stored
    assert len(await store.list_jobs("acme")) == 2
    await store.submit([job("beta") for _ in range(3)], max_open_per_tenant=3)  # another tenant's own bound
    keyed = job(idempotency_key="k")
    await store.submit([keyed], max_open_per_tenant=3)
    # The same key again is the job already stored: it adds nothing, so it is not refused.
    [(again, created)] = await store.submit([job(idempotency_key="k")], max_open_per_tenant=3)
    assert again.id == keyed.id and not created
    with raises(TooManyJobs):
        await store.submit([job()], max_open_per_tenant=3)


@check
async def an_ended_job_makes_room(store: JobStore) -> None:
    await store.submit([job(), job()], max_open_per_tenant=2)
    claimed = await claim_one(store, "c1")
    assert claimed is not None
    running_counts = await store.submit([], max_open_per_tenant=2)
    assert running_counts == []
    with raises(TooManyJobs):
        await store.submit([job()], max_open_per_tenant=2)  # a running job is still open
    await store.settle("acme", claimed.id, ok())
    await store.submit([job()], max_open_per_tenant=2)
    queued = [j for j in await store.list_jobs("acme") if j.status == "queued"]
    await store.cancel("acme", queued[0].id)
    await store.submit([job()], max_open_per_tenant=2)
    assert len(await store.list_jobs("acme", status="queued")) + len(
        await store.list_jobs("acme", status="running")) == 2


@check
async def concurrent_submissions_never_pass_the_bound(store: JobStore) -> None:
    results = await asyncio.gather(*(store.submit([job()], max_open_per_tenant=5) for _ in range(20)),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, TooManyJobs)]
    assert len(refused) == 15 and len(results) - len(refused) == 5, results
    assert len(await store.list_jobs("acme")) == 5
