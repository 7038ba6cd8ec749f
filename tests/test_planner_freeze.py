"""The planner's freezing of idle workers (``freeze_idle_after_s``, issue 16 goal 5): stub workers,
a synthetic clock. The real CLI's side of it is in test_real_cli_freeze.py."""

from __future__ import annotations

from claudepool.pool.planner import Assign, Freeze, Phase, Thaw, next_freeze_at, plan
from tests.test_planner import make, of_type


def test_an_idle_worker_is_frozen_once_idle_long_enough_and_only_once() -> None:
    h = make(min_idle=2, freeze_idle_after_s=5)
    old = h.worker(Phase.IDLE, last_active_at=0.0)
    new = h.worker(Phase.IDLE, last_active_at=3.0)
    assert of_type(plan(h.state, 4.9), Freeze) == []
    assert next_freeze_at(h.state) == 5.0
    assert of_type(plan(h.state, 5.0), Freeze) == [Freeze(old)]
    old.frozen = True
    assert next_freeze_at(h.state) == 8.0
    assert of_type(plan(h.state, 8.0), Freeze) == [Freeze(new)]
    new.frozen = True
    assert of_type(plan(h.state, 100.0), Freeze) == []  # nothing to freeze twice
    assert next_freeze_at(h.state) is None


def test_a_frozen_worker_is_thawed_just_before_it_is_lent() -> None:
    h = make(min_idle=1, freeze_idle_after_s=5)
    worker = h.worker(Phase.IDLE, last_active_at=0.0, frozen=True)
    waiter = h.wait("acme")
    actions = plan(h.state, 10.0)
    assert actions[:2] == [Thaw(worker), Assign(worker, waiter)]
    assert h.record(worker).phase is Phase.LEASED


def test_a_running_worker_is_lent_without_a_thaw() -> None:
    h = make(min_idle=1, freeze_idle_after_s=5)
    worker = h.worker(Phase.IDLE, last_active_at=9.0)
    waiter = h.wait("acme")
    actions = plan(h.state, 10.0)
    assert of_type(actions, Thaw) == [] and of_type(actions, Assign) == [Assign(worker, waiter)]


def test_a_worker_lent_is_not_frozen_and_busy_ones_never_are() -> None:
    h = make(min_idle=0, freeze_idle_after_s=1)
    idle = h.worker(Phase.IDLE, last_active_at=0.0)
    for phase in (Phase.LEASED, Phase.CLEANING, Phase.STARTING):
        h.worker(phase, last_active_at=0.0)
    waiter = h.wait("acme")
    actions = plan(h.state, 50.0)
    assert of_type(actions, Assign) == [Assign(idle, waiter)]
    assert of_type(actions, Freeze) == []  # the one idle worker was lent; the others are not idle


def test_with_the_knob_at_zero_no_worker_is_ever_frozen() -> None:
    h = make(min_idle=2, freeze_idle_after_s=0)
    h.worker(Phase.IDLE, last_active_at=0.0)
    h.worker(Phase.IDLE, last_active_at=0.0)
    assert of_type(plan(h.state, 1e6 - 1), Freeze) == []
    assert next_freeze_at(h.state) is None
