"""The provider account's own limits on the real CLI behind a real daemon (issue 12, "The account's
own limits"): what every answer says of the account reaches the gauges, per account name."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError
from claudepool.protocol.wire import PromptResult
from claudepool.testing.fake_upstream import RATELIMITS, FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]


async def test_every_answer_of_the_provider_sets_the_accounts_gauges(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream,
) -> None:
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-api03-default",
                  "profiles": {"tier2": {"api_key": "sk-ant-api03-tier2"}}},
        profiles={"default": {"upstream_max_retries": 0}, "tier2": {"upstream_max_retries": 0}})
    # Every configured account's throttle counts exist before any call.
    for account in ("default", "tier2"):
        for status in ("429", "529"):
            assert d.sample("claudepool_upstream_throttled_total", account=account, status=status) == 0
    assert d.sample("claudepool_upstream_ratelimit_utilisation", account="default", kind="requests") is None

    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        await client.prompt("[[ratelimit_remaining:1000]] [[reply:hi]]")
        assert d.sample("claudepool_upstream_ratelimit_utilisation", account="default", kind="requests") == 0.75
        assert d.sample("claudepool_upstream_ratelimit_remaining", account="default", kind="input_tokens") == 1000
        failed = await client.prompt("[[status:429]]")
    assert failed.is_error
    for kind, label in (("requests", "requests"), ("input-tokens", "input_tokens"),
                        ("output-tokens", "output_tokens")):
        limit = RATELIMITS[kind]
        assert d.sample("claudepool_upstream_ratelimit_limit", account="default", kind=label) == limit
    # The last answer (the 429) reported limit - 1 left; the one before, 1000.
    assert d.sample("claudepool_upstream_ratelimit_remaining", account="default", kind="requests") == 3999
    assert d.sample("claudepool_upstream_throttled_total", account="default", status="429") == 1
    assert d.sample("claudepool_upstream_throttled_total", account="tier2", status="429") == 0
    assert d.sample("claudepool_upstream_ratelimit_utilisation", account="tier2", kind="requests") is None
    # No key material in any label.
    text = await d.metrics_text()
    assert "sk-ant" not in text


IDLE_S = 2.0
WATCHDOG_S = 12.0


@pytest.mark.parametrize("cut", [True, False], ids=["idle-cut", "no-cut-negative-control"])
async def test_a_stalled_provider_costs_the_idle_timeout_not_the_turn_watchdog(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream, cut: bool,
) -> None:
    """The first answer stalls after its first text delta; the CLI's retry gets a whole one. With the
    cut the turn ends answered after about IDLE_S; without it, only the watchdog ends it."""
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1,
              "timeouts": {"ready_timeout_s": 30, "turn_idle_timeout_s": WATCHDOG_S}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-api03-default",
                  "idle_timeout_s": IDLE_S if cut else 0},
        profiles={"default": {"upstream_max_retries": 2, "upstream_timeout_ms": 120_000}})
    upstream.scripted[:] = [{"stall": ""}, {"reply": "recovered"}]
    started = time.monotonic()
    async with AsyncClient(key=KEYS["acme"], url=d.url) as client:
        try:
            answer: PromptResult | None = await client.prompt("hello")
        except RemoteError:
            answer = None
    elapsed_s = time.monotonic() - started
    if cut:
        assert answer is not None and not answer.is_error and answer.text == "recovered"
        assert IDLE_S <= elapsed_s < WATCHDOG_S / 2, elapsed_s
        assert d.sample("claudepool_gateway_calls_total", tenant="acme", outcome="upstream_idle") == 1
        assert len(upstream.message_requests()) == 2
    else:
        assert answer is None or answer.is_error
        assert elapsed_s >= WATCHDOG_S, elapsed_s
        assert d.sample("claudepool_gateway_calls_total", tenant="acme", outcome="upstream_idle") == 0
