"""What one tenant's ledger reads cost the daemon: answer size and how long they hold the event loop.

Starts a daemon in this process (no workers: none is needed), puts N records of one tenant in the
memory store's ledger, then has C clients read ``GET /v1/ledger?limit=100000`` at once, R rounds,
while a probe task measures how late the event loop wakes it (every other tenant's turns wait
that long). Run it against another checkout with ``PYTHONPATH=/that/checkout``.

    python -m bench.ledger_bench --records 100000 --clients 4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter

import aiohttp

import claudepool
from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier
from claudepool.store.base import UsageRecord


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="claudepool-ledger-bench-") as tmp:
        settings = load_settings(None, server={"socket": "", "http": "127.0.0.1:0"},
                                 pool={"min_idle": 0, "workdir": tmp}, sessions={"min_idle": 0},
                                 tenants={"acme": {"key": "acme-key"}})
        daemon = Daemon(settings, notifier=Notifier({}))
        task = asyncio.create_task(daemon.run(handle_signals=False))
        while "http" not in daemon.listening:
            await asyncio.sleep(0.01)
        now = time.time()
        # Through the store's own settle, before the clock starts: settling is not what is measured here.
        for i in range(args.records):
            await daemon.store.settle(UsageRecord(
                record_id=f"r{i}", request_id=f"{i:032x}", tenant="acme", profile="default",
                model="claude-sonnet-4-5", outcome="ok", at=now - args.records + i, input_tokens=12,
                output_tokens=120, cache_read_input_tokens=1232, cache_creation_input_tokens=250,
                cost_usd=0.0016, reservation_id=f"{i:032x}"))
        stalls: list[float] = []
        probing = True

        async def probe() -> None:
            while probing:
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                stalls.append(time.perf_counter() - started - 0.001)

        statuses: Counter[int] = Counter()
        sizes: list[int] = []
        lines: list[int] = []
        walls: list[float] = []
        prober = asyncio.create_task(probe())
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer acme-key"}) as session:

            async def read() -> None:
                started = time.perf_counter()
                async with session.get(f"{daemon.listening['http']}/v1/ledger?limit=100000") as resp:
                    body = await resp.read()
                statuses[resp.status] += 1
                walls.append(time.perf_counter() - started)
                if resp.status == 200:
                    sizes.append(len(body))
                    lines.append(body.count(b"\n"))

            for _ in range(args.rounds):
                await asyncio.gather(*(read() for _ in range(args.clients)))
        probing = False
        await prober
        daemon.request_stop()
        await task
    stalls.sort()
    print(f"claudepool from {claudepool.__file__}")
    print(f"{args.records} records, {args.clients} clients x {args.rounds} rounds of GET /v1/ledger?limit=100000")
    print(f"statuses {dict(statuses)}; answer {statistics.mean(sizes) / 1e6:.2f} MB "
          f"({statistics.mean(lines):.0f} records); read p50 {statistics.median(walls) * 1000:.0f} ms")
    print(f"event loop late by: p50 {stalls[len(stalls) // 2] * 1000:.1f} ms, "
          f"p99 {stalls[int(len(stalls) * 0.99)] * 1000:.1f} ms, max {stalls[-1] * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
