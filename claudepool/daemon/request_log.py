"""How a request ends: its one canonical ``request`` log line and its counts, refused or served.

Every request gets exactly one of the two: `RequestLog.refused` for one that ends before admission
(a bad key, an unreadable body, a limit), `RequestLog.finished` for one that was admitted, whatever
ended it. The line carries ids, outcome, timings, usage and how many tools the turn called, never
the prompt, the answer, a tool's input or output, or the key.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from claudepool.daemon.admission import Admission, new_request_id
from claudepool.daemon.metrics import RequestMetrics, outcome_of
from claudepool.errors import BudgetExhausted, RateLimited, TenancyError
from claudepool.pool.worker import TurnResult
from claudepool.pool.workspace_files import Collected
from claudepool.protocol.wire import PromptRequest
from claudepool.tenancy.tenants import Tenant

request_log = logging.getLogger("claudepool.request")


@dataclass
class Trace:
    """What one admitted request went through, for its metrics and its log line."""

    started: float
    queue_s: float | None = None
    first_text_s: float | None = None
    slot: int | None = None
    result: TurnResult | None = None
    tool_calls: int = 0
    # What the request's return_files found after the turn (None: it asked for none).
    files_back: Collected | None = None


def _rejection_kind(exc: TenancyError) -> str:
    if isinstance(exc, RateLimited):
        return exc.kind
    if isinstance(exc, BudgetExhausted):
        return "budget"
    return "queue_full"


class RequestLog:
    def __init__(self, metrics: RequestMetrics | None = None) -> None:
        self.metrics = metrics

    def refused(self, exc: BaseException, *, tenant: Tenant | None = None, request: PromptRequest | None = None,
                request_id: str | None = None, started: float | None = None) -> None:
        """A request that ends before admission: counted, and its line written."""
        outcome = outcome_of(exc)
        if self.metrics is not None:
            if tenant is not None and isinstance(exc, TenancyError):
                self.metrics.rejected(tenant.name, _rejection_kind(exc))
            self.metrics.request_done(tenant.name if tenant is not None else None, outcome, None, None)
        request_log.info("request", extra={"fields": {
            "request_id": request_id or new_request_id(), "tenant": tenant.name if tenant is not None else None,
            "session": request.session if request is not None else None,
            "profile": (request.profile if request is not None else None) or (tenant.profile if tenant else None),
            "priority": request.priority if request is not None else None, "worker_slot": None,
            "outcome": outcome, "queue_ms": None,
            "duration_ms": round((time.monotonic() - started) * 1000, 1) if started is not None else 0.0,
            "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
            "cost_usd": 0.0, "tool_calls": 0,
        }})

    def finished(self, admission: Admission, trace: Trace, error: BaseException | None) -> None:
        """An admitted request that ended, served or not: counted, timed, and its line written."""
        result = trace.result
        outcome = outcome_of(error, is_error=result.is_error if result else False)
        duration_s = time.monotonic() - trace.started
        if self.metrics is not None:
            self.metrics.request_done(admission.tenant.name, outcome, duration_s, trace.queue_s)
            if trace.first_text_s is not None:
                self.metrics.first_text(trace.first_text_s)
            if result is not None and (result.api_error_status is not None or result.terminal_reason == "api_error"):
                self.metrics.upstream_error(result.api_error_status)
        usage = result.usage if result is not None else None
        request_log.info("request", extra={"fields": {
            "request_id": admission.request_id, "tenant": admission.tenant.name,
            "session": admission.request.session, "profile": admission.context.profile,
            "priority": admission.request.priority, "worker_slot": trace.slot, "outcome": outcome,
            "queue_ms": round(trace.queue_s * 1000, 1) if trace.queue_s is not None else None,
            "duration_ms": round(duration_s * 1000, 1),
            "input_tokens": usage.input_tokens if usage else 0, "output_tokens": usage.output_tokens if usage else 0,
            "cache_read_input_tokens": usage.cache_read_input_tokens if usage else 0,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens if usage else 0,
            "cost_usd": result.cost_usd if result else 0.0, "tool_calls": trace.tool_calls,
        }})
