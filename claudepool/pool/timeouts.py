"""The deadlines of every exchange with a worker process, in one place."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorkerTimeouts(BaseModel):
    """Deadlines of every exchange with the process, in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ready_timeout_s: float = Field(default=30.0, gt=0)
    # Watchdog: a turn that produces no event for this long is interrupted, then killed.
    turn_idle_timeout_s: float = Field(default=120.0, gt=0)
    interrupt_timeout_s: float = Field(default=5.0, gt=0)
    reset_timeout_s: float = Field(default=10.0, gt=0)
    close_eof_timeout_s: float = Field(default=2.0, ge=0)
    close_term_timeout_s: float = Field(default=2.0, ge=0)
    close_kill_timeout_s: float = Field(default=5.0, gt=0)
