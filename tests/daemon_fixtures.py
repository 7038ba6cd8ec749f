"""An in-process daemon on the fake CLI, for front-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier
from tests.conftest import FAKE_CLAUDE
from tests.helpers import until

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

    async def make(**overrides: Any) -> RunningDaemon:
        config: dict[str, Any] = {
            "server": {"socket": str(tmp_path / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN_KEY,
                       "drain_timeout_s": 5},
            "pool": {"claude_bin": str(FAKE_CLAUDE), "min_idle": 1, "max_workers": 2, "workdir": str(tmp_path / "w"),
                     "env": {"FAKE_CLAUDE_LOG": str(fake_log)}, "maintenance_interval_s": 0.2,
                     "timeouts": {"close_eof_timeout_s": 1, "close_term_timeout_s": 1}},
            "profiles": {"default": {}, "lean": {"system_prompt": "brief"}, "other": {}},
            "tenants": {"acme": {"key": KEYS["acme"], "profiles": ["default", "lean"]},
                        "beta": {"key": KEYS["beta"]}},
        }
        settings = load_settings(None, **_deep_merge(config, overrides))
        daemon = Daemon(settings, notifier=Notifier({}))
        task = asyncio.create_task(daemon.run(handle_signals=False))
        async with asyncio.timeout(15):
            while not daemon.readiness()[0]:
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
