"""What a lease leaves in a sandboxed worker, taken away before the next lease.

A tool can leave files (in the cwd, TMPDIR or HOME) and processes (``sleep 600 &``, ``setsid nohup
…``) behind. In a sandbox every process lives in the worker's own PID namespace, whose orphans are
re-parented to the namespace's init, a descendant of the worker's process: so the worker's process
tree, read from the host, holds every process any lease ever started there, ``setsid`` or not (a
process group would not: ``setsid`` leaves it). `Workspace.snapshot` notes the processes and HOME
entries the worker has once ready (its init, the CLI, the gateway relay; the CLI's own files);
`Workspace.clean`, run by the reset, SIGKILLs every other process of the tree, then empties the cwd
and TMPDIR and removes whatever under HOME was not there at the snapshot, at any depth, and the CLI's
per-project state (transcripts, large tool outputs) whatever it was.
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


# The CLI's per-project state under HOME: transcripts, and the outputs of tools too large to show
# inline (``tool-results/``), all of them a lease's own data: never kept from one lease to the next,
# not even what was there at the snapshot (a resumed conversation's transcript, placed at spawn).
_LEASE_STATE = (".claude", "projects")


def _home_paths(home: Path) -> frozenset[str]:
    """Every path under ``home`` (relative, links not followed), but those of `_LEASE_STATE`."""
    paths: set[str] = set()
    for root, dirs, files in os.walk(home):
        relative = Path(root).relative_to(home)
        if relative.parts[:2] == _LEASE_STATE:
            dirs.clear()
            continue
        paths.update(str(relative / name) for name in (*dirs, *files))
    return frozenset(paths)


def _remove_new(home: Path, kept: frozenset[str]) -> int:
    """Remove what ``home`` holds beyond ``kept`` (a lease's files, at any depth); how many went."""
    removed = 0
    for root, dirs, files in os.walk(home, topdown=True):
        relative = Path(root).relative_to(home)
        for name in files:
            if str(relative / name) not in kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                removed += 1
        for name in list(dirs):
            path, new = os.path.join(root, name), str(relative / name) not in kept
            link = os.path.islink(path)
            if new or link:
                dirs.remove(name)  # not walked into: a new directory goes whole, a link is not followed
            if new and link:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            elif new:
                shutil.rmtree(path, ignore_errors=True)
            removed += new
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
        self._home_paths: frozenset[str] = frozenset()
        self.killed = 0  # processes leases left behind, over the worker's life

    def snapshot(self, pid: int) -> None:
        """What the worker itself is made of, once ready: kept by every `clean`."""
        self._kept = _tree(pid)
        self._home_paths = _home_paths(self._home)

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
        return _empty(self._cwd) + _empty(self._tmp) + _remove_new(self._home, self._home_paths)


async def empty_cwd(cwd: Path, timeout_s: float) -> None:
    """Empty an unsandboxed worker's cwd at its reset (in a thread, bounded; at once when it is empty,
    as it is unless a request put files there)."""
    with os.scandir(cwd) as listing:
        if next(listing, None) is None:
            return
    async with asyncio.timeout(timeout_s):
        await asyncio.to_thread(_empty, cwd)
