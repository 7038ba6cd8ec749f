"""What holds one sandboxed worker to its bounds, beside its sandbox's namespaces.

* Its **cgroup** (`claudepool.pool.cgroups`): processes and memory, for the CLI and every process a
  tool starts; killed and removed with the worker. Without a cgroup to use, rlimits.
* Its **workspace** (`claudepool.pool.workspace`): emptied, and its stray processes killed, at
  every reset.
* The **workspace bound**: no file grows past ``max_workspace_bytes`` (``RLIMIT_FSIZE``: the write
  fails), and while the worker lives a guard measures its directory every
  ``workspace_check_interval_s``; past the bound the worker fails with `WorkspaceFull`, its lease
  ends with that error, and the pool closes it, which removes what it wrote. So the disk holds at
  most the bound plus what one check interval lets a tool write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from claudepool.errors import WorkerStartError, WorkspaceFull
from claudepool.pool import cgroups
from claudepool.pool.profile import SpawnSettings
from claudepool.pool.workspace import Workspace

log = logging.getLogger(__name__)

# A tree with more entries than this counts as full: measuring it must stay cheap.
MAX_WORKSPACE_ENTRIES = 100_000


def disk_usage_bytes(directory: Path, max_entries: int = MAX_WORKSPACE_ENTRIES) -> int | None:
    """Bytes ``directory`` holds on disk (allocated blocks, links not followed); None past ``max_entries``."""
    total, seen, stack = 0, 0, [str(directory)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    return None
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


class Confinement:
    def __init__(self, worker_id: str, settings: SpawnSettings, directory: Path, check_interval_s: float) -> None:
        self._id, self._dir, self._check_interval_s = worker_id, directory, check_interval_s
        self._max_workspace_bytes = settings.max_workspace_bytes
        self._bounds = cgroups.Bounds(settings.max_processes, settings.max_memory_bytes,
                                      max_file_bytes=settings.max_workspace_bytes)
        self._cgroup: cgroups.WorkerCgroup | None = None
        self._guard: asyncio.Task[None] | None = None
        self.workspace: Workspace | None = None

    def command(self, argv: list[str]) -> list[str]:
        """The sandbox's command line inside the worker's cgroup and rlimits."""
        host = cgroups.host()
        if host is None:
            return self._bounds.prlimit(argv, processes=True)
        try:
            self._cgroup = host.create(self._id, self._bounds)
        except OSError as exc:
            raise WorkerStartError(f"worker {self._id}: its cgroup cannot be made: {exc}") from None
        # No NPROC rlimit here: it counts per user, so it would tie the workers together; the cgroup bounds each.
        return self._cgroup.enter(self._bounds.prlimit(argv, processes=False))

    def ready(self, pid: int, home: Path, tmp: Path, cwd: Path, on_full: Callable[[WorkspaceFull], None]) -> None:
        """The worker answered ``initialize``: note what it is made of, and start guarding its disk."""
        self.workspace = Workspace(home, tmp, cwd)
        self.workspace.snapshot(pid)
        if self._max_workspace_bytes is not None:
            self._guard = asyncio.create_task(self._watch(self._max_workspace_bytes, on_full),
                                              name=f"{self._id}-workspace-guard")

    async def _watch(self, limit_bytes: int, on_full: Callable[[WorkspaceFull], None]) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            try:
                async with asyncio.timeout(max(self._check_interval_s * 5, 5.0)):
                    used = await asyncio.to_thread(disk_usage_bytes, self._dir)
            except TimeoutError:
                used = None  # a tree too big to measure in time is too big
            if used is None or used > limit_bytes:
                shown = f"more than {MAX_WORKSPACE_ENTRIES} entries" if used is None else f"{used} bytes"
                log.warning("worker %s: its workspace holds %s, past its bound of %d bytes",
                            self._id, shown, limit_bytes)
                on_full(WorkspaceFull(f"the lease wrote {shown} to its workspace, past its bound of "
                                      f"{limit_bytes} bytes (max_workspace_bytes); its worker is closed"))
                return

    async def close(self, timeout_s: float) -> None:
        """Once the worker's process is stopped: stop the guard, kill what is left in its cgroup, remove it."""
        if self._guard is not None:
            self._guard.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._guard
        if self._cgroup is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    self._cgroup.kill()
                    if self._cgroup.remove():
                        return
                    await asyncio.sleep(0.05)
        log.warning("worker %s: its cgroup still held processes after %gs", self._id, timeout_s)
