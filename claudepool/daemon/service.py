"""The one path every prompt takes, whichever front end it came through: `PromptService.handle`.

authenticate → read the request → admit (see `claudepool.daemon.admission`: profile, session,
size, queue bounds, rate limits, budget) → run: wait for a worker in the pool's fair
queue → one turn, streaming its text and tool calls to the caller (`StreamItem`s) → one
`PromptResult`, or a `ClaudepoolError` the front end turns into its error response. Each request
ends in exactly one canonical log line and one count (`claudepool.daemon.request_log`), refused or
served. The request deadline covers the queue wait and the turn; when it passes, the turn is
abandoned and the pool interrupts and resets the worker. Usage is metered from the pool's callbacks
(see `claudepool.tenancy.metering`), so a turn is billed even when its client is gone.

Draining: set ``draining`` to stop admitting, `wait_idle` for requests in flight up to a deadline,
then `stop_in_flight`: each remaining request answers `Draining` rather than vanishing.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from claudepool.daemon.admission import Admission, Gate, new_request_id
from claudepool.daemon.metrics import RequestMetrics
from claudepool.daemon.request_log import RequestLog, Trace
from claudepool.errors import Cancelled, ClaudepoolError, Draining, RequestTimeout
from claudepool.pool.lease import Lease
from claudepool.pool.shares import Priority, TenantShare
from claudepool.pool.worker import TurnResult
from claudepool.pool.workspace_files import Collected, FileBounds, collect, write_files
from claudepool.protocol.cli_events import SystemApiRetry, SystemModelFallback
from claudepool.protocol.wire import (
    FileOut,
    OmittedFile,
    PromptRequest,
    PromptResult,
    StreamItem,
    TextDelta,
    ToolUse,
    UsageOut,
    stream_items,
)
from claudepool.sessions.manager import SessionManager
from claudepool.store.base import SessionRecord
from claudepool.tenancy.metering import Meter
from claudepool.tenancy.tenants import Tenant, TenantRegistry

log = logging.getLogger(__name__)

# Receives what a streaming request sees as its turn runs: text deltas, tool calls, tool results.
OnEvent = Callable[[StreamItem], Awaitable[None]]
# The request body, read once the key is known to be good (so an unreadable body is refused with
# its tenant known, and a bad key is refused before the body is read).
ReadRequest = Callable[[], Awaitable[PromptRequest]]


class PromptService:
    def __init__(self, gate: Gate, tenants: TenantRegistry, meter: Meter, *, metrics: RequestMetrics | None = None,
                 sessions: SessionManager | None = None, tool_preview_bytes: int = 2048,
                 file_bounds: FileBounds | None = None) -> None:
        self.gate = gate
        self.tenants = tenants
        self.meter = meter
        self.metrics = metrics
        self.sessions = sessions
        # The bound on each tool call's input and result preview a stream carries (UTF-8 bytes).
        self.tool_preview_bytes = tool_preview_bytes
        self.file_bounds = file_bounds or FileBounds()
        self.log = RequestLog(metrics)
        self.draining = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._stopped_by_drain: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Requests admitted (or being admitted) that have no worker yet: what the queue bounds count."""
        return self.gate.queued

    async def handle(self, key: str | None, request: PromptRequest | ReadRequest, on_event: OnEvent | None = None, *,
                     request_id: str | None = None) -> PromptResult:
        """Serve one prompt from the key to the answer. ``on_event`` receives the turn's text and tool
        calls as they happen (`StreamItem`s, in order), when the request asked for a stream.

        Raises the `ClaudepoolError` to answer; the request is counted and logged once either way.
        What ``on_event`` raises (the front end's own writes) passes through untouched."""
        request_id = request_id or new_request_id()
        tenant: Tenant | None = None
        try:
            tenant = self.tenants.authenticate(key)
            if not isinstance(request, PromptRequest):
                request = await request()
        except ClaudepoolError as exc:
            self.refused(exc, tenant=tenant, request_id=request_id)
            raise
        admission = await self.admit(tenant, request, request_id)
        return await self.run(admission, on_event if request.stream else None)

    async def serve(self, tenant: Tenant, request: PromptRequest, request_id: str) -> PromptResult:
        """Admit and run a prompt for a tenant already known (a job): no stream."""
        return await self.run(await self.admit(tenant, request, request_id))

    def refused(self, exc: BaseException, *, tenant: Tenant | None = None, request: PromptRequest | None = None,
                request_id: str | None = None, started: float | None = None) -> None:
        """Count a request that ends before admission and write its one canonical log line.

        `handle` calls it for its own refusals; a front end calls it for a prompt it refuses before
        `handle` (a frame it cannot read, a bound of the connection). Never the prompt or the key."""
        self.log.refused(exc, tenant=tenant, request=request, request_id=request_id, started=started)

    async def admit(self, tenant: Tenant, request: PromptRequest, request_id: str | None = None) -> Admission:
        """Every check that needs no worker. Raises the error to answer.

        The request counts as in flight from here (a drain waits for it, or stops it); `run`, which
        the caller awaits straight after, ends that. A refusal is counted and logged here, once."""
        started = time.monotonic()
        request_id = request_id or new_request_id()
        try:
            return await self._admit_in_flight(tenant, request, request_id)
        except asyncio.CancelledError:
            self.refused(Cancelled("the client went away"), tenant=tenant, request=request, request_id=request_id,
                         started=started)
            raise
        except BaseException as exc:
            self.refused(exc, tenant=tenant, request=request, request_id=request_id, started=started)
            raise

    async def _admit_in_flight(self, tenant: Tenant, request: PromptRequest, request_id: str) -> Admission:
        if self.draining:
            raise Draining("the daemon is shutting down; retry on another instance")
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            return await self.gate.admit(tenant, request, request_id)
        except BaseException as exc:
            self._in_flight.discard(task)
            stopped = task in self._stopped_by_drain
            self._stopped_by_drain.discard(task)
            if not self._in_flight:
                self._idle.set()
            if isinstance(exc, asyncio.CancelledError) and stopped and task.uncancel() == 0:
                raise Draining("the daemon stopped this request at its drain deadline") from None
            raise

    async def run(self, admission: Admission, on_event: OnEvent | None = None) -> PromptResult:
        """Serve an admitted request. ``on_event`` receives what it streams (if given)."""
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        trace = Trace(started=time.monotonic())
        error: BaseException | None = None
        try:
            return await self._serve(admission, on_event, trace)
        except asyncio.CancelledError:
            if task in self._stopped_by_drain and task.uncancel() == 0:
                error = Draining("the daemon stopped this request at its drain deadline")
                raise error from None
            error = Cancelled("the client went away")
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            admission.release()  # if it never reached the queue's end (a deadline, a cancel)
            self._in_flight.discard(task)
            self._stopped_by_drain.discard(task)
            if not self._in_flight:
                self._idle.set()
            self.log.finished(admission, trace, error)

    async def _serve(self, admission: Admission, on_event: OnEvent | None, trace: Trace) -> PromptResult:
        started = trace.started
        session: str | None = None
        try:
            async with asyncio.timeout(admission.timeout_s) as deadline:
                if admission.request.session is None:
                    lease = await self._acquire(admission)
                    try:
                        await self._drive(lease, admission, on_event, trace)
                    finally:
                        lease.release()
                else:
                    session = await self._serve_session(admission, on_event, trace)
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(f"no complete answer within {admission.timeout_s:g}s") from None
            raise
        result = trace.result
        assert result is not None
        if admission.context.refusal is not None:
            raise admission.context.refusal  # the gateway refused a call: that ended the turn
        return PromptResult(
            id=admission.request_id,
            tenant=admission.tenant.name,
            session=session,
            text=result.text,
            is_error=result.is_error,
            stop_reason=result.stop_reason,
            usage=UsageOut.of(result.usage),
            cost_usd=admission.context.billed_cost_usd(result.cost_usd),
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            queue_ms=round((trace.queue_s or 0.0) * 1000, 3),
            structured_output=result.structured_output,
            model=result.model,
            **files_out(trace.files_back),
        )

    async def _serve_session(self, admission: Admission, on_event: OnEvent | None, trace: Trace) -> str:
        """One turn of a conversation, on the worker that holds it (or resumed on a new one)."""
        assert self.sessions is not None and admission.request.session is not None
        tenant = admission.tenant
        ctx = admission.context

        async def drive(lease: Lease, record: SessionRecord) -> TurnResult:
            admission.queue_slot.release()  # it waited for the session and its worker: it has one now
            ctx.session = record.id
            lease.context = ctx
            try:
                return await self._drive(lease, admission, on_event, trace)
            except BaseException:
                if not lease.worker.in_turn():
                    # The worker died mid-turn (an abandoned turn is still draining and will bill itself).
                    self.meter.finish(ctx, turn_started=lease.turns_started > 0)
                raise

        try:
            record, _ = await self.sessions.run_turn(
                tenant, admission.request.session,
                share=TenantShare(tenant.weight, tenant.max_concurrency), priority=Priority(admission.request.priority),
                wait_s=tenant.max_queue_wait_s or admission.pool.config.lease_timeout_s, drive=drive,
            )
        finally:
            admission.queue_slot.release()
        return record.id

    async def _drive(self, lease: Lease, admission: Admission, on_event: OnEvent | None, trace: Trace) -> TurnResult:
        """Run the admitted prompt on ``lease``'s worker, streaming what it does and noting what happened:
        its input files written into the workspace first, its ``return_files`` read from it after."""
        trace.queue_s = time.monotonic() - trace.started
        trace.slot = lease.worker.slot
        cwd = lease.worker.cwd
        if admission.files and cwd is not None:
            lease.worker.dirty = True  # its workspace holds this tenant's files now: reset before anyone else's
            await to_the_end(write_files, cwd, admission.files)
        if admission.model_switch is not None:
            # Process settings survive /clear: marked dirty first, so the reset restores (and checks)
            # the profile's model before anyone's next turn, even when this switch fails half-way.
            lease.worker.dirty = True
            await lease.worker.set_model(admission.model_switch)
        if admission.effort_switch is not None:
            lease.worker.dirty = True  # as for the model: the reset restores the profile's effort
            await lease.worker.set_effort(admission.effort_switch)
        async for item in lease.run_turn(admission.request.prompt):
            if isinstance(item, TurnResult):
                trace.result = item
                continue
            if isinstance(item, SystemApiRetry) and self.metrics is not None:
                self.metrics.upstream_retry(item.error_status)
            if isinstance(item, SystemModelFallback) and self.metrics is not None:
                self.metrics.model_fallback(lease.worker.profile.label, item.trigger)
            for out in stream_items(item, self.tool_preview_bytes):
                if isinstance(out, TextDelta) and trace.first_text_s is None:
                    trace.first_text_s = time.monotonic() - trace.started
                elif isinstance(out, ToolUse):
                    trace.tool_calls += 1  # counted, never logged: the input is the tenant's own data
                if on_event is not None:
                    await on_event(out)
        assert trace.result is not None
        if admission.model_switch is not None:
            # Restored while the lease still holds the worker, so the call the CLI may make to check
            # the model is the request's (a reset holds no lease: the gateway would refuse it). A
            # session's next turn, which gets no reset, runs on the profile's model again.
            await lease.worker.set_model(admission.pool.profile.model)
        if admission.effort_switch is not None:
            await lease.worker.set_effort(None)  # a session's next turn runs on the profile's effort
        if admission.request.return_files and cwd is not None:
            b = self.file_bounds
            trace.files_back = await to_the_end(functools.partial(
                collect, cwd, admission.request.return_files, max_files=b.max_return_files,
                max_file_bytes=b.max_return_bytes, max_total_bytes=b.max_return_bytes,
                max_entries=b.max_listed_files))
        return trace.result

    async def _acquire(self, admission: Admission) -> Lease:
        """Wait in the pool's fair queue."""
        tenant = admission.tenant
        pool = admission.pool
        wait_s = tenant.max_queue_wait_s or pool.config.lease_timeout_s
        try:
            lease = await pool.acquire(
                tenant.name, timeout_s=wait_s, share=TenantShare(tenant.weight, tenant.max_concurrency),
                priority=Priority(admission.request.priority),
            )
        finally:
            admission.release()  # it has its worker (the pool is busy now), or it gave up
        lease.context = admission.context
        return lease

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def stop_in_flight(self) -> int:
        """Stop every request still running; each answers `Draining`. Returns how many there were."""
        stragglers = list(self._in_flight)
        for task in stragglers:
            self._stopped_by_drain.add(task)
            task.cancel()
        if stragglers:
            log.warning("stopping %d requests still in flight", len(stragglers))
            await self.wait_idle(10.0)
        return len(stragglers)


_T = TypeVar("_T")


async def to_the_end(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a thread, waited for to its end even when the caller is cancelled: a write into
    a workspace must be over before the lease is released and the reset empties it for someone else."""
    done = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait({done})
        raise


def files_out(found: Collected | None) -> dict[str, Any]:
    """The answer's ``files`` and ``files_omitted``, when the request asked for any."""
    if found is None:
        return {}
    return {"files": [FileOut(path=path, size_bytes=len(data), content_base64=base64.b64encode(data).decode())
                      for path, data in found.files],
            "files_omitted": [OmittedFile(path=path, reason=reason) for path, reason in found.omitted]}
