"""Exact usage metering and budget settlement, at the places every model call and every turn pass.

Every model call a worker makes goes through the daemon's gateway, which measures it from the
answer it relays and hands the meter one `UsageRecord` per call (``kind="call"``: tokens, cost by the
price table, the provider's request id, status, duration; `call_started` / `call_finished`). Those
are what a request is billed. The pool reports every settled turn of every lease (`on_turn_result`),
including a turn drained after its client went away, then tells when a lease can produce no further
result (`on_lease_done`). For a turn whose calls the gateway billed, the CLI's own figure is a
cross-check (a disagreement in tokens is counted); a turn the gateway saw no call of (the fake CLI
in tests, which calls nothing) is billed with the CLI's figure, as one ``kind="turn"`` record. A turn
result or the end of a lease that arrives while one of the request's calls is still being relayed
waits for it, so neither is decided on a partial count. A request counts once in the aggregates,
on its first record. A lease whose turn started but reported neither a call nor a result is
recorded as a ``failed`` turn. Budgets are held per call (`claudepool.gateway.budget`): a call's
record settles its reservation, and `release` gives back one whose call never went out.

The queue is drained by one task. When the store is down, records wait (bounded) and are retried
with back-off; settlement is idempotent on the record id, so a retry never counts twice. The ledger
file is written by a task of its own, in a thread (`LedgerFile`); a record goes to the store once
its line is in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from claudepool.errors import ClaudepoolError, StoreError
from claudepool.pool.lease import Lease
from claudepool.pool.worker import TurnResult
from claudepool.store.base import Store, UsageRecord
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.ledger_file import LedgerFile
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.settings import MeteringSettings

log = logging.getLogger(__name__)

_BACKOFF_MAX_S = 5.0


@dataclass
class RequestContext:
    """What the meter knows about the request a lease serves."""

    request_id: str
    tenant: str
    profile: str
    model: str
    session: str | None = None
    # The most the request may spend, all its calls together (None: no bound of its own), and what
    # its calls in flight hold of it (`claudepool.gateway.budget`).
    max_budget_usd: float | None = None
    held_usd: float = 0.0
    results: int = 0
    finished: bool = False
    # Model calls the gateway metered for this request, those still being relayed, and their tokens.
    calls: int = 0
    calls_in_flight: int = 0
    call_tokens: int = 0
    call_cost_usd: float = 0.0
    # Turn results and the end of the lease that came while a call was still being relayed: handled
    # once it ends, so that whether the gateway saw the turn's calls is known when they are.
    deferred: list[TurnResult] = field(default_factory=list)
    finish_deferred: bool | None = None
    # Whether a record of this request has counted it (aggregates count requests, not calls).
    counted: bool = False
    # Why the gateway refused the request's last model call (its budget, the budget store), if it
    # did: the request is answered this error rather than the turn the refusal ended.
    refusal: ClaudepoolError | None = None

    def billed_cost_usd(self, cli_cost_usd: float) -> float:
        """What this request is billed so far: its calls, as the gateway measured them, or the CLI's
        figure for a turn the gateway saw no call of."""
        return self.call_cost_usd if self.calls else cli_cost_usd

    def count_request(self) -> int:
        """1 for the request's first record, 0 after."""
        first = not self.counted
        self.counted = True
        return int(first)


@dataclass(frozen=True)
class _Release:
    tenant: str
    reservation_id: str


_Op = UsageRecord | _Release


