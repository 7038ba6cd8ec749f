"""What the gateway's hop costs, against a direct connection to the fake upstream (issue 12).

Two measurements, each alternating its two arms block by block (the order swapped every round), so
that drifts in the machine's load hit both alike:

* raw calls: ``POST /v1/messages?beta=true`` from one kept-alive aiohttp client, as the CLI sends it
  (a streamed SSE answer, and a JSON one), straight to the fake upstream, and through the gateway
  (credential, endpoint, lease and turn checks, the forward, the relay chunk by chunk), and through
  a gateway that also meters the call and holds a strict budget for it (memory store: the body
  parsed, its bound reserved, the call's record settled). The caller holds a real credential: a
  worker on the fake CLI, leased and in a turn. Reported: p50 and p95 per call, and this process's
  CPU per call (the client's in every arm, plus the gateway's).
* pool turns on the real CLI: one warm worker per arm, one turn per request (one model call, the
  fake upstream answering at once), then its reset. Reported: lease-to-result p50 and p95, and CPU
  per request: the worker's process tree plus this process (which holds the pool, the client and,
  in one arm, the gateway); resets included.

The fake upstream runs in a separate process; its CPU is counted in neither arm. Logging is the
daemon's (JSON, every record masked), into /dev/null: the gateway's line per call is part of its cost.

    python -m bench.gateway_bench --calls 400 --turns 60
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bench.pool_bench import REPO, fake_upstream_process, find_claude, percentile, self_cpu_s, settle, workers_cpu_s
from claudepool.gateway.attribution import from_leases
from claudepool.gateway.budget import CallBudget
from claudepool.gateway.call_usage import CallUsageMeter
from claudepool.gateway.credentials import CredentialRegistry
from claudepool.gateway.server import Gateway
from claudepool.gateway.settings import Upstream
from claudepool.logs import JsonFormatter, SecretMask
from claudepool.pool.config import PoolConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.worker import TurnResult
from claudepool.store.memory import MemoryStore
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.limits import RateLimiter
from claudepool.tenancy.metering import Meter, RequestContext
from claudepool.tenancy.settings import MeteringSettings, TenantSettings, default_prices
from claudepool.tenancy.tenants import TenantRegistry

FAKE = REPO / "tests" / "fakes" / "fake_claude.py"
KEY = "sk-ant-bench"
BODY = {"model": "claude-bench", "max_tokens": 64, "system": "Answer briefly.",
        "messages": [{"role": "user", "content": "Say hello. [[reply:Hello there, from the fake upstream.]]"}]}


@dataclass
class Arm:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    workers_cpu_s: float = 0.0  # the CLI processes'
    own_cpu_s: float = 0.0  # this process's: the pool, the client and, in one arm, the gateway

    @property
    def cpu_s(self) -> float:
        return self.workers_cpu_s + self.own_cpu_s

    def per_request_ms(self, seconds: float) -> float:
        return seconds / len(self.latencies_s) * 1000

    def row(self, what: str) -> str:
        ms = [t * 1000 for t in self.latencies_s]
        return (f"| {what} | {self.name} | {len(ms)} | {statistics.median(ms):.2f} | {percentile(ms, 0.95):.2f} | "
                f"{self.per_request_ms(self.cpu_s):.3f} | {self.per_request_ms(self.workers_cpu_s):.3f} | "
                f"{self.per_request_ms(self.own_cpu_s):.3f} |")


async def alternate(arms: dict[str, Callable[[], Awaitable[float]]], total: int, block: int,
                    workers_cpu: Callable[[str], float]) -> dict[str, Arm]:
    """``total`` requests per arm, in blocks of ``block``, the arms' order swapped every round."""
    results = {name: Arm(name) for name in arms}
    names = list(arms)
    for round_ in range(max(1, total // block)):
        for name in names if round_ % 2 == 0 else reversed(names):
            workers0, own0 = workers_cpu(name), self_cpu_s()
            for _ in range(block):
                results[name].latencies_s.append(await arms[name]())
            results[name].workers_cpu_s += workers_cpu(name) - workers0
            results[name].own_cpu_s += self_cpu_s() - own0
    return results


def budgeted_gateway(credentials: CredentialRegistry, pool: Pool, upstreams: dict[str, Upstream],
                     mode: str) -> tuple[Gateway, Meter]:
    """A second gateway on the same credentials whose calls are metered and hold a ``mode`` budget
    (memory store) before they go out: what a budgeted tenant's call pays on top."""
    store = MemoryStore()
    pricing = PricingTable.of(default_prices())
    meter = Meter(store, RateLimiter(), pricing, MeteringSettings())
    tenants = TenantRegistry.of({"bench": TenantSettings(key=SecretStr("k"), daily_budget_usd=1e9,
                                                         budget_mode=mode)})
    budget = CallBudget(store, tenants, pricing, MeteringSettings(), meter, reservation_ttl_s=900)
    gateway = Gateway(credentials, from_leases({"raw": pool}), upstreams, budget=budget)
    gateway.hooks.add(CallUsageMeter(pricing, CollectorRegistry(), lambda tenant: tenant, meter=meter))
    gateway.hooks.add(budget)
    return gateway, meter


async def raw_calls(base_url: str, workdir: Path, total: int, block: int) -> list[str]:
    credentials = CredentialRegistry()
    pool = Pool(Profile(name="raw", claude_bin=str(FAKE)), PoolConfig(min_idle=1, max_workers=1, workdir=workdir),
                credentials=credentials)
    upstreams = {"raw": Upstream("bench", base_url, {"x-api-key": KEY})}
    gateway = Gateway(credentials, from_leases({"raw": pool}), upstreams)
    await gateway.start()
    strict, meter = budgeted_gateway(credentials, pool, upstreams, "strict")
    await strict.start()
    flusher = asyncio.create_task(meter.run())
    await pool.start()
    await pool.wait_ready(60)
    lease = await pool.acquire("bench")
    lease.context = RequestContext(request_id="bench", tenant="bench", profile="raw", model="claude-bench")
    lease.run_turn("[[hang]]")  # the caller is this worker, in its turn, as the CLI is while it calls
    env = Path(f"/proc/{lease.worker.pid}/environ").read_bytes().split(b"\0")
    credential = next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"ANTHROPIC_API_KEY="))
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": KEY}
    rows = []
    try:
        async with aiohttp.ClientSession() as session:
            for stream in (True, False):
                data = orjson.dumps({**BODY, "stream": stream})

                def one(url: str, key: str, data: bytes = data) -> Callable[[], Awaitable[float]]:
                    async def call() -> float:
                        t0 = time.perf_counter()
                        async with session.post(f"{url}/v1/messages?beta=true", data=data,
                                                headers={**headers, "x-api-key": key}) as resp:
                            await resp.read()
                            if resp.status != 200:
                                raise RuntimeError(f"call failed: {resp.status}")
                        return time.perf_counter() - t0
                    return call

                calls = {"direct": one(base_url, KEY), "gateway": one(gateway.base_url or "", credential),
                         "gateway, strict budget": one(strict.base_url or "", credential)}
                arms = await alternate(calls, total, block, lambda _: 0.0)
                what = "raw call, SSE" if stream else "raw call, JSON"
                rows += [arms["direct"].row(what), arms["gateway"].row(what), delta(what, arms),
                         arms["gateway, strict budget"].row(what), delta(what, arms, "gateway, strict budget")]
    finally:
        lease.release()
        await pool.close()
        await gateway.close()
        await strict.close()
        flusher.cancel()
    return rows


