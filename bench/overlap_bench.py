"""Where a pooled request's extra CPU goes: the pool alone (no daemon, no gateway) against the floor.

    python -m bench.overlap_bench [--requests 60] [--rounds 3]

Four arms at concurrency 1, interleaved, on the real CLI against the loopback fake upstream:

* floor: one hand-driven warm process, ``/clear`` after each answer in its caller's wait
  (`bench.latency_bench.floor_phase`);
* pool3: a `Pool` of 3 workers; the reset of one worker overlaps the next turn on another;
* pool3-no-overlap: the same pool, but the caller waits (untimed) until the reset is done;
* pool1: a pool of 1 worker; the next lease waits for the reset.

Printed per arm: p50, the CLI processes' CPU per request, and this process's own (the pool's Python
work, or the floor's driver). Results: bench/RESULTS.md (2026-12-04, the whole suite).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from bench import latency_bench as lb
from bench.pool_bench import fake_upstream_process, find_claude, pool_request, self_cpu_s, settle, workers_cpu_s
from bench.suite import table
from claudepool.pool.config import PoolConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile

Row = tuple[float, float, float]  # p50 ms, workers' CPU ms/request, own CPU ms/request


async def pool_round(pool: Pool, n: int, *, wait_for_reset: bool) -> Row:
    for _ in range(3):
        await pool_request(pool)
    await settle(pool)
    workers0, own0 = workers_cpu_s(pool), self_cpu_s()
    latencies = []
    for _ in range(n):
        latencies.append(await pool_request(pool))
        if wait_for_reset:
            await settle(pool)
    await settle(pool)  # the last resets are part of the cost
    return (statistics.median(latencies) * 1000, (workers_cpu_s(pool) - workers0) / n * 1000,
            (self_cpu_s() - own0) / n * 1000)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freeze-idle-after-s", type=float, default=PoolConfig().freeze_idle_after_s)
    parser.add_argument("--claude")
    args = parser.parse_args()
    claude = find_claude(args.claude)
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-overlap-") as tmp_s:
        tmp = Path(tmp_s)
        profile = Profile(name="bench", claude_bin=claude,
                          env={"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"})
        three = PoolConfig(min_idle=3, max_workers=3, max_turns=1_000_000, workdir=tmp / "w3",
                           freeze_idle_after_s=args.freeze_idle_after_s)
        one = PoolConfig(min_idle=1, max_workers=1, max_turns=1_000_000, workdir=tmp / "w1",
                         freeze_idle_after_s=args.freeze_idle_after_s)
        rows: dict[str, list[Row]] = {"floor": [], "pool3": [], "pool3-no-overlap": [], "pool1": []}
        async with Pool(profile, three) as pool3, Pool(profile, one) as pool1, \
                lb.hand_driven(profile, tmp / "floor", 1) as procs:
            await pool3.wait_ready(120)
            await pool1.wait_ready(120)
            for _ in range(args.rounds):
                floor = await lb.floor_phase(procs, args.requests, 1, 0.0)
                own = floor.own_cpu_ms_per_request or 0.0
                rows["floor"].append((floor.p50_ms, floor.cpu_ms_per_request - own, own))
                rows["pool3"].append(await pool_round(pool3, args.requests, wait_for_reset=False))
                rows["pool3-no-overlap"].append(await pool_round(pool3, args.requests, wait_for_reset=True))
                rows["pool1"].append(await pool_round(pool1, args.requests, wait_for_reset=False))
    print(table(["arm", "p50 ms", "CLI processes' CPU ms/req", "own CPU ms/req"],
                [[arm, *(round(statistics.median(r[i] for r in got), 1) for i in range(3))]
                 for arm, got in rows.items()]))


if __name__ == "__main__":
    asyncio.run(main())
