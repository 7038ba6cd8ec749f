"""``[upstream]``: the provider the gateway forwards model calls to, and the credential it uses.

Only the gateway reads this (and ``ANTHROPIC_API_KEY`` from the daemon's environment, the default
key when none is configured). Workers get the gateway's address and a credential of their own,
never any of it. `claudepool.config` composes the section; `UpstreamSettings.resolve` turns it into
the `Upstream` one pool's calls go to, reading ``api_key_file`` there.

>>> s = UpstreamSettings(api_key="sk-ant-main", profiles={"batch": {"base_url": "http://127.0.0.1:9"}})
>>> s.resolve("default", {}).base_url, s.resolve("batch", {}).base_url
('https://api.anthropic.com', 'http://127.0.0.1:9')
>>> s.resolve("batch", {}).headers["x-api-key"]
'sk-ant-main'

``admin_key`` (or ``admin_key_file``) is the organisation's Admin API key, which only `claudepool
reconcile` reads (`UpstreamSettings.admin_credential`), to fetch the provider's usage and cost
reports. It is no part of any `Upstream`: it never goes with a model call, and no worker sees it.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from claudepool.errors import ConfigError

DEFAULT_BASE_URL = "https://api.anthropic.com"
# The API version claudepool's own calls to the provider send (the Admin API, Message Batches); a
# worker's calls carry the CLI's own.
API_VERSION = "2023-06-01"
MiB = 1 << 20
# Headers the gateway sets itself on every forwarded call: extra_headers may not replace them.
_RESERVED_HEADERS = frozenset({
    "x-api-key", "authorization", "proxy-authorization", "host", "content-length", "transfer-encoding",
    "connection", "keep-alive", "upgrade", "te", "trailer", "accept-encoding",
})  # fmt: skip


def _check_base_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"expected an http(s) URL without query or fragment, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("the URL may not carry credentials: use api_key, api_key_file or auth_token")
    return value.rstrip("/")


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    reserved = sorted(name.lower() for name in headers if name.lower() in _RESERVED_HEADERS)
    if reserved:
        raise ValueError(f"extra_headers may not set {', '.join(reserved)}: the gateway sets them")
    return {name.lower(): value for name, value in headers.items()}


def _one_of_the_credentials(section: BaseModel) -> None:
    given = [name for name in ("api_key", "api_key_file", "auth_token") if _given(getattr(section, name))]
    if len(given) > 1:
        raise ValueError(f"set at most one of api_key, api_key_file and auth_token (got {', '.join(given)})")


class UpstreamProfileSettings(BaseModel):
    # ``[upstream.profiles.NAME]``: where this profile's calls go, over the section's defaults. Unset
    # fields keep the section's; a credential given here replaces the section's credential;
    # extra_headers are merged over the section's. (No docstring: it would enter the JSON schema.)
    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_file: str | None = None
    auth_token: SecretStr | None = None
    extra_headers: dict[str, str] = Field(default_factory=dict)
    # This override's account caps (unset: [upstream]'s). An override is an account of its own.
    requests_per_minute: int | None = Field(default=None, ge=0)
    input_tokens_per_minute: int | None = Field(default=None, ge=0)
    headroom_fraction: float | None = Field(default=None, gt=0, le=1)
    batch_fraction: float | None = Field(default=None, gt=0, le=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)

    @field_validator("extra_headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    @model_validator(mode="after")
    def _one_credential(self) -> UpstreamProfileSettings:
        _one_of_the_credentials(self)
        return self


class UpstreamSettings(BaseModel):
    """``[upstream]``: the provider's Messages API the gateway forwards to."""

    model_config = ConfigDict(extra="forbid")

    # The provider, or an Anthropic-compatible proxy (a path prefix is kept: https://proxy/anthropic).
    base_url: str = DEFAULT_BASE_URL
    # One credential: the key (x-api-key), a file holding it (read at start-up), or a bearer token
    # (Authorization: Bearer, for a proxy). None set: $ANTHROPIC_API_KEY of the daemon, if any.
    api_key: SecretStr = SecretStr("")
    api_key_file: str = ""
    auth_token: SecretStr = SecretStr("")
    # Sent with every call (after the worker's anthropic-version and anthropic-beta).
    extra_headers: dict[str, str] = Field(default_factory=dict)
    profiles: dict[str, UpstreamProfileSettings] = Field(default_factory=dict)
    # A connection to the provider that is not up within this is a failed call (502 to the CLI,
    # which retries it as it would the provider's own 5xx).
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Connections to the provider open at once, all workers together (kept alive and reused).
    max_connections: int = Field(default=100, gt=0)
    # The account's own limits (0: no cap), as the provider's console shows them. The gateway caps
    # every call of this account at headroom_fraction of them, all tenants together, before it
    # forwards; batch calls may fill only batch_fraction of that cap, so interactive ones find room.
    requests_per_minute: int = Field(default=0, ge=0)
    input_tokens_per_minute: int = Field(default=0, ge=0)
    headroom_fraction: float = Field(default=0.7, gt=0, le=1)
    batch_fraction: float = Field(default=0.5, gt=0, le=1)
    # A provider answer that sends no byte for this long is cut (0: never): before anything was
    # relayed, a 504 with x-should-retry: true; mid-stream, an SSE overloaded_error event. Both are
    # retried by the CLI, so a hung provider costs this, not the turn watchdog's minutes. It also
    # bounds the wait for a streamed call's headers, never a non-streamed call's (its whole body).
    idle_timeout_s: float = Field(default=30.0, ge=0)
    # A larger request body is refused (413) without reaching the provider (whose own limit is 32 MB).
    max_request_bytes: int = Field(default=32 * MiB, gt=0)
    # The organisation's Admin API key (sk-ant-admin…), or a file holding it: only `claudepool reconcile`
    # reads it, for the provider's usage and cost reports. Never sent with a model call, never given to
    # a worker, never logged.
    admin_key: SecretStr = SecretStr("")
    admin_key_file: str = ""

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_base_url(value)

    @field_validator("extra_headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    @model_validator(mode="after")
    def _one_credential(self) -> UpstreamSettings:
        _one_of_the_credentials(self)
        if self.admin_key.get_secret_value() and self.admin_key_file:
            raise ValueError("set at most one of admin_key and admin_key_file")
        return self

    def admin_credential(self) -> str | None:
        """The Admin API key (``admin_key``, else ``admin_key_file``'s content), None when neither is
        set. Raises `ConfigError` when the file cannot be read or is empty."""
        if self.admin_key.get_secret_value():
            return self.admin_key.get_secret_value()
        return _read_key_file(self.admin_key_file, "upstream.admin_key_file") if self.admin_key_file else None

    def resolve(self, profile: str, environ: Mapping[str, str]) -> Upstream:
        """Where ``profile``'s calls go and with which credential. Raises `ConfigError` when
        ``api_key_file`` cannot be read."""
        override = self.profiles.get(profile)
        where = "upstream"
        base_url, headers = self.base_url, dict(self.extra_headers)
        rpm, itpm = self.requests_per_minute, self.input_tokens_per_minute
        headroom, batch = self.headroom_fraction, self.batch_fraction
        auth = _auth(self.api_key, self.api_key_file, self.auth_token, where)
        if auth is None and environ.get("ANTHROPIC_API_KEY"):
            auth = ("x-api-key", environ["ANTHROPIC_API_KEY"])
        if override is not None:
            where = f"upstream.profiles.{profile}"
            base_url = override.base_url or base_url
            headers.update(override.extra_headers)
            auth = _auth(override.api_key, override.api_key_file, override.auth_token, where) or auth
            rpm = override.requests_per_minute if override.requests_per_minute is not None else rpm
            itpm = override.input_tokens_per_minute if override.input_tokens_per_minute is not None else itpm
            headroom = override.headroom_fraction or headroom
            batch = override.batch_fraction or batch
        if auth is not None:
            headers[auth[0]] = auth[1]
        return Upstream(where, base_url, headers, caps=Caps(requests_per_minute=_share(rpm, headroom),
                                                            input_tokens_per_minute=_share(itpm, headroom),
                                                            batch_fraction=batch))


@dataclass(frozen=True)
class Caps:
    """An account's caps as the gateway enforces them (0: none): the configured limits times the
    headroom, and the share of them batch calls may fill."""

    requests_per_minute: int = 0
    input_tokens_per_minute: int = 0
    batch_fraction: float = 1.0

    def __bool__(self) -> bool:
        return self.requests_per_minute > 0 or self.input_tokens_per_minute > 0


@dataclass(frozen=True)
class Upstream:
    """One provider endpoint as the gateway uses it: its URL and the headers every call gets (the
    credential among them). Its repr never shows a header's value."""

    name: str  # where it is configured: "upstream" or "upstream.profiles.NAME"
    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    caps: Caps = field(default_factory=Caps)

    @property
    def account(self) -> str:
        """The provider account's label in metrics: ``default``, or the profile of an
        ``[upstream.profiles.NAME]`` override. Never key material."""
        return self.name.removeprefix("upstream.profiles.") if self.name != "upstream" else "default"

    def __repr__(self) -> str:
        auth = "x-api-key" if "x-api-key" in self.headers else "bearer" if "authorization" in self.headers else "none"
        return f"<Upstream {self.name} {self.base_url} auth={auth}>"

    @property
    def has_credential(self) -> bool:
        return "x-api-key" in self.headers or "authorization" in self.headers

    def url(self, path_qs: str) -> str:
        """The provider's URL for a path (and query) the worker called."""
        return self.base_url + path_qs

    def secrets(self) -> list[str]:
        """The credential's value, for the log masker."""
        values = [self.headers.get("x-api-key", ""), self.headers.get("authorization", "").removeprefix("Bearer ")]
        return [v for v in values if v]


def _share(limit: int, fraction: float) -> int:
    """``fraction`` of a limit, at least 1 of a limit that is set (0 means no cap)."""
    return max(1, math.floor(limit * fraction)) if limit > 0 else 0


def _given(value: SecretStr | str | None) -> bool:
    return bool(value.get_secret_value() if isinstance(value, SecretStr) else value)


def _auth(api_key: SecretStr | None, api_key_file: str | None, auth_token: SecretStr | None,
          where: str) -> tuple[str, str] | None:
    if api_key is not None and api_key.get_secret_value():
        return "x-api-key", api_key.get_secret_value()
    if api_key_file:
        return "x-api-key", _read_key_file(api_key_file, f"{where}.api_key_file")
    if auth_token is not None and auth_token.get_secret_value():
        return "authorization", f"Bearer {auth_token.get_secret_value()}"
    return None


def _read_key_file(path: str, where: str) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{where}: {path} is empty")
    return key


class EgressSettings(BaseModel):
    """``[egress]``: the bounds of the egress proxy (`claudepool.gateway.egress`), through which a
    sandboxed worker reaches its profile's ``allowed_hosts`` (none by default)."""

    model_config = ConfigDict(extra="forbid")

    # A request line and headers larger than this are refused (431) before anything is resolved.
    max_head_bytes: int = Field(default=16 * 1024, ge=1024, le=1 * MiB)
    # The request's head must arrive within this (a client that trickles it holds nothing for long).
    head_timeout_s: float = Field(default=10.0, gt=0)
    # Resolving the name and connecting to it, together (504 past it).
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A tunnel that relays no byte either way for this long is closed.
    idle_timeout_s: float = Field(default=120.0, gt=0)
    # Connections open through the proxy at once, per worker (429 past it).
    max_tunnels: int = Field(default=32, gt=0)
