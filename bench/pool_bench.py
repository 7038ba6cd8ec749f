"""Cold spawn per request versus the warm pool, on the real CLI and the loopback fake upstream.

For each concurrency level it runs the same number of requests two ways and reports p50/p95
latency, CPU seconds per request and memory:

* cold: ``claude -p PROMPT --output-format json`` with the same safe flags, one process per request
  (CPU from ``RUSAGE_CHILDREN``; memory is the peak RSS of one process);
* pool: lease a warm worker, run one turn, release (the reset runs after release). CPU is every
  worker's CPU time (psutil) plus this process's own, so the pool's overhead is included; memory is
  the PSS of each worker.

The fake upstream runs in a separate process and answers at once; its CPU is counted for neither.

    python -m bench.pool_bench --requests 40 --concurrency 1,4 --json-out bench/results/latest.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import psutil

from claudepool.pool.config import PoolConfig
from claudepool.pool.memory import MiB, pss_bytes
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.worker import TurnResult

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Summarise the benefits of a warm process pool in one line."


@dataclass
class Run:
    mode: str
    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    cpu_s_per_request: float
    mem_mib: float
    wall_s: float
    latencies_ms: list[float] = field(default_factory=list)  # every request's, for distributions


@contextlib.contextmanager
def fake_upstream_process() -> Iterator[str]:
    """The loopback fake upstream in a process of its own (its CPU counted in no arm); its base URL."""
    upstream = subprocess.Popen([sys.executable, "-m", "claudepool.testing.fake_upstream", "--port", "0"],
                                stdout=subprocess.PIPE, cwd=REPO)
    assert upstream.stdout is not None
    try:
        yield upstream.stdout.readline().decode().split()[-1]
    finally:
        upstream.terminate()
        upstream.wait()
        upstream.stdout.close()


def find_claude(explicit: str | None) -> str:
    for candidate in (explicit, os.environ.get("CLAUDEPOOL_TEST_CLAUDE"),
                      str(REPO / ".cache" / "claude-cli" / "node_modules" / ".bin" / "claude"),
                      shutil.which("claude")):
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("the real claude CLI was not found: run .ci/run first or pass --claude")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_requests(one: Callable[[], Awaitable[float]], requests: int, concurrency: int) -> list[float]:
    """Run ``requests`` calls of ``one`` with ``concurrency`` in flight; return their latencies."""
    remaining = requests
    latencies: list[float] = []

    async def runner() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await one())

    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return latencies


async def bench_cold(profile: Profile, home: Path, requests: int, concurrency: int) -> Run:
    # The same safe flags as a worker, in one-shot mode.
    argv = [profile.claude_bin, "-p", PROMPT, "--output-format", "json", "--tools", "",
            "--no-session-persistence", "--exclude-dynamic-system-prompt-sections"]
    if profile.bare:
        argv.append("--bare")
    env = profile.environ(home=home, tmpdir=home)

    async def one() -> float:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd=home)
        out, _ = await proc.communicate()
        if proc.returncode != 0 or orjson.loads(out).get("is_error"):
            raise RuntimeError(f"cold request failed: {out[:300]!r}")
        return time.perf_counter() - t0

    cpu0, wall0 = children_cpu_s(), time.perf_counter()
    latencies = await run_requests(one, requests, concurrency)
    wall, cpu = time.perf_counter() - wall0, children_cpu_s() - cpu0
    peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return Run("cold", concurrency, requests, percentile(latencies, 0.5) * 1000,
               percentile(latencies, 0.95) * 1000, cpu / requests, peak_rss_mib, wall,
               [round(x * 1000, 2) for x in latencies])


def workers_cpu_s(pool: Pool) -> float:
    total = 0.0
    for worker in pool.workers():
        if worker.pid is None:
            continue
        try:
            times = psutil.Process(worker.pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


async def settle(pool: Pool) -> None:
    """Wait until nothing is starting, leased, resetting or closing."""
    async with asyncio.timeout(120):
        while any(pool.counts()[k] for k in ("starting", "leased", "cleaning", "closing")):
            await asyncio.sleep(0.05)


async def pool_request(pool: Pool) -> float:
    """One request on a warm worker (lease, one turn, release; the reset runs after): its latency, s."""
    t0 = time.perf_counter()
    latency = 0.0
    async with pool.lease("bench") as lease:
        async for item in lease.run_turn(PROMPT):
            if isinstance(item, TurnResult):
                if item.is_error:
                    raise RuntimeError(f"pool request failed: {item.text[:300]}")
                latency = time.perf_counter() - t0
    return latency


async def bench_pool(profile: Profile, workdir: Path, requests: int, concurrency: int) -> Run:
    # Two workers beyond the concurrency absorb the resets that follow each release, so a new
    # request never waits for one. All are warmed before measuring: steady state, no spawns.
    size = concurrency + 2
    config = PoolConfig(min_idle=size, max_workers=size, max_turns=1_000_000, workdir=workdir)
    async with Pool(profile, config) as pool:
        await pool.wait_ready(120)

        def one() -> Awaitable[float]:
            return pool_request(pool)

        # Warm-up at full concurrency: the pool reaches its working size and every process has
        # served its slower first turns.
        for _ in range(3):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        await settle(pool)
        cpu0, self0, wall0 = workers_cpu_s(pool), self_cpu_s(), time.perf_counter()
        spawned0 = pool.stats.spawned
        latencies = await run_requests(one, requests, concurrency)
        wall = time.perf_counter() - wall0
        print(f"  pool c={concurrency}: {len(pool.workers())} workers, {pool.stats.spawned - spawned0} spawned "
              f"during the run", file=sys.stderr)
        await settle(pool)  # count the resets of the last requests
        cpu = workers_cpu_s(pool) - cpu0 + self_cpu_s() - self0
        pss = [p for w in pool.workers() if w.pid and (p := pss_bytes(w.pid))]
        return Run("pool", concurrency, requests, percentile(latencies, 0.5) * 1000,
                   percentile(latencies, 0.95) * 1000, cpu / requests, statistics.mean(pss) / MiB, wall)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--claude")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    claude = find_claude(args.claude)

    runs: list[Run] = []
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-bench-") as tmp:
        profile = Profile(name="bench", claude_bin=claude,
                          env={"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"})
        home = Path(tmp) / "cold-home"
        home.mkdir()
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            runs.append(await bench_cold(profile, home, args.requests, concurrency))
            runs.append(await bench_pool(profile, Path(tmp) / "workers", args.requests, concurrency))

    print(f"claude {subprocess.run([claude, '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{os.cpu_count()} CPUs, {args.requests} requests per run")
    print("| mode | concurrency | p50 ms | p95 ms | CPU s/request | memory MiB | p50 gain | CPU gain |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        cold = next(r for r in runs if r.mode == "cold" and r.concurrency == run.concurrency)
        gains = ("", "") if run.mode == "cold" else (
            f"{cold.p50_ms / run.p50_ms:.1f}×", f"{cold.cpu_s_per_request / run.cpu_s_per_request:.1f}×")
        memory = f"{run.mem_mib:.0f} {'peak RSS' if run.mode == 'cold' else 'PSS/worker'}"
        print(f"| {run.mode} | {run.concurrency} | {run.p50_ms:.0f} | {run.p95_ms:.0f} | "
              f"{run.cpu_s_per_request:.3f} | {memory} | {gains[0]} | {gains[1]} |")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_bytes(orjson.dumps([asdict(r) for r in runs], option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    asyncio.run(main())
