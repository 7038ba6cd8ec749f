"""Each model call's usage and cost, measured at the gateway from the answer it relays.

A `CallHook`: it reads the answer's bytes as they pass (`claudepool.gateway.usage`), prices the
usage with the daemon's price table when the call ends, puts both on the `Call` (so the call's log
line carries them), and counts tokens by kind, cost and time to first token per tenant.

Given the meter, it also bills each call of a request: `Meter.call_started` as the call is accepted,
`Meter.call_finished` with one ledger record (``kind="call"``) as it ends, whatever ended it (a cut
call counts what its stream had reported). The meter then takes the CLI's own figure for the turn as a
cross-check only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from claudepool.gateway.calls import Call
from claudepool.gateway.metrics import OTHER
from claudepool.gateway.usage import CallUsage, StreamUsage, usage_of_body
from claudepool.store.base import UsageRecord
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.metering import Meter

TOKEN_KINDS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# Only a message call is billed; count_tokens is free.
_BILLED_PATH = "/v1/messages"
# A JSON answer is kept whole to be read at its end; past this it is not read (a message body is
# rarely over a few hundred KB; the provider's own request limit is 32 MB).
MAX_JSON_BYTES = 8 * 1024 * 1024
_TTFT_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# A call's outcome as a ledger record names it (the outcomes of turns).
_RECORD_OUTCOMES = {"ok": "ok", "upstream_error": "model_error", "client_gone": "interrupted"}


class _Reader:
    """One answer: a stream is read as it passes; a JSON body is kept and read at the end."""

    def __init__(self) -> None:
        self.stream: StreamUsage | None = None
        self.body: bytearray | None = None

    def feed(self, chunk: bytes) -> None:
        if self.stream is None and self.body is None:
            # An SSE stream starts with a field line; a JSON body with '{'.
            if chunk.lstrip()[:1] == b"{":
                self.body = bytearray()
            else:
                self.stream = StreamUsage()
        if self.stream is not None:
            self.stream.feed(chunk, now=time.monotonic())
        elif self.body is not None and len(self.body) + len(chunk) <= MAX_JSON_BYTES:
            self.body += chunk

    def usage(self) -> CallUsage:
        if self.stream is not None:
            return self.stream.usage
        return usage_of_body(bytes(self.body)) if self.body is not None else CallUsage()


class CallUsageMeter:
    def __init__(self, pricing: PricingTable, registry: CollectorRegistry, tenant_label: Callable[[str], str], *,
                 tenants: Iterable[str] = (), meter: Meter | None = None) -> None:
        self._pricing = pricing
        self._meter = meter
        self._tenant = tenant_label
        self._readers: dict[str, _Reader] = {}
        r = registry
        self.tokens = Counter("claudepool_gateway_tokens", "Tokens the provider reported per call, by tenant and kind.",
                              ["tenant", "kind"], registry=r)
        self.cost = Counter("claudepool_gateway_cost_usd", "What the calls cost by the price table, by tenant.",
                            ["tenant"], registry=r)
        self.first_token = Histogram("claudepool_gateway_time_to_first_token_seconds",
                                     "A streamed call, from its arrival to its first content block.",
                                     buckets=_TTFT_SECONDS, registry=r)
        for tenant in (*sorted(set(tenants)), OTHER):
            self.cost.labels(tenant)
            for kind in TOKEN_KINDS:
                self.tokens.labels(tenant, kind)

    def call_started(self, call: Call, body: bytes) -> None:
        if call.path == _BILLED_PATH:
            self._readers[call.id] = _Reader()
            if self._meter is not None and call.attribution.context is not None:
                self._meter.call_started(call.attribution.context)

    def response_chunk(self, call: Call, chunk: bytes) -> None:
        reader = self._readers.get(call.id)
        if reader is not None:
            reader.feed(chunk)

    def call_finished(self, call: Call) -> None:
        reader = self._readers.pop(call.id, None)
        if reader is None:
            return
        usage = reader.usage()
        call.usage = usage
        call.cost_usd = self._pricing.cost(
            usage.model or "", input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_read_input_tokens=usage.cache_read_tokens, cache_creation_input_tokens=usage.cache_write_5m_tokens,
            cache_write_1h_input_tokens=usage.cache_write_1h_tokens)
        tenant = self._tenant(call.attribution.tenant)
        for kind, count in zip(TOKEN_KINDS, (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
                                             usage.cache_write_5m_tokens, usage.cache_write_1h_tokens), strict=True):
            if count:
                self.tokens.labels(tenant, kind).inc(count)
        self.cost.labels(tenant).inc(call.cost_usd)
        if usage.first_content_at is not None:
            self.first_token.observe(usage.first_content_at - call.started)
        context = call.attribution.context
        if self._meter is not None and context is not None:
            self._meter.call_finished(context, self._record(call, usage, context.model))

    @staticmethod
    def _record(call: Call, usage: CallUsage, default_model: str) -> UsageRecord:
        a = call.attribution
        assert a.request_id is not None and call.cost_usd is not None
        duration_s = call.duration_s if call.duration_s is not None else time.monotonic() - call.started
        return UsageRecord(
            record_id=f"{a.request_id}:{call.id}", request_id=a.request_id, tenant=a.tenant, profile=a.profile,
            model=usage.model or default_model, outcome=_RECORD_OUTCOMES.get(call.outcome, "failed"), at=time.time(),
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cache_read_input_tokens=usage.cache_read_tokens, cache_creation_input_tokens=usage.cache_write_tokens,
            cache_write_1h_input_tokens=usage.cache_write_1h_tokens, cost_usd=call.cost_usd, session=a.session,
            reservation_id=call.reservation_id, kind="call", call_id=call.id,
            upstream_request_id=call.upstream_request_id, message_id=usage.message_id, status=call.status,
            duration_ms=round(duration_s * 1000, 2), first_token_ms=call.first_token_ms)
