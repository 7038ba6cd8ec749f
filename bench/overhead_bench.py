"""The daemon's own overhead: throughput against a bare driver, and its CPU per request (issue 16, goal 2).

Arms, interleaved so a slow spell of the shared machine hits all of them:

* bare: ``W`` fake CLI processes (tests/fakes/fake_claude.py, which answers at once) driven directly
  over stream-json by a minimal asyncio driver in this process, ``c`` requests in flight. Each
  request sends the frames a worker sends: the prompt, then the reset (``/clear`` and the
  ``get_settings`` that checks it). req/s, and this driver's CPU per request.
* socket / http: ``claudepool serve`` (`bench.daemon_proc`) with the same ``W`` fake workers, loaded
  by a lean client in a process of its own (raw NDJSON frames on the socket, or aiohttp with
  keep-alive), ``c`` in flight, so the load generator's CPU is not taken from the daemon's
  interpreter. req/s, the daemon process's own CPU per request (not its workers') and the client's.
  With uvloop installed (the ``fast`` extra) every daemon arm also runs with
  ``server.event_loop = "uvloop"``.
* real: the daemon's own CPU per request with the real CLI against the loopback fake upstream
  (its gateway included: everything the daemon process spends, nothing subtracted).

Each arm stops after its count or its duration (quick: 1.5 s, full: 6 s; real CLI 2 s / 20 s),
whichever comes first, so the section keeps its budget (quick ≤ 25 s, full ≤ 4 min) on a busy machine.

    python -m bench --only overhead [--quick]
    python -m bench.overhead_bench client --socket PATH --key K -c 8 -n 2000   # the load generator
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.daemon_proc import DaemonProc, close_stdin_and_wait, daemon_process
from bench.latency_bench import settle
from bench.metrics_bench import FAKE
from bench.pool_bench import fake_upstream_process, self_cpu_s
from bench.suite import REPO, Options, Report, table
from claudepool.pool.profile import Profile
from claudepool.protocol.cli_events import encode_command, encode_control_request, encode_user_message

NAME = "overhead"
KEY = "bench-key-0123"
ADMIN = "bench-admin-0123"
PROMPT = "[[reply:ok]] overhead"


@dataclass
class Arm:
    mode: str  # bare | socket | http | real-socket
    loop: str  # asyncio | uvloop (the daemon's; the bare driver and clients use asyncio)
    workers: int
    concurrency: int
    requests: int
    requests_per_s: float
    cpu_ms_per_request: float  # the driver's (bare) or the daemon process's own
    client_cpu_ms_per_request: float | None  # the load generator's, in its own process


# -- the bare driver --------------------------------------------------------------------------

class Bare:
    """One fake CLI process, driven with the worker's frames: prompt, /clear, get_settings."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.asked = 0

    @classmethod
    async def start(cls, profile: Profile, home: Path) -> Bare:
        home.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *profile.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=profile.environ(home=home, tmpdir=home), cwd=home, limit=2**24)
        bare = cls(proc)
        await bare.control("initialize")
        return bare

    async def _until(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = orjson.loads(line)
            if event.get("type") == kind:
                return dict(event)
        raise RuntimeError("the fake CLI exited")

    def _send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)

    async def control(self, subtype: str) -> None:
        self.asked += 1
        self._send(encode_control_request(f"b{self.asked}", subtype))
        await self._until("control_response")

    async def request(self) -> None:
        self._send(encode_user_message(PROMPT))
        result = await self._until("result")
        if result.get("is_error"):
            raise RuntimeError(f"bare turn failed: {str(result)[:300]}")
        self._send(encode_command("/clear"))
        await self._until("result")
        await self.control("get_settings")

    async def close(self) -> None:
        await close_stdin_and_wait(self.proc)


@contextlib.asynccontextmanager
async def bare_pool(tmp: Path, workers: int) -> AsyncIterator[list[Bare]]:
    profile = Profile(name="bench", claude_bin=str(FAKE))
    procs = list(await asyncio.gather(*(Bare.start(profile, tmp / f"bare-{i}") for i in range(workers))))
    try:
        yield procs
    finally:
        await asyncio.gather(*(p.close() for p in procs))


async def drive(one: Callable[[int], Awaitable[None]], n: int, c: int, duration_s: float = 0) -> int:
    """Run ``one(i)`` with ``c`` in flight until ``n`` have started or ``duration_s`` (if set) has
    passed; the number done. The duration bounds a run on a slow (or busy) machine."""
    deadline = time.perf_counter() + duration_s if duration_s else float("inf")
    started = 0

    async def runner() -> None:
        nonlocal started
        while started < n and time.perf_counter() < deadline:
            started += 1
            await one(started)

    await asyncio.gather(*(runner() for _ in range(c)))
    return started


