"""What a conversation turn costs: new session, affine turn, resumed turn (and a stateless turn).

Runs a daemon in this process on the real CLI, with the loopback fake upstream in a separate process
(answering at once, so the numbers are claudepool's and the CLI's, not a model's). Each round:

* creates two sessions and runs turn 1 on each (``new``: the first turn of a fresh session on a warm
  session-capable worker), then turns 2 and 3 (``affine``: the worker already holds the context);
* parks one of them (its worker is reset for others, the transcript stays at rest) and runs turn 4
  on both: ``affine`` on the one that kept its worker, ``resumed`` on the parked one (a worker is
  respawned with ``--resume`` from the checkpoint, then runs the turn). Same prompts, same history:
  the two turn-4 requests differ only in how the context got there (each session's prompts carry
  its id, so the upstream's prompt cache never shares a prefix between them);
* runs one stateless turn for reference (lease, turn, reset after release).

Latency is the HTTP request's wall time; CPU is every CLI process's CPU (live workers and reaped
ones) plus this process's own, over the operation and the reset it causes; tokens are what the
upstream reported for the turn.

    python -m bench.session_bench --rounds 20 [--claude PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.pool_bench import children_cpu_s, find_claude, percentile, self_cpu_s, workers_cpu_s
from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier

KEY = "bench-key-0123"
HISTORY = [
    "Turn one. Our product is a warm pool of agent processes; remember the codename HARRIER.",
    "Turn two. The pool leases workers to tenants and resets them between tenants.",
    "Turn three. Sessions keep a worker bound to one conversation while it is active.",
]
TURN_FOUR = "Turn four. What was the codename, and what do sessions keep bound?"


def all_cpu_s(daemon: Daemon) -> float:
    """CPU of every CLI process this daemon ran (reaped ones via RUSAGE_CHILDREN) and of itself."""
    pools = [*daemon.pools.values(), *daemon.session_pools.values()]
    return children_cpu_s() + self_cpu_s() + sum(workers_cpu_s(pool) for pool in pools)


async def settle(daemon: Daemon) -> None:
    """Until no worker is starting, resetting or closing (leased ones may stay bound to sessions)."""
    async with asyncio.timeout(120):
        while any(pool.counts()[k] for pool in [*daemon.pools.values(), *daemon.session_pools.values()]
                  for k in ("starting", "cleaning", "closing")):
            await asyncio.sleep(0.02)


class Recorder:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.samples: dict[str, list[dict[str, float]]] = defaultdict(list)

    async def measure(self, kind: str, action: Callable[[], Awaitable[dict[str, Any] | None]]) -> Any:
        await settle(self.daemon)
        cpu0, t0 = all_cpu_s(self.daemon), time.perf_counter()
        body = await action()
        wall_ms = (time.perf_counter() - t0) * 1000
        await settle(self.daemon)  # the reset or respawn this caused is part of its cost
        sample = {"ms": wall_ms, "cpu_ms": (all_cpu_s(self.daemon) - cpu0) * 1000}
        if body is not None and "usage" in body:
            usage = body["usage"]
            sample.update(input_tokens=usage["input_tokens"], cache_read=usage["cache_read_input_tokens"],
                          cache_creation=usage["cache_creation_input_tokens"], cost_usd=body["cost_usd"])
        self.samples[kind].append(sample)
        return body


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--claude", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    claude = find_claude(args.claude)
    upstream = subprocess.Popen([sys.executable, "-m", "claudepool.testing.fake_upstream", "--port", "0"],
                                stdout=subprocess.PIPE)
    assert upstream.stdout is not None
    base_url = upstream.stdout.readline().decode().split()[-1]
    try:
        with tempfile.TemporaryDirectory(prefix="claudepool-session-bench-") as tmp:
            report = await run(claude, base_url, Path(tmp), args.rounds)
    finally:
        upstream.terminate()
        upstream.wait()
        upstream.stdout.close()
    print(report["table"])
    if args.json_out:
        Path(args.json_out).write_bytes(orjson.dumps(report["summary"], option=orjson.OPT_INDENT_2))


async def run(claude: str, base_url: str, tmp: Path, rounds: int) -> dict[str, Any]:
    settings = load_settings(None, server={"socket": "", "http": "127.0.0.1:0"}, pool={
        "claude_bin": claude, "min_idle": 2, "max_workers": 2, "workdir": str(tmp / "w"),
        "env": {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"},
        "timeouts": {"ready_timeout_s": 60},
    }, sessions={"dir": str(tmp / "sessions"), "min_idle": 3, "max_workers": 3, "park_idle_s": 3600},
        tenants={"bench": {"key": KEY, "requests_per_minute": 0}})
    daemon = Daemon(settings, notifier=Notifier({}))
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        async with asyncio.timeout(120):
            while not daemon.status.readiness()[0]:
                await asyncio.sleep(0.05)
        await daemon.session_pools["default"].wait_ready(120, idle=3)
        url = daemon.listening["http"]
        recorder = Recorder(daemon)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:

            async def request(method: str, path: str, body: Any = None) -> dict[str, Any]:
                async with http.request(method, f"{url}{path}", data=orjson.dumps(body)) as resp:
                    answer: dict[str, Any] = await resp.json()
                    if resp.status >= 300:
                        raise RuntimeError(f"{method} {path}: {resp.status} {answer}")
                    return answer

            async def turn(session: str | None, prompt: str) -> dict[str, Any]:
                # Each conversation's own words: the upstream's prompt cache must not share prefixes
                # between the two sessions of a round, or the second would read what the first wrote.
                text = f"({session or 'stateless'}) {prompt}"
                return await request("POST", "/v1/prompt", {"prompt": text, "session": session})

            for _ in range(2):  # warm-up: every process serves its slower first turns
                await turn(None, "warm-up")
                warm = (await request("POST", "/v1/sessions", {}))["id"]
                await turn(warm, "warm-up")
                await http.delete(f"{url}/v1/sessions/{warm}")
            for _ in range(rounds):
                kept = await recorder.measure("create", partial(request, "POST", "/v1/sessions", {}))
                parked = (await request("POST", "/v1/sessions", {}))
                for sid in (kept["id"], parked["id"]):
                    await recorder.measure("new", partial(turn, sid, HISTORY[0]))
                    for prompt in HISTORY[1:]:
                        await recorder.measure("affine", partial(turn, sid, prompt))
                await recorder.measure("park", partial(park, daemon, parked["id"]))
                await recorder.measure("affine turn 4", partial(turn, kept["id"], TURN_FOUR))
                await recorder.measure("resumed turn 4", partial(turn, parked["id"], TURN_FOUR))
                await recorder.measure("stateless", partial(turn, None, TURN_FOUR))
                for sid in (kept["id"], parked["id"]):
                    await http.delete(f"{url}/v1/sessions/{sid}")
        return summarise(recorder.samples, rounds, claude)
    finally:
        daemon.request_stop()
        async with asyncio.timeout(60):
            await task


async def park(daemon: Daemon, session_id: str) -> dict[str, Any] | None:
    if not await daemon.sessions.park(session_id):
        raise RuntimeError(f"could not park {session_id}")
    return None


def summarise(samples: dict[str, list[dict[str, float]]], rounds: int, claude: str) -> dict[str, Any]:
    rows = ["| operation | n | p50 ms | p95 ms | CPU ms (mean) | input tok | cache read | cache write | cost µUSD |",
            "|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {"rounds": rounds, "claude": claude, "operations": {}}
    for kind in ("create", "new", "affine", "park", "affine turn 4", "resumed turn 4", "stateless"):
        got = samples[kind]
        ms = [s["ms"] for s in got]

        def mean(key: str, got: list[dict[str, float]] = got) -> float:
            values = [s[key] for s in got if key in s]
            return statistics.mean(values) if values else float("nan")

        op = {"n": len(got), "p50_ms": percentile(ms, 0.5), "p95_ms": percentile(ms, 0.95),
              "cpu_ms": mean("cpu_ms"), "input_tokens": mean("input_tokens"), "cache_read": mean("cache_read"),
              "cache_creation": mean("cache_creation"), "cost_usd": mean("cost_usd")}
        summary["operations"][kind] = op
        tokens = ("—",) * 4 if op["input_tokens"] != op["input_tokens"] else (
            f"{op['input_tokens']:.0f}", f"{op['cache_read']:.0f}", f"{op['cache_creation']:.0f}",
            f"{op['cost_usd'] * 1e6:.0f}")
        rows.append(f"| {kind} | {op['n']} | {op['p50_ms']:.1f} | {op['p95_ms']:.1f} | {op['cpu_ms']:.1f} | "
                    + " | ".join(tokens) + " |")
    return {"table": "\n".join(rows), "summary": summary}


if __name__ == "__main__":
    asyncio.run(main())
