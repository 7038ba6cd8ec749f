"""Idle cost: what a daemon with 4 warm, idle real-CLI workers burns doing nothing, and what freezing
them (``pool.freeze_idle_after_s``: SIGSTOP after that long idle, SIGCONT as they are lent) saves
and adds to the next request.

Three ``claudepool serve`` daemons (`bench.daemon_proc`; quick runs: the first two) run side by side
against one loopback fake upstream, each with 4 workers: ``running`` (freezing off), ``frozen``
(freezing after 0.5 s) and ``frozen+quiet`` (freezing, and the daemon's own polls slowed:
``jobs.poll_interval_s`` and ``sessions.maintenance_interval_s`` at 5 s). They idle through one
window together, so a noisy spell of the machine hits all three; CPU is user + system from /proc
(the daemon alone, and the daemon with every worker), PSS from ``smaps_rollup`` of the whole tree.
One running worker's threads are read from ``/proc/PID/task/*/stat`` over the window, to show where
the idle CLI's CPU goes.

Then the thaw, in rounds, requests one at a time: once every worker of ``frozen`` is stopped, one to
``frozen`` (``thawed``: the lease continues one) and one to ``running`` (``rested``: its workers
idled as long, not stopped); then one to ``frozen`` right after the last settled (``hot``: that
worker still runs). The thaw's cost is thawed minus rested, p50, same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from bench.daemon_proc import DaemonProc, daemon_process
from bench.latency_bench import KEY, PROMPT, daemon_config, settle
from bench.pool_bench import fake_upstream_process, percentile
from bench.suite import Options, Report, table
from claudepool.client import AsyncClient
from claudepool.pool.memory import MiB, measure_trees
from claudepool.protocol.wire import PromptResult

NAME = "idle"
WORKERS = 4
FREEZE_AFTER_S = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")

ARMS: dict[str, dict[str, Any]] = {
    "running": {"pool": {"freeze_idle_after_s": 0}},
    "frozen": {"pool": {"freeze_idle_after_s": FREEZE_AFTER_S}},
    "frozen+quiet": {"pool": {"freeze_idle_after_s": FREEZE_AFTER_S}, "jobs": {"poll_interval_s": 5.0},
                     "sessions": {"maintenance_interval_s": 5.0}},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def worker_pids(d: DaemonProc) -> list[int]:
    return [p.pid for p in psutil.Process(d.proc.pid).children(recursive=True)
            if p.name() == "claude"]


def all_stopped(pids: list[int]) -> bool:
    with contextlib.suppress(psutil.Error):
        return bool(pids) and all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids)
    return False


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU ticks (user + system) per thread name of one process."""
    ticks: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks[comm] = ticks.get(comm, 0) + int(fields[11]) + int(fields[12])
    return ticks


@contextlib.asynccontextmanager
async def daemons(claude: str, base_url: str, tmp: Path, names: list[str]) -> AsyncIterator[dict[str, DaemonProc]]:
    async with contextlib.AsyncExitStack() as stack:
        entered = await asyncio.gather(*(
            stack.enter_async_context(daemon_process(merged(daemon_config(claude, base_url, tmp / name, WORKERS),
                                                            ARMS[name])))
            for name in names))
        yield dict(zip(names, entered, strict=True))


async def idle_window(ds: dict[str, DaemonProc], window_s: float) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    probe = worker_pids(ds["running"])[0]
    t0, ticks0 = time.perf_counter(), thread_ticks(probe)
    cpu0 = {n: (d.cpu_s(), d.tree_cpu_s()) for n, d in ds.items()}
    await asyncio.sleep(window_s)
    wall_s = time.perf_counter() - t0
    ticks1 = thread_ticks(probe)
    out: dict[str, dict[str, Any]] = {}
    for name, d in ds.items():
        pss = measure_trees([d.proc.pid])[0]
        pids = worker_pids(d)
        out[name] = {"daemon_cpu_s_per_s": round((d.cpu_s() - cpu0[name][0]) / wall_s, 4),
                     "total_cpu_s_per_s": round((d.tree_cpu_s() - cpu0[name][1]) / wall_s, 4),
                     "pss_mib": round(pss.pss_bytes / MiB, 1) if pss else None,
                     "workers_stopped": sum(1 for p in pids if all_stopped([p])), "workers": len(pids)}
    threads = sorted(((comm, round((ticks1.get(comm, 0) - t) / CLK_TCK / wall_s * 1000, 2))
                      for comm, t in ticks0.items()), key=lambda kv: -kv[1])
    return out, [list(t) for t in threads if t[1] > 0]


async def one_request(client: AsyncClient) -> float:
    t0 = time.perf_counter()
    async for piece in client.stream(PROMPT):
        if isinstance(piece, PromptResult):
            if piece.is_error:
                raise RuntimeError(f"request failed: {piece.text[:300]}")
            return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a result")


async def wait_stopped(d: DaemonProc, timeout_s: float = 30) -> float:
    t0 = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        while not all_stopped(worker_pids(d)):
            await asyncio.sleep(0.02)
    return time.perf_counter() - t0


