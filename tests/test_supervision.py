"""One task group supervises the daemon (issue 11): a background loop that crashes stops the daemon
with exit code 1 and leaves nothing behind, instead of dying silently while the rest serves on; and
the signal handlers in place before the daemon ran are back once it returns."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import pytest

from claudepool.daemon.notify import Notifier
from claudepool.daemon.spend import TenantSpend
from claudepool.pool.pool import Pool
from claudepool.sessions.manager import SessionManager
from claudepool.tenancy.metering import Meter
from tests.daemon_fixtures import KEYS, DaemonProcess, RunningDaemon, make_daemon, post, start_daemon
from tests.helpers import pid_gone, until
from tests.test_lifecycle import write_config

__all__ = ["make_daemon", "start_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]

# Each loop the daemon runs, by its task name, and the method that is its body.
LOOPS: dict[str, tuple[type, str]] = {
    "metering": (Meter, "run"),
    "spend-gauges": (TenantSpend, "run"),
    "sessions": (SessionManager, "maintain"),
    "watchdog": (Notifier, "run_watchdog"),
    "pool-default-maintenance": (Pool, "maintain"),
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
async def test_a_crashed_loop_stops_the_daemon_with_exit_1(
    loop: str, make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    crash = asyncio.Event()

    owner, method = LOOPS[loop]

    async def crashing(*args: Any, **kwargs: Any) -> None:
        if owner is Pool and args[0].profile.name != "default":
            await asyncio.Event().wait()  # every pool runs this loop: only the default pool's crashes
        await crash.wait()
        raise RuntimeError(f"injected crash of {loop}")

    monkeypatch.setattr(owner, method, crashing)
    d = await make_daemon()
    pids = [w.pid for w in d.pool().workers()]
    assert pids
    stuck = asyncio.create_task(post(d.url, {"prompt": "[[hang]]"}, KEYS["acme"]))
    await until(lambda: d.daemon.service.in_flight == 1, 10)
    with caplog.at_level(logging.ERROR, logger="claudepool.daemon.app"):
        crash.set()
        async with asyncio.timeout(20):
            code = await d.task
    assert code == 1
    assert d.daemon.crashed == [loop]
    assert f"{loop} crashed: stopping the daemon" in caplog.text
    assert f"RuntimeError: injected crash of {loop}" in caplog.text  # with its traceback
    status, body = await stuck
    # Stopped at once, like a forced stop: the request in flight answers, it does not hang.
    assert (status, body["error"]["code"]) == (503, "draining")
    assert all(pid_gone(pid) for pid in pids)


# A daemon whose spend-gauges loop crashes on SIGUSR1, run as `claudepool serve`.
_CRASH_ON_SIGUSR1 = """
import asyncio, signal, sys
from claudepool.daemon.spend import TenantSpend
from claudepool.pool.pool import Pool

async def crash_on_sigusr1(self, interval_s=15.0):
    crash = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, crash.set)
    await crash.wait()
    raise RuntimeError("injected crash")

TenantSpend.run = crash_on_sigusr1
from claudepool.cli import main
main(["serve", "--config", sys.argv[1]])
"""


async def test_a_daemon_process_whose_loop_crashes_exits_1_and_leaves_no_process(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    config = write_config(tmp_path)
    daemon = await start_daemon(argv=[sys.executable, "-c", _CRASH_ON_SIGUSR1, str(config)])
    workers = await daemon.worker_pids()
    assert len(workers) == 2
    stuck = await daemon.start_request("[[hang]]")
    # Everything the daemon started: workers, their tools, the reaper helper.
    descendants = [p.pid for p in psutil.Process(daemon.proc.pid).children(recursive=True)]
    assert set(workers) <= set(descendants)
    daemon.proc.send_signal(signal.SIGUSR1)
    assert await daemon.wait_exit() == 1
    status, body = await stuck
    assert (status, body["error"]["code"]) == (503, "draining")
    output = "".join(daemon.output)
    assert "spend-gauges crashed: stopping the daemon" in output
    assert "RuntimeError: injected crash" in output
    await until(lambda: all(pid_gone(pid) for pid in descendants), 5)


async def test_the_signal_handlers_from_before_are_restored(make_daemon: MakeDaemon) -> None:
    def before(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("the daemon's handler should have taken this signal")

    saved = {sig: signal.signal(sig, before) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        d = await make_daemon(handle_signals=True)
        assert signal.getsignal(signal.SIGTERM) is not before  # asyncio's, while the daemon runs
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon drains and exits
        async with asyncio.timeout(20):
            assert await d.task == 0
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
