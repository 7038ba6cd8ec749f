"""What the sandbox costs a worker (issue 13): the same Bash-enabled profile, with and without it.

Both arms run the real CLI behind one gateway (the sandboxed worker reaches it through its own Unix
socket and the relay in its sandbox, the other over loopback TCP), against the loopback fake
upstream answering at once from a process of its own.

* spawn: a worker from nothing to its answer to ``initialize`` (the sandbox's namespaces, mounts and
  relay included), then closed; the arms alternate.
* memory: PSS and RSS of a ready worker's whole process tree (bwrap and socat included), after a turn.
* turns: lease, one turn (one model call), release and the reset that follows (the sandboxed
  worker's reset also kills what the lease left and empties its workspace); the arms alternate
  block by block.

    python -m bench.sandbox_bench --spawns 10 --turns 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.gateway_bench import KEY, alternate, timed_turn
from bench.pool_bench import fake_upstream_process, find_claude, percentile
from claudepool.gateway.attribution import from_leases
from claudepool.gateway.credentials import CredentialRegistry
from claudepool.gateway.server import Gateway
from claudepool.gateway.settings import Upstream
from claudepool.pool.config import PoolConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.worker import Worker

ARMS = ("unsandboxed", "sandboxed")


def tree_cpu_s(pool: Pool) -> float:
    """CPU of every worker's whole live process tree, and what each process reaped: a sandboxed
    worker's CLI is a grandchild of its leader (bwrap), alive, so the leader's own figures miss it."""
    total = 0.0
    for worker in pool.workers():
        if worker.pid is None:
            continue
        try:
            root = psutil.Process(worker.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def profile(name: str, claude: str) -> Profile:
    return Profile(name=name, claude_bin=claude, tools=("Bash",), allowed_tools=("Bash",),
                   sandbox=name == "sandboxed")


async def spawns(claude: str, credentials: CredentialRegistry, workdir: Path, count: int) -> list[str]:
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for i in range(count):
        for arm in ARMS if i % 2 == 0 else reversed(ARMS):
            worker = Worker(profile(arm, claude), workdir_root=workdir / arm, credentials=credentials)
            t0 = time.perf_counter()
            await worker.start()
            seconds[arm].append(time.perf_counter() - t0)
            await worker.close()
    return [f"| spawn to ready | {arm} | {count} | {statistics.median(s) * 1000:.0f} | "
            f"{percentile([x * 1000 for x in s], 0.95):.0f} | |" for arm, s in seconds.items()]


async def turns(pools: dict[str, Pool], total: int, block: int) -> list[str]:
    for pool in pools.values():  # first turns are slower: not counted
        for _ in range(3):
            await timed_turn(pool)()
    arms = await alternate({name: timed_turn(pool) for name, pool in pools.items()}, total, block,
                           lambda name: tree_cpu_s(pools[name]))
    rows = []
    for name, arm in arms.items():
        ms = [t * 1000 for t in arm.latencies_s]
        worker = pools[name].workers()[0]
        pss = (worker.measure_memory() or 0) / 2**20
        rows.append(f"| turn + reset | {name} | {len(ms)} | {statistics.median(ms):.1f} | "
                    f"{percentile(ms, 0.95):.1f} | CPU {arm.per_request_ms(arm.cpu_s):.1f} ms/turn; "
                    f"PSS {pss:.0f} MiB, RSS {(worker.rss_bytes or 0) / 2**20:.0f} MiB |")
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spawns", type=int, default=10, help="workers started per arm")
    parser.add_argument("--turns", type=int, default=100, help="turns per arm")
    parser.add_argument("--block", type=int, default=10, help="turns in a row before switching arms")
    parser.add_argument("--claude")
    args = parser.parse_args()
    claude = find_claude(args.claude)
    credentials = CredentialRegistry()
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-bench-") as tmp:
        config = PoolConfig(min_idle=1, max_workers=1, max_turns=1_000_000, workdir=Path(tmp) / "pools")
        pools = {arm: Pool(profile(arm, claude), config, credentials=credentials) for arm in ARMS}
        gateway = Gateway(credentials, from_leases(pools),
                          {arm: Upstream("bench", base_url, {"x-api-key": KEY}) for arm in ARMS})
        await gateway.start()
        try:
            rows = await spawns(claude, credentials, Path(tmp) / "spawns", args.spawns)
            for pool in pools.values():
                await pool.start()
                await pool.wait_ready(120)
            rows += await turns(pools, args.turns, args.block)
        finally:
            for pool in pools.values():
                await pool.close()
            await gateway.close()
    version = subprocess.run([claude, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"claude {version}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("| what | arm | n | p50 ms | p95 ms | also |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
