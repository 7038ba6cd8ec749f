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
    env = { }                # extra environment for every worker (never a provider key: see [upstream])

    [capacity]               # one worker ceiling and RAM budget for all pools
    max_workers = 0          # 0 = derive from RAM ([pool]/profile max_workers cap each pool within it)

    [upstream]               # the provider; only the daemon's gateway holds its key
    api_key_file = "/etc/claudepool/anthropic.key"

    [profiles.default]       # spawn settings; more profiles may be defined
    args = []                # extra CLI args appended to the safe defaults

    [tenants.acme]
    key = "…"                # plain text or "sha256:<hex>"; only the hash is kept in memory
    profile = "default"      # used when a request names none
    profiles = ["default"]   # profiles this tenant may use; any other gets 403
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from claudepool.errors import ConfigError
from claudepool.gateway.settings import EgressSettings, Upstream, UpstreamProfileSettings, UpstreamSettings
from claudepool.jobs.settings import JobSettings, WebhookSettings
from claudepool.pool.config import CapacityConfig, PoolConfig
from claudepool.pool.memory import MiB
from claudepool.pool.profile import Profile, SpawnSettings, routes_upstream
from claudepool.sessions.settings import LimitOverrides, SessionOptions, SessionSettings
from claudepool.store.settings import StoreSettings
from claudepool.tenancy.routing import KIND_PATTERN, Router, RouteSettings, TierSettings
from claudepool.tenancy.settings import MeteringSettings, PriceSettings, TenantSettings, default_prices
from claudepool.tenancy.tenants import TenantRegistry, key_digest

# Each section's model lives in the package it configures; these names stay importable from here.
__all__ = [
    "CapacityConfig", "EgressSettings", "MeteringSettings", "MetricsSettings", "PoolSettings", "PriceSettings",
    "ProfileSettings", "RouteSettings", "ServerSettings", "SessionSettings", "Settings", "StoreSettings",
    "TenantSettings", "TierSettings", "UpstreamProfileSettings", "UpstreamSettings",
    "default_socket_path", "key_digest", "load_settings",
]

_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def default_socket_path() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "claudepool" if runtime else Path(tempfile.gettempdir()) / f"claudepool-{os.getuid()}"
    return str(base / "claudepool.sock")


