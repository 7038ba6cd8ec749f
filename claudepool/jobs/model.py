"""A durable job's record and the moves between its states, as pure functions.

A job is submitted ``queued``; a consumer (one daemon's runner, or its batch lane) claims it, which
makes it ``running`` with a fresh ``attempt_token`` and a visibility deadline (``visible_at``) that
the consumer's heartbeats push forward. A claim whose deadline passes is taken over by another
claim (at-least-once execution) until ``max_attempts`` deliveries are spent; then the job is
``dead`` (dead-lettered). The first settle of a job wins: a late attempt's settle, or a settle after
a cancel, changes nothing, so the tenant sees one result, one usage and one cost per job.

The stores (`claudepool.jobs.sqlite_store`, `claudepool.jobs.redis_store`) keep these records and
apply these functions atomically; the rules live here once.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "dead"]
Lane = Literal["pool", "batch_api"]
JobPriority = Literal["interactive", "batch"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "dead"})
LANES: tuple[Lane, ...] = ("pool", "batch_api")
PRIORITIES: tuple[JobPriority, ...] = ("interactive", "batch")

# Which status may follow which; a move not listed is refused by the functions below.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "dead", "failed"}),
    "running": frozenset({"running", "succeeded", "failed", "cancelled", "dead"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "dead": frozenset(),
}

_RECORD = ConfigDict(strict=True, frozen=True, extra="forbid")


class JobFailure(BaseModel):
    """Why a job failed: the code and message of the `ClaudepoolError` (or the provider's reason)."""

    model_config = _RECORD

    code: str
    message: str


class Outcome(BaseModel):
    """What one attempt ends with: a result (succeeded) or an error (failed)."""

    model_config = _RECORD

    status: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: JobFailure | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    cost_usd: float = 0.0


class WebhookDelivery(BaseModel):
    """Where the job's completion webhook stands (see `claudepool.jobs.webhooks`)."""

    model_config = _RECORD

    state: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    next_attempt_at: float | None = None


class JobRecord(BaseModel):
    model_config = _RECORD

    id: str
    tenant: str
    status: JobStatus
    lane: Lane
    priority: JobPriority
    # The job's request as JSON (a `claudepool.jobs.api.JobRequest` without lane and metadata).
    request: dict[str, Any]
    metadata: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = None
    created_at: float
    updated_at: float
    # Unix time after which the job is not started (it fails with ``deadline_exceeded``).
    deadline_at: float | None = None
    # Deliveries so far; the claim that would make it exceed ``max_attempts`` dead-letters it.
    attempts: int = 0
    max_attempts: int = 3
    # The current claim's: a consumer proves with the token that it still holds the job.
    attempt_token: str | None = None
    claimed_by: str | None = None
    visible_at: float | None = None
    # The provider batch holding this job (batch lane), so a redelivered claim resumes it instead
    # of sending the job again.
    batch_id: str | None = None
    result: dict[str, Any] | None = None
    error: JobFailure | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    cost_usd: float = 0.0
    finished_at: float | None = None
    webhook: WebhookDelivery | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def view(self) -> dict[str, Any]:
        """What the tenant sees: everything but the claim's internals."""
        return self.model_dump(mode="json", exclude={"attempt_token", "claimed_by", "visible_at", "tenant"})


class TransitionRefused(ValueError):
    """A move the table does not allow (a store turns it into a no-op or a `JobConflict`)."""


def _moved(job: JobRecord, status: JobStatus, now: float, **changes: Any) -> JobRecord:
    if status not in TRANSITIONS[job.status]:
        raise TransitionRefused(f"job {job.id}: {job.status} -> {status}")
    return job.model_copy(update={"status": status, "updated_at": now, **changes})


def new_token() -> str:
    return secrets.token_hex(16)


def claimed(job: JobRecord, consumer: str, now: float, visibility_timeout_s: float,
            token: str | None = None) -> JobRecord:
    """A claim of a queued job, or of a running one whose visibility deadline has passed: the next
    attempt, or ``dead`` when the attempts are spent, or ``failed`` past its deadline."""
    if job.status == "running" and (job.visible_at is None or job.visible_at > now):
        raise TransitionRefused(f"job {job.id} is held by a live claim")
    if job.deadline_at is not None and now > job.deadline_at:
        return _moved(job, "failed", now, finished_at=now, attempt_token=None, visible_at=None,
                      error=JobFailure(code="deadline_exceeded", message="the job's deadline passed before it ran"))
    if job.attempts >= job.max_attempts:
        return _moved(job, "dead", now, finished_at=now, attempt_token=None, visible_at=None,
                      error=JobFailure(code="delivery_limit",
                                     message=f"the job was delivered {job.attempts} times without settling"))
    return _moved(job, "running", now, attempts=job.attempts + 1, attempt_token=token or new_token(),
                  claimed_by=consumer, visible_at=now + visibility_timeout_s)


def heartbeat(job: JobRecord, token: str, now: float, visibility_timeout_s: float) -> JobRecord:
    """The claim holder's proof of life: pushes the visibility deadline forward."""
    if job.status != "running" or job.attempt_token != token:
        raise TransitionRefused(f"job {job.id}: the claim is no longer this attempt's")
    return job.model_copy(update={"visible_at": now + visibility_timeout_s, "updated_at": now})


def settled(job: JobRecord, outcome: Outcome, now: float) -> JobRecord:
    """The first settle of a job; any attempt's (the job's result is the first one to arrive)."""
    if job.terminal or job.status == "queued":
        raise TransitionRefused(f"job {job.id} is {job.status}: nothing to settle")
    return _moved(job, outcome.status, now, result=outcome.result, error=outcome.error, usage=dict(outcome.usage),
                  cost_usd=outcome.cost_usd, finished_at=now, attempt_token=None, visible_at=None)


def cancelled(job: JobRecord, now: float) -> JobRecord:
    if job.terminal:
        raise TransitionRefused(f"job {job.id} is already {job.status}")
    return _moved(job, "cancelled", now, finished_at=now, attempt_token=None, visible_at=None,
                  error=JobFailure(code="cancelled", message="the job was cancelled"))


def with_batch(job: JobRecord, token: str, batch_id: str, now: float) -> JobRecord:
    if job.status != "running" or job.attempt_token != token:
        raise TransitionRefused(f"job {job.id}: the claim is no longer this attempt's")
    return job.model_copy(update={"batch_id": batch_id, "updated_at": now})
