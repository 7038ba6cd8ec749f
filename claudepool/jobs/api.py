"""A job as the tenant submits it (``POST /v1/jobs``, the socket's ``job_submit``), and its record.

A job is a prompt (``prompt``, or a chat history in ``messages``) with the fields of a prompt request
that make sense without a client waiting: no stream, no files. ``lane`` picks who runs it: ``pool``
(a warm worker, at ``priority``), ``batch_api`` (the provider's Message Batches API at half price,
no tools, no session), or ``auto``: the batch lane for a job that can wait an hour or more
(``deadline_s`` ≥ 3600), needs no session, and whose profile has no tools, when the batch lane is
on; the pool otherwise.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from claudepool.errors import BadRequest
from claudepool.frontdoor.history import flatten
from claudepool.jobs.model import JobPriority, JobRecord, Lane
from claudepool.protocol.wire import PromptRequest, describe_validation_error

_REQUEST = ConfigDict(extra="forbid", strict=True)
# The batch lane's own reach: what waits an hour can wait for a batch.
AUTO_BATCH_DEADLINE_S = 3600.0


class JobMessage(BaseModel):
    model_config = _REQUEST

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)


class JobRequest(BaseModel):
    model_config = _REQUEST

    prompt: str | None = Field(default=None, min_length=1)
    messages: list[JobMessage] | None = Field(default=None, min_length=1)
    session: str | None = None
    profile: str | None = None
    system: str | None = None
    model: str | None = Field(default=None, min_length=1, max_length=256)
    kind: str | None = Field(default=None, min_length=1, max_length=64)
    max_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    priority: JobPriority = "batch"
    lane: Literal["pool", "batch_api", "auto"] = "auto"
    # Not started after this many seconds from submission: failed with deadline_exceeded.
    deadline_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # A batch-lane job whose provider request expires or errors is run on the pool instead.
    fallback_to_pool: bool = True
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)

    @model_validator(mode="after")
    def _one_prompt(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        if any(len(k) > 64 or len(v) > 512 for k, v in self.metadata.items()):
            raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return self

    def prompt_text(self) -> str:
        """The one prompt a pool worker is given: the prompt, or the history flattened."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return flatten([(m.role, m.content) for m in self.messages])

    def chat(self) -> list[dict[str, str]]:
        """The history as the Messages API takes it (the batch lane)."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def prompt_request(self, *, timeout_s: float | None = None) -> PromptRequest:
        """The prompt request a pool worker serves: `BadRequest` if it is not a valid one."""
        try:
            return PromptRequest(prompt=self.prompt_text(), session=self.session, profile=self.profile,
                                 system=self.system, model=self.model, kind=self.kind,
                                 max_budget_usd=self.max_budget_usd, timeout_s=timeout_s or self.timeout_s,
                                 priority=self.priority)
        except ValidationError as exc:
            raise BadRequest(f"invalid job: {describe_validation_error(exc)}") from None


class BulkJobRequest(BaseModel):
    model_config = _REQUEST

    jobs: list[JobRequest] = Field(min_length=1)


def parse_job(body: Any) -> JobRequest:
    try:
        return JobRequest.model_validate(body, strict=False) if isinstance(body, dict) else _not_an_object()
    except ValidationError as exc:
        raise BadRequest(f"invalid job: {describe_validation_error(exc)}") from None


def parse_bulk(body: Any, max_jobs: int) -> list[JobRequest]:
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise BadRequest('a bulk submission is {"jobs": [job, ...]}')
    if len(body["jobs"]) > max_jobs:
        raise BadRequest(f"at most {max_jobs} jobs per bulk submission (got {len(body['jobs'])})")
    try:
        return BulkJobRequest.model_validate(body, strict=False).jobs
    except ValidationError as exc:
        raise BadRequest(f"invalid job: {describe_validation_error(exc)}") from None


def _not_an_object() -> JobRequest:
    raise BadRequest("a job is a JSON object")


def choose_lane(job: JobRequest, *, batch_lane: bool, profile_has_tools: bool) -> Lane:
    """Where the job runs; `BadRequest` for a batch-lane job the batch lane cannot serve."""
    batchable = job.session is None and not profile_has_tools
    if job.lane == "batch_api":
        if not batch_lane:
            raise BadRequest("the batch lane is not enabled on this daemon (jobs.batch_lane)")
        if not batchable:
            raise BadRequest("a batch-lane job takes no session and runs on a profile without tools")
        return "batch_api"
    if job.lane == "auto" and batch_lane and batchable and (job.deadline_s or 0) >= AUTO_BATCH_DEADLINE_S:
        return "batch_api"
    return "pool"


def new_record(tenant: str, job: JobRequest, lane: Lane, *, idempotency_key: str | None, max_attempts: int,
               now: float | None = None) -> JobRecord:
    now = time.time() if now is None else now
    return JobRecord(id=f"job_{uuid.uuid4().hex}", tenant=tenant, status="queued", lane=lane, priority=job.priority,
                     request=job.model_dump(mode="json", exclude={"lane", "metadata"}, exclude_none=True),
                     metadata=dict(job.metadata), idempotency_key=idempotency_key, created_at=now, updated_at=now,
                     deadline_at=now + job.deadline_s if job.deadline_s is not None else None,
                     max_attempts=max_attempts)


def request_of(record: JobRecord) -> JobRequest:
    """The job's request, read back from its record."""
    return JobRequest.model_validate(record.request, strict=False)
