"""What the gateway exports, on the registry it is given: calls by tenant and outcome, their
duration, refusals by reason, and (at scrape time) the credentials valid now.

Labels follow the daemon's rules (`claudepool.daemon.metrics`): ``tenant`` is a configured tenant's
name or ``__other__`` (the daemon's `TenantLabels` decides), every known series starts at 0, and a
refusal carries only its reason: a refused call has no tenant, and its worker, path or credential
never becomes a label.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = GatewayMetrics(registry, lambda tenant: tenant, tenants=["acme"])
>>> metrics.refused("no_lease")
>>> registry.get_sample_value("claudepool_gateway_refusals_total", {"reason": "no_lease"})
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from claudepool.errors import (
    AccountCapped,
    BudgetStoreDown,
    CallOverAccountCap,
    CallOverBudget,
    CallUnpriceable,
    EndpointRefused,
    GatewayRequestTooLarge,
    MissingCredential,
    NoLease,
    NotInTurn,
    UnknownCredential,
    WrongSocket,
)
from claudepool.gateway.calls import OUTCOMES, Call

REFUSAL_REASONS = tuple(e.reason for e in (MissingCredential, UnknownCredential, NoLease, NotInTurn,
                                           EndpointRefused, GatewayRequestTooLarge, AccountCapped,
                                           CallOverAccountCap, CallOverBudget, CallUnpriceable, BudgetStoreDown,
                                           WrongSocket))
OTHER = "__other__"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """A `claudepool.gateway.calls.CallHook` that counts, and the refusal counter."""

    def __init__(self, registry: CollectorRegistry, tenant_label: Callable[[str], str], *,
                 tenants: Iterable[str] = (), live_credentials: Callable[[], int] | None = None) -> None:
        self._tenant = tenant_label
        r = registry
        self.calls = Counter("claudepool_gateway_calls", "Model calls the gateway forwarded, by tenant and outcome.",
                             ["tenant", "outcome"], registry=r)
        self.call_seconds = Histogram("claudepool_gateway_call_duration_seconds",
                                      "A forwarded call, from its arrival to the last byte relayed.",
                                      buckets=_SECONDS, registry=r)
        self.refusals = Counter("claudepool_gateway_refusals", "Calls the gateway refused, by reason.", ["reason"],
                                registry=r)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for tenant in (*sorted(set(tenants)), OTHER):
            for outcome in OUTCOMES:
                self.calls.labels(tenant, outcome)
        if live_credentials is not None:
            Gauge("claudepool_gateway_credentials", "Worker credentials valid now (one per live worker).",
                  registry=r).set_function(live_credentials)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason if reason in REFUSAL_REASONS else "endpoint").inc()

    # -- CallHook --------------------------------------------------------------------------------

    def call_started(self, call: Call, body: bytes) -> None:
        pass

    def response_chunk(self, call: Call, chunk: bytes) -> None:
        pass

    def call_finished(self, call: Call) -> None:
        self.calls.labels(self._tenant(call.attribution.tenant), call.outcome).inc()
        if call.duration_s is not None:
            self.call_seconds.observe(call.duration_s)
