"""``server.event_loop``: the daemon on uvloop (the ``fast`` extra) serves, drains and exits as on asyncio
(issue 16, goal 2)."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.daemon_fixtures import DaemonProcess, post, start_daemon
from tests.helpers import pid_gone
from tests.test_lifecycle import write_config

__all__ = ["start_daemon"]


def _loads_uvloop(pid: int) -> bool:
    """Whether uvloop's extension module is mapped into the process: only a daemon that runs on it imports it."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_the_daemon_serves_drains_and_exits_on_its_event_loop(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]], event_loop: str
) -> None:
    pytest.importorskip("uvloop")
    config = write_config(tmp_path).read_text().replace(
        "[server]\n", f'[server]\nevent_loop = "{event_loop}"\n')
    (tmp_path / "claudepool.toml").write_text(config)
    daemon = await start_daemon("--config", str(tmp_path / "claudepool.toml"))
    # The asyncio arm is the negative control: the check below tells the two loops apart.
    assert _loads_uvloop(daemon.proc.pid) is (event_loop == "uvloop")
    status, body = await post(daemon.url, {"prompt": "[[reply:on the loop]]"})
    assert (status, body["text"]) == (200, "on the loop")
    pids = await daemon.worker_pids()
    in_flight = await daemon.start_request("[[sleep:0.5]] [[reply:finished anyway]]")
    daemon.proc.send_signal(signal.SIGTERM)
    status, body = await in_flight
    assert (status, body["text"]) == (200, "finished anyway")
    assert await daemon.wait_exit() == 0
    assert all(pid_gone(pid) for pid in pids)


async def test_uvloop_asked_for_but_not_installed_exits_2_with_the_fix(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    stub = tmp_path / "stub"
    (stub / "uvloop").mkdir(parents=True)
    (stub / "uvloop" / "__init__.py").write_text('raise ImportError("no uvloop here")\n')
    config = write_config(tmp_path).read_text().replace("[server]\n", '[server]\nevent_loop = "uvloop"\n')
    (tmp_path / "claudepool.toml").write_text(config)
    daemon = await start_daemon("--config", str(tmp_path / "claudepool.toml"), wait_ready=False,
                                env={"PYTHONPATH": f"{stub}:{REPO}"})
    assert await daemon.wait_exit() == 2
    assert "pip install 'claudepool[fast]'" in "".join(daemon.output)


async def test_an_unknown_event_loop_is_a_config_error(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    config = write_config(tmp_path).read_text().replace("[server]\n", '[server]\nevent_loop = "trio"\n')
    (tmp_path / "claudepool.toml").write_text(config)
    daemon = await start_daemon("--config", str(tmp_path / "claudepool.toml"), wait_ready=False)
    assert await daemon.wait_exit() == 2
    assert "event_loop" in "".join(daemon.output)