class Meter:
    def __init__(self, store: Store, limiter: RateLimiter, pricing: PricingTable, settings: MeteringSettings, *,
                 on_record: Callable[[UsageRecord], None] | None = None) -> None:
        self.store = store
        self.on_record = on_record
        self.limiter = limiter
        self.pricing = pricing
        self.settings = settings
        # Each with its line number in the ledger file (0: none), which the flusher waits for first.
        self._pending: deque[tuple[_Op, int]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ledger_path = Path(settings.ledger_file) if settings.ledger_file else None
        self._ledger_file = LedgerFile(self._ledger_path, max_pending=settings.max_buffered_records) if (
            self._ledger_path is not None) else None
        self.dropped = 0
        self._applying: _Op | None = None
        self.price_mismatches = 0
        # Turns whose tokens as the CLI reports them differ from the sum the gateway measured.
        self.call_mismatches = 0

    @property
    def backlog(self) -> int:
        return len(self._pending)

    # -- pool callbacks (synchronous: they run inside the pool's bookkeeping) ----------------------

    def on_turn_result(self, lease: Lease, result: TurnResult) -> None:
        ctx: RequestContext | None = lease.context
        if ctx is None:
            return  # a lease taken outside the service (tests, tools): nothing to bill
        if ctx.calls_in_flight:
            ctx.deferred.append(result)
            return
        self._turn_result(ctx, result)

    # -- gateway callbacks: one model call of a request ------------------------------------------

    def call_started(self, ctx: RequestContext) -> None:
        ctx.calls += 1
        ctx.calls_in_flight += 1

    def call_finished(self, ctx: RequestContext, record: UsageRecord) -> None:
        """Bill one model call, as the gateway measured it; then what waited for it."""
        ctx.calls_in_flight -= 1
        ctx.call_tokens += record.tokens
        ctx.call_cost_usd += record.cost_usd
        self.submit(replace(record, requests=ctx.count_request()))
        if ctx.calls_in_flight:
            return
        deferred, ctx.deferred = ctx.deferred, []
        for result in deferred:
            self._turn_result(ctx, result)
        if ctx.finish_deferred is not None:
            self.finish(ctx, turn_started=ctx.finish_deferred)

    def _turn_result(self, ctx: RequestContext, result: TurnResult) -> None:
        if ctx.calls or ctx.refusal is not None:
            # The gateway billed this turn's calls (or refused them, at no cost): the CLI's own
            # figure is a cross-check only.
            ctx.results += 1
            cli_tokens = result.usage.context_tokens + result.usage.output_tokens
            if cli_tokens != ctx.call_tokens:
                self.call_mismatches += 1
                log.warning("request %s: the CLI reports %d tokens, the gateway measured %d (the gateway's are billed)",
                            ctx.request_id, cli_tokens, ctx.call_tokens)
            return
        outcome = "interrupted" if result.interrupted else "model_error" if result.is_error else "ok"
        record = UsageRecord(
            record_id=f"{ctx.request_id}:{ctx.results}",
            request_id=ctx.request_id,
            tenant=ctx.tenant,
            profile=ctx.profile,
            model=result.model or ctx.model,
            outcome=outcome,
            at=time.time(),
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            cache_read_input_tokens=result.usage.cache_read_input_tokens,
            cache_creation_input_tokens=result.usage.cache_creation_input_tokens,
            cost_usd=result.cost_usd,
            session=ctx.session,
            requests=ctx.count_request(),
        )
        ctx.results += 1
        self._cross_check(record)
        self.submit(record)

    def on_lease_done(self, lease: Lease) -> None:
        ctx: RequestContext | None = lease.context
        if ctx is not None:
            self.finish(ctx, turn_started=lease.turns_started > 0)

    def finish(self, ctx: RequestContext, *, turn_started: bool) -> None:
        """No further result can come for this request: settle what is still open, once."""
        if ctx.finished:
            return
        if ctx.calls_in_flight:
            ctx.finish_deferred = turn_started  # decided once the calls being relayed have ended
            return
        ctx.finished = True
        if ctx.calls or ctx.results or not turn_started:
            return
        # The turn ran but its worker died or was killed before a result, and the gateway saw no call:
        # whatever it cost, nothing reported it. Record the turn so the ledger shows it.
        self.submit(UsageRecord(record_id=f"{ctx.request_id}:0", request_id=ctx.request_id, tenant=ctx.tenant,
                                 profile=ctx.profile, model=ctx.model, outcome="failed", at=time.time(),
                                 session=ctx.session, requests=ctx.count_request()))

    def release(self, tenant: str, reservation_id: str) -> None:
        """Give back a reservation whose call never went out; queued behind the records before it, so
        it reaches the store in order (idempotent)."""
        self._enqueue(_Release(tenant, reservation_id))

    # -- the flusher ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply queued records to the store, in order, retrying through outages, and write the ledger
        file. Runs forever."""
        async with asyncio.TaskGroup() as group:
            if self._ledger_file is not None:
                group.create_task(self._ledger_file.run(), name="ledger-file")
            await self._flush_forever()

    async def _flush_forever(self) -> None:
        backoff_s = 0.2
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            op, line = self._pending[0]
            self._applying = op
            try:
                if line and self._ledger_file is not None:
                    await self._ledger_file.wait_written(line)
                await self._apply(op)
            except StoreError as exc:
                log.warning("usage store unavailable, %d records waiting: %s", len(self._pending), exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
                continue
            finally:
                self._applying = None
            backoff_s = 0.2
            self._pending.popleft()  # `_enqueue` never drops the record being applied: this is `op`

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued record reached the ledger file and the store; False if ``timeout_s``
        passed first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                if self._ledger_file is not None:
                    await self._ledger_file.drained()
                await self._idle.wait()
        if self._ledger_file is not None and self._ledger_file.pending:
            log.error("%d usage records could not reach the ledger file %s before shutdown", self._ledger_file.pending,
                      self._ledger_path)
        if self._pending:
            log.error("%d usage records could not reach the store before shutdown%s", len(self._pending),
                      "; they are in the ledger file" if self._ledger_path else "")
            return False
        return True

    async def _apply(self, op: _Op) -> None:
        if isinstance(op, _Release):
            await self.store.release(op.tenant, op.reservation_id)
            return
        if await self.store.settle(op):
            await self.limiter.record_tokens(op.tenant, op.tokens)

    def submit(self, record: UsageRecord) -> None:
        """Meter one record now: the ledger file (if configured), then the store, in that order."""
        if self.on_record is not None:
            self.on_record(record)
        line = 0
        if self._ledger_file is not None:
            line = self._ledger_file.append(orjson.dumps(record.to_dict()) + b"\n")
        self._enqueue(record, line)

    # -- internals -------------------------------------------------------------------------------

    def _enqueue(self, op: _Op, line: int = 0) -> None:
        # The record on its way to the store right now stays at the head, outside the bound.
        head = 1 if self._applying is not None else 0
        if len(self._pending) - head >= self.settings.max_buffered_records:
            lost, _ = self._pending[head]
            del self._pending[head]
            self.dropped += 1
            log.error("usage buffer full while the store is down; dropping the oldest: %s",
                      orjson.dumps(lost.to_dict() if isinstance(lost, UsageRecord) else vars(lost)).decode())
        self._pending.append((op, line))
        self._idle.clear()
        self._wake.set()

    def _cross_check(self, record: UsageRecord) -> None:
        expected = self.pricing.cost(record.model, input_tokens=record.input_tokens,
                                     output_tokens=record.output_tokens,
                                     cache_read_input_tokens=record.cache_read_input_tokens,
                                     cache_creation_input_tokens=record.cache_creation_input_tokens)
        if abs(expected - record.cost_usd) > max(1e-6, 0.05 * record.cost_usd):
            self.price_mismatches += 1
            log.debug("price table says $%.6f for %s, the CLI says $%.6f (the CLI's figure is billed)",
                      expected, record.model, record.cost_usd)
