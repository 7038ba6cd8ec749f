"""Every model call's usage and cost, measured at the gateway, on the real CLI (issue 12, part B).

The fake provider records the usage it reported for each request; the gateway must read the same
from the bytes it relayed, whether a turn makes one call or a tool loop makes several.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from claudepool.daemon.metrics import TenantLabels
from claudepool.gateway.call_usage import CallUsageMeter
from claudepool.pool.profile import Profile
from claudepool.tenancy.budgets import Price, PricingTable
from claudepool.testing.fake_upstream import FakeUpstream
from tests.gateway_fixtures import TENANTS, MakeStack, lease_for, make_stack
from tests.helpers import collect

pytestmark = pytest.mark.real_cli
__all__ = ["make_stack"]

PRICES = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75, 6.0)})


def summed(upstream: FakeUpstream, field: str) -> int:
    return sum((r.usage or {}).get(field, 0) for r in upstream.message_requests())


@pytest.mark.parametrize("tools", [pytest.param((), id="one-call"), pytest.param(("Bash",), id="tool-loop")])
async def test_the_gateway_reads_each_calls_usage_as_the_provider_reported_it(
    make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, tools: tuple[str, ...],
    caplog: pytest.LogCaptureFixture
) -> None:
    args = ("--allowedTools", "Bash") if tools else ()
    profile = Profile(name="default", claude_bin=real_claude, tools=tools, args=args, upstream_max_retries=0)
    stack = await make_stack(profile, upstream.base_url, key="sk-ant-test")
    assert stack.gateway is not None
    meter = CallUsageMeter(PRICES, stack.registry, TenantLabels(TENANTS, max_labels=10), tenants=TENANTS)
    stack.gateway.hooks.add(meter)
    prompt = "[[tool:Bash:echo measured]]" if tools else "[[chunks:4]] hello there"
    lease = await lease_for(stack.pool, "acme", "req-1")
    with caplog.at_level(logging.INFO, logger="claudepool.gateway.server"):
        _, result = await collect(lease.run_turn(prompt), timeout_s=60)
    lease.release()
    assert not result.is_error, result.text
    calls = [c for c in stack.recorder.calls if c.path == "/v1/messages"]
    assert len(calls) == len(upstream.message_requests()) == (2 if tools else 1)
    assert all(c.usage is not None and c.usage.complete for c in calls)

    def tokens(kind: str) -> float | None:
        return stack.sample("claudepool_gateway_tokens_total", tenant="acme", kind=kind)

    assert tokens("input") == summed(upstream, "input_tokens")
    assert tokens("output") == summed(upstream, "output_tokens") > 0
    assert tokens("cache_read") == summed(upstream, "cache_read_input_tokens")
    assert tokens("cache_write_5m") == summed(upstream, "cache_creation_input_tokens") > 0
    # The turn's usage as the CLI reports it is the sum of its calls.
    assert result.usage.input_tokens == tokens("input") and result.usage.output_tokens == tokens("output")
    expected_usd = sum(PRICES.cost("m", input_tokens=(r.usage or {})["input_tokens"],
                                   output_tokens=(r.usage or {})["output_tokens"],
                                   cache_read_input_tokens=(r.usage or {})["cache_read_input_tokens"],
                                   cache_creation_input_tokens=(r.usage or {})["cache_creation_input_tokens"])
                       for r in upstream.message_requests())
    assert stack.sample("claudepool_gateway_cost_usd_total", tenant="acme") == pytest.approx(expected_usd)
    assert stack.sample("claudepool_gateway_cost_usd_total", tenant="beta") == 0
    lines: list[dict[str, Any]] = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "gateway call"]
    lines = [fields for fields in lines if fields["path"] == "/v1/messages"]
    assert [fields["message_id"] for fields in lines] == [c.usage.message_id for c in calls if c.usage]
    assert all(fields["cost_usd"] > 0 and fields["first_token_ms"] is not None for fields in lines)
    assert stack.sample("claudepool_gateway_time_to_first_token_seconds_count") == len(calls)
