"""Which models a tenant may ask for, by name or alias, and what a request's ``model`` resolves to.

A profile runs on its own model (``profiles.NAME.model``; unset, the CLI's default, named
``"default"`` here). A request may name another model only if it is in its tenant's
``tenants.NAME.models``; the worker is then switched with the CLI's ``set_model`` for that request
and restored by the reset before anyone else is served (`claudepool.pool.exchange.Exchange.reset`).

>>> catalog = ModelCatalog({"default": ProfileModel("claude-sonnet-4-5", None)})
>>> catalog.switch_for("default", frozenset({"claude-haiku-4-5"}), "haiku")
'claude-haiku-4-5'
>>> catalog.switch_for("default", frozenset(), "claude-sonnet-4-5") is None  # its own: no switch
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from claudepool.errors import ModelNotAllowed

# Short names clients use, to the full model ids the CLI and the provider are asked for.
ALIASES: Mapping[str, str] = {
    "opus": "claude-opus-4-5",
    "sonnet": "claude-sonnet-4-5",
    "haiku": "claude-haiku-4-5",
}
DISPLAY_NAMES: Mapping[str, str] = {
    "claude-opus-4-5": "Claude Opus 4.5",
    "claude-sonnet-4-5": "Claude Sonnet 4.5",
    "claude-haiku-4-5": "Claude Haiku 4.5",
}
# The name of a profile's model when the profile sets none (the CLI picks it).
DEFAULT_MODEL = "default"


def resolve_model(name: str) -> str:
    """The full id of ``name``: an alias resolved, anything else as it is.

    >>> resolve_model("haiku"), resolve_model("claude-opus-4-5")
    ('claude-haiku-4-5', 'claude-opus-4-5')
    """
    return ALIASES.get(name.strip().lower(), name.strip())


def resolve_all(names: Iterable[str]) -> frozenset[str]:
    return frozenset(resolve_model(n) for n in names)


def display_name(model: str) -> str:
    return DISPLAY_NAMES.get(model, model)


@dataclass(frozen=True)
class ProfileModel:
    """What the model catalog needs of a profile: its model (None: the CLI's default) and system prompt."""

    model: str | None
    system_prompt: str | None


class ModelCatalog:
    """The profiles' own models, and the checks of a request's ``model`` against its tenant's list."""

    def __init__(self, profiles: Mapping[str, ProfileModel]) -> None:
        self._profiles = dict(profiles)

    def profile_model(self, profile: str) -> str:
        """The model ``profile`` runs on (``"default"`` when the CLI picks it)."""
        found = self._profiles.get(profile)
        return (found.model if found is not None else None) or DEFAULT_MODEL

    def system_prompt(self, profile: str) -> str | None:
        found = self._profiles.get(profile)
        return found.system_prompt if found is not None else None

    def allowed(self, profile: str, models: frozenset[str]) -> list[str]:
        """Every model a tenant on ``profile`` with ``models`` may ask for, the profile's own first."""
        own = self.profile_model(profile)
        return [own, *sorted(models - {own})]

    def switch_for(self, profile: str, models: frozenset[str], requested: str | None) -> str | None:
        """The model to switch ``profile``'s worker to for a request naming ``requested``: None when it
        names none or the profile's own; else the full id, if ``models`` (the tenant's list) has it.

        Raises `ModelNotAllowed` for any other model."""
        if requested is None:
            return None
        resolved = resolve_model(requested)
        own = self.profile_model(profile)
        if resolved == own:
            return None
        if resolved in models:
            return resolved
        allowed = ", ".join(self.allowed(profile, models))
        raise ModelNotAllowed(f"model {requested!r} is not allowed for this tenant on profile {profile!r} "
                              f"(allowed: {allowed})")
