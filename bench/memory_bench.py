"""Memory: PSS per warm worker by pool size, the RAM-derived pool size, and the daemon's cost per connection.

* workers: a ``claudepool serve`` process with ``min_idle = max_workers = N`` real CLI workers
  (loopback fake upstream), warmed by a few requests, then every worker's process tree (the CLI
  and any children) read from ``/proc/PID/smaps_rollup`` (`claudepool.pool.memory.measure_trees`,
  what the pool itself reads). PSS splits shared pages (the CLI's ~75 MB binary, its libraries)
  between the processes mapping them, so N workers' PSS sums to what they really hold; RSS counts
  the shared pages once per worker, so RSS/worker staying flat while PSS/worker falls with N is the
  sharing; USS (private pages, psutil) is what PSS/worker tends to. Other processes of the same
  binary on the machine share its pages too and lower PSS: they are counted and shown.
* sizing: what `PoolSizing` over the default ``[capacity]`` picks on this machine with no configured
  ``max_workers``, before any worker is measured (the estimate) and from the measured workers, and
  what a running daemon reports (`/v1/pool` capacity).
* connections: a daemon on the fake CLI (`tests/fakes/fake_claude.py`: its workers cost the daemon
  the same bookkeeping as real ones, and little RAM of their own), its RSS before and with idle
  HTTP keep-alive connections (each served one ``GET /healthz``) and idle Unix-socket connections
  (each served one ``status`` frame), then, with those still open, with SSE streams (streamed
  prompts whose turn never ends, ``[[hang]]``, each read up to its first ``delta`` event). Every
  connection is counted open in the daemon's own socket table (TCP: psutil; Unix: ``/proc/net/unix``,
  which tells accepted sockets from the listener) at the moment of reading, or the section fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from bench.daemon_proc import DaemonProc, daemon_process
from bench.latency_bench import ADMIN, KEY, daemon_config, pool_counts, settle
from bench.pool_bench import fake_upstream_process
from bench.suite import Options, Report, table
from claudepool.client import AsyncClient
from claudepool.pool.config import CapacityConfig
from claudepool.pool.memory import MiB, ProcessMemory, available_memory_bytes, measure_trees, process_memory
from claudepool.pool.sizing import PoolSizing
from tests.fakes import fake_claude_executable

NAME = "memory"
KiB = 1024


@dataclass
class PoolSize:
    workers: int
    processes: int  # in all the workers' trees
    pss_per_worker_mib: float
    rss_per_worker_mib: float
    uss_per_worker_mib: float  # private pages only: what one more worker costs once many share the rest
    max_worker_pss_mib: float  # the largest one tree: what the sizing rule divides by
    total_pss_mib: float
    daemon_rss_mib: float
    daemon_pss_mib: float
    daemon_max_workers: int  # the capacity ceiling the running daemon derived from RAM
    daemon_reading_mib: float  # the workers' total PSS as the daemon last read it (what its ceiling used)
    # Processes of the same CLI binary outside this daemon (another user of the machine): they share
    # the binary's pages too, so they lower our workers' PSS.
    other_cli_processes: int


@dataclass
class ConnectionStep:
    what: str
    connections: int  # counted open in the daemon's socket table
    rss_mib: float
    kib_per_connection: float | None


# -- workers -------------------------------------------------------------------------------------


async def pool_status(d: DaemonProc) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{d.url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        body: dict[str, Any] = await resp.json()
    return body


def other_processes_of(pids: list[int]) -> int:
    """Processes running the workers' executable that are not these workers."""
    exes = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            exes.add(psutil.Process(pid).exe())
    mine = set(pids)
    return sum(1 for p in psutil.process_iter(["exe"]) if p.info["exe"] in exes and p.pid not in mine)


def tree_uss(pid: int) -> tuple[int, int]:
    """(processes, USS bytes) of a worker's tree: USS is its private memory, what it alone holds."""
    count, uss = 0, 0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                uss += int(proc.memory_full_info().uss)
                count += 1
    return count, uss


