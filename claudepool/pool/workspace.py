"""What a lease leaves in a sandboxed worker, taken away before the next lease.

A tool can leave files (in the cwd, TMPDIR or HOME) and processes (``sleep 600 &``, ``setsid nohup
…``) behind. In a sandbox every process lives in the worker's own PID namespace, whose orphans are
re-parented to the namespace's init, a descendant of the worker's process: so the worker's process
tree, read from the host, holds every process any lease ever started there, ``setsid`` or not (a
process group would not: ``setsid`` leaves it). `Workspace.snapshot` notes the processes and HOME
entries the worker has once ready (its init, the CLI, the gateway relay; the CLI's own files);
`Workspace.clean`, run by the reset, SIGKILLs every other process of the tree, then empties the cwd
and TMPDIR and removes the HOME entries that were not there at the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def _tree(pid: int) -> dict[int, float]:
    """The process ``pid`` and its descendants, by pid, with their start times (a pid can be reused)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    tree: dict[int, float] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            tree[proc.pid] = proc.create_time()
    return tree


def _empty(directory: Path, keep: frozenset[str] = frozenset()) -> int:
    """Remove what ``directory`` holds except the entries named in ``keep``; how many went."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed += 1
    return removed


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    psutil.wait_procs(procs, timeout=timeout_s)


class Workspace:
    def __init__(self, home: Path, tmp: Path, cwd: Path) -> None:
        self._home, self._tmp, self._cwd = home, tmp, cwd
        self._kept: dict[int, float] = {}
        self._home_entries: frozenset[str] = frozenset()
        self.killed = 0  # processes leases left behind, over the worker's life

    def snapshot(self, pid: int) -> None:
        """What the worker itself is made of, once ready: kept by every `clean`."""
        self._kept = _tree(pid)
        self._home_entries = frozenset(os.listdir(self._home))

    def strays(self, pid: int) -> list[int]:
        """The processes of the worker's tree that it did not have when it became ready."""
        return [p for p, started in _tree(pid).items() if self._kept.get(p) != started]

    async def clean(self, pid: int, timeout_s: float) -> None:
        """Kill what the last lease started, and remove what it wrote (in a thread, bounded)."""
        strays = self.strays(pid)
        for stray in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)
        self.killed += len(strays)
        async with asyncio.timeout(timeout_s):
            # Killed is not gone: a killed process runs until it exits, and the next lease must not
            # see it (nor it, the next lease's files).
            await asyncio.to_thread(_wait_gone, strays, timeout_s)
            removed = await asyncio.to_thread(self._remove_files)
        if strays or removed:
            log.info("workspace cleaned", extra={"fields": {"processes": len(strays), "entries": removed}})

    def _remove_files(self) -> int:
        return _empty(self._cwd) + _empty(self._tmp) + _empty(self._home, self._home_entries)


async def empty_cwd(cwd: Path, timeout_s: float) -> None:
    """Empty an unsandboxed worker's cwd at its reset (in a thread, bounded; at once when it is empty,
    as it is unless a request put files there)."""
    with os.scandir(cwd) as listing:
        if next(listing, None) is None:
            return
    async with asyncio.timeout(timeout_s):
        await asyncio.to_thread(_empty, cwd)