async def bare_arm(procs: list[Bare], n: int, c: int, duration_s: float) -> Arm:
    waiting: asyncio.Queue[Bare] = asyncio.Queue()
    for p in procs:
        waiting.put_nowait(p)

    async def one(_: int) -> None:
        proc = await waiting.get()
        try:
            await proc.request()
        finally:
            waiting.put_nowait(proc)

    await drive(one, 2 * c, c)
    cpu0, t0 = self_cpu_s(), time.perf_counter()
    done = await drive(one, n, c, duration_s)
    wall_s, cpu_s = time.perf_counter() - t0, self_cpu_s() - cpu0
    return Arm("bare", "asyncio", len(procs), c, done, round(done / wall_s, 1), round(cpu_s / done * 1000, 3), None)


# -- the lean load generator (in a process of its own) ------------------------------------------

async def socket_load(path: str, key: str, n: int, c: int, duration_s: float = 0) -> int:
    """``n`` prompts (or ``duration_s`` of them), ``c`` in flight, multiplexed on one connection by
    id; raw NDJSON frames. The number done."""
    reader, writer = await asyncio.open_unix_connection(path, limit=2**24)
    pending: dict[str, asyncio.Future[None]] = {}
    loop = asyncio.get_running_loop()

    async def read() -> None:
        while line := await reader.readline():
            frame = orjson.loads(line)
            if frame.get("event") == "result":
                pending.pop(frame["id"]).set_result(None)
            elif frame.get("event") == "error":
                pending.pop(frame["id"]).set_exception(RuntimeError(str(frame)[:300]))

    reading = asyncio.create_task(read())

    async def one(i: int) -> None:
        rid = f"r{i}"
        done = pending[rid] = loop.create_future()
        writer.write(orjson.dumps({"id": rid, "op": "prompt", "key": key, "prompt": PROMPT}) + b"\n")
        await done

    try:
        return await drive(one, n, c, duration_s)
    finally:
        reading.cancel()
        writer.close()


async def http_load(url: str, key: str, n: int, c: int, duration_s: float = 0) -> int:
    import aiohttp

    body = orjson.dumps({"prompt": PROMPT})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as http:

        async def one(_: int) -> None:
            async with http.post(f"{url}/v1/prompt", data=body, headers=headers) as resp:
                answer = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {answer[:300]!r}")

        return await drive(one, n, c, duration_s)


async def client_main(args: argparse.Namespace) -> None:
    """Warm up, then print ``{"requests", "wall_s", "cpu_s"}`` of the measured run, once per line."""

    def load(n: int, duration_s: float = 0) -> Coroutine[Any, Any, int]:
        if args.socket:
            return socket_load(args.socket, args.key, n, args.c, duration_s)
        return http_load(args.url, args.key, n, args.c, duration_s)

    await load(args.warmup, args.duration_s / 4)
    print("warm", flush=True)
    sys.stdin.readline()  # the bench reads the daemon's CPU, then says go
    cpu0, t0 = self_cpu_s(), time.perf_counter()
    done = await load(args.n, args.duration_s)
    print(orjson.dumps({"requests": done, "wall_s": time.perf_counter() - t0, "cpu_s": self_cpu_s() - cpu0}).decode(),
          flush=True)


