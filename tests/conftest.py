"""Shared fixtures: the fake CLI, the fake upstream, the real CLI, and a guard against leaked processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from claudepool.pool.config import PoolConfig
from claudepool.pool.pool import Pool
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import default_reaper
from claudepool.testing.fake_upstream import FakeUpstream
from tests.fakes import fake_claude_executable
from tests.helpers import running
from tests.redis_server import _redis_server, redis_url

# Re-exported so every test module can use a real redis-server without importing it.
__all__ = ["_redis_server", "redis_url"]

REPO = Path(__file__).resolve().parent.parent


FAKE_CLAUDE = fake_claude_executable()


def real_claude_bin() -> str | None:
    """The real CLI: $CLAUDEPOOL_TEST_CLAUDE, else the project-local npm install, else PATH."""
    explicit = os.environ.get("CLAUDEPOOL_TEST_CLAUDE")
    if explicit:
        return explicit
    local = REPO / ".cache" / "claude-cli" / "node_modules" / ".bin" / "claude"
    if local.exists():
        return str(local)
    return shutil.which("claude")


@pytest.fixture
def fake_log(tmp_path: Path) -> Path:
    """File where the fake CLI appends every stdin line it receives."""
    return tmp_path / "fake-stdin.jsonl"


@pytest.fixture
def make_fake_profile(fake_log: Path) -> Callable[..., Profile]:
    def make(faults: str = "", name: str = "fake", **kwargs: Any) -> Profile:
        env = {"FAKE_CLAUDE_LOG": str(fake_log)}
        if faults:
            env["FAKE_CLAUDE_FAULTS"] = faults
        env.update(kwargs.pop("env", {}))
        return Profile(name=name, claude_bin=str(FAKE_CLAUDE), env=env, **kwargs)

    return make


@pytest.fixture
def fake_profile(make_fake_profile: Callable[..., Profile]) -> Profile:
    return make_fake_profile()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with running(FakeUpstream()) as server:
        yield server


@pytest.fixture
def real_claude() -> str:
    """Path of the real CLI. Fails, never skips, when it is missing: CI must run these tests."""
    binary = real_claude_bin()
    if binary is None:
        pytest.fail("the real `claude` CLI is not installed: run .ci/run or set CLAUDEPOOL_TEST_CLAUDE")
    return binary


@pytest.fixture
def real_profile(upstream: FakeUpstream, real_claude: str) -> Callable[..., Profile]:
    """Profiles for the real CLI pointed at the loopback fake upstream."""
    binary = real_claude

    def make(name: str = "real", **kwargs: Any) -> Profile:
        env = {"ANTHROPIC_BASE_URL": upstream.base_url, "ANTHROPIC_API_KEY": "sk-ant-test-key"}
        env.update(kwargs.pop("env", {}))
        kwargs.setdefault("upstream_max_retries", 1)
        kwargs.setdefault("upstream_timeout_ms", 10_000)
        return Profile(name=name, claude_bin=binary, env=env, **kwargs)

    return make


@pytest.fixture
def pool_defaults() -> dict[str, Any]:
    """PoolConfig defaults for `make_pool`; a test module overrides this fixture with its own."""
    return {}


@pytest.fixture
async def make_pool(tmp_path: Path, pool_defaults: dict[str, Any]) -> AsyncIterator[Callable[..., Pool]]:
    """Build pools that are closed after the test. Keywords are PoolConfig fields, except
    ``on_turn_result``, ``memory_probe`` and ``capacity``, which go to the Pool."""
    pools: list[Pool] = []

    def make(profile: Profile, **kw: Any) -> Pool:
        extra = {k: kw.pop(k) for k in ("on_turn_result", "memory_probe", "capacity") if k in kw}
        config = PoolConfig(**{"workdir": tmp_path / "workers", **pool_defaults, **kw})
        pool = Pool(profile, config, **extra)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        async with asyncio.timeout(30):
            await pool.close()


def _descendants() -> list[psutil.Process]:
    helper = default_reaper().helper_pid
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for child in children:
        try:
            if child.pid != helper and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Every test must leave no child process behind: no orphan, no zombie worker."""
    yield
    deadline = time.monotonic() + 5.0
    leaked = _descendants()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _descendants()
    if leaked:
        desc = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in leaked if p.is_running()]
        for p in leaked:
            with contextlib.suppress(psutil.Error):
                p.kill()
        pytest.fail(f"test leaked processes: {desc}")