async def measure_pool(claude: str, base_url: str, tmp: Path, n: int, warm_requests: int) -> tuple[PoolSize, list[int]]:
    async with daemon_process(daemon_config(claude, base_url, tmp, n)) as d:
        await settle(d, n)
        async with AsyncClient(key=KEY, socket_path=d.socket) as client:
            # Steady state: each worker has served turns (and been reset after them), not just booted.
            await asyncio.gather(*(client.prompt(f"warm-up {i}") for i in range(warm_requests)))
        await settle(d, n)
        status = await pool_status(d)
        pids = [int(w["pid"]) for p in status["pools"].values() for w in p["workers"] if w.get("pid")]
        trees = [t for t in await asyncio.to_thread(measure_trees, pids) if t is not None]
        if len(trees) != n:
            raise RuntimeError(f"expected {n} live workers, read {len(trees)} of {pids}")
        total = sum(trees, ProcessMemory(0, 0))
        others = other_processes_of(pids)
        private = [tree_uss(pid) for pid in pids]
        capacity = status.get("capacity")
        own = process_memory(d.proc.pid) or ProcessMemory(0, 0)
        sizes = [t.pss_bytes for t in trees]
        return PoolSize(
            workers=n, processes=sum(c for c, _ in private),
            uss_per_worker_mib=round(sum(u for _, u in private) / n / MiB, 1),
            pss_per_worker_mib=round(total.pss_bytes / n / MiB, 1),
            rss_per_worker_mib=round(total.rss_bytes / n / MiB, 1),
            max_worker_pss_mib=round(max(sizes) / MiB, 1), total_pss_mib=round(total.pss_bytes / MiB, 1),
            daemon_rss_mib=round(own.rss_bytes / MiB, 1), daemon_pss_mib=round(own.pss_bytes / MiB, 1),
            daemon_max_workers=int(capacity["max_workers"]) if capacity else 0,
            daemon_reading_mib=round(int(capacity["total_pss_bytes"]) / MiB, 1) if capacity else 0.0,
            other_cli_processes=others), sizes


# -- connections ---------------------------------------------------------------------------------


def raise_open_files() -> int:
    """This process holds every client end: the soft open-file limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_connections(d: DaemonProc) -> tuple[int, int]:
    """(TCP connections established to the daemon's HTTP port, Unix connections on its socket),
    from the daemon's own socket table; listeners are not counted."""
    port = int(d.url.rsplit(":", 1)[1])
    tcp = sum(1 for c in psutil.Process(d.proc.pid).net_connections(kind="tcp")
              if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
    return tcp, unix_accepted(d.proc.pid, d.socket)


def unix_accepted(pid: int, path: str) -> int:
    """Accepted connections on the Unix socket ``path`` held by ``pid``. psutil cannot tell them from
    the listener (both show the path, neither a peer), ``/proc/net/unix`` can: the listener's flags
    carry ``__SO_ACCEPTCON`` (0x10000)."""
    held = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) >= 8 and fields[7] == path and fields[6] in held and not int(fields[3], 16) & 0x10000:
            count += 1
    return count


def connection_fake_config(tmp: Path, workers: int, connections: int) -> dict[str, Any]:
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 10_000,
                   # Idle connections must outlive the measurement; room for every one of them.
                   "keepalive_timeout_s": 600, "max_connections": connections + 64,
                   "drain_timeout_s": 5},
        # Its shebang names this interpreter: through a version manager's shim each spawn costs ~3×.
        "pool": {"claude_bin": str(fake_claude_executable()), "min_idle": workers, "max_workers": workers,
                 "max_turns": 1_000_000, "workdir": str(tmp / "w"), "maintenance_interval_s": 3600,
                 "max_concurrent_spawns": 4},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "tenants": {"bench": {"key": KEY, "requests_per_minute": 0, "max_queued": 0}},
    }


async def read_http_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return await reader.readexactly(length)


async def http_idle(d: DaemonProc) -> asyncio.StreamWriter:
    host, port = d.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
    await read_http_response(reader)
    return writer


async def unix_idle(d: DaemonProc) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_unix_connection(d.socket)
    writer.write(orjson.dumps({"id": "s", "op": "status", "key": ADMIN}) + b"\n")
    answer = orjson.loads(await reader.readline())
    if answer.get("event") != "status":
        raise RuntimeError(f"the status frame was answered {answer}")
    return writer


async def sse_stream(d: DaemonProc, i: int) -> asyncio.StreamWriter:
    """A streamed prompt whose turn never ends, read until its first ``delta`` event."""
    host, port = d.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"prompt": f"[[hang]] stream {i}", "stream": True})
    writer.write(b"POST /v1/prompt HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream {i} was refused: {head[:200]!r}")
    while b"event: delta" not in (line := await reader.readline()):
        if not line:
            raise RuntimeError(f"stream {i} ended before its first delta")
    return writer


async def gather_bounded(coros: list[Any], at_once: int) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(at_once)

    async def one(coro: Any) -> asyncio.StreamWriter:
        async with gate:
            result: asyncio.StreamWriter = await coro
            return result

    async with asyncio.timeout(120):  # a daemon that stops answering fails the section, not hangs it
        return list(await asyncio.gather(*(one(c) for c in coros)))