def host_port(address: str) -> tuple[str, int]:
    """A validated ``HOST:PORT`` (``[v6]:PORT`` too) as a host and a port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket: str = Field(default_factory=default_socket_path)
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    http: str = "127.0.0.1:8787"
    # Bind ``http`` with SO_REUSEPORT, so several daemons on one host can listen on the same port
    # (the kernel spreads new connections over them). Every daemon sharing it must set it; each
    # still needs a Unix socket path of its own (a Unix socket cannot be shared).
    reuse_port: bool = False
    # HOST:PORT where this daemon alone serves /metrics, /healthz, /readyz and /v1/pool: beside a
    # shared port, a scrape of ``http`` reaches whichever daemon the kernel picks. Not shared (no
    # SO_REUSEPORT); "" (default): none; port 0: any free one (printed at start).
    metrics_http: str = ""
    admin_key: SecretStr = SecretStr("")
    max_prompt_bytes: int = Field(default=1 * MiB, gt=0)
    # A request's (or a session's) own system prompt. It reaches the CLI as one argument of its
    # command line, which Linux bounds at 128 KiB (MAX_ARG_STRLEN); it counts towards
    # max_prompt_bytes too.
    max_system_prompt_bytes: int = Field(default=64 * 1024, gt=0, le=128 * 1024 - 1)
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
    # The event loop the daemon runs on: uvloop (the ``fast`` extra) spends less CPU per request in
    # the loop's own machinery; asyncio needs nothing more. Chosen before anything is started.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
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
    # A streamed tool call's input and its result's preview are cut to this many bytes of UTF-8.
    tool_preview_bytes: int = Field(default=2048, ge=0, le=1 * MiB)
    # A request's input files (``files``): how many, each one's and all together's decoded bytes.
    # The HTTP body bound grows by their base64; a socket frame stays within max_frame_bytes.
    max_input_files: int = Field(default=32, ge=0)
    max_input_file_bytes: int = Field(default=1 * MiB, ge=0)
    max_input_bytes: int = Field(default=4 * MiB, ge=0)
    # ``return_files``: most patterns, and most files and bytes (all together, each file too) an
    # answer carries; more are named in files_omitted.
    max_return_files: int = Field(default=32, ge=0)
    max_return_bytes: int = Field(default=4 * MiB, ge=0)
    # GET /v1/sessions/{id}/files: most entries listed (and walked); most bytes of one file read.
    max_listed_files: int = Field(default=1000, gt=0)
    max_file_read_bytes: int = Field(default=8 * MiB, gt=0)

    # Origins a browser app may call the daemon from (CORS; `claudepool.daemon.cors`): exact
    # ``scheme://host[:port]``. Empty: none.
    cors_origins: list[str] = Field(default_factory=list)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"a CORS origin is scheme://host[:port] exactly (no path, no wildcard), "
                                 f"got {origin!r}")
        return origins

    @field_validator("http", "metrics_http")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"expected HOST:PORT or an empty string, got {value!r}")
        return value

    def http_host_port(self) -> tuple[str, int]:
        return host_port(self.http)


class PoolSettings(PoolConfig):
    """``[pool]``: every `PoolConfig` knob, plus what all profiles share."""

    claude_bin: str = "claude"
    env: dict[str, str] = Field(default_factory=dict)
    # Pools made on demand for system prompts other than their profile's (`claudepool.daemon.pools`):
    # at most this many live at once (stateless and session-capable ones alike), and each is closed
    # once it has had no worker and no waiter for on_demand_idle_s.
    max_on_demand_pools: int = Field(default=64, ge=1)
    on_demand_idle_s: float = Field(default=300.0, gt=0)

    def pool_config(self, **overrides: Any) -> PoolConfig:
        fields = self.model_dump(include=set(PoolConfig.model_fields))
        return PoolConfig(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})


class ProfileSettings(SpawnSettings):
    """``[profiles.NAME]``: how this profile's workers start (see `Profile`)."""

    model_config = ConfigDict(extra="forbid")

    # The spawn settings (model, system_prompt, tools, args, ...) are `SpawnSettings`' own fields.
    claude_bin: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    min_idle: int | None = Field(default=None, ge=0)
    max_workers: int | None = Field(default=None, ge=0)
    # Passed to the CLI as --max-budget-usd: a per-request cap (the CLI stops after the model call
    # that crosses it, so one call can overshoot). 0 = none.
    max_budget_usd: float = Field(default=0.0, ge=0)
    # Session limits for this profile (None = [sessions]).
    max_session_turns: int | None = Field(default=None, ge=0)
    max_session_age_s: float | None = Field(default=None, ge=0)
    max_session_context_tokens: int | None = Field(default=None, ge=0)


