"""Daemon configuration: a TOML file, every key overridable by ``CLAUDEPOOL_…`` environment variables.

Precedence, highest first: environment, the TOML file (``--config FILE`` or ``$CLAUDEPOOL_CONFIG``),
defaults. Nested keys use ``__`` in variable names: ``CLAUDEPOOL_POOL__MIN_IDLE=4``,
``CLAUDEPOOL_TENANTS__ACME__KEY=…``, ``CLAUDEPOOL_POOL__ENV='{"ANTHROPIC_API_KEY": "…"}'``.

    [server]
    socket = "/run/claudepool/claudepool.sock"   # Unix socket, mode 0660; "" disables
    http = "127.0.0.1:8787"                      # HTTP bind; "" disables
    admin_key = "…"                              # bearer key for admin endpoints

    [pool]
    claude_bin = "claude"
    min_idle = 2
    max_workers = 0          # 0 = derive from RAM
    env = { }                # extra environment for every worker (e.g. ANTHROPIC_BASE_URL)

    [profiles.default]       # spawn settings; more profiles may be defined
    args = []                # extra CLI args appended to the safe defaults

    [tenants.acme]
    key = "…"                # plain text or "sha256:<hex>"; only the hash is kept in memory
    profile = "default"      # used when a request names none
    profiles = ["default"]   # profiles this tenant may use; any other gets 403
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from claudepool.errors import ConfigError
from claudepool.pool.memory import MiB
from claudepool.pool.pool import PoolConfig
from claudepool.pool.profile import Profile

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
_SHA256 = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


def key_digest(key: str) -> str:
    """The hex SHA-256 of a key; a key written as ``sha256:<hex>`` is already a digest."""
    match = _SHA256.match(key)
    if match:
        return match.group(1).lower()
    return hashlib.sha256(key.encode()).hexdigest()


def default_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "claudepool" if runtime else Path(tempfile.gettempdir()) / f"claudepool-{os.getuid()}"
    return str(base / "claudepool.sock")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket: str = Field(default_factory=default_socket_path)
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    http: str = "127.0.0.1:8787"
    admin_key: SecretStr = SecretStr("")
    max_prompt_bytes: int = Field(default=1 * MiB, gt=0)
    # A socket frame holds a prompt plus its envelope.
    max_frame_bytes: int = Field(default=2 * MiB, gt=0)
    # Prompts in flight on one socket connection; more get too_many_in_flight (each holds a task and
    # its prompt, and a tenant's own queue bound cannot stop a flood of tasks that fail fast).
    max_requests_per_connection: int = Field(default=256, gt=0)
    # GET /v1/ledger: most records in one answer (a larger limit is lowered to it; page with since),
    # and reads of one tenant (or of the admin) at once; more get too_many_in_flight.
    ledger_page_records: int = Field(default=10_000, gt=0)
    max_ledger_reads_per_tenant: int = Field(default=2, gt=0)
    default_timeout_s: float = Field(default=300.0, gt=0)
    max_timeout_s: float = Field(default=3600.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # Requests admitted but waiting for a worker, across all tenants and profiles.
    max_queued: int = Field(default=1000, gt=0)
    ready_timeout_s: float = Field(default=120.0, gt=0)
    # Listen backlog of every listener, HTTP and Unix, sockets handed over by systemd included (a
    # listen() on them again sets it): connections a burst of clients can queue before accept.
    backlog: int = Field(default=1024, gt=0)
    # HTTP deadlines against slow clients: accept (or a keep-alive connection's next byte) to the end of
    # the request head; the head to the end of the body; an idle keep-alive connection. Above the
    # aiohttp client's own 15 s keep-alive, so clients drop idle connections before the daemon does.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    # Client connections open at once, per front end (all HTTP listeners; all Unix sockets).
    max_connections: int = Field(default=1024, gt=0)

    @field_validator("http")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"expected HOST:PORT or an empty string, got {value!r}")
        return value

    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host.strip("[]"), int(port)


class PoolSettings(PoolConfig):
    """``[pool]``: every `PoolConfig` knob, plus what all profiles share."""

    claude_bin: str = "claude"
    env: dict[str, str] = Field(default_factory=dict)

    def pool_config(self, **overrides: Any) -> PoolConfig:
        fields = self.model_dump(include=set(PoolConfig.model_fields))
        return PoolConfig(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})


class ProfileSettings(BaseModel):
    """``[profiles.NAME]``: how this profile's workers start (see `Profile`)."""

    model_config = ConfigDict(extra="forbid")

    args: list[str] = Field(default_factory=list)
    claude_bin: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    tools: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    bare: bool = True
    include_partial_messages: bool = True
    read_claude_md: bool = False
    upstream_max_retries: int = Field(default=2, ge=0)
    upstream_timeout_ms: int = Field(default=60_000, gt=0)
    min_idle: int | None = Field(default=None, ge=0)
    max_workers: int | None = Field(default=None, ge=0)
    # Passed to the CLI as --max-budget-usd: a per-request cap (the CLI stops after the model call
    # that crosses it, so one call can overshoot). 0 = none.
    max_budget_usd: float = Field(default=0.0, ge=0)
    # Session limits for this profile (None = [sessions]).
    max_session_turns: int | None = Field(default=None, ge=0)
    max_session_age_s: float | None = Field(default=None, ge=0)
    max_session_context_tokens: int | None = Field(default=None, ge=0)


class TenantSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: SecretStr
    profile: str = "default"
    # Defaults to [profile].
    profiles: list[str] | None = None
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
    # Session limits for this tenant (None = the profile's, else [sessions]).
    max_session_turns: int | None = Field(default=None, ge=0)
    max_session_age_s: float | None = Field(default=None, ge=0)
    max_session_context_tokens: int | None = Field(default=None, ge=0)
    # Open (not closed) sessions this tenant may hold (None = [sessions] max_sessions; 0 = no bound).
    max_sessions: int | None = Field(default=None, ge=0)

    @field_validator("key")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("a tenant key may not be empty")
        return value

    def allowed_profiles(self) -> frozenset[str]:
        return frozenset(self.profiles if self.profiles is not None else [self.profile])


class StoreSettings(BaseModel):
    """``[store]``: where limits, budgets and usage live."""

    model_config = ConfigDict(extra="forbid")

    # "" keeps everything in this process; "redis://host:6379/0" or "unix:///path/redis.sock" shares it.
    url: SecretStr = SecretStr("")
    key_prefix: str = Field(default="cp", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    # A reservation not settled within this time is released (a daemon crashed mid-turn).
    reservation_ttl_s: float = Field(default=900.0, gt=0)
    ledger_max_records: int = Field(default=100_000, gt=0)
    socket_timeout_s: float = Field(default=2.0, gt=0)


class PriceSettings(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cache_read_per_mtok: float = Field(ge=0)
    cache_write_per_mtok: float = Field(ge=0)


def _default_prices() -> dict[str, PriceSettings]:
    # Deliberately high (Opus-class) so an unpriced model's reservation still bounds its cost.
    return {"default": PriceSettings(input_per_mtok=15, output_per_mtok=75, cache_read_per_mtok=1.5,
                                     cache_write_per_mtok=18.75)}


class MeteringSettings(BaseModel):
    """``[metering]``: how turns are recorded and how reservations are estimated."""

    model_config = ConfigDict(extra="forbid")

    # A local JSON-lines copy of every usage record, written at once (kept through store outages).
    ledger_file: str = ""
    # The reservation for a turn: prompt tokens (bytes / 3) + this overhead at the cache-write price,
    # plus this many output tokens at the output price. Raise them for long answers or tool use.
    reservation_overhead_tokens: int = Field(default=8_000, ge=0)
    reservation_output_tokens: int = Field(default=8_192, ge=0)
    # Usage records waiting for the store when it is down; past this, the oldest are written to the
    # log at error level rather than held.
    max_buffered_records: int = Field(default=100_000, gt=0)


class SessionSettings(BaseModel):
    """``[sessions]``: conversations, their session-capable workers, and their transcripts."""

    model_config = ConfigDict(extra="forbid")

    # Transcripts at rest: DIR/<tenant>/<session>.jsonl. Share it between daemons (with Redis) to
    # resume a session on any of them. "" = a directory under the pool's workdir (or the temp dir).
    dir: str = ""
    # Session-capable workers per profile (they keep transcripts; stateless workers never do).
    min_idle: int = Field(default=1, ge=0)
    max_workers: int = Field(default=4, ge=1)
    # An active session idle this long gives its worker back; its next turn resumes it elsewhere.
    park_idle_s: float = Field(default=120.0, gt=0)
    # A session unused this long expires (is closed).
    ttl_s: float = Field(default=86_400.0, gt=0)
    # Transcripts of closed sessions are deleted after this; 0 = at once.
    retention_s: float = Field(default=7 * 86_400.0, ge=0)
    # Bound on the transcripts directory; past it, closed transcripts go first, then the oldest
    # parked sessions are expired. 0 = unbounded.
    max_disk_bytes: int = Field(default=0, ge=0)
    # Limits (0 = none); tenants and profiles may set their own.
    max_turns: int = Field(default=0, ge=0)
    max_age_s: float = Field(default=0.0, ge=0)
    max_context_tokens: int = Field(default=0, ge=0)
    # At a limit: close with session_limit_reached, or carry on in a fresh session (its id returned).
    rollover: bool = False
    # Open (not closed) sessions per tenant; past it, creating one is 429 too_many_sessions. 0 = no bound.
    max_sessions: int = Field(default=100, ge=0)
    # How often to park idle sessions, and how often to sweep for expiry, retention and disk use.
    maintenance_interval_s: float = Field(default=1.0, gt=0)
    sweep_interval_s: float = Field(default=15.0, gt=0)


class MetricsSettings(BaseModel):
    """``[metrics]``: bounds on label values, so /metrics stays small whatever traffic arrives."""

    model_config = ConfigDict(extra="forbid")

    # Configured tenants beyond this many (sorted by name) are reported as tenant="__other__".
    max_tenant_labels: int = Field(default=100, ge=1)
    # Models beyond the first this many seen are reported as model="__other__".
    max_model_labels: int = Field(default=20, ge=1)
    # /metrics names every configured tenant with its traffic and spend, so it takes a bearer key:
    # this one (for the scraper: it opens nothing else) or the admin key. `public = true` drops the
    # check, for a listener no tenant can reach.
    key: SecretStr = SecretStr("")
    public: bool = False


class Settings(BaseSettings):
    """The whole daemon configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CLAUDEPOOL_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )
    toml_path: ClassVar[Path | None] = None

    server: ServerSettings = Field(default_factory=ServerSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    profiles: dict[str, ProfileSettings] = Field(default_factory=lambda: {"default": ProfileSettings()})
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    store: StoreSettings = Field(default_factory=StoreSettings)
    pricing: dict[str, PriceSettings] = Field(default_factory=_default_prices)
    metering: MeteringSettings = Field(default_factory=MeteringSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for name in [*self.profiles, *self.tenants]:
            if not re.match(_NAME, name) or name in (".", ".."):
                raise ValueError(f"name {name!r} must match {_NAME} (and not be . or ..: it names directories)")
        if not self.profiles:
            raise ValueError("at least one profile must be defined")
        # Models without their own entry are priced by pricing.default, which always exists.
        self.pricing.setdefault("default", _default_prices()["default"])
        digests: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            allowed = tenant.allowed_profiles()
            if tenant.profile not in allowed:
                raise ValueError(f"tenants.{name}: profile {tenant.profile!r} is not in its profiles list")
            unknown = sorted(allowed - set(self.profiles))
            if unknown:
                raise ValueError(f"tenants.{name}: unknown profiles {unknown}")
            digest = key_digest(tenant.key.get_secret_value())
            if digest in digests:
                raise ValueError(f"tenants.{name} and tenants.{digests[digest]} have the same key")
            digests[digest] = name
        admin = self.server.admin_key.get_secret_value()
        if admin and key_digest(admin) in digests:
            raise ValueError(f"server.admin_key equals the key of tenants.{digests[key_digest(admin)]}")
        return self

    def profile(self, name: str) -> Profile:
        """The spawn profile ``name``, with ``[pool]`` defaults filled in."""
        p = self.profiles[name]
        return Profile(
            name=name,
            claude_bin=p.claude_bin or self.pool.claude_bin,
            model=p.model,
            system_prompt=p.system_prompt,
            tools=tuple(p.tools),
            args=tuple(p.args),
            env={**self.pool.env, **p.env},
            bare=p.bare,
            include_partial_messages=p.include_partial_messages,
            read_claude_md=p.read_claude_md,
            upstream_max_retries=p.upstream_max_retries,
            upstream_timeout_ms=p.upstream_timeout_ms,
            max_budget_usd=p.max_budget_usd or None,
        )

    def pool_config(self, name: str) -> PoolConfig:
        p = self.profiles[name]
        return self.pool.pool_config(min_idle=p.min_idle, max_workers=p.max_workers)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the configuration, or raise `ConfigError` with every problem spelled out."""
    if path is None and os.environ.get("CLAUDEPOOL_CONFIG"):
        path = os.environ["CLAUDEPOOL_CONFIG"]
    toml_path = Path(path) if path else None
    if toml_path is not None:
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path} does not exist")
        try:
            tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_path} is not valid TOML: {exc}") from None
    settings_cls = type("Settings", (Settings,), {"toml_path": toml_path})
    try:
        settings: Settings = settings_cls(**overrides)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {toml_path}" if toml_path else ""
        raise ConfigError(f"invalid configuration{where} (or CLAUDEPOOL_* variables):\n{problems}") from None
    return settings
