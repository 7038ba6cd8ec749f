"""Why the pool's schedule costs CPU: a CLI that has just worked is faster than one that sat idle.

    python -m bench.warmth_bench [--requests 60] [--rounds 3]

Hand-driven warm processes only (no pool, no daemon), the real CLI against the loopback fake
upstream, concurrency 1, each request a turn then ``/clear`` then ``get_settings`` (the pool's reset,
by hand), arms interleaved:

* one: one process, each request right after the last one's reset (the floor, with the settings check);
* gap N ms: the same process, idle N ms after each reset;
* alternating: two processes taking turns, nothing overlapping: each sits idle while the other
  works, as a worker does when the pool lends the next request to another worker while it resets.

Printed per arm: p50, the CLI processes' CPU per request, and their context switches and minor
page faults per request (`/proc`). Results: bench/RESULTS.md (2026-12-06).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import latency_bench as lb
from bench.pool_bench import fake_upstream_process, find_claude
from bench.suite import table
from claudepool.pool.profile import Profile

Row = tuple[float, float, float, float]  # p50 ms, CPU ms, context switches, minor faults; per request


def switches_and_faults(procs: list[lb.HandDriven]) -> tuple[int, int]:
    """Context switches of every thread, and minor page faults, of ``procs`` so far."""
    switches = faults = 0
    for proc in procs:
        task_dir = Path(f"/proc/{proc.proc.pid}/task")
        for task in task_dir.iterdir():
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches" in line:
                    switches += int(line.split()[1])
        faults += int(Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    return switches, faults


async def request(proc: lb.HandDriven, i: int) -> float:
    latency_s, _ = await proc.turn(lb.PROMPT)
    await proc.clear()
    await proc.get_settings(f"settings-{i}")
    return latency_s


async def arm(procs: list[lb.HandDriven], n: int, gap_s: float = 0.0) -> Row:
    """``n`` requests taking ``procs`` in turn, each followed by ``gap_s`` of idleness."""
    switches0, faults0 = switches_and_faults(procs)
    cpu0 = sum(p.cpu_s() for p in procs)
    latencies = []
    for i in range(n):
        latencies.append(await request(procs[i % len(procs)], i))
        if gap_s:
            await asyncio.sleep(gap_s)
    switches1, faults1 = switches_and_faults(procs)
    return (statistics.median(latencies) * 1000, (sum(p.cpu_s() for p in procs) - cpu0) / n * 1000,
            (switches1 - switches0) / n, (faults1 - faults0) / n)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gaps-ms", default="5,20,50,200")
    parser.add_argument("--claude")
    args = parser.parse_args()
    gaps_s = [float(g) / 1000 for g in args.gaps_ms.split(",") if g]
    claude = find_claude(args.claude)
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-warmth-") as tmp_s:
        profile = Profile(name="bench", claude_bin=claude,
                          env={"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"})
        rows: dict[str, list[Row]] = {"one": [], **{f"gap {g * 1000:g} ms": [] for g in gaps_s}, "alternating": []}
        async with lb.hand_driven(profile, Path(tmp_s), 2) as procs:
            for _ in range(5):  # the first turns of a process are slower
                for i, proc in enumerate(procs):
                    await request(proc, i)
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                rows["one"].append(await arm(procs[:1], args.requests))
                for g in gaps_s:
                    rows[f"gap {g * 1000:g} ms"].append(await arm(procs[:1], args.requests, g))
                rows["alternating"].append(await arm(procs, args.requests))
    print(table(["arm", "p50 ms", "CLI CPU ms/req", "context switches/req", "minor faults/req"],
                [[name, *(round(statistics.median(r[i] for r in got), 1) for i in range(4))]
                 for name, got in rows.items()]))
    print(f"{args.rounds} rounds of {args.requests} requests per arm, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
