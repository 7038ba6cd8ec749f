"""A lean closed-loop HTTP/1.1 load generator, run as a process of its own (`bench.scale_bench`).

    python -m bench.http_load --url http://127.0.0.1:8787 --key KEY --connections 32 \\
        --start-at T0 --stop-at T1 --body '{"prompt": "hi"}'

Each connection is kept alive and sends one ``POST /v1/prompt`` after another (the request bytes
are built once; the answer is read by its Content-Length, never parsed), so the client costs a few
tens of microseconds per request and is not what limits a daemon. ``--start-at``/``--stop-at`` are
``time.monotonic()`` instants (CLOCK_MONOTONIC is one clock for every process on Linux): the
connections run from launch until the stop, and only the answers completed between the two count,
so the parent measures the daemons' CPU over the same window. Prints one JSON line: ``ok``,
``errors``, this process's CPU over the window and the latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import urlsplit

import orjson


class Tally:
    def __init__(self, start_at: float, stop_at: float) -> None:
        self.start_at = start_at
        self.stop_at = stop_at
        self.ok = 0
        self.errors = 0
        self.latencies_s: list[float] = []
        self.cpu_at_start = 0.0
        self.cpu_at_stop = 0.0

    def done(self, t0: float, t1: float, status: int) -> None:
        if not self.start_at <= t1 <= self.stop_at:
            return
        if status == 200:
            self.ok += 1
            self.latencies_s.append(t1 - t0)
        else:
            self.errors += 1


def request_bytes(host: str, port: int, key: str, body: bytes) -> bytes:
    return (f"POST /v1/prompt HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def connection(host: str, port: int, request: bytes, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < tally.stop_at:
            t0 = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            tally.done(t0, time.monotonic(), status)
    finally:
        writer.close()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--stop-at", type=float, required=True)
    parser.add_argument("--body", default='{"prompt": "[[reply:ok]] scale"}')
    args = parser.parse_args()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally = Tally(args.start_at, args.stop_at)
    loop = asyncio.get_running_loop()
    # loop.time() is time.monotonic(): the CPU is read at the window's edges, as the parent does.
    loop.call_at(args.start_at, lambda: setattr(tally, "cpu_at_start", time.process_time()))
    loop.call_at(args.stop_at, lambda: setattr(tally, "cpu_at_stop", time.process_time()))
    request = request_bytes(host, port, args.key, args.body.encode())
    tasks = [asyncio.create_task(connection(host, port, request, tally)) for _ in range(args.connections)]
    # An answer that never comes must not hold the run: the last ones get 30 s past the stop.
    await asyncio.wait(tasks, timeout=max(0.0, args.stop_at - time.monotonic()) + 30)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    lat = sorted(tally.latencies_s)

    def pct(q: float) -> float:
        return round(1000 * lat[min(len(lat) - 1, round(q * (len(lat) - 1)))], 2) if lat else 0.0

    sys.stdout.write(orjson.dumps({
        "ok": tally.ok, "errors": tally.errors, "failed_connections": failures[:3],
        "cpu_s": round(tally.cpu_at_stop - tally.cpu_at_start, 4), "p50_ms": pct(0.5), "p95_ms": pct(0.95),
    }).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