def timed_turn(pool: Pool) -> Callable[[], Awaitable[float]]:
    """One turn on ``pool`` and the reset after it: timed from lease to result; the reset runs
    before the next turn, so it counts in the arm's CPU."""
    async def turn() -> float:
        t0 = time.perf_counter()
        async with pool.lease("bench") as lease:
            async for item in lease.run_turn("Say hello. [[reply:Hello there.]]"):
                if isinstance(item, TurnResult):
                    if item.is_error:
                        raise RuntimeError(f"turn failed: {item.text[:300]}")
                    latency = time.perf_counter() - t0
        await settle(pool)
        return latency
    return turn


async def pool_turns(claude: str, base_url: str, workdir: Path, total: int, block: int) -> list[str]:
    config = PoolConfig(min_idle=1, max_workers=1, max_turns=1_000_000, workdir=workdir)
    direct = Pool(Profile(name="direct", claude_bin=claude, env={"ANTHROPIC_BASE_URL": base_url,
                                                                  "ANTHROPIC_API_KEY": KEY}), config)
    credentials = CredentialRegistry()
    via = Pool(Profile(name="gateway", claude_bin=claude), config, credentials=credentials)
    gateway = Gateway(credentials, from_leases({"gateway": via}),
                      {"gateway": Upstream("bench", base_url, {"x-api-key": KEY})})
    await gateway.start()
    pools = {"direct": direct, "gateway": via}
    try:
        for pool in pools.values():
            await pool.start()
            await pool.wait_ready(120)

        for pool in pools.values():  # first turns are slower: not counted
            for _ in range(3):
                await timed_turn(pool)()
        arms = await alternate({name: timed_turn(pool) for name, pool in pools.items()}, total, block,
                               lambda name: workers_cpu_s(pools[name]))
        what = "pool turn, real CLI"
        return [arms["direct"].row(what), arms["gateway"].row(what), delta(what, arms)]
    finally:
        for pool in pools.values():
            await pool.close()
        await gateway.close()


def delta(what: str, arms: dict[str, Arm], arm: str = "gateway") -> str:
    d, g = arms["direct"], arms[arm]
    p50 = (statistics.median(g.latencies_s) - statistics.median(d.latencies_s)) * 1000
    total_d, total_g = d.per_request_ms(d.cpu_s), g.per_request_ms(g.cpu_s)
    workers = g.per_request_ms(g.workers_cpu_s) - d.per_request_ms(d.workers_cpu_s)
    own = g.per_request_ms(g.own_cpu_s) - d.per_request_ms(d.own_cpu_s)
    return (f"| {what} | added by the {arm} | | {p50:+.2f} | | {total_g - total_d:+.3f} "
            f"({total_g / total_d - 1:+.1%}) | {workers:+.3f} | {own:+.3f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="raw calls per arm and answer kind")
    parser.add_argument("--turns", type=int, default=60, help="pool turns per arm")
    parser.add_argument("--block", type=int, default=20, help="requests in a row before switching arms")
    parser.add_argument("--claude")
    args = parser.parse_args()
    claude = find_claude(args.claude)
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretMask())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-bench-") as tmp:
        rows = await raw_calls(base_url, Path(tmp) / "raw", args.calls, args.block)
        rows += await pool_turns(claude, base_url, Path(tmp) / "turns", args.turns, args.block)
    version = subprocess.run([claude, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"claude {version}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print("| what | arm | requests | p50 ms | p95 ms | CPU ms/request | of which CLI | of which this process |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
