"""The test helpers' own promises, where a test relies on them to prove something."""

from __future__ import annotations

import subprocess

import psutil

from tests.helpers import pid_gone, until


async def test_a_zombie_is_not_gone_until_it_is_reaped() -> None:
    child = subprocess.Popen(["true"])
    try:
        await until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 5)
        assert not pid_gone(child.pid)  # it exited, but nobody waited for it: still a leak
    finally:
        child.wait(timeout=5)
    assert pid_gone(child.pid)
