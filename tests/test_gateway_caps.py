"""The provider account's caps at the gateway (issue 12, "The account's own limits"): every tenant's
calls together never exceed the cap in any window; batch calls are refused before interactive ones;
a refused call is the provider's own 429 with retry-after. Real gateway, workers on the fake CLI, the
fake provider counting what it received; the test plays the workers' CLI with their credentials."""

from __future__ import annotations

import asyncio
import doctest
import time
from collections.abc import Callable

import orjson
import pytest

from claudepool.gateway import caps as caps_module
from claudepool.gateway.caps import AccountCaps
from claudepool.gateway.settings import Caps, UpstreamSettings
from claudepool.pool.profile import Profile
from claudepool.pool.shares import Priority
from claudepool.tenancy.metering import RequestContext
from claudepool.testing.fake_upstream import FakeUpstream
from tests.gateway_fixtures import MakeStack, Stack, make_stack, worker_environ
from tests.test_gateway import call

__all__ = ["make_stack"]

KEY = "sk-ant-api03-provider-key-caps"
BODY = orjson.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "[[reply:hi]]"}]})


@pytest.fixture
def profile(make_fake_profile: Callable[..., Profile]) -> Profile:
    return make_fake_profile(name="default")


def test_the_module_doctests_pass() -> None:
    result = doctest.testmod(caps_module)
    assert (result.attempted > 0, result.failed) == (True, 0)


async def capped_stack(make_stack: MakeStack, profile: Profile, upstream: FakeUpstream, caps: Caps,
                       window_s: float = 60.0, buckets: int = 60) -> Stack:
    return await make_stack(profile, upstream.base_url, key=KEY, min_idle=2, max_workers=2, caps=caps,
                            gateway_options={"caps": AccountCaps(window_s=window_s, buckets=buckets)})


async def worker_in_turn(stack: Stack, tenant: str, priority: Priority) -> tuple[str, str]:
    lease = await stack.pool.acquire(tenant, timeout_s=30, priority=priority)
    lease.context = RequestContext(request_id=f"req-{priority}", tenant=tenant, profile="default", model="m")
    lease.run_turn("[[hang]]")
    env = worker_environ(lease.worker.pid)
    return env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"]


@pytest.mark.parametrize("capped", [True, False], ids=["capped", "no-cap-negative-control"])
async def test_concurrent_calls_never_exceed_the_cap_in_any_window(
    make_stack: MakeStack, profile: Profile, upstream: FakeUpstream, capped: bool
) -> None:
    # 10 requests per 1 s window (limit 20 x headroom 0.5), counted in 10 sub-buckets; two tenants'
    # workers send 8 calls at a time, for 3 s, retrying a 429 after its retry-after.
    window_s = 1.0
    caps = Caps(requests_per_minute=10, batch_fraction=1.0) if capped else Caps()
    stack = await capped_stack(make_stack, profile, upstream, caps, window_s=window_s, buckets=10)
    workers = [await worker_in_turn(stack, tenant, Priority.INTERACTIVE) for tenant in ("acme", "beta")]
    statuses: list[int] = []
    deadline = time.monotonic() + 3 * window_s

    async def client(url: str, credential: str) -> None:
        while time.monotonic() < deadline:
            status, headers, body = await call(url, credential, body=BODY)
            statuses.append(status)
            if status == 429:
                assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
                assert headers["x-should-retry"] == "true" and int(headers["retry-after"]) >= 1
                await asyncio.sleep(0.05)  # the CLI would wait retry-after; a shorter wait presses harder

    async with asyncio.timeout(30):
        await asyncio.gather(*(client(*workers[i % 2]) for i in range(8)))
    arrivals = sorted(r.received_at for r in upstream.message_requests())
    # The most calls the provider saw in any window (less 50 ms, for the hop's jitter between the
    # gateway's admission and the provider's arrival).
    busiest = max(sum(1 for t in arrivals if start <= t < start + window_s - 0.05) for start in arrivals)
    refused = statuses.count(429)
    if capped:
        assert busiest <= 10, busiest
        assert refused > 0 and len(arrivals) >= 20  # it admitted, window after window
        assert stack.sample("claudepool_gateway_refusals_total", reason="account_cap") == refused
    else:
        assert busiest > 10 and refused == 0
        assert stack.sample("claudepool_gateway_refusals_total", reason="account_cap") == 0


async def test_batch_calls_are_refused_before_interactive_ones(
    make_stack: MakeStack, profile: Profile, upstream: FakeUpstream
) -> None:
    # A cap of 10 requests a minute; batch may fill half of it.
    stack = await capped_stack(make_stack, profile, upstream, Caps(requests_per_minute=10, batch_fraction=0.5))
    interactive = await worker_in_turn(stack, "acme", Priority.INTERACTIVE)
    batch = await worker_in_turn(stack, "beta", Priority.BATCH)
    batch_statuses = [(await call(*batch, body=BODY))[0] for _ in range(7)]
    assert batch_statuses == [200] * 5 + [429] * 2
    interactive_statuses = [(await call(*interactive, body=BODY))[0] for _ in range(6)]
    assert interactive_statuses == [200] * 5 + [429]
    assert len(upstream.message_requests()) == 10
    assert stack.sample("claudepool_gateway_refusals_total", reason="account_cap") == 3


async def test_input_tokens_are_capped_by_the_bodies_bytes(
    make_stack: MakeStack, profile: Profile, upstream: FakeUpstream
) -> None:
    # Room for exactly 3 bodies' bytes a minute; a body bigger than the whole cap never fits.
    stack = await capped_stack(make_stack, profile, upstream, Caps(input_tokens_per_minute=3 * len(BODY)))
    worker = await worker_in_turn(stack, "acme", Priority.INTERACTIVE)
    assert [(await call(*worker, body=BODY))[0] for _ in range(4)] == [200, 200, 200, 429]
    big = orjson.dumps({**orjson.loads(BODY), "system": "x" * 4 * len(BODY)})
    status, headers, _ = await call(*worker, body=big)
    assert (status, headers["x-should-retry"]) == (413, "false")
    assert len(upstream.message_requests()) == 3
    assert stack.sample("claudepool_gateway_refusals_total", reason="over_account_cap") == 1


def test_the_caps_are_the_limits_times_the_headroom_and_overrides_are_accounts_of_their_own() -> None:
    settings = UpstreamSettings.model_validate({
        "api_key": "k", "requests_per_minute": 4000, "input_tokens_per_minute": 400_000,
        "profiles": {"tier2": {"api_key": "k2", "requests_per_minute": 50, "headroom_fraction": 0.9}}})
    default = settings.resolve("default", {})
    tier2 = settings.resolve("tier2", {})
    assert (default.account, default.caps) == ("default", Caps(2800, 280_000, 0.5))
    assert (tier2.account, tier2.caps) == ("tier2", Caps(45, 360_000, 0.5))
    assert not UpstreamSettings().resolve("default", {}).caps
