"""The event-loop lag monitor (issue 16, goal 4): a blocked loop shows, a healthy one does not, and the
daemon exports it from its supervision tree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from claudepool.daemon.loop_lag import LoopLagMonitor
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.helpers import until

__all__ = ["make_daemon"]

NAME = "claudepool_event_loop_lag_seconds"


def count(registry: CollectorRegistry, le: str | None = None) -> float:
    if le is None:
        return registry.get_sample_value(f"{NAME}_count") or 0.0
    return registry.get_sample_value(f"{NAME}_bucket", {"le": le}) or 0.0


async def run_monitor(registry: CollectorRegistry, *, block_s: float) -> None:
    """Run a monitor for ~0.6 s of wall time, blocking the loop for ``block_s`` in the middle."""
    monitor = LoopLagMonitor(registry, interval_s=0.02)
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: count(registry) >= 3, 5)
        if block_s:
            time.sleep(block_s)  # what a synchronous call in a handler does to every request
        seen = count(registry)
        await until(lambda: count(registry) >= seen + 3, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()  # cancellation passes through the monitor untouched


async def test_a_blocked_loop_shows_as_a_large_lag() -> None:
    registry = CollectorRegistry()
    await run_monitor(registry, block_s=0.6)
    # The wake-up after the block came ~0.6 s late: above the 0.5 s bucket.
    assert count(registry, "+Inf") - count(registry, "0.5") >= 1
    assert (registry.get_sample_value(f"{NAME}_sum") or 0) >= 0.5


async def test_a_free_loop_shows_no_large_lag() -> None:
    # The negative control: the same run without the block has no observation near it.
    registry = CollectorRegistry()
    await run_monitor(registry, block_s=0)
    assert count(registry) >= 6
    assert count(registry, "0.25") == count(registry)


async def test_the_daemon_exports_the_lag(make_daemon: Callable[..., Awaitable[RunningDaemon]]) -> None:
    d = await make_daemon()

    async def observations() -> float:
        for family in text_string_to_metric_families(await d.metrics_text()):
            for sample in family.samples:
                if sample.name == f"{NAME}_count":
                    return sample.value
        return -1.0

    async with asyncio.timeout(10):
        while await observations() < 2:  # -1 if the series is missing: the monitor is not running
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("busy", [True, False])
async def test_the_monitor_samples_rarely_while_nothing_is_served(busy: bool) -> None:
    # An idle daemon's loop has no request to delay: ten wake-ups a second were most of its idle CPU
    # (issue 16 goal 5). The busy run is the control: the same monitor samples at its interval.
    registry = CollectorRegistry()
    monitor = LoopLagMonitor(registry, interval_s=0.02, idle_interval_s=0.3, busy=lambda: busy)
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.7)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (count(registry) >= 10) is busy, count(registry)
    assert count(registry) >= 2  # idle, it still samples (a stalled maintenance loop shows)
