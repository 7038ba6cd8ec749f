"""Scaling past one core: N daemons sharing one HTTP port (``server.reuse_port``) and one Redis.

For N = 1, 2, … up to cores + 1 (quick: 1 and 2), N ``claudepool serve`` processes listen on one
loopback port with SO_REUSEPORT, share one ``redis-server`` (started here) as their store, and each
keeps W warm fake-CLI workers (tests/fakes/fake_claude.py, which answers at once). One tenant on a
budget no run reaches, so every request reserves and settles in the shared Redis. The load
generator (`bench.http_load`) is a process of its own: C keep-alive connections, closed loop, one
``POST /v1/prompt`` after another; the kernel spreads the connections over the daemons by their
4-tuple hash.

Every N has a port of its own and all groups run side by side (1 + 2 + … daemons), measured in
turns, round after round (1, 2, 3, 1, 2, 3, …), so a change in a shared host's load falls on every
N alike. Per window: answers per second, each daemon's own CPU, its workers', Redis's, the load
generator's and the rest of the host's (as % of one core), and the answers each daemon served
(its workers' turns). The scaling ratio at N is the median over rounds of req/s(N) / req/s(1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.daemon_proc import DaemonProc, daemon_process
from bench.metrics_bench import FAKE
from bench.suite import REPO, Options, Report, table
from claudepool.client import AsyncClient
from tests.redis_server import RedisServer

NAME = "scale"
KEY = "scale-bench-key-0123"
ADMIN = "scale-bench-admin-0123"
BODY = '{"prompt": "[[reply:ok]] scale"}'


def workers_per_daemon(opts: Options) -> int:
    """Warm workers per daemon: 4 (closed-loop load keeps them all busy); 2 in quick runs, whose
    time goes mostly to starting processes."""
    return 2 if opts.quick else 4


CONNECTIONS = 32  # the load generator's, whatever N: the same offered load at every N


@dataclass
class Point:
    daemons: int
    window_s: float
    req_per_s: float
    errors: int
    p50_ms: float
    p95_ms: float
    daemon_cpu_pct: list[float]  # each daemon process's own CPU, % of one core
    workers_cpu_pct: float  # every daemon's fake-CLI workers together
    redis_cpu_pct: float
    load_cpu_pct: float
    served: list[int]  # answers each daemon gave in the window (its workers' turns)
    idle_cpu_pct: float  # the other N's daemons and workers, waiting for their turn
    others_cpu_pct: float  # every other process on the host (other users of a shared machine)
    load_average: float  # the host's 1-minute load average at the window's end

    @property
    def total_cpu_pct(self) -> float:
        return sum(self.daemon_cpu_pct) + self.workers_cpu_pct + self.redis_cpu_pct + self.load_cpu_pct


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(tmp: Path, port: int, redis_url: str, workers: int) -> dict[str, Any]:
    return {
        # The Unix socket cannot be shared: each daemon has its own, which the bench uses to reach
        # one daemon in particular (its readiness, its workers' turns).
        "server": {"socket": str(tmp / "cp.sock"), "http": f"127.0.0.1:{port}", "reuse_port": True,
                   "admin_key": ADMIN, "max_queued": 10_000},
        "pool": {"claude_bin": str(FAKE), "min_idle": workers, "max_workers": workers, "max_turns": 1_000_000,
                 "workdir": str(tmp / "w")},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "store": {"url": redis_url},
        "tenants": {"bench": {"key": KEY, "requests_per_minute": 0, "max_queued": 10_000,
                              "daily_budget_usd": 1e9, "monthly_budget_usd": 1e9}},
    }


async def admin_status(d: DaemonProc) -> dict[str, Any]:
    async with AsyncClient(key=ADMIN, socket_path=d.socket) as client:
        return await client.status()


async def ready(d: DaemonProc) -> None:
    """This daemon ready with every worker idle (asked on its own socket: the port may answer for another)."""
    async with asyncio.timeout(60):
        while True:
            # The stateless pool (the sessions' pool keeps no warm worker: sessions.min_idle = 0).
            pool = (await admin_status(d))["pools"]["default"]
            if pool["counts"].get("idle", 0) >= pool["max_workers"]:
                return
            await asyncio.sleep(0.05)


async def turns(d: DaemonProc) -> int:
    pools = (await admin_status(d))["pools"].values()
    return sum(int(w["turns"]) for p in pools for w in p["workers"])


def cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def host_busy_s() -> float:
    """CPU seconds every core of the host has spent busy (all processes, the kernel's too)."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


async def measure(daemons: list[DaemonProc], idle: list[DaemonProc], url: str, redis: psutil.Process, *,
                  warmup_s: float,
                  window_s: float) -> Point:
    start_at = time.monotonic() + warmup_s
    stop_at = start_at + window_s
    load = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.http_load", "--url", url, "--key", KEY, "--connections", str(CONNECTIONS),
        "--start-at", repr(start_at), "--stop-at", repr(stop_at), "--body", BODY,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        await asyncio.sleep(start_at - time.monotonic())
        own0 = [d.cpu_s() for d in daemons]
        tree0 = [d.tree_cpu_s() for d in daemons]
        idle0 = sum(d.tree_cpu_s() for d in idle)
        redis0 = cpu_s(redis)
        host0 = host_busy_s()
        turns0 = await asyncio.gather(*(turns(d) for d in daemons))
        await asyncio.sleep(stop_at - time.monotonic())
        own1 = [d.cpu_s() for d in daemons]
        tree1 = [d.tree_cpu_s() for d in daemons]
        idle1 = sum(d.tree_cpu_s() for d in idle)
        redis1 = cpu_s(redis)
        host1 = host_busy_s()
        turns1 = await asyncio.gather(*(turns(d) for d in daemons))
        async with asyncio.timeout(60):
            out, _ = await load.communicate()
    finally:
        if load.returncode is None:
            load.kill()
            await load.wait()
    result = orjson.loads(out)
    if result["failed_connections"]:
        raise RuntimeError(f"load generator connections failed: {result['failed_connections']}")
    own = [b - a for a, b in zip(own0, own1, strict=True)]
    workers = sum(tb - ta for ta, tb in zip(tree0, tree1, strict=True)) - sum(own)
    pct = 100 / window_s
    ours = sum(tb - ta for ta, tb in zip(tree0, tree1, strict=True)) + (redis1 - redis0) + result["cpu_s"]
    return Point(daemons=len(daemons), window_s=window_s, req_per_s=round(result["ok"] / window_s, 1),
                 errors=result["errors"], p50_ms=result["p50_ms"], p95_ms=result["p95_ms"],
                 daemon_cpu_pct=[round(c * pct, 1) for c in own], workers_cpu_pct=round(workers * pct, 1),
                 redis_cpu_pct=round((redis1 - redis0) * pct, 1), load_cpu_pct=round(result["cpu_s"] * pct, 1),
                 served=[b - a for a, b in zip(turns0, turns1, strict=True)],
                 idle_cpu_pct=round((idle1 - idle0) * pct, 1),
                 others_cpu_pct=round(max(0.0, host1 - host0 - ours - (idle1 - idle0)) * pct, 1),
                 load_average=round(os.getloadavg()[0], 2))


def plan(opts: Options) -> tuple[list[int], float, float, int]:
    """Daemon counts, warm-up and window seconds, repeats."""
    cores = os.cpu_count() or 1
    if opts.quick:
        return [1, 2], 0.5, 2.5, 1
    return list(range(1, cores + 2)), 1.5, 6.0, opts.repeats


async def start_all(stack: contextlib.AsyncExitStack, configs: list[dict[str, Any]]) -> list[DaemonProc]:
    """Every daemon at once (each start is mostly waiting for its workers); all entered into
    ``stack`` before the first failure, if any, is raised, so none is left running."""

    async def one(config: dict[str, Any]) -> DaemonProc:
        return await stack.enter_async_context(daemon_process(config))

    started = await asyncio.gather(*(one(c) for c in configs), return_exceptions=True)
    for result in started:
        if isinstance(result, BaseException):
            raise result
    return [d for d in started if isinstance(d, DaemonProc)]


async def run(opts: Options) -> Report:
    levels, warmup_s, window_s, repeats = plan(opts)
    rounds: list[list[Point]] = []
    with RedisServer() as redis, tempfile.TemporaryDirectory(prefix="claudepool-scale-") as tmp_s:
        assert redis.pid is not None
        redis_proc = psutil.Process(redis.pid)
        async with contextlib.AsyncExitStack() as stack:
            # Each N on a port of its own, all running at once, measured in turns (1, 2, 3, 1, 2, …):
            # a change in the host's load then falls on every N alike. An idle group costs little
            # (its CPU shows as "others").
            ports = {n: free_port() for n in levels}
            configs = [daemon_config(Path(tmp_s) / f"n{n}-d{i}", ports[n], redis.url, workers_per_daemon(opts))
                       for n in levels for i in range(n)]
            t0 = time.perf_counter()
            daemons = await start_all(stack, configs)
            await asyncio.gather(*(ready(d) for d in daemons))
            start_s = time.perf_counter() - t0
            groups = {n: daemons[sum(levels[:k]):sum(levels[:k]) + n] for k, n in enumerate(levels)}
            for _ in range(repeats):
                rounds.append([await measure(groups[n], [d for d in daemons if d not in groups[n]],
                                             f"http://127.0.0.1:{ports[n]}", redis_proc,
                                             warmup_s=warmup_s, window_s=window_s) for n in levels])
    rep = report(rounds, opts)
    rep.data["start_s"] = round(start_s, 1)  # every daemon started and warm
    return rep


def report(rounds: list[list[Point]], opts: Options) -> Report:
    """``rounds``: one point per N in each round. Per N the round with the median req/s is shown;
    the ratios are the medians of each round's own ratio (N and N = 1 measured a few seconds apart)."""
    cores = os.cpu_count() or 1
    width = len(rounds[0])
    points = [sorted((r[k] for r in rounds), key=lambda p: p.req_per_s)[len(rounds) // 2] for k in range(width)]
    ratios = [statistics.median(r[k].req_per_s / r[0].req_per_s if r[0].req_per_s else 0.0 for r in rounds)
              for k in range(width)]
    rows = [[p.daemons, p.req_per_s, f"{x:.2f}", p.p50_ms, p.p95_ms,
             " / ".join(f"{c:.0f}" for c in p.daemon_cpu_pct), f"{p.workers_cpu_pct:.0f}", f"{p.redis_cpu_pct:.0f}",
             f"{p.load_cpu_pct:.0f}", f"{p.total_cpu_pct:.0f}", f"{p.idle_cpu_pct:.0f}", f"{p.others_cpu_pct:.0f}",
             p.load_average,
             " / ".join(str(s) for s in p.served), p.errors]
            for p, x in zip(points, ratios, strict=True)]
    k_cores = next((k for k, p in enumerate(points) if p.daemons == cores), width - 1)
    at_cores = points[k_cores]
    ratio = ratios[k_cores]
    one = points[0]
    cpu_ms = {p.daemons: round(10 * p.total_cpu_pct / p.req_per_s, 2) if p.req_per_s else 0.0 for p in points}
    # What the cores allow, from N=1's CPU per answer (all of the bench's processes, and the daemon's
    # loop alone): one daemon saturates its core at 1000/loop_ms answers/s, every core busy gives
    # cores*1000/total_ms, so N daemons beat one saturated daemon by at most min(N, cores*loop/total).
    total_ms = cpu_ms[one.daemons]
    loop_ms = round(10 * one.daemon_cpu_pct[0] / one.req_per_s, 2) if one.req_per_s else 0.0
    ceiling = min(at_cores.daemons, cores * loop_ms / total_ms) if total_ms else 0.0
    shared = max(p.others_cpu_pct for p in points) > 25 * cores
    limit = (f"an answer costs {total_ms} ms of CPU, {loop_ms} ms of it in the daemon's loop (N=1): one daemon "
             f"saturates its core at ~{1000 / loop_ms if loop_ms else 0:.0f} req/s, {cores} busy cores give "
             f"~{cores * 1000 / total_ms if total_ms else 0:.0f} req/s, so at most {ceiling:.2f}× with the fake "
             f"workers ({at_cores.workers_cpu_pct:.0f}% at N={at_cores.daemons}), Redis "
             f"({at_cores.redis_cpu_pct:.0f}%) and the load generator ({at_cores.load_cpu_pct:.0f}%) on the same "
             f"cores; N=1's loop ran at {one.daemon_cpu_pct[0]:.0f}% of a core")
    last_ms = cpu_ms[points[-1].daemons]
    if total_ms and last_ms > 1.1 * total_ms:
        limit += (f"; the CPU per answer grows with N ({total_ms} → {last_ms} ms at N={points[-1].daemons}): each "
                  "loop wakes for fewer events at a time (less batching), and on a busy host each wake-up waits "
                  "for a core")
    if shared:
        limit += (f"; other processes took up to {max(p.others_cpu_pct for p in points):.0f}% (load average up to "
                  f"{max(p.load_average for p in points):g}): the bench's share of a busy host, not the "
                  "daemons, set the curve")
    markdown = "\n".join([
        f"N `claudepool serve` processes share one HTTP port (`server.reuse_port`) and one Redis (budgets "
        f"reserved and settled there on every request); {workers_per_daemon(opts)} warm fake-CLI workers "
        f"each; a load generator in its own process keeps {CONNECTIONS} keep-alive connections busy (closed "
        f"loop). CPU columns are % of one core over a {points[0].window_s:g} s window. Each N has a port of "
        f"its own and they run side by side, measured in turns ({len(rounds)} round(s)): the median round by "
        "req/s is shown, `× N=1` is the median of each round's own ratio; `bench CPU` is all of the bench's "
        "processes, `idle N` the groups waiting for their turn, `others` the rest of the host; `served` is each "
        "daemon's answers in the window.",
        "",
        table(["daemons", "req/s", "× N=1", "p50 ms", "p95 ms", "daemon CPU % (each)", "workers CPU %",
               "Redis CPU %", "load gen CPU %", "bench CPU %", "idle N CPU %", "others CPU %", "load avg",
               "served (each)", "errors"], rows),
        "",
        "CPU per answer, all of the bench's processes (ms): " + ", ".join(f"N={n}: {v}" for n, v in cpu_ms.items())
        + ".",
        "",
        f"What limits the curve: {limit}. A daemon is one event loop, so one daemon uses at most one core; "
        f"its workers, Redis and the load generator need CPU too, and on {cores} cores they take it from the "
        "daemons: N daemons reach N times one only while the cores are not all busy. On a host with more cores "
        "than the daemons, each added daemon adds a core's worth of answers up to the core count.",
    ])
    data = {"cores": cores, "workers_per_daemon": workers_per_daemon(opts), "connections": CONNECTIONS,
            "points": [{**asdict(p), "total_cpu_pct": round(p.total_cpu_pct, 1)} for p in points],
            "ratios": [round(x, 3) for x in ratios], "rounds": [[asdict(p) for p in r] for r in rounds],
            "ratio_at_cores": round(ratio, 3), "cpu_ceiling_ratio": round(ceiling, 3), "host_shared": shared}
    met = ratio >= 1.5 and not shared
    measured = f"{ratio:.2f}× ({at_cores.req_per_s:g} vs {one.req_per_s:g} req/s)" + ("" if met else f"; {limit}")
    return Report(name=NAME, data=data, markdown=markdown,
                  checks=[(f"throughput(N={at_cores.daemons}) ≥ 1.5× throughput(1), or explained", met, measured)])


def plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    points = rep.data["points"]
    ns = [p["daemons"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ns, [p["req_per_s"] for p in points], marker="o", label="measured")
    base = points[0]["req_per_s"]
    left.plot(ns, [base * min(n, rep.data["cores"]) for n in ns], linestyle="--", color="grey",
              label="linear up to the core count")
    left.set_xlabel("daemons on one port")
    left.set_ylabel("answers / s")
    left.set_xticks(ns)
    left.legend()
    left.set_title("Throughput")
    parts: list[tuple[str, list[float]]] = [
        ("daemons", [sum(p["daemon_cpu_pct"]) for p in points]),
        ("fake workers", [p["workers_cpu_pct"] for p in points]),
        ("Redis", [p["redis_cpu_pct"] for p in points]), ("load generator", [p["load_cpu_pct"] for p in points]),
        ("the other N, idle", [p["idle_cpu_pct"] for p in points]),
        ("other processes", [p["others_cpu_pct"] for p in points])]
    bottom = [0.0] * len(ns)
    for label, pcts in parts:
        values = [v / 100 for v in pcts]
        right.bar(ns, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.axhline(rep.data["cores"], color="black", linestyle=":", label="cores")
    right.set_xlabel("daemons on one port")
    right.set_ylabel("cores busy")
    right.set_xticks(ns)
    right.legend(fontsize="small")
    right.set_title("Where the CPU goes")
    fig.tight_layout()
    path = out_dir / "scale.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
