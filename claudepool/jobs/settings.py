"""``[jobs]``: durable asynchronous jobs, their lanes and their webhooks (composed by `claudepool.config`)."""

from __future__ import annotations

import contextlib
import ipaddress
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # The embedded store's file (without store.url): "" = jobs.sqlite3 in the state directory
    # ($STATE_DIRECTORY under systemd, else pool.workdir, else the temp directory).
    path: str = ""
    # Ended jobs (their results) are kept this long, then purged.
    retention_s: float = Field(default=7 * 86_400.0, gt=0)
    # A claimed job whose daemon sends no heartbeat for this long is delivered again (to any daemon).
    visibility_timeout_s: float = Field(default=60.0, gt=0)
    # Deliveries before a job is dead-lettered (a job that kills its daemon every time).
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Pool-lane jobs this daemon runs at once; they queue at their priority like any request, so
    # batch jobs use only what interactive requests leave free.
    max_running: int = Field(default=4, ge=1)
    # How often an idle runner looks for work another daemon (or a restart) left.
    poll_interval_s: float = Field(default=0.5, gt=0)
    # Empty looks in a row double that interval up to this (jobs submitted here wake the lane at once).
    poll_max_interval_s: float = Field(default=5.0, gt=0)
    # Jobs per bulk submission, and jobs (not ended) per tenant: past it, 429 too_many_jobs.
    max_bulk_jobs: int = Field(default=5_000, ge=1)
    max_open_jobs_per_tenant: int = Field(default=50_000, ge=1)
    # A job's attempt on a pool worker is bounded like a request (server.default_timeout_s unless
    # the job sets timeout_s).

    # The batch lane: the provider's Message Batches API through the gateway's upstream.
    batch_lane: bool = True
    # Jobs are gathered this long (or up to max_batch_requests) before a batch is created.
    batch_window_s: float = Field(default=5.0, ge=0)
    max_batch_requests: int = Field(default=1_000, ge=1, le=100_000)
    # A batch is polled first after batch_poll_first_s, then ever less often, at most every batch_poll_max_s.
    batch_poll_first_s: float = Field(default=1.0, gt=0)
    batch_poll_max_s: float = Field(default=60.0, gt=0)
    # The provider ends a batch within 24 hours; past this, the lane cancels it and fails its jobs.
    batch_timeout_s: float = Field(default=86_400.0, gt=0)
    # The model of a batch request whose profile names none (the CLI would pick its own).
    batch_default_model: str = Field(default="claude-sonnet-4-5", min_length=1)
    # A batch request's max_tokens (the Messages API requires one).
    batch_max_tokens: int = Field(default=4_096, ge=1)


class WebhookSettings(BaseModel):
    """``[webhooks]``: where job webhooks may go and how hard they are retried."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Exact host names or IP literals a webhook URL may name (any port); empty: webhooks are off.
    allowed_hosts: list[str] = Field(default_factory=list)
    # One attempt, connect to the end of the bounded read.
    timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    # Exponential back-off with full jitter: attempt n waits up to first_retry_s * 2**(n-1), at most max_retry_s.
    first_retry_s: float = Field(default=1.0, ge=0)
    max_retry_s: float = Field(default=300.0, ge=0)
    # What is read of an answer; the rest is never read (the connection is closed).
    max_response_bytes: int = Field(default=64 * 1024, ge=0)
    # For receivers (`verify`): how old or new a signature's timestamp may be.
    tolerance_s: float = Field(default=300.0, gt=0)
    # Attempts in flight at once, over every delivery (a delivery waiting out its back-off holds none).
    max_concurrent: int = Field(default=32, ge=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [normal_host(host) for host in hosts]


def normal_host(host: str) -> str:
    """``host`` as a URL's host compares: lower case, IDNA-encoded, IPv6 without brackets and
    compressed, without a trailing dot. Raises ValueError for what cannot be a host."""
    bare = host.strip().removeprefix("[").removesuffix("]").rstrip(".").lower()
    if not bare:
        raise ValueError(f"{host!r} is not a host")
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(bare).compressed
    try:
        encoded = bare.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{host!r} is not a host") from None
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", encoded):
        raise ValueError(f"{host!r} is not a host")
    return encoded
