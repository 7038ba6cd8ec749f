"""A pool behind a gateway, composed as the daemon composes them, and its negative control: the same
pool with the provider's key and address in every worker's environment (the path before the gateway).

`make_stack(profile, upstream_url, key=…)` builds either; a test drives leases on ``stack.pool`` as the
daemon's prompt service does (`lease_for` sets the request context the gateway attributes calls to).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from claudepool.daemon.metrics import TenantLabels
from claudepool.gateway.attribution import from_leases
from claudepool.gateway.calls import Call
from claudepool.gateway.credentials import CredentialRegistry
from claudepool.gateway.metrics import GatewayMetrics
from claudepool.gateway.server import Gateway
from claudepool.gateway.settings import Caps, Upstream
from claudepool.pool.config import PoolConfig
from claudepool.pool.lease import Lease
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.tenancy.metering import RequestContext

TENANTS = ("acme", "beta")


@dataclass
class Recorder:
    """A `CallHook` keeping every call and the bytes relayed for it (what part B's meter will parse)."""

    calls: list[Call] = field(default_factory=list)
    bodies: dict[str, bytes] = field(default_factory=dict)
    relayed: dict[str, bytearray] = field(default_factory=dict)

    def call_started(self, call: Call, body: bytes) -> None:
        self.bodies[call.id] = body
        self.relayed[call.id] = bytearray()

    def response_chunk(self, call: Call, chunk: bytes) -> None:
        self.relayed[call.id] += chunk

    def call_finished(self, call: Call) -> None:
        self.calls.append(call)


@dataclass
class Stack:
    pool: Pool
    registry: CollectorRegistry
    recorder: Recorder
    gateway: Gateway | None = None  # None: the negative control, workers hold the key

    @property
    def credentials(self) -> CredentialRegistry:
        assert self.gateway is not None
        return self.gateway.credentials

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


async def lease_for(pool: Pool, tenant: str, request_id: str, session: str | None = None) -> Lease:
    """A lease with the request context the daemon's prompt service would give it."""
    lease = await pool.acquire(tenant, timeout_s=30)
    lease.context = RequestContext(request_id=request_id, tenant=tenant, profile=pool.profile.name, model="m",
                                   session=session)
    return lease


def worker_environ(pid: int | None) -> dict[str, str]:
    """A process's environment, as any process of the same user (a tenant's tool) can read it."""
    assert pid is not None
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    built: list[Stack] = []

    async def make(profile: Profile, upstream_url: str, *, key: str, direct: bool = False,
                   gateway_options: dict[str, Any] | None = None, caps: Caps | None = None, **config: Any) -> Stack:
        """``direct``: no gateway; every worker gets ``key`` and ``upstream_url`` in its environment.
        ``caps``: the upstream's account caps (default none)."""
        registry = CollectorRegistry()
        recorder = Recorder()
        pool_config = PoolConfig(**{"workdir": tmp_path / "workers", "min_idle": 1, "max_workers": 1, **config})
        if direct:
            env = {**profile.env, "ANTHROPIC_BASE_URL": upstream_url, "ANTHROPIC_API_KEY": key}
            stack = Stack(Pool(profile.model_copy(update={"env": env}), pool_config), registry, recorder)
        else:
            credentials = CredentialRegistry()
            pool = Pool(profile, pool_config, credentials=credentials)
            labels = TenantLabels(TENANTS, max_labels=10)
            metrics = GatewayMetrics(registry, labels, tenants=labels.names, live_credentials=lambda: len(credentials))
            gateway = Gateway(credentials, from_leases({profile.name: pool}),
                              {profile.name: Upstream("upstream", upstream_url, {"x-api-key": key},
                                                      caps=caps or Caps())},
                              metrics=metrics, **(gateway_options or {}))
            gateway.hooks.add(recorder)
            await gateway.start()
            stack = Stack(pool, registry, recorder, gateway)
        built.append(stack)
        await stack.pool.start()
        await stack.pool.wait_ready(60)
        return stack

    yield make
    for stack in built:
        async with asyncio.timeout(30):
            await stack.pool.close()
        if stack.gateway is not None:
            await stack.gateway.close(5)
