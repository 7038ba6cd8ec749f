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
from collections.abc import Iterable
from dataclasses import dataclass

from claudepool.config import Settings, key_digest
from claudepool.errors import Forbidden, Unauthorized


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

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, profile={self.profile!r})"  # never the digest


class TenantRegistry:
    """Authenticates bearer keys to tenants, and the admin key."""

    def __init__(self, tenants: Iterable[Tenant], admin_key_sha256: str = "") -> None:
        self._tenants = {t.name: t for t in tenants}
        self._admin = admin_key_sha256

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantRegistry:
        admin = settings.server.admin_key.get_secret_value()
        return cls(
            (Tenant(name, key_digest(t.key.get_secret_value()), t.profile, t.allowed_profiles())
             for name, t in settings.tenants.items()),
            key_digest(admin) if admin else "",
        )

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

    def require_admin(self, key: str | None) -> None:
        """`Unauthorized` without a valid key; `Forbidden` for a tenant key on an admin endpoint."""
        if self.is_admin(key):
            return
        if not self._admin:
            raise Forbidden("the admin API is disabled: set server.admin_key")
        self.authenticate(key)  # raises Unauthorized for a key nobody holds
        raise Forbidden("this endpoint needs the admin key")
