"""A sandboxed worker's bounds on the real CLI (issue 13): a tenant's Bash tool forks, allocates and
writes without end, and is held to the profile's ``max_processes``, ``max_memory_bytes`` and
``max_workspace_bytes``. Each scenario runs twice: bounded, and on the same sandboxed profile with
that bound unset (the negative control), where the same command gets what it asks for.

The process and memory bounds are the worker's cgroup (`claudepool.pool.cgroups`): this test needs
a host where the daemon can make one (cgroup v2 delegated, or writable v1 as root in a container),
and says so when it cannot, instead of passing without having tested anything."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from claudepool.client import AsyncClient
from claudepool.errors import RemoteError
from claudepool.pool import cgroups
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import until

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
BASH = {"tools": ["Bash"], "allowed_tools": ["Bash"], "upstream_max_retries": 0, "min_idle": 1, "max_workers": 1}
MiB = 2**20


async def daemon(make_daemon: MakeDaemon, claude: str, upstream: FakeUpstream, bound: dict[str, Any],
                 unbound: dict[str, Any], **pool: Any) -> RunningDaemon:
    """Profile ``default`` with ``bound``, ``open`` the same sandboxed profile with ``unbound``."""
    return await make_daemon(
        pool={"claude_bin": claude, "min_idle": 1, "max_workers": 2, "timeouts": {"ready_timeout_s": 30}, **pool},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {**BASH, **bound}, "open": {**BASH, **unbound}, "lean": {"min_idle": 0},
                  "other": {"min_idle": 0}},
        tenants={"acme": {"profiles": ["default", "open"]}, "beta": {"profiles": ["default", "open"]}})


async def run_tool(d: RunningDaemon, command: str, profile: str, tenant: str = "acme") -> str:
    async with AsyncClient(key=KEYS[tenant], url=d.url) as client:
        answer = await client.prompt(f"[[tool:Bash:{command}]]", profile=profile, timeout_s=90)
    return answer.text


async def outcome(d: RunningDaemon, command: str, profile: str) -> str:
    """The tool's answer, or ``error:CODE`` when the request failed."""
    try:
        return await run_tool(d, command, profile)
    except RemoteError as exc:
        return f"error:{exc.remote_code}"


@pytest.fixture
def cgroup_host() -> cgroups.Cgroups:
    host = cgroups.host()
    assert host is not None, "no cgroup to bound workers with here: see claudepool.pool.cgroups"
    return host


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_fork_bomb_is_held_to_max_processes(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, cgroup_host: cgroups.Cgroups, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, {"max_processes": 96}, {"max_processes": None})
    await d.idle(1, profile=profile)
    seconds = sleep_of_its_own()
    bomb = (f"for i in $(seq 200); do sleep {seconds} >/dev/null 2>&1 & done 2>/dev/null; "
            "echo procs=$(ps -e --no-headers | wc -l)")
    answer = await outcome(d, bomb, profile)
    if answer != "error:worker_died" or profile == "open":
        # (Threads count, so a bomb at the bound may leave the CLI none to start: it aborts, and says so.)
        assert "procs=" in answer, answer
        procs = int(answer.rsplit("procs=", 1)[1].split()[0])
        assert procs < 96 if profile == "default" else procs > 200, answer
    await d.idle(1, profile=profile)  # reset (by the worker's process tree) or closed (with its cgroup)
    assert not sleepers(seconds)


def sleep_of_its_own() -> str:
    """A ``sleep`` argument no other test uses (tests run side by side): its processes are this test's."""
    return f"600.{secrets.randbelow(10**6)}"


def sleepers(seconds: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]]


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_tool_is_held_to_max_memory_bytes(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, cgroup_host: cgroups.Cgroups, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, {"max_memory_bytes": 768 * MiB},
                     {"max_memory_bytes": None})
    await d.idle(1, profile=profile)
    # 1 GiB written, so every page is touched. The kernel may pick the CLI itself: the worker dies, and says so.
    answer = await outcome(d, "python3 -c \"b = b'x' * (1024 * 2**20); print('ALLOCATED', len(b))\" 2>&1; "
                              "echo exit=$?", profile)
    if profile == "default":
        assert answer == "error:worker_died" or "exit=137" in answer, answer  # SIGKILL by the cgroup's OOM killer
        assert "ALLOCATED 1073741824" not in answer
    else:
        assert "ALLOCATED 1073741824" in answer, answer


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_no_file_grows_past_max_workspace_bytes(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, profile: str
) -> None:
    # The guard measures rarely here: what holds the file is the rlimit, at once, however fast it is written.
    d = await daemon(make_daemon, real_claude, upstream, {"max_workspace_bytes": 32 * MiB},
                     {"max_workspace_bytes": None}, timeouts={"ready_timeout_s": 30, "workspace_check_interval_s": 60})
    await d.idle(1, profile=profile)
    answer = await run_tool(d, "dd if=/dev/zero of=big bs=1M count=64 2>/dev/null; echo size=$(stat -c %s big)",
                            profile)
    size = int(answer.rsplit("size=", 1)[1].split()[0])
    if profile == "default":
        assert size == 32 * MiB, answer  # dd got SIGXFSZ at the bound
    else:
        assert size == 64 * MiB, answer


@pytest.mark.parametrize("profile", ["default", "open"])
async def test_a_lease_that_fills_its_workspace_ends_and_leaves_nothing(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, tmp_path: Path, profile: str
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, {"max_workspace_bytes": 32 * MiB},
                     {"max_workspace_bytes": None}, timeouts={"ready_timeout_s": 30, "workspace_check_interval_s": 0.2})
    await d.idle(1, profile=profile)
    worker_dir = d.pool(profile).workers()[0]._process.dir
    fill = "for i in $(seq 12); do head -c 8M /dev/zero > f$i; sleep 0.2; done; echo wrote-all"
    if profile == "open":
        assert "wrote-all" in await run_tool(d, fill, profile)
        return
    with pytest.raises(RemoteError) as caught:
        await run_tool(d, fill, profile)
    assert caught.value.remote_code == "workspace_full", caught.value
    assert d.requests_by_outcome() == {"error": 1}
    await d.idle(1, profile=profile)  # a fresh worker took its place
    await until(lambda: not worker_dir.exists(), 10)  # and the full one's directory goes with it


@pytest.mark.parametrize("watchdog_s", [2.0, 120.0])
async def test_a_tool_call_is_bounded_in_time_by_the_turn_watchdog(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, watchdog_s: float
) -> None:
    d = await daemon(make_daemon, real_claude, upstream, {}, {},
                     timeouts={"ready_timeout_s": 30, "turn_idle_timeout_s": watchdog_s, "interrupt_timeout_s": 2})
    await d.idle(1)
    seconds = sleep_of_its_own()
    request = asyncio.create_task(outcome(d, f"sleep {seconds}; echo slept", "default"))
    done, _ = await asyncio.wait([request], timeout=20)
    if watchdog_s < 20:
        assert done and request.result() == "error:turn_stalled", request.result()
    else:  # the control: without a short watchdog the same call is still running
        assert not done
        request.cancel()
    await d.idle(1)
    assert not sleepers(seconds)
