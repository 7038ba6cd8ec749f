"""One model call through the gateway, and the hooks that see it.

A `Call` is created once a call is accepted (its credential, endpoint and lease checked) and
finished once its answer has been relayed, or the relay stopped. Each `CallHook` hears the start
with the request body, every chunk of the answer exactly as it is relayed (the SSE or JSON bytes),
and the end. This is where per-call metering attaches: usage is parsed from the chunks
(``message_start`` and ``message_delta`` in a stream, the body otherwise) and recorded at the end.
A budget that must hold a call back, or lower its ``max_tokens``, acts in an awaitable step before
this (`claudepool.gateway.budget.CallBudget.hold`), which may refuse the call or return another body.

Hooks run on the event loop in the relay's path: they must be quick and must not raise (what one
raises is logged and the call goes on).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from claudepool.gateway.attribution import Attribution
from claudepool.gateway.usage import CallUsage

log = logging.getLogger(__name__)

# What became of a call. ``upstream_error``: the provider answered an error status, relayed as it is;
# ``upstream_idle``: the provider sent nothing for ``upstream.idle_timeout_s`` and the gateway cut it.
OUTCOMES = ("ok", "upstream_error", "unreachable", "upstream_cut", "upstream_idle", "client_gone")
_ids = itertools.count(1)


@dataclass
class Call:
    attribution: Attribution
    upstream: str  # the `Upstream`'s name
    method: str
    path: str
    request_bytes: int
    id: str = field(default_factory=lambda: f"gwc_{next(_ids):08x}")
    at: float = field(default_factory=time.time)  # unix time the call arrived
    started: float = field(default_factory=time.monotonic)
    status: int | None = None  # the status relayed to the worker
    # The provider's own id of the call (its ``request-id`` header).
    upstream_request_id: str | None = None
    first_byte_s: float | None = None  # arrival to the first byte of the answer's body
    duration_s: float | None = None
    response_bytes: int = 0
    outcome: str = "pending"
    # What the answer reported, and its price (set by `claudepool.gateway.call_usage` at the end).
    usage: CallUsage | None = None
    cost_usd: float | None = None
    # The budget reservation the call holds (`claudepool.gateway.budget`), which its record settles.
    reservation_id: str | None = None
    # What the call holds of its request's own budget (``max_budget_usd``), given back at its end.
    request_held_usd: float = 0.0

    @property
    def first_token_ms(self) -> float | None:
        """Arrival to the first content block, in ms, once the answer's usage was read."""
        at = self.usage.first_content_at if self.usage is not None else None
        return None if at is None else round((at - self.started) * 1000, 2)

    def finish(self, outcome: str) -> None:
        if self.outcome == "pending":
            self.outcome = outcome
        if self.duration_s is None:
            self.duration_s = time.monotonic() - self.started


class CallHook(Protocol):
    def call_started(self, call: Call, body: bytes) -> None: ...

    def response_chunk(self, call: Call, chunk: bytes) -> None: ...

    def call_finished(self, call: Call) -> None: ...


class Hooks:
    """The hooks of one gateway, each called in turn; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._hooks: list[CallHook] = []

    def add(self, hook: CallHook) -> None:
        self._hooks.append(hook)

    def started(self, call: Call, body: bytes) -> None:
        for hook in self._hooks:
            try:
                hook.call_started(call, body)
            except Exception:
                log.exception("gateway hook %r failed at the start of call %s", hook, call.id)

    def chunk(self, call: Call, chunk: bytes) -> None:
        for hook in self._hooks:
            try:
                hook.response_chunk(call, chunk)
            except Exception:
                log.exception("gateway hook %r failed on a chunk of call %s", hook, call.id)

    def finished(self, call: Call) -> None:
        for hook in self._hooks:
            try:
                hook.call_finished(call)
            except Exception:
                log.exception("gateway hook %r failed at the end of call %s", hook, call.id)
