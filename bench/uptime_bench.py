"""Does the daemon slow down with uptime? Many requests through one daemon, its CPU per block.

Starts ``claudepool serve`` in its own process on the fake CLI (tests/fakes/fake_claude.py, which
answers at once), with every tenant on a budget so each request reserves and settles, then keeps
``--clients`` requests in flight over the Unix socket from ``--tenants`` tenants until
``--requests`` are done. For each block of ``--block`` requests it prints the daemon's own CPU per
request (user + system of the daemon process, not of its CLI workers), the throughput and the
daemon's RSS. The first block follows a short warm-up (``--warmup`` requests, not counted), so it
measures the steady state of a fresh daemon, not its start.

    python -m bench.uptime_bench [--requests 100000] [--block 10000] [--clients 16] [--workers 4]
    python -m bench.uptime_bench --daemon-src /tmp/claudepool-main   # another checkout's daemon

It exits 1 if the last block's CPU per request is more than ``--max-ratio`` (1.1) times the first's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import psutil

from bench.metrics_bench import FAKE, REPO
from bench.pool_bench import percentile
from claudepool.client import AsyncClient
from claudepool.pool.memory import MiB

ADMIN_KEY = "uptime-bench-admin"
PROMPT = "[[reply:ok]] uptime"


@dataclass(frozen=True)
class Block:
    requests: int  # served so far, at the end of this block
    cpu_ms_per_request: float  # the daemon process's own user + system CPU
    requests_per_s: float
    p50_ms: float
    rss_mib: float


def write_config(tmp: Path, *, workers: int, tenants: int) -> Path:
    lines = [
        "[server]", f'socket = "{tmp / "cp.sock"}"', 'http = ""', f'admin_key = "{ADMIN_KEY}"',
        "max_queued = 100000",
        "[pool]", f'claude_bin = "{FAKE}"', f"min_idle = {workers}", f"max_workers = {workers}",
        f'workdir = "{tmp / "workers"}"',
        "[sessions]", "min_idle = 0", f'dir = "{tmp / "sessions"}"',
    ]
    for i in range(tenants):
        # A budget no run reaches: every request reserves before its turn and settles after it.
        lines += [f"[tenants.tenant{i}]", f'key = "{tenant_key(i)}"', "max_queued = 10000",
                  "daily_budget_usd = 1e9", "monthly_budget_usd = 1e9"]
    path = tmp / "claudepool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tenant_key(i: int) -> str:
    return f"uptime-bench-key-{i}"


async def start_daemon(config: Path, log_path: Path, daemon_src: Path, workers: int) -> subprocess.Popen[bytes]:
    """``claudepool serve`` from ``daemon_src``, its output in ``log_path``; returns once warm."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "claudepool", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=daemon_src,
            env={**os.environ, "PYTHONPATH": str(daemon_src)},
        )
    try:
        async with asyncio.timeout(60):
            while b"claudepool: listening on" not in log_path.read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited: {log_path.read_text()[-2000:]}")
                await asyncio.sleep(0.05)
            socket_path = str(config.parent / "cp.sock")
            async with AsyncClient(key=ADMIN_KEY, socket_path=socket_path) as admin:
                while (await admin.status())["pools"]["default"]["counts"]["idle"] < workers:
                    await asyncio.sleep(0.05)
    except BaseException:
        stop_daemon(proc)
        raise
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def daemon_cpu_s(process: psutil.Process) -> float:
    """The daemon's own CPU time: its CLI workers are children, and not counted."""
    times = process.cpu_times()
    return times.user + times.system