async def daemon_arm(d: DaemonProc, mode: str, loop: str, workers: int, n: int, c: int, duration_s: float = 0) -> Arm:
    where = ["--socket", d.socket] if mode.endswith("socket") else ["--url", d.url]
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.overhead_bench", "client", *where, "--key", KEY, "-c", str(c),
        "-n", str(n), "--duration-s", str(duration_s), "--warmup", str(max(2 * c, min(n // 10, 200))),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert client.stdin is not None and client.stdout is not None
    try:
        async with asyncio.timeout(600):
            if (await client.stdout.readline()).strip() != b"warm":
                raise RuntimeError("the load generator failed in its warm-up")
            await settle(d, workers)
            cpu0 = d.cpu_s()
            client.stdin.write(b"go\n")
            await client.stdin.drain()
            line = await client.stdout.readline()
            if not line:
                raise RuntimeError("the load generator failed")
            # The resets of the last requests are part of their cost: wait for them, polling lightly.
            await asyncio.sleep(0.2)
            cpu_s = d.cpu_s() - cpu0
            await client.wait()
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    got = orjson.loads(line)
    done = got["requests"]
    return Arm(mode, loop, workers, c, done, round(done / got["wall_s"], 1), round(cpu_s / done * 1000, 3),
               round(got["cpu_s"] / done * 1000, 3))


def daemon_config(claude: str, tmp: Path, workers: int, loop: str, base_url: str = "") -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 100_000},
        "pool": {"claude_bin": claude, "min_idle": workers, "max_workers": workers, "max_turns": 10_000_000,
                 "workdir": str(tmp / "w"), "timeouts": {"ready_timeout_s": 60}},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "tenants": {"bench": {"key": KEY, "requests_per_minute": 0, "max_queued": 0}},
    }
    if loop != "asyncio":
        config["server"]["event_loop"] = loop
    if base_url:
        config["upstream"] = {"base_url": base_url, "api_key": "sk-ant-bench"}
    return config


def loops() -> list[str]:
    return ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") is not None else ["asyncio"]


async def run(opts: Options) -> Report:
    workers, c = 4, 8
    # Each arm stops at n requests or its duration, whichever comes first: on a busy machine the
    # duration keeps the section within its budget (quick ≤ 25 s, full ≤ 4 min).
    n, duration_s = (2_000, 1.5) if opts.quick else (20_000, 6.0)
    real_n, real_c, real_s = (20, 2, 2.0) if opts.quick else (300, 2, 20.0)
    repeats = 1 if opts.quick else opts.repeats
    arms: list[Arm] = []
    with tempfile.TemporaryDirectory(prefix="claudepool-overhead-") as tmp_s:
        tmp = Path(tmp_s)
        async with contextlib.AsyncExitStack() as stack:
            procs = await stack.enter_async_context(bare_pool(tmp / "bare", workers))
            daemons = {loop: await stack.enter_async_context(
                daemon_process(daemon_config(str(FAKE), tmp / f"d-{loop}", workers, loop))) for loop in loops()}
            for d in daemons.values():
                await settle(d, workers)
            for _ in range(repeats):
                arms.append(await bare_arm(procs, n, c, duration_s))
                for loop, d in daemons.items():
                    for mode in ("socket", "http"):
                        arms.append(await daemon_arm(d, mode, loop, workers, n, c, duration_s))
        with fake_upstream_process() as base_url:
            # Quick: the default loop only (each real-CLI daemon starts its workers, seconds each).
            for loop in loops()[:1] if opts.quick else loops():
                async with daemon_process(daemon_config(opts.claude, tmp / f"r-{loop}", real_c, loop, base_url)) as d:
                    await settle(d, real_c)
                    arms.append(await daemon_arm(d, "real-socket", loop, real_c, real_n, real_c, real_s))
    return report(arms, opts)


def report(arms: list[Arm], opts: Options) -> Report:
    groups: dict[tuple[str, str], list[Arm]] = {}
    for a in arms:
        groups.setdefault((a.mode, a.loop), []).append(a)

    def med(key: tuple[str, str], field: str) -> float | None:
        values = [getattr(a, field) for a in groups.get(key, []) if getattr(a, field) is not None]
        return round(statistics.median(values), 3) if values else None

    bare = med(("bare", "asyncio"), "requests_per_s") or 0.0
    rows = []
    for key, group in groups.items():
        rate = med(key, "requests_per_s") or 0.0
        rows.append([key[0], key[1], group[0].workers, group[0].concurrency, sum(a.requests for a in group), rate,
                     f"{rate / bare:.2f}×" if bare and not key[0].startswith("real") else "",
                     med(key, "cpu_ms_per_request"), med(key, "client_cpu_ms_per_request") or ""])
    checks = []
    for loop in ("asyncio", "uvloop"):
        for mode in ("socket", "http"):
            rps = med((mode, loop), "requests_per_s")
            if rps is not None and bare:
                checks.append((f"fake CLI, {mode}, {loop}: ≥ 0.6× bare driver's req/s", rps >= 0.6 * bare,
                               f"{rps:.0f} vs {bare:.0f} req/s ({rps / bare:.2f}×)"))
        cpu = med(("real-socket", loop), "cpu_ms_per_request")
        if cpu is not None:
            checks.append((f"real CLI, {loop}: daemon CPU ≤ 1 ms/request", cpu <= 1.0, f"{cpu:.2f} ms"))
    markdown = (
        "Throughput and CPU per request. bare: this process driving the fake CLI processes directly (the "
        "worker's frames: prompt, /clear, get_settings), its own CPU; socket/http: `claudepool serve` on "
        "the same fake CLI, loaded by a lean client process (raw NDJSON / aiohttp keep-alive), the daemon "
        "process's own CPU (not its workers') and the client's; real-socket: the real CLI against the "
        "loopback fake upstream, the daemon's own CPU including its gateway. loop: the daemon's event loop"
        f"{'' if opts.quick else f'; medians of {opts.repeats} interleaved repeats'}. The machine has 2 cores: "
        "the fake CLI processes, the daemon and the client share them.\n\n") + table(
        ["mode", "loop", "W", "c", "requests (all repeats)", "req/s", "vs bare", "CPU ms/req", "client CPU ms/req"],
        rows)
    return Report(NAME, {"arms": [asdict(a) for a in arms]}, markdown, checks)


def _client_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["client"])
    parser.add_argument("--socket", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--key", required=True)
    parser.add_argument("-c", type=int, default=8)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--duration-s", type=float, default=0, help="stop starting requests after this (0: none)")
    parser.add_argument("--warmup", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(client_main(_client_args()))
