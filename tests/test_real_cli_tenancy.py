"""Metering on the real CLI: what the daemon bills equals what the upstream reported."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from claudepool.client import AsyncClient
from claudepool.store.base import Window
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import eventually

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]


async def test_metered_usage_equals_the_upstream_request_log(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream
) -> None:
    d = await make_daemon(pool={
        "claude_bin": real_claude, "min_idle": 1, "max_workers": 2,
        "timeouts": {"ready_timeout_s": 30},
    }, upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"upstream_max_retries": 0}, "lean": {}, "other": {}},
        tenants={"acme": {"daily_budget_usd": 5.0}})
    answers = []
    async with AsyncClient(key=KEYS["acme"], url=d.url) as acme, AsyncClient(key=KEYS["beta"], url=d.url) as beta:
        answers.append(await acme.prompt("first [[reply:one]]"))
        answers.append(await beta.prompt("second, a longer prompt " * 20))
        answers.append(await acme.prompt("third [[reply:three three three]]"))
        answers.append(await acme.prompt("fails upstream [[status:529]]"))
    assert [a.is_error for a in answers] == [False, False, False, True]

    async def settled() -> bool:
        return d.daemon.meter.backlog == 0 and len(await d.daemon.store.ledger()) == 4

    await eventually(settled, 10)

    usage = await d.daemon.store.usage(Window.current("day"))
    metered = {field: sum(getattr(t, field) for tenant in usage.values() for t in tenant.values())
               for field in ("requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                             "cache_creation_input_tokens", "cost_usd")}
    reported = [r.usage for r in upstream.message_requests() if r.usage is not None]
    assert len(reported) == 3  # the 529 carried no usage
    for field in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert metered[field] == sum(u[field] for u in reported), field
    assert metered["requests"] == 4
    assert metered["cost_usd"] == pytest.approx(sum(a.cost_usd for a in answers), rel=1e-9)
    assert metered["cost_usd"] > 0
    assert set(usage) == {"acme", "beta"}
    # The Prometheus counters say the same as the upstream's log.
    by_type: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(d.daemon.registry).decode()):
        for sample in family.samples:
            if sample.name == "claudepool_tokens_total":
                by_type[sample.labels["type"]] = by_type.get(sample.labels["type"], 0) + sample.value
    assert by_type["input"] == sum(u["input_tokens"] for u in reported)
    assert by_type["output"] == sum(u["output_tokens"] for u in reported)
    assert by_type["cache_read"] == sum(u["cache_read_input_tokens"] for u in reported)
    assert by_type["cache_write"] == sum(u["cache_creation_input_tokens"] for u in reported)
    state = await d.daemon.store.budget("acme")
    assert state.day_spent_usd == pytest.approx(sum(a.cost_usd for a in answers if a.tenant == "acme"), rel=1e-9)
    assert state.reserved_usd == pytest.approx(0, abs=1e-12)
    # One ledger record per model call (issue 12, part B), each naming the provider's own request id.
    ledger = await d.daemon.store.ledger()
    assert [r.kind for r in ledger] == ["call"] * 4
    assert [r.upstream_request_id for r in ledger] == [r.request_id for r in upstream.message_requests()]
    assert [(r.status, r.outcome) for r in ledger] == [(200, "ok")] * 3 + [(529, "model_error")]
    assert sum(r.requests for r in ledger) == 4 and all(r.message_id for r in ledger[:3])
    assert d.sample("claudepool_call_mismatches_total") == 0  # the CLI's figures agree with the calls'
