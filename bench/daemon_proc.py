"""A daemon as a process of its own, for benchmarks that measure its CPU apart from the clients'.

    async with daemon_process(config) as d:   # config: the TOML tables as a dict
        d.url, d.socket, d.cpu_s()             # cpu_s: the daemon's own CPU, not its workers'
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.suite import REPO


def to_toml(tables: dict[str, Any], prefix: str = "") -> str:
    """The few TOML shapes our config uses: nested tables of strings, numbers, booleans and lists."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    scalars = [f"{k} = {value(v)}" for k, v in tables.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in tables.items():
        if isinstance(v, dict):
            out.append(to_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out)


@dataclass
class DaemonProc:
    proc: asyncio.subprocess.Process
    url: str = ""
    socket: str = ""
    output: list[str] = field(default_factory=list)

    def cpu_s(self) -> float:
        """The daemon process's own CPU (user + system), without its workers'."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def tree_cpu_s(self) -> float:
        """The daemon's CPU plus every worker's, live (psutil) and reaped (its children times)."""
        me = psutil.Process(self.proc.pid)
        times = me.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system  # a live child's own children are counted when reaped
        return total

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)


@contextlib.asynccontextmanager
async def daemon_process(config: dict[str, Any], *, ready_timeout_s: float = 120,
                         env: dict[str, str] | None = None,
                         on_line: Callable[[str], None] | None = None) -> AsyncIterator[DaemonProc]:
    """Run ``claudepool serve --config`` on ``config`` until the block ends (SIGTERM, bounded).

    ``d.output`` keeps the daemon's last 200 lines; ``on_line`` is given every line once it is ready
    (to count log lines over a long run without keeping them)."""
    with tempfile.TemporaryDirectory(prefix="claudepool-bench-cfg-") as tmp:
        path = Path(tmp) / "claudepool.toml"
        path.write_text(to_toml(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "claudepool", "serve", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        d = DaemonProc(proc)
        drain: asyncio.Task[None] | None = None
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while "claudepool: listening on" not in (line := (await proc.stdout.readline()).decode()):
                    if not line:
                        raise RuntimeError("the daemon exited:\n" + "".join(d.output))
                    d.output.append(line)
            for part in line.split("listening on ", 1)[1].strip().split(" and "):
                kind, _, where = part.partition(" ")
                if kind == "http":
                    d.url = where
                elif kind == "unix":
                    d.socket = where
            drain = asyncio.create_task(_drain(proc, d.output, on_line))
            if d.url:
                async with asyncio.timeout(ready_timeout_s), aiohttp.ClientSession() as http:
                    while True:
                        async with http.get(f"{d.url}/readyz") as resp:
                            if resp.status == 200:
                                break
                        await asyncio.sleep(0.05)
            yield d
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            if drain is not None:
                drain.cancel()


async def _drain(proc: asyncio.subprocess.Process, output: list[str],
                 on_line: Callable[[str], None] | None) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        output.append(text := line.decode())
        del output[:-200]
        if on_line is not None:
            on_line(text)


async def close_stdin_and_wait(proc: asyncio.subprocess.Process, timeout_s: float = 5) -> None:
    """End a stream-json process as a worker's graceful close does: EOF on stdin, then a bounded
    wait, then SIGKILL."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        async with asyncio.timeout(timeout_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
