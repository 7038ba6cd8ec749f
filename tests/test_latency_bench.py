"""The latency benchmark's hand-driven arms, on the fake CLI: what each arm claims to schedule, it does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import latency_bench as lb
from claudepool.pool.profile import Profile


def count_turns(procs: list[lb.HandDriven], served: Counter[int]) -> None:
    for index, proc in enumerate(procs):
        turn = proc.turn

        async def counted(prompt: str, index: int = index,
                          turn: Callable[[str], Awaitable[lb.Sample]] = turn) -> lb.Sample:
            served[index] += 1
            return await turn(prompt)

        proc.turn = counted  # type: ignore[method-assign]


async def served_by(profile: Profile, tmp_path: Path, phase: Callable[..., Awaitable[lb.Phase]],
                    n: int) -> tuple[lb.Phase, Counter[int]]:
    """``phase`` over 3 hand-driven fake-CLI processes at c=1: its result, and turns per process."""
    async with lb.hand_driven(profile, tmp_path, 3) as procs:
        served: Counter[int] = Counter()
        count_turns(procs, served)
        return await phase(procs, n, 1, 0.0), served


async def test_floor_overlap_cleans_in_the_background_so_the_next_turn_takes_another_process(
        fake_profile: Profile, tmp_path: Path) -> None:
    phase, served = await served_by(fake_profile, tmp_path, lb.floor_overlap_phase, 20)
    assert phase.mode == "floor-overlap" and phase.requests == 20 and len(phase.latencies_ms) == 20
    # The reset runs beside the next turn, so that turn takes another process: more than one serves
    # (a /clear in the caller's wait would leave one), and at least two take turns.
    assert len(served) >= 2, served
    assert served.most_common(2)[1][1] >= 5, served


async def test_the_floor_drives_one_process_per_runner_and_counts_no_spare(
        fake_profile: Profile, tmp_path: Path) -> None:
    phase, served = await served_by(fake_profile, tmp_path, lb.floor_phase, 10)
    assert phase.requests == 10 and len(phase.latencies_ms) == 10
    assert set(served) == {0}, served