@contextlib.asynccontextmanager
async def holding(writers: list[asyncio.StreamWriter]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for w in writers:
            w.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


async def steady_rss_mib(d: DaemonProc) -> float:
    """The daemon's RSS once the last client's work has settled (a short wait, then a read)."""
    await asyncio.sleep(0.3)
    return round(d.rss_bytes() / MiB, 2)


def step(what: str, connections: int, rss_mib: float, before_mib: float, added: int) -> ConnectionStep:
    per = round((rss_mib - before_mib) * MiB / KiB / added, 1) if added else None
    return ConnectionStep(what, connections, rss_mib, per)


async def expect_open(d: DaemonProc, tcp: int, unix: int) -> tuple[int, int]:
    """Wait (bounded) until the daemon's socket table shows these connections, else fail."""
    counted = (0, 0)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while (counted := open_connections(d)) != (tcp, unix):
                await asyncio.sleep(0.05)
    if counted != (tcp, unix):
        raise RuntimeError(f"the daemon holds {counted} (tcp, unix) connections, expected {(tcp, unix)}")
    return counted


async def measure_connections(tmp: Path, idle_n: int, sse_n: int) -> list[ConnectionStep]:
    """One daemon with ``sse_n`` fake workers: idle connections first, then, with them still open,
    the SSE streams. Nothing is closed between readings, so no freed memory is reused by the next step."""
    http_n, unix_n = idle_n // 2, idle_n - idle_n // 2
    config = connection_fake_config(tmp, sse_n, idle_n + sse_n)
    async with daemon_process(config, ready_timeout_s=180) as d:
        await settle(d, sse_n)
        # Warm the paths the connections take, so their first use is not counted per connection.
        warm = [await http_idle(d) for _ in range(4)] + [await unix_idle(d) for _ in range(4)]
        warm += [await sse_stream(d, -i) for i in range(1, 5)]
        async with holding(warm):
            pass
        await settle(d, sse_n)  # the warm-up turns interrupted and their workers reset
        await expect_open(d, 0, 0)
        before = await steady_rss_mib(d)
        steps = [step(f"before ({sse_n} idle fake workers)", 0, before, before, 0)]
        http = await gather_bounded([http_idle(d) for _ in range(http_n)], 64)
        async with holding(http):
            await expect_open(d, http_n, 0)
            with_http = await steady_rss_mib(d)
            steps.append(step(f"+{http_n} HTTP keep-alive", (await expect_open(d, http_n, 0))[0], with_http,
                              before, http_n))
            unix = await gather_bounded([unix_idle(d) for _ in range(unix_n)], 64)
            async with holding(unix):
                await expect_open(d, http_n, unix_n)
                with_idle = await steady_rss_mib(d)
                steps.append(step(f"+{unix_n} Unix socket", (await expect_open(d, http_n, unix_n))[1], with_idle,
                                  with_http, unix_n))
                steps.append(step(f"= {idle_n} idle", http_n + unix_n, with_idle, before, idle_n))
                streams = await gather_bounded([sse_stream(d, i) for i in range(sse_n)], 32)
                async with holding(streams):
                    await expect_open(d, http_n + sse_n, unix_n)
                    leased = (await pool_counts(d)).get("leased", 0)
                    if leased != sse_n:
                        raise RuntimeError(f"{leased} workers leased with {sse_n} streams open")
                    with_sse = await steady_rss_mib(d)
                    tcp_open, _ = await expect_open(d, http_n + sse_n, unix_n)
                    steps.append(step(f"+{sse_n} SSE streams (prompts mid-turn)", tcp_open - http_n, with_sse,
                                      with_idle, sse_n))
    return steps


# -- the section ---------------------------------------------------------------------------------


def used_cpu_s() -> float:
    """CPU of this process and its reaped children (each phase's daemon and workers are reaped in it)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def plan(opts: Options) -> tuple[list[int], int, int]:
    """Pool sizes; idle connections (half HTTP, half socket); SSE streams."""
    return ([1, 4], 300, 50) if opts.quick else ([1, 2, 4, 8, 16], 1000, 200)


async def run(opts: Options) -> Report:
    sizes, idle_n, sse_n = plan(opts)
    nofile = raise_open_files()
    if nofile < idle_n + sse_n + 256:
        raise RuntimeError(f"the open-file limit ({nofile}) is too low for {idle_n + sse_n} connections")
    pools: list[PoolSize] = []
    largest_pss = 0
    timings: dict[str, float] = {}
    t0, cpu0 = time.perf_counter(), used_cpu_s()

    def lap(what: str) -> None:
        # CPU beside wall time: on a shared machine the wall time says more about the neighbours.
        nonlocal t0, cpu0
        wall_s, cpu_s = round(time.perf_counter() - t0, 1), round(used_cpu_s() - cpu0, 1)
        timings[f"{what}_s"], timings[f"{what}_cpu_s"] = wall_s, cpu_s
        print(f"memory: {what} took {wall_s} s, {cpu_s} CPU-s", file=sys.stderr, flush=True)
        t0, cpu0 = time.perf_counter(), used_cpu_s()

    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-memory-") as tmp_s:
        tmp = Path(tmp_s)
        for n in sizes:
            async with asyncio.timeout(300):  # a phase that stalls fails the section rather than hang it
                size, trees = await measure_pool(opts.claude, base_url, tmp / f"p{n}", n, warm_requests=2 * n)
            pools.append(size)
            largest_pss = max(largest_pss, *trees)
            lap(f"workers_{n}")
        async with asyncio.timeout(300):
            connections = await measure_connections(tmp / "connections", idle_n, sse_n)
        lap("connections")
    return report(pools, sizing_of(largest_pss), connections, timings)


def sizing_of(largest_pss_bytes: int) -> dict[str, Any]:
    """What the sizing rule over the default ``[capacity]`` (no max_workers) picks here."""
    config = CapacityConfig()
    available = available_memory_bytes()
    rule = PoolSizing(config, lambda: available)
    estimate, measured = rule.initial(), rule.plan_sizes([largest_pss_bytes])
    return {"available_mib": round(available / MiB), "memory_fraction": config.memory_fraction,
            "assumed_pss_mib": round(config.worker_pss_estimate_bytes / MiB, 1),
            "max_workers_assumed": estimate.max_workers,
            "largest_measured_pss_mib": round(largest_pss_bytes / MiB, 1),
            "max_workers_measured": measured.max_workers,
            "soft_limit_mib": round(estimate.soft_limit_bytes / MiB),
            "hard_limit_mib": round(estimate.hard_limit_bytes / MiB)}


def report(pools: list[PoolSize], sizing: dict[str, Any], connections: list[ConnectionStep],
           timings: dict[str, float]) -> Report:
    rows = [[p.workers, p.processes, p.pss_per_worker_mib, p.rss_per_worker_mib, p.uss_per_worker_mib,
             p.max_worker_pss_mib, p.total_pss_mib, f"{p.daemon_pss_mib} / {p.daemon_rss_mib}",
             f"{p.daemon_max_workers} ({p.daemon_reading_mib:g})",
             p.other_cli_processes] for p in pools]
    conn_rows = [[s.what, s.connections, s.rss_mib, "" if s.kib_per_connection is None else s.kib_per_connection]
                 for s in connections]
    worst = max(p.max_worker_pss_mib for p in pools)
    # Other processes of the binary lower a lone worker's PSS; its RSS is what its PSS would be alone.
    lone = pools[0].rss_per_worker_mib if pools[0].workers == 1 else worst
    others = max(p.other_cli_processes for p in pools)
    checks = [(f"measured PSS/worker ≤ the sizing rule's {sizing['assumed_pss_mib']:g} MiB",
               max(worst, lone) <= sizing["assumed_pss_mib"],
               f"largest worker {worst:g} MiB (a lone one's RSS, the most its PSS can be: {lone:g}); mean at "
               f"N={pools[-1].workers}: {pools[-1].pss_per_worker_mib:g} MiB"
               + (f"; up to {others} other CLI processes ran" if others else ""))]
    idle_all, sse_all = connections[-2], connections[-1]
    markdown = (
        "**PSS per warm worker.** A daemon with `min_idle = max_workers = N` real CLI workers (fake upstream), "
        "each warmed by a couple of turns (and their `/clear`), then each worker's process tree read from "
        "`/proc/PID/smaps_rollup`. PSS, not RSS: PSS splits the pages the workers share (the CLI's binary, "
        "its libraries) between them, so it sums to what N workers really take; RSS counts them once per "
        "worker, so RSS/worker stays flat while PSS/worker falls as N grows toward USS/worker (the pages "
        "a worker alone holds: what one more worker costs once many share the rest). MiB; daemon = the daemon's "
        "own process (PSS / RSS); ceiling = the worker ceiling the running daemon derived from RAM "
        "(`[capacity]` without `max_workers`) and, in brackets, the workers' total PSS as the daemon last "
        "read it (at ready, then every `maintenance_interval_s`: a worker still at its boot size makes "
        "the ceiling higher); other CLIs = processes of the same CLI binary outside this "
        "daemon (another user of the machine), which share its pages too and so lower these PSS figures: "
        "with none, N = 1 is the worst case (nothing shared).\n\n"
        + table(["N", "processes", "PSS/worker", "RSS/worker", "USS/worker", "largest PSS", "total PSS",
                 "daemon PSS / RSS", "ceiling", "other CLIs"], rows)
        + f"\n\n**RAM-derived pool size.** `PoolSizing` over the default `[capacity]` here: "
          f"({sizing['available_mib']} MiB available) × {sizing['memory_fraction']:g} ÷ "
          f"{sizing['assumed_pss_mib']:g} MiB assumed per worker = **{sizing['max_workers_assumed']} workers** "
          f"before any is measured (soft limit {sizing['soft_limit_mib']} MiB, hard {sizing['hard_limit_mib']} MiB); "
          f"from the largest measured worker ({sizing['largest_measured_pss_mib']:g} MiB) "
          f"**{sizing['max_workers_measured']}**. "
        + ("The assumption holds: it is above every worker measured here and above a lone worker's RSS "
           "(its PSS when no other process shares the binary's pages), and the rule re-derives from measured "
           "PSS after.\n\n"
           if max(worst, lone) <= sizing["assumed_pss_mib"] else
           "The assumption is short of a measured worker: until the first reading the rule admits more "
           "workers than fit; it re-derives from measured PSS after.\n\n")
        + "**Daemon RSS per connection.** A daemon on the fake CLI (the workers' RAM is theirs, not the "
          "daemon's); idle connections: HTTP keep-alive ones each served one `GET /healthz`, Unix-socket ones "
          "one `status` frame; then, with those still open, SSE streams: streamed prompts whose turn never ends "
          "(`[[hang]]`), each read to its first `delta`, one worker leased each (the workers idle in `before`). "
          "Connections are counted in the daemon's socket table when its RSS is read; KiB per connection is "
          "the RSS growth over the row's added connections (the previous row to this one; `=`: over `before`).\n\n"
        + table(["step", "open", "daemon RSS MiB", "KiB/connection"], conn_rows))
    if idle_all.kib_per_connection is not None:
        checks.append((f"{idle_all.connections} idle connections (HTTP + socket) open when read", True,
                       f"{idle_all.kib_per_connection:g} KiB each"))
    if sse_all.kib_per_connection is not None:
        checks.append((f"{sse_all.connections} SSE streams open when read", True,
                       f"{sse_all.kib_per_connection:g} KiB each"))
    return Report(NAME, {"pools": [asdict(p) for p in pools], "sizing": sizing,
                         "connections": [asdict(s) for s in connections], **timings},
                  markdown, checks)


def plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    pools = rep.data["pools"]
    n = [p["workers"] for p in pools]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [p["pss_per_worker_mib"] for p in pools], "o-", label="PSS / worker")
    left.plot(n, [p["rss_per_worker_mib"] for p in pools], "s--", label="RSS / worker")
    left.plot(n, [p["uss_per_worker_mib"] for p in pools], "^:", label="USS / worker (private)")
    for p in pools:  # PSS read while other processes shared the binary's pages: lower than alone
        if p["other_cli_processes"]:
            left.annotate(f"{p['other_cli_processes']} other CLIs", (p["workers"], p["pss_per_worker_mib"]),
                          textcoords="offset points", xytext=(-10, 8), fontsize=7)
    left.axhline(rep.data["sizing"]["assumed_pss_mib"], color="grey", linestyle=":", label="sizing rule's assumption")
    left.set_xscale("log", base=2)
    left.set_xticks(n, [str(x) for x in n])
    left.set_xlabel("warm workers")
    left.set_ylabel("MiB")
    left.set_ylim(bottom=0)
    left.set_title("Memory per warm worker")
    left.legend()
    right.plot(n, [p["total_pss_mib"] for p in pools], "o-", label="workers' total PSS")
    right.plot(n, [p["rss_per_worker_mib"] * p["workers"] for p in pools], "s--", label="workers' total RSS")
    right.set_xticks(n, [str(x) for x in n])
    right.set_xlabel("warm workers")
    right.set_ylabel("MiB")
    right.set_title("Total")
    right.legend()
    fig.tight_layout()
    path = out_dir / "memory_pss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
