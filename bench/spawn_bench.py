"""What the PDEATHSIG exec wrapper costs a spawn: spawn-to-ready with and without ``setpriv``.

Starts workers one at a time (``Worker.start``: spawn, then the answer to ``initialize`` and
``get_settings``), alternating with and without the ``setpriv --pdeathsig KILL --`` wrapper so load
drifts hit both alike, on the fake CLI and on the real one (against the loopback fake upstream,
which start-up does not call). Reports the median, p90 and mean spawn-to-ready per arm.

    python -m bench.spawn_bench --spawns 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.pool_bench import REPO, find_claude, percentile
from claudepool.pool import process
from claudepool.pool.profile import Profile
from claudepool.pool.worker import Worker

FAKE = REPO / "tests" / "fakes" / "fake_claude.py"
WRAPPED = process.pdeathsig_argv


def unwrapped() -> tuple[str, ...]:
    return ()


async def spawn_to_ready_s(profile: Profile, workdir: Path, wrapped: bool) -> float:
    process.pdeathsig_argv = WRAPPED if wrapped else unwrapped  # type: ignore[assignment]
    worker = Worker(profile, workdir_root=workdir)
    started = time.perf_counter()
    await worker.start()
    elapsed_s = time.perf_counter() - started
    await worker.close()
    return elapsed_s


async def bench(name: str, profile: Profile, workdir: Path, spawns: int) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    await spawn_to_ready_s(profile, workdir, True)  # warm the page cache: not counted
    for i in range(2 * spawns):
        wrapped = i % 2 == 0
        times[wrapped].append(await spawn_to_ready_s(profile, workdir, wrapped))
    for wrapped in (False, True):
        ms = [t * 1000 for t in times[wrapped]]
        print(f"| {name} | {'setpriv' if wrapped else 'none'} | {spawns} | {statistics.median(ms):.1f} | "
              f"{percentile(ms, 0.9):.1f} | {statistics.mean(ms):.1f} |")
    delta = statistics.median(times[True]) - statistics.median(times[False])
    print(f"| {name} | median difference | | {delta * 1000:+.1f} | | |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spawns", type=int, default=20, help="per arm and per CLI")
    parser.add_argument("--claude")
    parser.add_argument("--fake-only", action="store_true")
    args = parser.parse_args()
    if not WRAPPED():
        sys.exit("setpriv (util-linux) is not installed: nothing to compare")

    print("| CLI | wrapper | spawns | median ms | p90 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="claudepool-spawn-bench-") as tmp:
        await bench("fake", Profile(name="fake", claude_bin=str(FAKE)), Path(tmp), args.spawns)
        if args.fake_only:
            return
        upstream = subprocess.Popen([sys.executable, "-m", "claudepool.testing.fake_upstream", "--port", "0"],
                                    stdout=subprocess.PIPE, cwd=REPO)
        assert upstream.stdout is not None
        try:
            base_url = upstream.stdout.readline().decode().split()[-1]
            real = Profile(name="real", claude_bin=find_claude(args.claude),
                           env={"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"})
            await bench("real", real, Path(tmp), args.spawns)
        finally:
            upstream.terminate()
            upstream.wait()


if __name__ == "__main__":
    asyncio.run(main())
