"""A warm floor that follows demand (``pool.min_idle_max``, issue 16 goal 5): the planner keeps the
last window's peak of concurrent leases plus one warm, between ``min_idle`` and ``min_idle_max``,
within the pool's cap. Stub workers, a synthetic clock (the harness of test_planner.py)."""

from __future__ import annotations

import doctest

import pytest

from claudepool.pool import demand as demand_module
from claudepool.pool.demand import DemandWindow, warm_floor
from claudepool.pool.planner import Assign, Phase, Retire, Spawn, plan
from tests.test_planner import Harness, make, of_type


def test_demand_doctests_pass() -> None:
    result = doctest.testmod(demand_module)
    assert result.attempted > 0 and result.failed == 0


def test_the_window_keeps_the_peak_of_its_last_seconds_only() -> None:
    window = DemandWindow(10.0)
    for now, count in [(0.0, 1), (1.0, 4), (1.5, 3), (2.0, 2), (3.0, 2), (4.0, 1)]:  # 1.5: second 1 keeps its 4
        window.leased(count, now=now)
    assert window.peak(now=5.0) == 4
    assert window.peak(now=11.5) == 2  # second 1 (the 4) is out of the window now
    assert window.peak(now=100.0) == 0


def test_the_floor_stays_between_min_idle_and_its_maximum() -> None:
    config = make(min_idle=1, min_idle_max=3).config
    window = DemandWindow(60.0)
    assert warm_floor(config, window, leased_now=0, now=0.0) == 1  # no demand seen: min_idle
    window.leased(6, now=0.0)
    assert warm_floor(config, window, leased_now=0, now=1.0) == 3  # 6 + 1 wanted, capped at the maximum
    assert warm_floor(config, window, leased_now=5, now=1.0) == 2  # 5 of the 7 are leased already
    assert warm_floor(config, window, leased_now=6, now=1.0) == 1
    assert warm_floor(make(min_idle=1).config, window, leased_now=0, now=1.0) == 1  # off: min_idle


def burst(h: Harness, n: int, now: float) -> int:
    """``n`` idle workers lent to ``n`` waiters at ``now``, then given back clean (returned, for the
    next step); what that step started."""
    workers = [h.worker(Phase.IDLE, last_active_at=now - 1) for _ in range(n)]
    waiters = [h.wait("acme") for _ in range(n)]
    actions = plan(h.state, now)
    assert len(of_type(actions, Assign)) == n and all(w.cancelled is False for w in waiters)
    for worker in workers:
        h.state.move(h.record(worker), Phase.RETURNED)
    return len(of_type(actions, Spawn))


@pytest.mark.parametrize("adaptive", [True, False])
def test_after_a_burst_the_pool_keeps_its_peak_warm_until_the_window_passes(adaptive: bool) -> None:
    # The control: a fixed floor of 0 (min_idle_max off) starts nothing and retires the idle at once.
    h = make(min_idle=0, min_idle_max=4 if adaptive else 0, max_workers=8, max_concurrent_spawns=8,
             max_idle_s=30, min_idle_window_s=60)
    assert burst(h, 3, now=0.0) == (1 if adaptive else 0)  # 3 leased + 1 warm
    if adaptive:
        h.worker(Phase.IDLE, last_active_at=5.0)  # the one it started, now ready
    assert of_type(plan(h.state, 5.0), Spawn) == []  # 3 given back + 1: the floor of 4 is met
    retired = of_type(plan(h.state, 40.0), Retire)  # idle 35 s, past max_idle_s, inside the window
    assert len(retired) == (0 if adaptive else 3)
    retired = of_type(plan(h.state, 70.0), Retire)  # the burst left the window: the floor is min_idle again
    assert len(retired) == (4 if adaptive else 0)
    assert h.state.count(Phase.IDLE) == 0


def test_the_floor_never_starts_past_the_pools_cap() -> None:
    h = make(min_idle=0, min_idle_max=8, max_workers=4, max_concurrent_spawns=8)
    assert burst(h, 4, now=0.0) == 0  # a peak of 4 wants 5 warm; the cap (RAM budget or max_workers) is 4
    assert of_type(plan(h.state, 5.0), Spawn) == []
