"""The provider account's rate limits as responses report them (issue 12, the account's own limits)."""

from __future__ import annotations

import datetime as dt
import doctest

from prometheus_client import CollectorRegistry

from claudepool.gateway import ratelimits
from claudepool.gateway.ratelimits import AccountLimits, LimitKind, read_limits

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)

HEADERS = {
    "anthropic-ratelimit-requests-limit": "4000", "anthropic-ratelimit-requests-remaining": "1000",
    "anthropic-ratelimit-requests-reset": "2026-12-02T12:00:30Z",
    "anthropic-ratelimit-input-tokens-limit": "400000", "anthropic-ratelimit-input-tokens-remaining": "360000",
    "anthropic-ratelimit-input-tokens-reset": "2026-12-02T12:00:05+00:00",
    "anthropic-ratelimit-output-tokens-limit": "80000", "anthropic-ratelimit-output-tokens-remaining": "bogus",
}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_the_module_doctests_pass() -> None:
    result = doctest.testmod(ratelimits)
    assert (result.attempted > 0, result.failed) == (True, 0)


def test_readings_per_kind_with_their_reset_times_and_malformed_ones_left_out() -> None:
    readings = read_limits(HEADERS)
    assert set(readings) == {LimitKind.REQUESTS, LimitKind.INPUT_TOKENS}
    assert readings[LimitKind.REQUESTS].reset_at == T0 + dt.timedelta(seconds=30)
    assert readings[LimitKind.REQUESTS].utilisation(T0) == 0.75
    assert readings[LimitKind.INPUT_TOKENS].utilisation(T0) == 0.1


def test_gauges_per_account_and_kind_and_a_refilled_window_reads_zero() -> None:
    registry = CollectorRegistry()
    now = [T0]
    limits = AccountLimits(registry, accounts=("default", "tier2"), clock=lambda: now[0])
    limits.observe("default", HEADERS, status=200)
    assert sample(registry, "claudepool_upstream_ratelimit_utilisation", account="default", kind="requests") == 0.75
    assert sample(registry, "claudepool_upstream_ratelimit_remaining", account="default", kind="input_tokens") == 360000
    assert sample(registry, "claudepool_upstream_ratelimit_limit", account="default", kind="requests") == 4000
    assert sample(registry, "claudepool_upstream_ratelimit_utilisation", account="tier2", kind="requests") is None
    now[0] = T0 + dt.timedelta(seconds=10)  # past the input-token window's reset, not the requests'
    assert sample(registry, "claudepool_upstream_ratelimit_utilisation", account="default", kind="input_tokens") == 0
    assert sample(registry, "claudepool_upstream_ratelimit_remaining", account="default", kind="input_tokens") == 400000
    assert sample(registry, "claudepool_upstream_ratelimit_utilisation", account="default", kind="requests") == 0.75


def test_a_later_response_replaces_the_reading() -> None:
    registry = CollectorRegistry()
    limits = AccountLimits(registry, clock=lambda: T0)
    limits.observe("default", HEADERS, status=200)
    limits.observe("default", {**HEADERS, "anthropic-ratelimit-requests-remaining": "3600"}, status=200)
    assert sample(registry, "claudepool_upstream_ratelimit_utilisation", account="default", kind="requests") == 0.1


def test_throttled_answers_are_counted_from_zero_per_configured_account() -> None:
    registry = CollectorRegistry()
    limits = AccountLimits(registry, accounts=("default",), clock=lambda: T0)
    assert sample(registry, "claudepool_upstream_throttled_total", account="default", status="429") == 0
    limits.observe("default", {"retry-after": "12"}, status=429)
    limits.observe("default", {}, status=529)
    limits.observe("default", {}, status=500)
    assert sample(registry, "claudepool_upstream_throttled_total", account="default", status="429") == 1
    assert sample(registry, "claudepool_upstream_throttled_total", account="default", status="529") == 1
    assert sample(registry, "claudepool_upstream_throttled_total", account="default", status="500") is None
