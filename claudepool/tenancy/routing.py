"""Routing: what a request's ``kind`` and its tenant's tier choose (a profile, a model, an effort).

``[routes.KIND]`` sets ``profile``, ``model`` and ``effort`` (each optional) for the requests that
name ``kind = "KIND"``; ``[tiers.NAME]`` gives the tenants with ``tier = "NAME"`` their own
defaults and, under ``routes``, their own per-kind overrides. Each field is resolved on its own,
the first that sets it winning:

1. the request's own field (``profile``, ``model``; a request has no effort field),
2. the tenant's tier's route for the kind (``tiers.T.routes.KIND``),
3. the global route for the kind (``routes.KIND``),
4. the tier's default (``tiers.T.profile`` / ``model`` / ``effort``),
5. the tenant's ``profile``, and that profile's own model and effort.

A kind neither the tier nor the global routes know is refused (`UnknownKind`, 400). What is
resolved is only a choice: admission still checks it against the tenant's allow lists (a profile
outside ``tenants.NAME.profiles`` is 403, a model outside ``tenants.NAME.models`` is refused as a
request naming it would be), so a route never widens what a tenant may use.

>>> router = Router({"code_review": Route(model="sonnet", effort="medium")},
...                 {"free": Tier(routes={"code_review": Route(model="haiku")})})
>>> router.resolve(tier="free", kind="code_review", profile=None, model=None)
Resolved(profile=None, model='haiku', effort='medium')
>>> router.resolve(tier=None, kind="code_review", profile=None, model="opus")
Resolved(profile=None, model='opus', effort='medium')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from claudepool.errors import UnknownKind

Effort = Literal["low", "medium", "high", "xhigh", "max"]
KIND_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class RouteSettings(BaseModel):
    # ``[routes.KIND]`` and ``[tiers.NAME.routes.KIND]`` (no docstring: it would enter the schema)
    model_config = ConfigDict(extra="forbid")

    profile: str | None = None
    model: str | None = Field(default=None, min_length=1, max_length=256)
    effort: Effort | None = None


class TierSettings(BaseModel):
    # ``[tiers.NAME]``: the defaults of this tier's tenants, and their per-kind overrides
    model_config = ConfigDict(extra="forbid")

    profile: str | None = None
    model: str | None = Field(default=None, min_length=1, max_length=256)
    effort: Effort | None = None
    routes: dict[str, RouteSettings] = Field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    profile: str | None = None
    model: str | None = None
    effort: Effort | None = None

    @classmethod
    def of(cls, settings: RouteSettings | TierSettings) -> Route:
        return cls(settings.profile, settings.model, settings.effort)


@dataclass(frozen=True)
class Tier:
    default: Route = Route()
    routes: Mapping[str, Route] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: TierSettings) -> Tier:
        return cls(Route.of(settings), {kind: Route.of(r) for kind, r in settings.routes.items()})


@dataclass(frozen=True)
class Resolved:
    """What routing chose; None: nothing chose it (the tenant's profile, the profile's model or effort)."""

    profile: str | None
    model: str | None
    effort: Effort | None


class Router:
    """The global routes and the tiers, and the resolution of one request (see the module)."""

    def __init__(self, routes: Mapping[str, Route] | None = None, tiers: Mapping[str, Tier] | None = None) -> None:
        self._routes = dict(routes or {})
        self._tiers = dict(tiers or {})

    @classmethod
    def of(cls, routes: Mapping[str, RouteSettings], tiers: Mapping[str, TierSettings]) -> Router:
        return cls({k: Route.of(r) for k, r in routes.items()}, {n: Tier.of(t) for n, t in tiers.items()})

    def kinds(self, tier: str | None) -> list[str]:
        """The kinds a tenant of ``tier`` may name."""
        found = self._tiers.get(tier) if tier is not None else None
        return sorted(self._routes.keys() | (found.routes.keys() if found is not None else set()))

    def resolve(self, *, tier: str | None, kind: str | None, profile: str | None, model: str | None) -> Resolved:
        """The profile, model and effort for a request of a tenant of ``tier`` naming ``kind`` (or
        none) and its own ``profile`` and ``model`` (or none). Raises `UnknownKind`."""
        found = self._tiers.get(tier) if tier is not None else None
        layers: list[Route] = []
        if kind is not None:
            tier_route = found.routes.get(kind) if found is not None else None
            global_route = self._routes.get(kind)
            if tier_route is None and global_route is None:
                known = ", ".join(self.kinds(tier)) or "none"
                raise UnknownKind(f"unknown kind {kind!r} (known: {known})")
            layers += [r for r in (tier_route, global_route) if r is not None]
        if found is not None:
            layers.append(found.default)
        return Resolved(
            profile if profile is not None else next((r.profile for r in layers if r.profile is not None), None),
            model if model is not None else next((r.model for r in layers if r.model is not None), None),
            next((r.effort for r in layers if r.effort is not None), None),
        )
