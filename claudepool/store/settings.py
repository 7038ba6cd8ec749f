"""``[store]``: where limits, budgets and usage live (read by `claudepool.store.factory.build_store` and the
rate limiter; composed into the daemon's settings by `claudepool.config`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from claudepool.store.base import SETTLED_MAX_IDS


class StoreSettings(BaseModel):
    """``[store]``: where limits, budgets and usage live."""

    model_config = ConfigDict(extra="forbid")

    # "" keeps everything in this process; "redis://host:6379/0" or "unix:///path/redis.sock" shares it.
    url: SecretStr = SecretStr("")
    key_prefix: str = Field(default="cp", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # A reservation not settled within this time is released (a daemon crashed mid-turn).
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    ledger_max_records: int = Field(default=100_000, gt=0)
    # Settled record ids remembered, so a settle repeated after a lost reply counts once (see
    # `claudepool.store.base.SETTLED_MAX_IDS`): per tenant in Redis, in all in this process.
    settled_max_ids: int = Field(default=SETTLED_MAX_IDS, gt=0)
    socket_timeout_s: float = Field(default=2.0, gt=0)
