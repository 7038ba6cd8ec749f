"""Cost of /metrics and of the memory measurement behind it, with many workers.

Starts a daemon in this process with N warm workers (the fake CLI by default, the real one with
--claude), then times: one memory refresh of every worker (the /proc reads the maintenance loop does
every maintenance_interval_s), and the scrape itself (which reads no per-worker /proc file).

    python -m bench.metrics_bench --workers 50 [--claude PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest

from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "fakes" / "fake_claude.py"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--claude", default=str(FAKE))
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="claudepool-metrics-bench-") as tmp:
        settings = load_settings(None, server={"socket": "", "http": ""}, pool={
            "claude_bin": args.claude, "min_idle": args.workers, "max_workers": args.workers,
            "max_concurrent_spawns": 4, "workdir": tmp, "maintenance_interval_s": 3600,
            "env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "ANTHROPIC_API_KEY": "x"},
        }, tenants={f"tenant{i}": {"key": f"key-{i}"} for i in range(20)})
        daemon = Daemon(settings, notifier=Notifier({}))
        task = asyncio.create_task(daemon.run(handle_signals=False))
        pool = daemon.pools["default"]
        started = time.perf_counter()
        await asyncio.sleep(0.1)
        await pool.wait_ready(600, idle=args.workers)
        warm_s = time.perf_counter() - started
        refresh = []
        for _ in range(20):
            t0 = time.perf_counter()
            pool.refresh_memory()
            refresh.append(time.perf_counter() - t0)
        scrapes = []
        size = 0
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            size = len(generate_latest(daemon.registry))
            scrapes.append(time.perf_counter() - t0)
        daemon.request_stop()
        await task
    kind = "fake CLI" if args.claude == str(FAKE) else "real CLI"
    print(f"{args.workers} warm workers ({kind}) in {warm_s:.1f}s")
    print(f"memory refresh of all workers: median {statistics.median(refresh) * 1000:.1f} ms, "
          f"max {max(refresh) * 1000:.1f} ms")
    print(f"/metrics scrape: median {statistics.median(scrapes) * 1000:.2f} ms, "
          f"p95 {sorted(scrapes)[int(len(scrapes) * 0.95)] * 1000:.2f} ms, {size} bytes")


if __name__ == "__main__":
    asyncio.run(main())