async def thaw_arms(ds: dict[str, DaemonProc], n: int) -> dict[str, list[float]]:
    running, frozen = ds["running"], ds["frozen"]
    samples: dict[str, list[float]] = {"rested": [], "thawed": [], "hot": []}
    async with AsyncClient(key=KEY, url=running.url) as rc, AsyncClient(key=KEY, url=frozen.url) as fc:
        for _ in range(n + 1):  # the first round warms each arm up and is dropped
            # Both daemons rest at least as long: until every worker of `frozen` is stopped.
            await wait_stopped(frozen)
            thawed = await one_request(fc)
            await settle(frozen, WORKERS)  # its reset would otherwise compete with the next request
            rested = await one_request(rc)
            await settle(running, WORKERS)
            hot = await one_request(fc)
            await asyncio.gather(settle(frozen, WORKERS), settle(running, WORKERS))
            for arm, value in (("thawed", thawed), ("hot", hot), ("rested", rested)):
                samples[arm].append(value)
    return {arm: values[1:] for arm, values in samples.items()}


async def run(opts: Options) -> Report:
    window_s, n = (8.0, 3) if opts.quick else (30.0, 30)
    # Quick: two daemons (starting 12 workers on 2 cores alone takes ~10 s).
    names = ["running", "frozen"] if opts.quick else list(ARMS)
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-idle-") as tmp:
        async with daemons(opts.claude, base_url, Path(tmp), names) as ds:
            for d in ds.values():
                await settle(d, WORKERS)
            await wait_stopped(ds["frozen"])
            await asyncio.sleep(0.5)  # past the start-up's last timers
            idle, threads = await idle_window(ds, window_s)
            samples = await thaw_arms(ds, n)
    return report(idle, threads, samples, window_s, opts)


def report(idle: dict[str, dict[str, Any]], threads: list[Any], samples: dict[str, list[float]],
           window_s: float, opts: Options) -> Report:
    p50 = {arm: round(percentile(v, 0.5) * 1000, 2) for arm, v in samples.items()}
    p95 = {arm: round(percentile(v, 0.95) * 1000, 2) for arm, v in samples.items()}
    thaw_ms = round(p50["thawed"] - p50["rested"], 2)
    frozen_cpu = idle["frozen"]["total_cpu_s_per_s"]
    quiet = idle.get("frozen+quiet")
    quiet_note = f"{quiet['total_cpu_s_per_s']} with the daemon's polls at 5 s; " if quiet else ""
    rows = [[name, f"{v['workers_stopped']}/{v['workers']}", v["daemon_cpu_s_per_s"], v["total_cpu_s_per_s"],
             v["pss_mib"]] for name, v in idle.items()]
    markdown = "\n".join([
        f"{WORKERS} warm real-CLI workers idle for {window_s:g} s after warm-up, {len(idle)} daemons side by side "
        "(CPU-s per second, user + system; PSS of the daemon's whole tree):", "",
        table(["daemon", "workers stopped", "daemon CPU-s/s", "daemon + workers CPU-s/s", "PSS MiB"], rows), "",
        "Where an idle CLI's CPU goes (one `running` worker, ms CPU per s, by thread): "
        + ", ".join(f"{comm} {ms}" for comm, ms in threads[:6]) + ". Traced (`strace -f`): the main "
        "thread wakes on ~1 s timers to read `/proc/self/statm` (a memory watch), a `Bun Pool` thread "
        "`statx`es `$HOME/.claude.json` every second (a settings-file watch), and the JavaScriptCore "
        "garbage collector (`HeapHelper`, a `Collector Thread` that SIGPWRs the main thread to stop it) "
        "and mimalloc's `mi-scavenger` run every few seconds: ~9 ms CPU per second per worker, none of "
        "it avoidable from outside but by stopping the process. The daemon's own idle CPU "
        "(py-spy `--gil`): mostly the jobs pool lane claiming from its SQLite store every "
        "`jobs.poll_interval_s` (0.5 s, for jobs another daemon or a restart left), then the sessions "
        "maintenance (1 s), the pools' memory measurement (`maintenance_interval_s`, 5 s) and the "
        "timers themselves; `frozen+quiet` (full runs) slows the first two to 5 s.", "",
        f"Requests one at a time ({len(samples['thawed'])} per arm, p50 / p95 ms): rested (not frozen) "
        f"{p50['rested']} / {p95['rested']}, thawed (every worker stopped; the lease continues one) "
        f"{p50['thawed']} / {p95['thawed']}, hot (frozen daemon, worker just used) {p50['hot']} / {p95['hot']}. "
        f"The thaw adds {thaw_ms} ms at p50 (thawed − rested; noise on this machine is a few ms).",
    ])
    checks = [
        ("idle CPU (daemon + 4 workers) with freezing ≤ 0.01 CPU-s/s", frozen_cpu <= 0.01,
         f"{frozen_cpu} ({quiet_note}{idle['running']['total_cpu_s_per_s']} unfrozen)"),
        ("thaw cost p50 (ms, reported)", True, f"{thaw_ms} ms"),
    ]
    return Report(NAME, {"window_s": window_s, "idle": idle, "threads_ms_per_s": threads,
                         "samples_ms": {a: [round(x * 1000, 2) for x in v] for a, v in samples.items()},
                         "p50_ms": p50, "p95_ms": p95, "thaw_ms": thaw_ms, "quick": opts.quick},
                  markdown, checks)
