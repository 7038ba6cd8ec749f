"""The provider account's own rate limits, as every response reports them, exported per account.

Every tenant shares the account's limits, so they are watched where all calls pass: the gateway
hands each response's headers to `AccountLimits.observe`. The provider reports, per kind (requests,
tokens, input tokens, output tokens), ``anthropic-ratelimit-KIND-limit``, ``-remaining`` and
``-reset`` (an RFC 3339 time); a 429's ``retry-after`` is relayed to the CLI, which honours it. A
reading holds until the next response or its reset time, after which the window has refilled and
utilisation reads 0.

The account label is the name the configuration gives the key (``default``, or an
``[upstream.profiles.NAME]`` override): never key material.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> limits = AccountLimits(registry)
>>> limits.observe("default", {"anthropic-ratelimit-requests-limit": "50",
...                            "anthropic-ratelimit-requests-remaining": "10"}, status=200)
>>> registry.get_sample_value("claudepool_upstream_ratelimit_utilisation",
...                           {"account": "default", "kind": "requests"})
0.8
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# The provider's throttling answers: 429 (a rate limit) and 529 (overloaded).
THROTTLE_STATUSES = frozenset({429, 529})


class LimitKind(enum.StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"

    @property
    def header(self) -> str:
        return "anthropic-ratelimit-" + self.value.replace("_", "-")


@dataclass(frozen=True)
class LimitReading:
    limit: int
    remaining: int
    reset_at: dt.datetime | None

    def utilisation(self, now: dt.datetime) -> float:
        if self.limit <= 0 or (self.reset_at is not None and now >= self.reset_at):
            return 0.0
        return min(1.0, max(0.0, (self.limit - self.remaining) / self.limit))


def read_limits(headers: Mapping[str, str]) -> dict[LimitKind, LimitReading]:
    """The readings a response's headers carry (a kind with a missing or malformed header is left out).
    ``headers`` may be any mapping; aiohttp's is case-insensitive, a plain dict must be lower-case."""
    readings: dict[LimitKind, LimitReading] = {}
    for kind in LimitKind:
        try:
            limit = int(headers[f"{kind.header}-limit"])
            remaining = int(headers[f"{kind.header}-remaining"])
        except (KeyError, ValueError):
            continue
        readings[kind] = LimitReading(limit, remaining, _parse_time(headers.get(f"{kind.header}-reset")))
    return readings


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


class AccountLimits(Collector):
    """The latest reading per account and kind, and the throttled answers per account, exported at
    scrape time on the registry it is given."""

    def __init__(self, registry: CollectorRegistry, *, accounts: tuple[str, ...] = (),
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._clock = clock
        self._readings: dict[tuple[str, LimitKind], LimitReading] = {}
        # Every configured account's throttle counts exist from the start, so a rate() over them
        # has a baseline before the first 429.
        self._throttled: Counter[tuple[str, int]] = Counter(
            {(account, status): 0 for account in accounts for status in THROTTLE_STATUSES})
        # observe runs on the event loop, collect in the scrape's thread.
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, account: str, headers: Mapping[str, str], *, status: int) -> None:
        readings = read_limits(headers)
        with self._lock:
            for kind, reading in readings.items():
                self._readings[account, kind] = reading
            if status in THROTTLE_STATUSES:
                self._throttled[account, status] += 1

    def collect(self) -> Iterator[Metric]:
        utilisation = GaugeMetricFamily(
            "claudepool_upstream_ratelimit_utilisation",
            "Share of the provider account's rate limit in use (1 - remaining/limit), as last reported.",
            labels=["account", "kind"])
        remaining = GaugeMetricFamily("claudepool_upstream_ratelimit_remaining",
                                      "What the provider last reported left in the current window.",
                                      labels=["account", "kind"])
        limit = GaugeMetricFamily("claudepool_upstream_ratelimit_limit", "The provider account's limit per window.",
                                  labels=["account", "kind"])
        throttled = CounterMetricFamily("claudepool_upstream_throttled",
                                        "Provider answers 429 (rate limited) and 529 (overloaded).",
                                        labels=["account", "status"])
        now = self._clock()
        with self._lock:
            readings = sorted(self._readings.items())
            counts = sorted(self._throttled.items())
        for (account, kind), reading in readings:
            labels = [account, kind.value]
            utilisation.add_metric(labels, reading.utilisation(now))
            refilled = reading.reset_at is not None and now >= reading.reset_at
            remaining.add_metric(labels, reading.limit if refilled else reading.remaining)
            limit.add_metric(labels, reading.limit)
        for (account, status), count in counts:
            throttled.add_metric([account, str(status)], count)
        yield from (utilisation, remaining, limit, throttled)
