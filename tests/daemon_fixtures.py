"""An in-process daemon on the fake CLI, for front-end tests."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier
from tests.conftest import FAKE_CLAUDE, REPO
from tests.helpers import until

ADMIN = "lifecycle-admin"
KEY = "lifecycle-key"
ADMIN_KEY = "admin-key-0123"
KEYS = {"acme": "acme-key-0123", "beta": "beta-key-0123"}


@dataclass
class RunningDaemon:
    daemon: Daemon
    task: asyncio.Task[int]
    url: str
    socket: str

    def pool(self, name: str = "default") -> Any:
        return self.daemon.pools[name]

    def sample(self, name: str, **labels: str) -> float | None:
        """One sample of the daemon's registry, as a scrape would show it (None: no such series)."""
        return self.daemon.registry.get_sample_value(name, labels)

    def requests_by_outcome(self) -> Counter[str]:
        """``claudepool_requests_total`` summed over tenants, by outcome, without the series at zero."""
        counts: Counter[str] = Counter()
        for family in self.daemon.registry.collect():
            for sample in family.samples:
                if sample.name == "claudepool_requests_total" and sample.value:
                    counts[sample.labels["outcome"]] += int(sample.value)
        return counts

    async def metrics_text(self) -> str:
        """GET /metrics as a scraper does: with a key that may read it (the admin key here)."""
        async with aiohttp.ClientSession() as session, session.get(
            f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.text()

    async def idle(self, count: int = 1, profile: str = "default") -> None:
        """Wait until the pool has settled with ``count`` idle workers (resets done)."""
        pool = self.daemon.pools[profile]
        await until(lambda: pool.counts()["idle"] >= count and pool.counts()["cleaning"] == 0, 10)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


@pytest.fixture
async def make_daemon(tmp_path: Path, fake_log: Path) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    running: list[RunningDaemon] = []

    async def make(*, handle_signals: bool = False, **overrides: Any) -> RunningDaemon:
        """A daemon on ``overrides`` of the test config; ``handle_signals`` installs its SIGTERM and SIGINT handlers."""
        config: dict[str, Any] = {
            "server": {"socket": str(tmp_path / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN_KEY,
                       "drain_timeout_s": 5},
            "pool": {"claude_bin": str(FAKE_CLAUDE), "min_idle": 1, "max_workers": 2, "workdir": str(tmp_path / "w"),
                     "env": {"FAKE_CLAUDE_LOG": str(fake_log)}, "maintenance_interval_s": 0.2,
                     "timeouts": {"close_eof_timeout_s": 1, "close_term_timeout_s": 1}},
            # Only the default profile is kept warm: the others start a worker when a test uses them.
            "profiles": {"default": {}, "lean": {"system_prompt": "brief", "min_idle": 0}, "other": {"min_idle": 0}},
            # Session-capable workers only when a test asks: they would double every test's workers.
            "sessions": {"min_idle": 0, "dir": str(tmp_path / "sessions")},
            "tenants": {"acme": {"key": KEYS["acme"], "profiles": ["default", "lean"]},
                        "beta": {"key": KEYS["beta"]}},
        }
        settings = load_settings(None, **_deep_merge(config, overrides))
        daemon = Daemon(settings, notifier=Notifier({}))
        task = asyncio.create_task(daemon.run(handle_signals=handle_signals))
        async with asyncio.timeout(15):
            while not daemon.status.readiness()[0]:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        handle = RunningDaemon(daemon, task, daemon.listening["http"], settings.server.socket)
        running.append(handle)
        return handle

    yield make
    for handle in running:
        handle.daemon.request_stop()
        async with asyncio.timeout(30):
            await handle.task


# -- the daemon as a separate process ------------------------------------------------------------

@dataclass
class DaemonProcess:
    proc: asyncio.subprocess.Process
    url: str = ""
    socket: str = ""
    metrics_url: str = ""  # server.metrics_http, when set
    output: list[str] = field(default_factory=list)

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(
            f"{self.url}/v1/pool", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def wait_draining(self, timeout_s: float = 10) -> None:
        """Return once the daemon says it drains (after a stop signal); it still answers meanwhile."""
        async with asyncio.timeout(timeout_s):
            while not (await self.status())["draining"]:
                await asyncio.sleep(0.02)

    async def worker_pids(self) -> list[int]:
        return [w["pid"] for p in (await self.status())["pools"].values() for w in p["workers"] if w["pid"]]

    async def wait_exit(self, timeout_s: float = 20) -> int:
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            tail = "".join(self.output[-40:])
            raise AssertionError(f"the daemon did not exit within {timeout_s:g}s; its last output:\n{tail}") from None

    async def start_request(self, prompt: str, timeout_s: float = 10) -> asyncio.Task[tuple[int, dict[str, Any]]]:
        """Post ``prompt`` in the background; return once the daemon counts it in flight."""
        answer = asyncio.create_task(post(self.url, {"prompt": prompt}))
        async with asyncio.timeout(timeout_s):
            while (await self.status())["in_flight"] != 1:
                await asyncio.sleep(0.02)
        return answer


async def post(url: str, body: dict[str, Any], key: str = KEY) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/prompt", data=orjson.dumps(body), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Awaitable[DaemonProcess]]]:
    started: list[DaemonProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
                    argv: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> DaemonProcess:
        proc = await asyncio.create_subprocess_exec(
            *(argv or [sys.executable, "-m", "claudepool", "serve", *args]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, pass_fds=pass_fds,
        )
        daemon = DaemonProcess(proc)
        started.append(daemon)
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    return daemon  # exited early: the test looks at the output
                daemon.output.append(line)
                if "claudepool: listening on" in line:
                    break
        listening = line.split("listening on ", 1)[1].strip()
        for part in listening.split(" and "):
            kind, _, where = part.partition(" ")
            if kind == "http":
                daemon.url = where if where.startswith("http") else f"http://{where}"
            elif kind == "unix":
                daemon.socket = where
            elif kind == "metrics":
                daemon.metrics_url = where
        asyncio.get_running_loop().create_task(_collect(proc, daemon.output))
        if wait_ready:
            assert daemon.url, "the daemon must listen on HTTP for wait_ready"
            async with asyncio.timeout(20), aiohttp.ClientSession() as session:
                while True:
                    async with session.get(f"{daemon.url}/readyz") as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()


async def _collect(proc: asyncio.subprocess.Process, output: list[str]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        output.append(line.decode())