async def serve(socket_path: str, *, requests: int, block: int, clients: int, tenants: int, warmup: int,
                pid: int, on_block: Callable[[Block], None] | None = None) -> list[Block]:
    """Keep ``clients`` requests in flight until ``warmup + requests`` are done; one `Block` per ``block``."""
    process = psutil.Process(pid)
    blocks: list[Block] = []
    total = warmup + requests
    started = done = 0
    latencies: list[float] = []
    mark = (time.perf_counter(), daemon_cpu_s(process))

    async def client_loop(client: AsyncClient) -> None:
        nonlocal started, done, mark
        while started < total:
            started += 1
            t0 = time.perf_counter()
            result = await client.prompt(PROMPT)
            if result.is_error:
                raise RuntimeError(f"request failed: {result}")
            done += 1
            if done > warmup:
                latencies.append(time.perf_counter() - t0)
            if done == warmup or (done > warmup and (done - warmup) % block == 0):
                now = (time.perf_counter(), daemon_cpu_s(process))
                if done > warmup:
                    blocks.append(Block(
                        requests=done - warmup,
                        cpu_ms_per_request=(now[1] - mark[1]) * 1000 / block,
                        requests_per_s=block / (now[0] - mark[0]),
                        p50_ms=percentile(latencies, 0.5) * 1000,
                        rss_mib=process.memory_info().rss / MiB,
                    ))
                    latencies.clear()
                    if on_block is not None:
                        on_block(blocks[-1])
                mark = now

    connections = [AsyncClient(key=tenant_key(i), socket_path=socket_path) for i in range(tenants)]
    try:
        await asyncio.gather(*(client_loop(connections[i % tenants]) for i in range(clients)))
    finally:
        for client in connections:
            await client.close()
    return blocks


async def run(*, requests: int, block: int, clients: int, workers: int, tenants: int, warmup: int,
              daemon_src: Path = REPO, on_block: Callable[[Block], None] | None = None) -> list[Block]:
    """Start a daemon, serve the requests, stop it; the blocks measured."""
    if requests % block:
        raise ValueError("--requests must be a multiple of --block")
    with tempfile.TemporaryDirectory(prefix="claudepool-uptime-bench-") as tmp:
        config = write_config(Path(tmp), workers=workers, tenants=tenants)
        proc = await start_daemon(config, Path(tmp) / "daemon.log", daemon_src, workers)
        try:
            return await serve(str(Path(tmp) / "cp.sock"), requests=requests, block=block, clients=clients,
                               tenants=tenants, warmup=warmup, pid=proc.pid, on_block=on_block)
        finally:
            stop_daemon(proc)


TABLE_HEADER = ("| requests | daemon CPU ms/request | throughput req/s | p50 ms | daemon RSS MiB |\n"
                "|---|---|---|---|---|")


def row(b: Block) -> str:
    return (f"| {b.requests:,} | {b.cpu_ms_per_request:.3f} | {b.requests_per_s:,.0f} | {b.p50_ms:.1f} | "
            f"{b.rss_mib:.0f} |")


def table(blocks: list[Block]) -> str:
    return "\n".join([TABLE_HEADER, *(row(b) for b in blocks)])


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--block", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16, help="requests in flight")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--daemon-src", type=Path, default=REPO,
                        help="the checkout whose claudepool package the daemon runs (default: this one)")
    parser.add_argument("--max-ratio", type=float, default=1.1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.requests <= 0 or args.block <= 0 or args.requests % args.block:
        parser.error("--requests must be a positive multiple of --block")
    print(f"{os.cpu_count()} CPUs; daemon from {args.daemon_src}; {args.workers} fake CLI workers, "
          f"{args.clients} requests in flight from {args.tenants} tenants; {args.warmup} warm-up requests")
    print(TABLE_HEADER, flush=True)
    blocks = await run(requests=args.requests, block=args.block, clients=args.clients, workers=args.workers,
                       tenants=args.tenants, warmup=args.warmup, daemon_src=args.daemon_src.resolve(),
                       on_block=lambda b: print(row(b), flush=True))
    ratio = blocks[-1].cpu_ms_per_request / blocks[0].cpu_ms_per_request
    print(f"last block / first block CPU per request: {ratio:.2f}× (target ≤ {args.max_ratio}×)")
    if args.json_out:
        args.json_out.write_bytes(orjson.dumps([asdict(b) for b in blocks], option=orjson.OPT_INDENT_2))
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
