"""Every deadline of a worker, in one model: the exchange's and the process's.

Its own module, importing only pydantic, so configuration can embed it without loading the worker.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorkerTimeouts(BaseModel):
    """Deadlines of every exchange with the process, and of every step of its close, in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ready_timeout_s: float = Field(default=30.0, gt=0)
    # Watchdog: a turn that produces no event for this long is interrupted, then killed.
    turn_idle_timeout_s: float = Field(default=120.0, gt=0)
    interrupt_timeout_s: float = Field(default=5.0, gt=0)
    reset_timeout_s: float = Field(default=10.0, gt=0)
    close_eof_timeout_s: float = Field(default=2.0, ge=0)
    close_term_timeout_s: float = Field(default=2.0, ge=0)
    close_kill_timeout_s: float = Field(default=5.0, gt=0)
    # Once stdout ends, how long the process has to exit before its code is reported as unknown.
    exit_after_eof_timeout_s: float = Field(default=2.0, ge=0)
    # Once the process is dead: how long its pipes may take to reach EOF (a grandchild outside its
    # group may hold them open) before they are closed from our side, and how long the event reader
    # then has to finish before it is cancelled.
    close_pipes_timeout_s: float = Field(default=1.0, ge=0)
    # Removing the private directories (in a thread): past this, close goes on and the thread
    # finishes on its own.
    remove_dirs_timeout_s: float = Field(default=10.0, gt=0)
    # How often a sandboxed worker's workspace is measured against its max_workspace_bytes.
    workspace_check_interval_s: float = Field(default=1.0, gt=0)
