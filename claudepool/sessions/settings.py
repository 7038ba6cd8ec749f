"""What the session manager is configured with: the ``[sessions]`` section, and the limits a profile or a
tenant sets over it. `claudepool.config` composes the section and builds `SessionOptions` at the edge.

A limit is looked up tenant first, then profile, then ``[sessions]``:

>>> base = SessionLimits(max_turns=100, max_age_s=0.0, max_context_tokens=0)
>>> LimitOverrides(max_turns=5).over(LimitOverrides(max_turns=20, max_age_s=60.0).over(base))
SessionLimits(max_turns=5, max_age_s=60.0, max_context_tokens=0)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


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
    # A session's workspace (its worker's cwd) is saved beside its transcript when it parks, as
    # <session>.workspace.tar, and restored when it resumes. Over the bound nothing is saved (logged).
    save_workspace: bool = True
    max_saved_workspace_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # Limits (0 = none); tenants and profiles may set their own.
    max_turns: int = Field(default=0, ge=0)
    max_age_s: float = Field(default=0.0, ge=0)
    max_context_tokens: int = Field(default=0, ge=0)
    # At a limit: close with session_limit_reached, or carry on in a fresh session (its id returned).
    rollover: bool = False
    # Open (not closed) sessions per tenant; past it, creating one is 429 too_many_sessions. 0 = no bound.
    max_sessions: int = Field(default=100, ge=0)
    # Conversations recognised from a chat history by the front doors (/v1/messages,
    # /v1/chat/completions; `claudepool.sessions.conversations`): on or off, how long one unused
    # is still recognised (its session then expires), and how many open ones a tenant keeps (past
    # it, the least recently used is closed). They count in max_sessions like any session.
    conversations: bool = True
    conversation_idle_ttl_s: float = Field(default=3600.0, gt=0)
    max_conversations: int = Field(default=20, ge=1)
    # How often to park idle sessions, and how often to sweep for expiry, retention and disk use.
    maintenance_interval_s: float = Field(default=1.0, gt=0)
    sweep_interval_s: float = Field(default=15.0, gt=0)

    def limits(self) -> SessionLimits:
        return SessionLimits(self.max_turns, self.max_age_s, self.max_context_tokens)


@dataclass(frozen=True)
class SessionLimits:
    """When a session is closed (or rolled over); 0 = no limit."""

    max_turns: int
    max_age_s: float
    max_context_tokens: int

    def reached(self, turns: int, age_s: float, context_tokens: int) -> str | None:
        """Which limit a session with these counts is at, if any."""
        if self.max_turns and turns >= self.max_turns:
            return f"max_turns ({self.max_turns})"
        if self.max_age_s and age_s >= self.max_age_s:
            return f"max_age_s ({self.max_age_s:g})"
        if self.max_context_tokens and context_tokens >= self.max_context_tokens:
            return f"max_context_tokens ({self.max_context_tokens})"
        return None


@dataclass(frozen=True)
class LimitOverrides:
    """Limits a profile or a tenant sets; None = the next level's."""

    max_turns: int | None = None
    max_age_s: float | None = None
    max_context_tokens: int | None = None

    def over(self, base: SessionLimits) -> SessionLimits:
        return SessionLimits(
            max_turns=self.max_turns if self.max_turns is not None else base.max_turns,
            max_age_s=self.max_age_s if self.max_age_s is not None else base.max_age_s,
            max_context_tokens=self.max_context_tokens if self.max_context_tokens is not None
            else base.max_context_tokens,
        )


@dataclass(frozen=True)
class SessionOptions:
    """Everything `SessionManager` is configured with."""

    settings: SessionSettings
    # Where transcripts rest (``[sessions] dir``, else a default under the pool's workdir).
    dir: Path
    # By profile name; a profile without an entry sets no limit of its own.
    profile_limits: Mapping[str, LimitOverrides] = field(default_factory=dict)

    def limits_for(self, profile: str, tenant: LimitOverrides) -> SessionLimits:
        """A session's limits: its tenant's own, else its profile's, else ``[sessions]``."""
        return tenant.over(self.profile_limits.get(profile, LimitOverrides()).over(self.settings.limits()))
