"""Latency and CPU per request: the daemon (HTTP and socket) vs a hand-driven warm process vs cold.

Same CLI, same flags (`Profile.argv`), one loopback fake upstream in a process of its own (its CPU
is counted in no arm), the same prompt:

* floor: ``c`` warm ``claude`` processes driven directly over stream-json by a minimal asyncio
  driver in this process, one request at a time each, each sending ``/clear`` after its answer
  and before its next request (what a hand-written wrapper with one process per concurrent caller
  does to keep callers apart; the reset is not in the latency). CPU: the processes' plus this
  driver's. ``floor-noreset`` (full runs): the same without ``/clear``, for reference.
* floor-overlap: the pool's schedule driven by hand, no daemon and no pool code: ``c + 2`` warm
  processes; after its answer a process's ``/clear`` runs in the background and the runner's next
  request takes the most recently cleaned free process (as the pool's idle stack does). It
  measures what overlapping the reset costs in itself: the next request lands on a process that
  sat idle while another worked, and a CLI that has idled is slower and costs more CPU.
* http / socket: a ``claudepool serve`` process (``c + 2`` warm workers; its gateway in the path),
  driven by `AsyncClient.stream`. CPU: the daemon's and every worker's (live and reaped), measured
  until the resets of the run are done; the clients' CPU is not counted.
* cold: ``claude -p`` per request (`bench.pool_bench.bench_cold`).

Latency is request to result, TTFT request to the first text delta. Each phase runs ``n``
requests with ``c`` in flight after a warm-up; medians over the repeats are reported, and the
ratios compare arms measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from bench.daemon_proc import DaemonProc, close_stdin_and_wait, daemon_process
from bench.pool_bench import bench_cold, fake_upstream_process, percentile, self_cpu_s
from bench.suite import Options, Report, table
from claudepool.client import AsyncClient
from claudepool.pool.profile import Profile
from claudepool.protocol.cli_events import encode_command, encode_control_request, encode_user_message
from claudepool.protocol.wire import PromptResult

NAME = "latency"
KEY = "bench-key-0123"
ADMIN = "bench-admin-0123"
PROMPT = "Summarise the benefits of a warm process pool in one line."


@dataclass
class Phase:
    mode: str  # floor | floor-noreset | floor-overlap | http | socket | socket@floor-rate | cold
    concurrency: int
    delay_s: float
    requests: int
    p50_ms: float
    p95_ms: float
    ttft_p50_ms: float | None
    cpu_ms_per_request: float
    # Requests per second over the phase: in a closed loop a floor runner's next request waits for
    # its process's /clear, a daemon runner's does not (the reset is on another worker).
    req_per_s: float = 0.0
    # Of cpu_ms_per_request, the daemon process's own (its gateway included) or the floor's driver's.
    own_cpu_ms_per_request: float | None = None
    # Every request's latency, for the distributions plot.
    latencies_ms: list[float] = field(default_factory=list)


Sample = tuple[float, float | None]  # (latency s, time to first token s)


def prompt_for(delay_s: float) -> str:
    return f"{PROMPT} [[delay_s:{delay_s:g}]]" if delay_s else PROMPT


async def run_phase(one: Callable[[], Awaitable[Sample]], n: int, c: int) -> tuple[list[Sample], float]:
    """``n`` requests, ``c`` in flight; the samples and the wall time in seconds."""
    t0 = time.perf_counter()
    left = n
    samples: list[Sample] = []

    async def runner() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            samples.append(await one())

    await asyncio.gather(*(runner() for _ in range(c)))
    return samples, time.perf_counter() - t0


async def run_paced(one: Callable[[], Awaitable[Sample]], n: int, c: int, rate_per_s: float) -> tuple[
        list[Sample], float]:
    """``n`` requests started ``1 / rate_per_s`` apart (open loop), at most ``c`` in flight."""
    t0 = time.perf_counter()
    gate = asyncio.Semaphore(c)
    samples: list[Sample] = []

    async def at(i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + i / rate_per_s - time.perf_counter()))
        async with gate:
            samples.append(await one())

    await asyncio.gather(*(at(i) for i in range(n)))
    return samples, time.perf_counter() - t0


def phase_of(mode: str, c: int, delay_s: float, run: tuple[list[Sample], float], cpu_s: float,
             own_cpu_s: float | None = None) -> Phase:
    samples, wall_s = run
    lat = [s[0] for s in samples]
    ttft = [s[1] for s in samples if s[1] is not None]
    return Phase(mode, c, delay_s, len(samples), round(percentile(lat, 0.5) * 1000, 2),
                 round(percentile(lat, 0.95) * 1000, 2), round(percentile(ttft, 0.5) * 1000, 2) if ttft else None,
                 round(cpu_s / len(samples) * 1000, 2), round(len(samples) / wall_s, 1),
                 None if own_cpu_s is None else round(own_cpu_s / len(samples) * 1000, 2),
                 [round(x * 1000, 2) for x in lat])


class HandDriven:
    """One warm CLI process driven by hand: initialize once, then one user message per request."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, profile: Profile, home: Path) -> HandDriven:
        home.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *profile.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=profile.environ(home=home, tmpdir=home), cwd=home, limit=2**24)
        driven = cls(proc)
        await driven._send(encode_control_request("init", "initialize"))
        await driven._until(lambda e: e.get("type") == "control_response")
        return driven

    async def _send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        await self.proc.stdin.drain()

    async def _until(self, done: Callable[[dict[str, Any]], bool],
                     on: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = orjson.loads(line)
            if on is not None:
                on(event)
            if done(event):
                return dict(event)
        raise RuntimeError("the CLI exited")

    async def turn(self, prompt: str) -> Sample:
        t0 = time.perf_counter()
        first: list[float] = []

        def on(event: dict[str, Any]) -> None:
            if not first and event.get("type") == "stream_event" and \
                    event.get("event", {}).get("delta", {}).get("type") == "text_delta":
                first.append(time.perf_counter() - t0)

        await self._send(encode_user_message(prompt))
        result = await self._until(lambda e: e.get("type") == "result", on)
        if result.get("is_error"):
            raise RuntimeError(f"hand-driven turn failed: {str(result)[:300]}")
        return time.perf_counter() - t0, first[0] if first else None

    async def clear(self) -> None:
        await self._send(encode_command("/clear"))
        await self._until(lambda e: e.get("type") == "result")

    async def get_settings(self, request_id: str) -> None:
        """The pool's settings check after a reset, by hand (the floor itself does not send it)."""
        await self._send(encode_control_request(request_id, "get_settings"))
        await self._until(lambda e: e.get("type") == "control_response")

    def cpu_s(self) -> float:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system + t.children_user + t.children_system
        return 0.0

    async def close(self) -> None:
        await close_stdin_and_wait(self.proc)


@contextlib.asynccontextmanager
async def hand_driven(profile: Profile, tmp: Path, count: int) -> AsyncIterator[list[HandDriven]]:
    procs = list(await asyncio.gather(*(HandDriven.start(profile, tmp / f"floor-{i}") for i in range(count))))
    try:
        yield procs
    finally:
        await asyncio.gather(*(p.close() for p in procs))


async def floor_phase(procs: list[HandDriven], n: int, c: int, delay_s: float, *, reset: bool = True) -> Phase:
    procs = procs[:c]  # one per runner; the spares are floor-overlap's, their idle CPU not the floor's
    free = list(procs)

    async def one() -> Sample:
        proc = free.pop()
        try:
            sample = await proc.turn(prompt_for(delay_s))
            if reset:  # after the answer: its runner's next request waits for it, as a wrapper's would
                await proc.clear()
            return sample
        finally:
            free.append(proc)

    await run_phase(one, 3 * c, c)  # warm-up: the first turns of a process are slower
    own0 = self_cpu_s()
    cpu0 = sum(p.cpu_s() for p in procs) + own0
    measured = await run_phase(one, n, c)
    own_s = self_cpu_s() - own0
    cpu_s = sum(p.cpu_s() for p in procs) + self_cpu_s() - cpu0
    return phase_of("floor" if reset else "floor-noreset", c, delay_s, measured, cpu_s, own_s)


async def floor_overlap_phase(procs: list[HandDriven], n: int, c: int, delay_s: float) -> Phase:
    """``c`` runners over all of ``procs``: each process's /clear after its answer runs in the
    background, and a runner takes the process cleaned last (the pool's idle stack, by hand)."""
    free = list(procs)
    ready = asyncio.Condition()
    cleaning: set[asyncio.Task[None]] = set()

    async def clean(proc: HandDriven) -> None:
        await proc.clear()
        async with ready:
            free.append(proc)
            ready.notify()

    async def one() -> Sample:
        t0 = time.perf_counter()
        async with ready:  # waiting for a clean process is part of the latency, as a lease's is
            await ready.wait_for(lambda: bool(free))
            proc = free.pop()
        waited_s = time.perf_counter() - t0
        latency_s, ttft_s = await proc.turn(prompt_for(delay_s))
        task = asyncio.create_task(clean(proc))
        cleaning.add(task)
        task.add_done_callback(cleaning.discard)
        return latency_s + waited_s, None if ttft_s is None else ttft_s + waited_s

    async def drained() -> None:
        while cleaning:
            await asyncio.gather(*cleaning)

    await run_phase(one, 3 * c, c)
    await drained()
    own0 = self_cpu_s()
    cpu0 = sum(p.cpu_s() for p in procs) + own0
    measured = await run_phase(one, n, c)
    await drained()  # the run's resets are part of its cost
    own_s = self_cpu_s() - own0
    cpu_s = sum(p.cpu_s() for p in procs) + self_cpu_s() - cpu0
    return phase_of("floor-overlap", c, delay_s, measured, cpu_s, own_s)


async def pool_counts(d: DaemonProc) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{d.url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        body = await resp.json()
    counts: dict[str, int] = {}
    for pool in body["pools"].values():
        for k, v in pool["counts"].items():
            counts[k] = counts.get(k, 0) + v
    return counts


async def settle(d: DaemonProc, idle: int) -> None:
    async with asyncio.timeout(180):
        while True:
            counts = await pool_counts(d)
            if counts.get("idle", 0) >= idle and not any(counts.get(k) for k in ("starting", "cleaning", "leased")):
                return
            await asyncio.sleep(0.05)


async def daemon_phase(d: DaemonProc, mode: str, n: int, c: int, delay_s: float,
                       rate_per_s: float | None = None) -> Phase:
    """Closed loop (``c`` runners back to back), or with ``rate_per_s`` requests that arrive at that
    rate: the floor's own, so both serve the same load and the floor's /clear is no longer hidden in
    its runners' waits."""
    where = {"url": d.url} if mode == "http" else {"socket_path": d.socket}
    async with AsyncClient(key=KEY, **where) as client:  # type: ignore[arg-type]

        async def one() -> Sample:
            t0 = time.perf_counter()
            first: float | None = None
            async for piece in client.stream(prompt_for(delay_s)):
                if first is None and isinstance(piece, str):
                    first = time.perf_counter() - t0
                if isinstance(piece, PromptResult):
                    if piece.is_error:
                        raise RuntimeError(f"daemon request failed: {piece.text[:300]}")
                    return time.perf_counter() - t0, first
            raise RuntimeError("the stream ended without a result")

        await run_phase(one, 3 * c, c)
        await settle(d, c + 2)
        cpu0, own0 = d.tree_cpu_s(), d.cpu_s()
        measured = await (run_phase(one, n, c) if rate_per_s is None else run_paced(one, n, c, rate_per_s))
        await settle(d, c + 2)  # the resets of the run are part of its cost
        return phase_of(mode if rate_per_s is None else f"{mode}@floor-rate", c, delay_s, measured,
                        d.tree_cpu_s() - cpu0, d.cpu_s() - own0)


def daemon_config(claude: str, base_url: str, tmp: Path, workers: int) -> dict[str, Any]:
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 10_000},
        "pool": {"claude_bin": claude, "min_idle": workers, "max_workers": workers, "max_turns": 1_000_000,
                 "workdir": str(tmp / "w"), "timeouts": {"ready_timeout_s": 60}},
        "upstream": {"base_url": base_url, "api_key": "sk-ant-bench"},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "tenants": {"bench": {"key": KEY, "requests_per_minute": 0, "max_queued": 0}},
    }


