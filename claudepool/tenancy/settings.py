"""The configuration sections tenancy reads: ``[tenants.NAME]``, ``[pricing.MODEL]`` and ``[metering]``.

`claudepool.config` composes them into the daemon's settings (with the checks that span sections,
such as a tenant's profiles existing); nothing here knows about the rest of the configuration.
"""

from __future__ import annotations

import urllib.parse
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class TenantSettings(BaseModel):
    # ``[tenants.NAME]`` (no docstring: it would enter the configuration's JSON schema)
    model_config = ConfigDict(extra="forbid")

    key: SecretStr
    profile: str = "default"
    # Defaults to [profile].
    profiles: list[str] | None = None
    # Models a request may switch to (full ids or the aliases opus, sonnet, haiku), besides the
    # profile's own; empty = only the profile's model, no switching.
    models: list[str] = Field(default_factory=list)
    # The tenant's persona: the system prompt of its requests and sessions that send none (unset:
    # the profile's own). One a request sends that differs from it is refused (403) unless
    # allow_custom_system_prompt. Either runs on a pool made on demand for it (README, "System prompts").
    system_prompt: str | None = None
    allow_custom_system_prompt: bool = False
    # The ``[tiers.NAME]`` whose defaults and per-kind routes this tenant's requests get (README,
    # "Routing"); None: the global ``[routes]`` only.
    tier: str | None = None
    # Scheduling: share of the workers when several tenants wait, and bounds. 0 = unlimited.
    weight: float = Field(default=1.0, gt=0)
    max_concurrency: int = Field(default=0, ge=0)
    max_queued: int = Field(default=100, ge=0)
    max_queue_wait_s: float | None = Field(default=None, gt=0)
    # Limits and budgets. 0 = unlimited.
    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    daily_budget_usd: float = Field(default=0.0, ge=0)
    monthly_budget_usd: float = Field(default=0.0, ge=0)
    # The most one request may spend, all its model calls together, held at the gateway: a request's
    # ``max_budget_usd`` above it is refused, and a request naming none gets this one. 0 = no cap.
    max_request_budget_usd: float = Field(default=0.0, ge=0)
    # How the budgets hold each model call (see README, "Budgets"): "strict" reserves what a call can
    # cost at most and lowers its max_tokens to fit, so spend never exceeds a budget; "soft" reserves
    # an estimate learnt from recent calls and stops admitting at soft_stop_fraction of the budget.
    budget_mode: Literal["soft", "strict"] = "soft"
    soft_stop_fraction: float = Field(default=0.9, gt=0, le=1)
    # Session limits for this tenant (None = the profile's, else [sessions]).
    max_session_turns: int | None = Field(default=None, ge=0)
    max_session_age_s: float | None = Field(default=None, ge=0)
    max_session_context_tokens: int | None = Field(default=None, ge=0)
    # Open (not closed) sessions this tenant may hold (None = [sessions] max_sessions; 0 = no bound).
    max_sessions: int | None = Field(default=None, ge=0)
    # Where a job's end is POSTed (`claudepool.jobs.webhooks`), signed with webhook_secret: both or
    # neither. Its host must also be in [webhooks] allowed_hosts, checked when it is called.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None

    @field_validator("key")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("a tenant key may not be empty")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # The shape only (stdlib: the configuration loads no HTTP stack); the webhook sender parses
        # it again, as it calls it, against the allow-list.
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http(s) URL with a host, got {value!r}")
        if "@" in parts.netloc:
            raise ValueError("a webhook URL may not carry a user or password")
        return value

    @model_validator(mode="after")
    def _webhook_pair(self) -> TenantSettings:
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("set both webhook_url and webhook_secret, or neither (deliveries are signed)")
        if self.webhook_secret is not None and not self.webhook_secret.get_secret_value():
            raise ValueError("webhook_secret may not be empty")
        return self

    def allowed_profiles(self) -> frozenset[str]:
        return frozenset(self.profiles if self.profiles is not None else [self.profile])


class PriceSettings(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float = Field(ge=0)
    # A 5-minute cache write (the default TTL).
    cache_write_per_mtok: float = Field(ge=0)
    # A 1-hour cache write; unset, twice the input price, as the provider prices it.
    cache_write_1h_per_mtok: float | None = Field(default=None, ge=0)
    # What a Message Batches call costs, as a fraction of the prices above: the provider prices the
    # Batches API at 50% of its standard prices.
    batch_multiplier: float = Field(default=0.5, ge=0, le=1)


def default_prices() -> dict[str, PriceSettings]:
    # Deliberately high (Opus-class) so an unpriced model's reservation still bounds its cost.
    return {"default": PriceSettings(input_per_mtok=15, output_per_mtok=75, cache_read_per_mtok=1.5,
                                     cache_write_per_mtok=18.75)}


class MeteringSettings(BaseModel):
    """``[metering]``: how turns are recorded and how reservations are estimated."""

    model_config = ConfigDict(extra="forbid")

    # A local JSON-lines copy of every usage record, written at once (kept through store outages).
    ledger_file: str = ""
    # A model call's reservation (gateway/budget.py). Its input is bounded by the request's bytes
    # (a token is at least one byte) plus this allowance for what the provider adds itself (the
    # tool-use system prompt is a few hundred tokens).
    call_input_overhead_tokens: int = Field(default=1_000, ge=0)
    # Strict budgets: a call whose max_tokens must be lowered below this to fit is refused instead.
    min_call_output_tokens: int = Field(default=1_024, ge=1)
    # Soft budgets: a call reserves the mean cost of this many recent calls of its profile.
    soft_estimate_calls: int = Field(default=32, ge=1)
    # A call that does not fit only because other calls in flight hold the rest waits this long
    # for them to settle before it is refused.
    budget_wait_s: float = Field(default=30.0, ge=0)
    # Usage records waiting for the store when it is down; past this, the oldest are written to the
    # log at error level rather than held.
    max_buffered_records: int = Field(default=100_000, gt=0)