# The `Profile` fields a ``[profiles.NAME]`` section sets as they are; `Settings.profile` derives the others.
_SPAWN_FIELDS = set(SpawnSettings.model_fields)


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
    capacity: CapacityConfig = Field(default_factory=CapacityConfig)
    profiles: dict[str, ProfileSettings] = Field(default_factory=lambda: {"default": ProfileSettings()})
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    # What a request's ``kind`` chooses, and each tier's defaults and own routes (README, "Routing").
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    tiers: dict[str, TierSettings] = Field(default_factory=dict)
    store: StoreSettings = Field(default_factory=StoreSettings)
    pricing: dict[str, PriceSettings] = Field(default_factory=default_prices)
    metering: MeteringSettings = Field(default_factory=MeteringSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    egress: EgressSettings = Field(default_factory=EgressSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

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
        unknown_upstreams = sorted(set(self.upstream.profiles) - set(self.profiles))
        if unknown_upstreams:
            raise ValueError(f"upstream.profiles: unknown profiles {unknown_upstreams}")
        # Workers reach the provider only through the gateway, with a credential of their own: a
        # provider key or address in their environment would hand it to every tool they run.
        envs = [("pool.env", self.pool.env), *((f"profiles.{n}.env", p.env) for n, p in self.profiles.items())]
        for where, env in envs:
            routed = sorted(name for name in env if routes_upstream(name))
            if routed:
                raise ValueError(f"{where}: {', '.join(routed)} may not be set for workers: the provider's address "
                                 "and credentials go in [upstream] (base_url, api_key, api_key_file, auth_token), "
                                 "which only the daemon's gateway reads")
        # Models without their own entry are priced by pricing.default, which always exists.
        self.pricing.setdefault("default", default_prices()["default"])
        self._check_routes()
        digests: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            allowed = tenant.allowed_profiles()
            if tenant.profile not in allowed:
                raise ValueError(f"tenants.{name}: profile {tenant.profile!r} is not in its profiles list")
            unknown = sorted(allowed - set(self.profiles))
            if unknown:
                raise ValueError(f"tenants.{name}: unknown profiles {unknown}")
            if tenant.system_prompt is not None and (
                    len(tenant.system_prompt.encode()) > self.server.max_system_prompt_bytes):
                raise ValueError(f"tenants.{name}: system_prompt is over server.max_system_prompt_bytes "
                                 f"({self.server.max_system_prompt_bytes})")
            digest = key_digest(tenant.key.get_secret_value())
            if digest in digests:
                raise ValueError(f"tenants.{name} and tenants.{digests[digest]} have the same key")
            digests[digest] = name
        admin = self.server.admin_key.get_secret_value()
        if admin and key_digest(admin) in digests:
            raise ValueError(f"server.admin_key equals the key of tenants.{digests[key_digest(admin)]}")
        return self

    def _check_routes(self) -> None:
        """Every route's and tier's profile exists, kinds are names, and each tenant's tier exists
        with a default profile the tenant may use (else every request of it would be refused)."""
        places: list[tuple[str, str | None, RouteSettings | TierSettings]] = [
            (f"routes.{kind}", kind, route) for kind, route in self.routes.items()]
        for name, tier in self.tiers.items():
            if not re.match(_NAME, name):
                raise ValueError(f"tiers: name {name!r} must match {_NAME}")
            places.append((f"tiers.{name}", None, tier))
            places += [(f"tiers.{name}.routes.{kind}", kind, route) for kind, route in tier.routes.items()]
        for where, kind, place in places:
            if kind is not None and not re.match(KIND_PATTERN, kind):
                raise ValueError(f"{where}: a kind must match {KIND_PATTERN}")
            if place.profile is not None and place.profile not in self.profiles:
                raise ValueError(f"{where}: unknown profile {place.profile!r} (define [profiles.{place.profile}])")
            # The CLI switches effort at runtime among low..xhigh only: "max" is a spawn flag.
            own = self.profiles[place.profile].effort if place.profile is not None else None
            if place.effort == "max" and own != "max":
                raise ValueError(f"{where}: effort \"max\" cannot be switched to on a warm worker: define a "
                                 "profile with effort = \"max\" and name it here as profile")
            if place.effort is not None and own == "max" and place.effort != "max":
                raise ValueError(f"{where}: profile {place.profile!r} runs at effort \"max\", which a warm worker "
                                 "cannot be switched back to: name a profile with this effort instead")
        for name, tenant in self.tenants.items():
            if tenant.tier is None:
                continue
            found = self.tiers.get(tenant.tier)
            if found is None:
                raise ValueError(f"tenants.{name}: unknown tier {tenant.tier!r} (define [tiers.{tenant.tier}])")
            if found.profile is not None and found.profile not in tenant.allowed_profiles():
                raise ValueError(f"tenants.{name}: its tier {tenant.tier!r} defaults to profile {found.profile!r}, "
                                 "which is not in its profiles list")

    def router(self) -> Router:
        """The routing table: ``[routes]`` and ``[tiers]``."""
        return Router.of(self.routes, self.tiers)

    def profile(self, name: str) -> Profile:
        """The spawn profile ``name``, with ``[pool]`` defaults filled in."""
        p = self.profiles[name]
        return Profile(name=name, claude_bin=p.claude_bin or self.pool.claude_bin, env={**self.pool.env, **p.env},
                       max_budget_usd=p.max_budget_usd or None, **p.model_dump(include=_SPAWN_FIELDS))

    def upstream_for(self, name: str) -> Upstream:
        """Where profile ``name``'s model calls go (``[upstream]`` and its ``profiles.NAME``). Reads
        ``api_key_file`` and ``$ANTHROPIC_API_KEY``; raises `ConfigError` on an unreadable file."""
        return self.upstream.resolve(name, os.environ)

    def pool_config(self, name: str) -> PoolConfig:
        p = self.profiles[name]
        return self.pool.pool_config(min_idle=p.min_idle, max_workers=p.max_workers)

    def tenant_registry(self) -> TenantRegistry:
        """The configured tenants, with the admin and the metrics keys."""
        return TenantRegistry.of(self.tenants, admin_key=self.server.admin_key.get_secret_value(),
                                 metrics_key=self.metrics.key.get_secret_value())

    def session_options(self) -> SessionOptions:
        """What the session manager needs: ``[sessions]``, where transcripts rest, each profile's limits."""
        directory = Path(self.sessions.dir) if self.sessions.dir else (
            (self.pool.workdir or Path(os.environ.get("TMPDIR", "/tmp"))) / "claudepool-sessions")
        return SessionOptions(self.sessions, directory, {
            name: LimitOverrides(p.max_session_turns, p.max_session_age_s, p.max_session_context_tokens)
            for name, p in self.profiles.items()})


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
