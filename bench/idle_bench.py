"""Idle cost: what a daemon with warm, idle real-CLI workers burns doing nothing, and what freezing
them (``pool.freeze_idle_after_s``: SIGSTOP after that long idle, SIGCONT as they are lent) saves
and adds to the next request.

Three ``claudepool serve`` daemons (`bench.daemon_proc`) run side by side against one loopback fake
upstream, each with 4 workers (quick runs: the first two, with one worker each, to start in seconds
on a loaded machine): ``running`` (freezing off), ``frozen`` (freezing after 0.3 s) and
``frozen+quiet`` (freezing, and the daemon's polls set slow: ``jobs.poll_interval_s`` and
``sessions.maintenance_interval_s`` at 5 s, the bound an idle daemon's own back-off reaches). They idle
through one window together, so a noisy spell of the machine hits all three; CPU is user + system
from /proc (the daemon alone, and the daemon with every worker), PSS from ``smaps_rollup`` of the
whole tree. One running worker's threads are read from ``/proc/PID/task/*/stat`` over the window, to
show where the idle CLI's CPU goes.

Then the thaw, in rounds, requests one at a time: once every worker of ``frozen`` is stopped, one
to ``frozen`` (``thawed``: the lease continues one) and one to ``running`` (``rested``: its workers
idled as long, not stopped), in alternating order from round to round (the second of a pair would
otherwise always follow a reset); then one to ``frozen`` right after the last settled (``hot``: that
worker still runs). The thaw's cost is thawed minus rested: the difference of their p50 and p95, and
the median of the per-round (paired) differences, all from the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
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
FREEZE_AFTER_S = 0.3
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
async def daemons(claude: str, base_url: str, tmp: Path, names: list[str], workers: int
                  ) -> AsyncIterator[dict[str, DaemonProc]]:
    async with contextlib.AsyncExitStack() as stack:
        entered = await asyncio.gather(*(
            stack.enter_async_context(daemon_process(merged(daemon_config(claude, base_url, tmp / name, workers),
                                                            ARMS[name])))
            for name in names))
        try:
            yield dict(zip(names, entered, strict=True))
        finally:
            # All stop at once (the stack would stop them one after the other, each closing its workers).
            for d in entered:
                if d.proc.returncode is None:
                    d.proc.send_signal(signal.SIGTERM)


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


async def thaw_arms(ds: dict[str, DaemonProc], n: int, workers: int) -> dict[str, list[float]]:
    running, frozen = ds["running"], ds["frozen"]
    samples: dict[str, list[float]] = {"rested": [], "thawed": [], "hot": []}
    async with AsyncClient(key=KEY, url=running.url) as rc, AsyncClient(key=KEY, url=frozen.url) as fc:
        arms = {"thawed": (fc, frozen), "rested": (rc, running)}
        for i in range(n + 1):  # the first round warms each arm up and is dropped
            # Both daemons rest at least as long: until every worker of `frozen` is stopped.
            await wait_stopped(frozen)
            got: dict[str, float] = {}
            for arm in ("thawed", "rested") if i % 2 else ("rested", "thawed"):
                client, d = arms[arm]
                got[arm] = await one_request(client)
                await settle(d, workers)  # its reset would otherwise compete with the next request
            got["hot"] = await one_request(fc)
            await asyncio.gather(settle(frozen, workers), settle(running, workers))
            for arm, value in got.items():
                samples[arm].append(value)
    return {arm: values[1:] for arm, values in samples.items()}


async def run(opts: Options) -> Report:
    # Quick: two daemons of one worker each (starting 8 workers on a loaded 2-core machine took
    # ~12 s): the daemon's own idle CPU, what the check is about, does not depend on how many are frozen.
    # The window stays 5 s, the period of the slowest timers (memory round, backed-off job polls).
    window_s, n, workers = (5.0, 4, 1) if opts.quick else (30.0, 30, 4)
    names = ["running", "frozen"] if opts.quick else list(ARMS)
    phases_s: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(phase: str) -> None:
        phases_s[phase] = round(time.perf_counter() - t0 - sum(phases_s.values()), 2)

    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-idle-") as tmp:
        async with daemons(opts.claude, base_url, Path(tmp), names, workers) as ds:
            await asyncio.gather(*(settle(d, workers) for d in ds.values()))
            await wait_stopped(ds["frozen"])
            lap("start")
            await asyncio.sleep(0.5)  # past the start-up's last timers
            idle, threads = await idle_window(ds, window_s)
            lap("idle window")
            samples = await thaw_arms(ds, n, workers)
            lap("thaw rounds")
        lap("stop")
    out = report(idle, threads, samples, window_s, workers, opts)
    out.data["phases_s"] = phases_s
    return out


def report(idle: dict[str, dict[str, Any]], threads: list[Any], samples: dict[str, list[float]],
           window_s: float, workers: int, opts: Options) -> Report:
    p50 = {arm: round(percentile(v, 0.5) * 1000, 2) for arm, v in samples.items()}
    p95 = {arm: round(percentile(v, 0.95) * 1000, 2) for arm, v in samples.items()}
    thaw_ms = round(p50["thawed"] - p50["rested"], 2)
    thaw_p95_ms = round(p95["thawed"] - p95["rested"], 2)
    paired_ms = round(percentile([t - r for t, r in zip(samples["thawed"], samples["rested"], strict=True)], 0.5)
                      * 1000, 2)
    frozen_cpu = idle["frozen"]["total_cpu_s_per_s"]
    quiet = idle.get("frozen+quiet")
    quiet_note = f"{quiet['total_cpu_s_per_s']} with the daemon's polls at 5 s; " if quiet else ""
    rows = [[name, f"{v['workers_stopped']}/{v['workers']}", v["daemon_cpu_s_per_s"], v["total_cpu_s_per_s"],
             v["pss_mib"]] for name, v in idle.items()]
    markdown = "\n".join([
        f"{workers} warm real-CLI workers per daemon idle for {window_s:g} s after warm-up, {len(idle)} daemons "
        "side by side (CPU-s per second, user + system; PSS of the daemon's whole tree):", "",
        table(["daemon", "workers stopped", "daemon CPU-s/s", "daemon + workers CPU-s/s", "PSS MiB"], rows), "",
        "Where an idle CLI's CPU goes (one `running` worker, ms CPU per s, by thread): "
        + ", ".join(f"{comm} {ms}" for comm, ms in threads[:6]) + ". Traced (`strace -f`): the main "
        "thread wakes on ~1 s timers to read `/proc/self/statm` (a memory watch), a `Bun Pool` thread "
        "`statx`es `$HOME/.claude.json` every second (a settings-file watch), and the JavaScriptCore "
        "garbage collector (`HeapHelper`, a `Collector Thread` that SIGPWRs the main thread to stop it) "
        "and mimalloc's `mi-scavenger` run every few seconds: ~9 ms CPU per second per worker, none of "
        "it avoidable from outside but by stopping the process. The daemon's own idle CPU was "
        "~0.011 CPU-s/s before it was made quiet (py-spy: the jobs lane claiming from SQLite every 0.5 s, "
        "session maintenance every 1 s, the memory scan walking the host's whole process table every 5 s); "
        "now the jobs lanes back off to `jobs.poll_max_interval_s` (5 s) while they find nothing, session "
        "maintenance sleeps while no session holds a worker, and a worker's memory is read through its own "
        "`/proc` children files, and the event-loop lag monitor samples once a second, not ten times, while "
        "no request is in flight. What is left: the pools' 5 s memory round, that sample and Python's "
        "timers (CPU is read in 10 ms ticks: a 5 s quick window resolves 0.002 CPU-s/s). `frozen+quiet` "
        "(full runs) sets the polls slow from "
        "the start: it should match `frozen`.", "",
        f"Requests one at a time ({len(samples['thawed'])} per arm, p50 / p95 ms): rested (not frozen) "
        f"{p50['rested']} / {p95['rested']}, thawed (every worker stopped; the lease continues one) "
        f"{p50['thawed']} / {p95['thawed']}, hot (frozen daemon, worker just used) {p50['hot']} / {p95['hot']}. "
        f"The thaw adds {thaw_ms} ms at p50 and {thaw_p95_ms} ms at p95 (thawed − rested); the median of the "
        f"per-round differences is {paired_ms} ms (noise on this machine is a few ms; quick runs have few "
        "samples).",
    ])
    checks = [
        (f"idle CPU (daemon + {workers} frozen workers) ≤ 0.01 CPU-s/s", frozen_cpu <= 0.01,
         f"{frozen_cpu} ({quiet_note}{idle['running']['total_cpu_s_per_s']} unfrozen)"),
        ("thaw cost p50 / p95 (ms, reported)", True,
         f"{thaw_ms} / {thaw_p95_ms} ms (paired median {paired_ms} ms)"),
    ]
    return Report(NAME, {"window_s": window_s, "workers": workers, "idle": idle, "threads_ms_per_s": threads,
                         "samples_ms": {a: [round(x * 1000, 2) for x in v] for a, v in samples.items()},
                         "p50_ms": p50, "p95_ms": p95, "thaw_ms": thaw_ms, "thaw_p95_ms": thaw_p95_ms,
                         "thaw_paired_p50_ms": paired_ms, "quick": opts.quick},
                  markdown, checks)
