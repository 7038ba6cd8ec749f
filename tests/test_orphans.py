"""No orphans: kill -9 the process hosting a pool; every worker and tool subprocess must die."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest

from claudepool.pool import reaper
from claudepool.testing.fake_upstream import FakeUpstream
from tests.conftest import FAKE_CLAUDE, REPO


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _host(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, list[int] | int | None]]:
    host = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fakes" / "pool_host.py"), "--workdir", str(tmp_path / "w"), *extra],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert host.stdout is not None
    line = host.stdout.readline()
    if not line:
        host.kill()
        host.wait()
        raise AssertionError("pool host died before reporting its pids")
    return host, orjson.loads(line)


def _kill_host_and_wait(host: subprocess.Popen[bytes], pids: list[int], deadline_s: float) -> list[int]:
    host.send_signal(signal.SIGKILL)
    host.wait()
    assert host.stdout is not None
    host.stdout.close()
    deadline = time.monotonic() + deadline_s
    survivors = [p for p in pids if _alive(p)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.05)
        survivors = [p for p in survivors if _alive(p)]
    return survivors


def _all_pids(report: dict[str, list[int] | int | None]) -> list[int]:
    workers = report["workers"]
    grandchildren = report["grandchildren"]
    assert isinstance(workers, list)
    assert isinstance(grandchildren, list)
    return [*workers, *grandchildren]


def test_sigkilled_host_leaves_no_worker_or_grandchild(tmp_path: Path) -> None:
    host, report = _host(tmp_path, "--claude", str(FAKE_CLAUDE), "--child")
    pids = _all_pids(report)
    assert len(report["workers"]) == 3  # type: ignore[arg-type]
    assert len(report["grandchildren"]) == 1  # type: ignore[arg-type]
    assert all(_alive(p) for p in pids)
    helper = report["helper"]
    assert isinstance(helper, int)
    assert _alive(helper)
    # The reaper helper itself exits once its work is done.
    survivors = _kill_host_and_wait(host, [*pids, helper], deadline_s=5.0)
    assert survivors == []


def test_without_protection_the_same_check_finds_orphans(tmp_path: Path) -> None:
    """The control for the test above: with PDEATHSIG and the reaper off, processes survive."""
    host, report = _host(tmp_path, "--claude", str(FAKE_CLAUDE), "--child", "--unprotected")
    pids = _all_pids(report)
    try:
        started = {pid: reaper.start_time(pid) for pid in pids}
        survivors = _kill_host_and_wait(host, pids, deadline_s=1.0)
        # Idle workers exit on stdin EOF by themselves; a worker mid-turn and a tool subprocess
        # do not, and those are what the protections exist for.
        seen = {pid: (pid in survivors, started[pid], reaper.start_time(pid)) for pid in pids}
        assert report["busy"] in survivors, (report, seen)
        assert set(report["grandchildren"]) <= set(survivors), (report, seen)  # type: ignore[arg-type]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_pdeathsig_alone_misses_tool_subprocesses(tmp_path: Path) -> None:
    """Why the reaper helper exists: PDEATHSIG reaches the CLI but not the tools it started. It also
    shows that PDEATHSIG (set by the setpriv exec wrapper) kills a worker mid-turn without the
    reaper: `test_without_protection_the_same_check_finds_orphans` is its control."""
    host, report = _host(tmp_path, "--claude", str(FAKE_CLAUDE), "--child", "--no-reaper")
    pids = _all_pids(report)
    try:
        survivors = _kill_host_and_wait(host, pids, deadline_s=1.0)
        assert report["busy"] not in survivors
        assert set(survivors) == set(report["grandchildren"])  # type: ignore[arg-type]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_reaper_spares_a_group_whose_id_now_names_another_process() -> None:
    """Process ids are reused: a worker reaped just before the daemon died, not yet unregistered,
    must not cost an innocent process group its life (issue 10: a flaky orphan test)."""
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)
    reused = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        helper = subprocess.Popen([sys.executable, "-I", "-S", reaper.__file__], stdin=subprocess.PIPE)
        assert helper.stdin is not None
        # As the helper would see it had `reused` taken the id of a group registered earlier.
        registered_start = reaper.start_time(reused.pid) - 1
        helper.stdin.write(f"+{ours.pid} {reaper.start_time(ours.pid)}\n+{reused.pid} {registered_start}\n".encode())
        helper.stdin.close()  # EOF: the daemon is gone
        assert helper.wait(timeout=5) == 0
        assert ours.wait(timeout=5) == -signal.SIGKILL
        assert reused.poll() is None
    finally:
        for proc in (ours, reused):
            proc.kill()
            proc.wait()


@pytest.mark.real_cli
async def test_sigkilled_host_leaves_no_real_cli_worker(
    tmp_path: Path, upstream: FakeUpstream, real_claude: str
) -> None:
    env = ["--env", f"ANTHROPIC_BASE_URL={upstream.base_url}", "--env", "ANTHROPIC_API_KEY=sk-ant-test"]
    host, report = await asyncio.to_thread(
        _host, tmp_path, "--claude", real_claude, "--stall-prompt", "[[stall]]", *env
    )
    pids = _all_pids(report)
    assert len(pids) == 3
    survivors = await asyncio.to_thread(_kill_host_and_wait, host, pids, 5.0)
    assert survivors == []


@pytest.mark.real_cli
async def test_pdeathsig_alone_kills_a_real_cli_worker_mid_turn(
    tmp_path: Path, upstream: FakeUpstream, real_claude: str
) -> None:
    """The setpriv wrapper works in front of the real CLI too: with no reaper, a worker in the middle
    of a stalled turn (which stdin EOF would not end) dies with its SIGKILLed host."""
    env = ["--env", f"ANTHROPIC_BASE_URL={upstream.base_url}", "--env", "ANTHROPIC_API_KEY=sk-ant-test"]
    host, report = await asyncio.to_thread(
        _host, tmp_path, "--claude", real_claude, "--stall-prompt", "[[stall]]", "--no-reaper", *env
    )
    pids = _all_pids(report)
    try:
        survivors = await asyncio.to_thread(_kill_host_and_wait, host, pids, 5.0)
        assert report["busy"] in pids
        assert survivors == []
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
