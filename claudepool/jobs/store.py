"""Where jobs live: one interface, two stores (SQLite embedded, Redis shared by many daemons).

Every method is atomic on its own. A store never decides a rule itself: it loads a record, applies
the pure function of `claudepool.jobs.model` and writes the result back only if nobody moved the
record meanwhile (a transaction, or a compare-and-set on a version). The conformance suite
(`claudepool.testing.job_conformance`) holds both stores to the same behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from claudepool.jobs.model import JobRecord, JobStatus, Lane, Outcome, WebhookDelivery


class JobStore(Protocol):
    async def start(self) -> None:
        """Open (and create) what the store needs; before any other call."""
        ...

    async def submit(self, jobs: Sequence[JobRecord], *, max_open_per_tenant: int = 0
                     ) -> list[tuple[JobRecord, bool]]:
        """Store new ``queued`` jobs, in order, all at once. A job whose tenant already has a job with
        its ``idempotency_key`` is not stored again: its entry is that job and False. With
        ``max_open_per_tenant``, `TooManyJobs` (and nothing stored) when a tenant's queued and running
        jobs would exceed it, checked in the same atomic step as the write."""
        ...

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job; `JobNotFound` for another tenant's or an unknown id."""
        ...

    async def list_jobs(self, tenant: str, *, status: JobStatus | None = None, since: float | None = None,
                   limit: int = 100) -> list[JobRecord]:
        """The tenant's jobs created at or after ``since``, oldest first, at most ``limit``."""
        ...

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        """Up to ``limit`` jobs of ``lane`` for ``consumer``, ``interactive`` ones before ``batch``,
        oldest first: queued jobs and jobs whose claim expired. A claimed job past its deadline or its
        delivery cap is failed or dead-lettered instead and not returned: it is appended to ``ended``
        (so the claimant can tell its tenant, as of any job's end)."""
        ...

    async def heartbeat(self, tenant: str, job_id: str, token: str, *, visibility_timeout_s: float) -> bool:
        """Extend the claim; False if the job is no longer this attempt's (taken over, settled, cancelled)."""
        ...

    async def note_batch(self, tenant: str, job_id: str, token: str, batch_id: str) -> bool:
        """Record the provider batch the job went into; False as for `heartbeat`."""
        ...

    async def settle(self, tenant: str, job_id: str, outcome: Outcome) -> tuple[JobRecord, bool]:
        """End a running job with ``outcome``: the record and True for the first settle; the record as
        it stands and False when it had ended already (a redelivered attempt, a cancel)."""
        ...

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel a queued or running job (a running attempt sees its heartbeat fail); an ended job
        is returned as it is."""
        ...

    async def set_webhook(self, tenant: str, job_id: str, delivery: WebhookDelivery) -> None:
        ...

    async def purge(self, finished_before: float) -> int:
        """Delete ended jobs that finished before this time; how many."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[JobRecord]:
        """Dead-lettered jobs, oldest first (an operator's view)."""
        ...

    async def close(self) -> None:
        ...