def plan(opts: Options) -> tuple[list[int], list[tuple[float, Callable[[int], int], int]]]:
    """Concurrency levels, and per upstream delay: requests per phase (from c) and repeats."""
    if opts.quick:
        return [1, 4], [(0.0, lambda c: 12, 1)]
    return [1, 4, 16], [(0.0, lambda c: max(40, 4 * c), opts.repeats), (1.0, lambda c: 2 * c, 1),
                        (5.0, lambda c: c, 1)]


async def run(opts: Options) -> Report:
    levels, delays = plan(opts)
    phases: list[Phase] = []
    with fake_upstream_process() as base_url, tempfile.TemporaryDirectory(prefix="claudepool-latency-") as tmp_s:
        tmp = Path(tmp_s)
        profile = Profile(name="bench", claude_bin=opts.claude,
                          env={"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "sk-ant-bench"})
        cold_home = tmp / "cold"
        cold_home.mkdir()
        for c in levels:
            async with daemon_process(daemon_config(opts.claude, base_url, tmp / f"d{c}", c + 2)) as d, \
                    hand_driven(profile, tmp / f"f{c}", c + 2) as procs:
                await settle(d, c + 2)
                for delay_s, n_of, repeats in delays:
                    n = n_of(c)
                    for _ in range(repeats):
                        # Interleaved arms, so a slow spell of the machine hits all of them.
                        floor = await floor_phase(procs, n, c, delay_s)
                        phases.append(floor)
                        phases.append(await daemon_phase(d, "http", n, c, delay_s))
                        phases.append(await daemon_phase(d, "socket", n, c, delay_s))
                        phases.append(await floor_overlap_phase(procs, n, c, delay_s))
                        if delay_s == 0:
                            phases.append(await daemon_phase(d, "socket", n, c, delay_s, floor.req_per_s))
                        if not opts.quick and delay_s == 0:
                            phases.append(await floor_phase(procs, n, c, delay_s, reset=False))
            # Cold only with the upstream answering at once: with a slow one it is that delay plus this.
            cold = await bench_cold(profile, cold_home, min(delays[0][1](c), 20), c)
            phases.append(Phase("cold", c, 0.0, cold.requests, round(cold.p50_ms, 2), round(cold.p95_ms, 2),
                                None, round(cold.cpu_s_per_request * 1000, 2), latencies_ms=cold.latencies_ms))
    return report(phases, opts)


def medians(phases: list[Phase]) -> dict[tuple[str, int, float], dict[str, float | None]]:
    groups: dict[tuple[str, int, float], list[Phase]] = {}
    for p in phases:
        groups.setdefault((p.mode, p.concurrency, p.delay_s), []).append(p)

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 2) if present else None

    return {k: {"p50_ms": med([p.p50_ms for p in g]), "p95_ms": med([p.p95_ms for p in g]),
                "ttft_p50_ms": med([p.ttft_p50_ms for p in g]),
                "cpu_ms_per_request": med([p.cpu_ms_per_request for p in g]),
                "own_cpu_ms_per_request": med([p.own_cpu_ms_per_request for p in g]),
                "req_per_s": med([p.req_per_s or None for p in g])} for k, g in groups.items()}


def ratio(m: dict[tuple[str, int, float], dict[str, float | None]], mode: str, c: int, delay_s: float,
          key: str, base: str = "floor") -> float | None:
    """``mode``'s ``key`` over ``base``'s, at the same concurrency and delay (None: not measured)."""
    mine, floor = m.get((mode, c, delay_s), {}).get(key), m.get((base, c, delay_s), {}).get(key)
    return mine / floor if mine is not None and floor else None


def report(phases: list[Phase], opts: Options) -> Report:
    m = medians(phases)
    rows, checks = [], []
    for (mode, c, delay_s), v in sorted(m.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        lat, cpu = ratio(m, mode, c, delay_s, "p50_ms"), ratio(m, mode, c, delay_s, "cpu_ms_per_request")
        rate = ratio(m, mode, c, delay_s, "req_per_s")
        rows.append([f"{delay_s:g}", c, mode, v["p50_ms"], v["p95_ms"], v["ttft_p50_ms"] or "",
                     v["cpu_ms_per_request"], v["own_cpu_ms_per_request"] or "", v["req_per_s"] or "",
                     "" if mode == "floor" or lat is None else f"{lat:.2f}×",
                     "" if mode == "floor" or cpu is None else f"{cpu:.2f}×",
                     "" if mode == "floor" or rate is None else f"{rate:.2f}×"])
    for c in sorted({p.concurrency for p in phases}):
        for mode in ("http", "socket", "socket@floor-rate"):
            lat, cpu = ratio(m, mode, c, 0.0, "p50_ms"), ratio(m, mode, c, 0.0, "cpu_ms_per_request")
            if lat is not None and cpu is not None:
                checks.append((f"c={c} {mode}: p50 ≤ 1.1× floor", lat <= 1.1, f"{lat:.2f}×"))
                checks.append((f"c={c} {mode}: CPU/request ≤ 1.1× floor", cpu <= 1.1, f"{cpu:.2f}×"))
    markdown = ("Upstream delay in seconds; p50/p95/TTFT in ms; CPU ms per request (daemon + workers, or "
                "floor processes + driver); ratios to the floor at the same concurrency and delay, same run"
                f"{'' if opts.quick else f' (medians of {opts.repeats} repeats at delay 0)'}. http and socket are "
                "closed loops like the floor's (each runner sends its next request when its last one is "
                "answered), but a floor runner also waits for its process's /clear while a daemon runner does "
                "not: on saturated cores the daemon then serves more requests per second at a longer latency "
                "(Little's law). socket@floor-rate sends requests at the floor's measured rate instead, so "
                "both serve the same load.\n\n") + table(
        ["delay s", "c", "mode", "p50", "p95", "TTFT p50", "CPU ms/req", "of which daemon/driver", "req/s",
         "p50 vs floor", "CPU vs floor", "req/s vs floor"], rows) + overlap_table(m)
    return Report(NAME, {"phases": [asdict(p) for p in phases],
                         "medians": [{"mode": k[0], "concurrency": k[1], "delay_s": k[2], **v} for k, v in m.items()]},
                  markdown, checks)


def overlap_table(m: dict[tuple[str, int, float], dict[str, float | None]]) -> str:
    """The split of the daemon's gap at delay 0: the schedule's (floor-overlap over floor) and the rest
    (socket over floor-overlap: the daemon, the pool's code and the gateway)."""
    rows = []
    for c in sorted({k[1] for k in m if k[0] == "floor-overlap" and k[2] == 0}):
        got = [ratio(m, "floor-overlap", c, 0.0, "p50_ms"), ratio(m, "floor-overlap", c, 0.0, "cpu_ms_per_request"),
               ratio(m, "socket", c, 0.0, "p50_ms", "floor-overlap"),
               ratio(m, "socket", c, 0.0, "cpu_ms_per_request", "floor-overlap")]
        rows.append([c, *("" if r is None else f"{r:.2f}×" for r in got)])
    if not rows:
        return ""
    return ("\n\nWhere the gap is, at delay 0: overlapping the reset in itself (floor-overlap, the pool's "
            "schedule driven by hand, over the floor), and the rest (the daemon socket arm over floor-overlap: "
            "the daemon, the pool's code, the gateway).\n\n") + table(
        ["c", "floor-overlap p50 vs floor", "floor-overlap CPU vs floor", "socket p50 vs floor-overlap",
         "socket CPU vs floor-overlap"], rows)


def plot(rep: Report, out_dir: Path) -> list[Path]:
    """The latency distributions at delay 0 (every request of every repeat), one panel per concurrency."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    phases = [p for p in rep.data["phases"] if p["delay_s"] == 0 and p.get("latencies_ms")]
    levels = sorted({p["concurrency"] for p in phases})
    modes = [m for m in ("floor", "floor-overlap", "socket@floor-rate", "socket", "http", "cold")
             if any(p["mode"] == m for p in phases)]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.8), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], levels, strict=True):
        for mode in modes:
            values = sorted(x for p in phases if p["mode"] == mode and p["concurrency"] == c
                            for x in p["latencies_ms"])
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=mode)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("latency, ms (log)")
        ax.set_title(f"c={c}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize="small", loc="lower right")
    fig.suptitle("Request latency distributions: daemon vs hand-driven warm processes vs cold claude -p")
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
