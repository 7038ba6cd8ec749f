"""Tenants and their keys.

Only SHA-256 digests of keys are kept in memory. A presented key is hashed and compared with every
digest in constant time, so neither the lookup's timing nor a memory dump reveals a key.

>>> registry = TenantRegistry([Tenant("acme", key_digest("k"), "default", frozenset({"default"}))])
>>> registry.authenticate("k").name
'acme'
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from claudepool.errors import Forbidden, Unauthorized
from claudepool.tenancy.models import resolve_all
from claudepool.tenancy.settings import TenantSettings

_SHA256 = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


def key_digest(key: str) -> str:
    """The hex SHA-256 of a key; a key written as ``sha256:<hex>`` is already a digest."""
    match = _SHA256.match(key)
    if match:
        return match.group(1).lower()
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_digest(key: str) -> str:
    # A presented key is always hashed as it is: sending "sha256:<digest>" copied from a config
    # file must not authenticate.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    profile: str
    profiles: frozenset[str]
    weight: float = 1.0
    max_concurrency: int = 0
    max_queued: int = 100
    max_queue_wait_s: float | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    daily_budget_usd: float = 0.0
    monthly_budget_usd: float = 0.0
    budget_mode: str = "soft"
    soft_stop_fraction: float = 0.9
    max_session_turns: int | None = None
    max_session_age_s: float | None = None
    max_session_context_tokens: int | None = None
    max_sessions: int | None = None
    # Full model ids a request may switch to, besides its profile's own (aliases resolved).
    models: frozenset[str] = frozenset()
    # The persona (None: the profile's own system prompt), and whether a request may send another.
    system_prompt: str | None = None
    allow_custom_system_prompt: bool = False
    tier: str | None = None
    max_request_budget_usd: float = 0.0

    @classmethod
    def of(cls, name: str, settings: TenantSettings) -> Tenant:
        """The tenant ``[tenants.NAME]`` configures; only its key's digest is kept."""
        return cls(name, key_digest(settings.key.get_secret_value()), settings.profile, settings.allowed_profiles(),
                   weight=settings.weight, max_concurrency=settings.max_concurrency, max_queued=settings.max_queued,
                   max_queue_wait_s=settings.max_queue_wait_s, requests_per_minute=settings.requests_per_minute,
                   tokens_per_minute=settings.tokens_per_minute, daily_budget_usd=settings.daily_budget_usd,
                   monthly_budget_usd=settings.monthly_budget_usd, budget_mode=settings.budget_mode,
                   soft_stop_fraction=settings.soft_stop_fraction, max_session_turns=settings.max_session_turns,
                   max_session_age_s=settings.max_session_age_s,
                   max_session_context_tokens=settings.max_session_context_tokens, max_sessions=settings.max_sessions,
                   models=resolve_all(settings.models), system_prompt=settings.system_prompt,
                   allow_custom_system_prompt=settings.allow_custom_system_prompt, tier=settings.tier,
                   max_request_budget_usd=settings.max_request_budget_usd)

    def system_prompt_for(self, profile_system_prompt: str | None, requested: str | None) -> str | None:
        """The system prompt a request (or a session) of this tenant runs with, on a profile whose own
        is ``profile_system_prompt``: ``requested`` if it sent one, else the tenant's persona, else the
        profile's. One that differs from that default needs ``allow_custom_system_prompt``
        (`Forbidden` otherwise): a persona is the operator's choice, not the caller's.

        >>> Tenant("a", "", "default", frozenset()).system_prompt_for("Be brief.", None)
        'Be brief.'
        """
        default = self.system_prompt if self.system_prompt is not None else profile_system_prompt
        if requested is None or requested == default:
            return default
        if not self.allow_custom_system_prompt:
            raise Forbidden("a system prompt of the request's own is not allowed for this tenant "
                            "(tenants.NAME.allow_custom_system_prompt): send none, or exactly its default")
        return requested

    @property
    def has_budget(self) -> bool:
        return self.daily_budget_usd > 0 or self.monthly_budget_usd > 0

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, profile={self.profile!r})"  # never the digest


class TenantRegistry:
    """Authenticates bearer keys to tenants, and the admin key."""

    def __init__(self, tenants: Iterable[Tenant], admin_key_sha256: str = "", metrics_key_sha256: str = "") -> None:
        self._tenants = {t.name: t for t in tenants}
        self._admin = admin_key_sha256
        self._metrics = metrics_key_sha256

    @classmethod
    def of(cls, tenants: Mapping[str, TenantSettings], *, admin_key: str = "", metrics_key: str = "") -> TenantRegistry:
        """The registry of the configured tenants, with the admin and the metrics key ("" = none)."""
        return cls((Tenant.of(name, t) for name, t in tenants.items()),
                   key_digest(admin_key) if admin_key else "", key_digest(metrics_key) if metrics_key else "")

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def __len__(self) -> int:
        return len(self._tenants)

    def names(self) -> list[str]:
        return sorted(self._tenants)

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant holding ``key``, or `Unauthorized`."""
        if key:
            digest = _presented_digest(key)
            found = None
            for tenant in self._tenants.values():
                if hmac.compare_digest(tenant.key_sha256, digest):
                    found = tenant
            if found is not None:
                return found
        raise Unauthorized("missing or unknown key")

    def is_admin(self, key: str | None) -> bool:
        return bool(key and self._admin and hmac.compare_digest(self._admin, _presented_digest(key)))

    def require_scraper(self, key: str | None) -> None:
        """For /metrics: the metrics key or the admin key; `Forbidden` for a tenant's key."""
        if self.is_admin(key) or bool(
                key and self._metrics and hmac.compare_digest(self._metrics, _presented_digest(key))):
            return
        self.authenticate(key)  # raises Unauthorized for a key nobody holds
        raise Forbidden("/metrics needs the metrics key or the admin key")

    def require_admin(self, key: str | None) -> None:
        """`Unauthorized` without a valid key; `Forbidden` for a tenant key on an admin endpoint."""
        if self.is_admin(key):
            return
        if not self._admin:
            raise Forbidden("the admin API is disabled: set server.admin_key")
        self.authenticate(key)  # raises Unauthorized for a key nobody holds
        raise Forbidden("this endpoint needs the admin key")
