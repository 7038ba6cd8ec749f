"""Measure worker memory and size the pool by RAM.

A `claude` process maps a ~75 MB binary that every worker shares, so RSS counts that memory once per
worker and overstates the cost of one more worker by half. PSS (proportional set size, from
``/proc/PID/smaps_rollup``) splits shared pages between their users and sums to the real total, so
the pool sizes and limits itself by PSS of each worker's whole process group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

MiB = 1024 * 1024


@dataclass(frozen=True)
class ProcessMemory:
    pss_bytes: int
    rss_bytes: int

    def __add__(self, other: ProcessMemory) -> ProcessMemory:
        return ProcessMemory(self.pss_bytes + other.pss_bytes, self.rss_bytes + other.rss_bytes)


def process_memory(pid: int) -> ProcessMemory | None:
    """PSS and RSS of one process from one read of ``smaps_rollup``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            fields = {}
            for line in f:
                if line.startswith((b"Pss:", b"Rss:")):
                    fields[line[:3]] = int(line.split()[1]) * 1024
            return ProcessMemory(fields.get(b"Pss", 0), fields.get(b"Rss", 0))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        pass
    # No smaps_rollup (old kernel, other OS): RSS stands in for PSS, an overestimate.
    try:
        rss = int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
    return ProcessMemory(rss, rss)


def pss_bytes(pid: int) -> int | None:
    """PSS of one process, or None if it is gone or unreadable."""
    memory = process_memory(pid)
    return memory.pss_bytes if memory is not None else None


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` from ``/proc/PID/task/*/children`` (each thread's own), [] if it is
    gone, None when the kernel has no such file (built without CONFIG_PROC_CHILDREN)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None  # the thread is there, its children file is not: unsupported
        except OSError:
            continue  # the thread ended meanwhile
    return children


def _descendants(pid: int) -> list[int] | None:
    """Every descendant of ``pid``, reading only its tree's ``children`` files (not the host's
    process table: a scan of it costs per process on the host, every maintenance round, for workers
    that mostly have no child at all). None when the kernel cannot tell."""
    found: list[int] = []
    stack = [pid]
    while stack:
        children = _children(stack.pop())
        if children is None:
            return None
        found.extend(children)
        stack.extend(children)
    return found


def _scan_descendants(pids: list[int]) -> dict[int, list[int]]:
    """The fallback: descendants of ``pids`` from one scan of the whole process table."""
    children = children_by_parent()
    out: dict[int, list[int]] = {}
    for pid in pids:
        found, stack = [], list(children.get(pid, ()))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(children.get(child, ()))
        out[pid] = found
    return out


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` now: through its tree's ``children`` files, or one scan of the
    process table where the kernel has none."""
    found = _descendants(pid)
    return found if found is not None else _scan_descendants([pid])[pid]


def measure_trees(pids: list[int]) -> list[ProcessMemory | None]:
    """`tree_memory` of many processes (tool subprocesses count against their worker), each tree
    read through its own ``children`` files; the whole process table is scanned, once, only where the
    kernel cannot list children. Safe to run in a thread."""
    trees = {pid: _descendants(pid) for pid in pids}
    unknown = [pid for pid, found in trees.items() if found is None]
    if unknown:
        trees.update(_scan_descendants(unknown))
    readings: list[ProcessMemory | None] = []
    for pid in pids:
        total = process_memory(pid)
        if total is not None:
            for child in trees[pid] or ():
                total += process_memory(child) or ProcessMemory(0, 0)
        readings.append(total)
    return readings


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from one scan of the process table.

    On Linux, each ``/proc/PID/stat`` is read directly: a third of the CPU of psutil's
    ``process_iter`` (which builds a `psutil.Process` per entry), and the scan is over every process
    on the host, every maintenance interval. Elsewhere, psutil."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    children: dict[int, list[int]] = {}
    if not any(name == "self" for name in names):
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
        return children
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # "PID (COMM) STATE PPID …": COMM may hold spaces and parentheses, so split after the last ")".
            ppid = int(stat[stat.rindex(b")") + 2:].split(b" ", 2)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile (or unreadable): it has no memory to count
        children.setdefault(ppid, []).append(int(name))
    return children


def tree_memory(pid: int) -> ProcessMemory | None:
    """Memory of a process and all its descendants (tool subprocesses count against the worker)."""
    return measure_trees([pid])[0]


def _cgroup_memory_headroom_bytes() -> int | None:
    """Bytes left under the tightest cgroup v2 ``memory.max`` of this process's cgroup and its
    ancestors (with worker cgroups the daemon sits in a ``daemon/`` leaf of the service's cgroup,
    whose limit covers the workers too), if any has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        if line.startswith("0::"):
            base, headroom = root / line[3:].lstrip("/"), None
            for group in [base, *base.parents]:
                if group == root.parent:
                    break
                try:
                    limit = (group / "memory.max").read_text().strip()
                    current = int((group / "memory.current").read_text().strip())
                except (OSError, ValueError):
                    continue
                if limit != "max":
                    left = max(0, int(limit) - current)
                    headroom = left if headroom is None else min(headroom, left)
            return headroom
    return None


def available_memory_bytes() -> int:
    """Memory this daemon may still take: host available memory, capped by a cgroup limit."""
    available = int(psutil.virtual_memory().available)
    headroom = _cgroup_memory_headroom_bytes()
    return available if headroom is None else min(available, headroom)


@dataclass(frozen=True)
class MemoryPlan:
    """The outcome of sizing: how many workers fit and when to stop spawning or start shedding."""

    max_workers: int
    soft_limit_bytes: int
    hard_limit_bytes: int
    per_worker_bytes: int


def plan_memory(
    *,
    available_bytes: int,
    pool_pss_bytes: int,
    memory_fraction: float,
    per_worker_bytes: int,
    configured_max_workers: int = 0,
    soft_limit_bytes: int = 0,
    hard_limit_bytes: int = 0,
) -> MemoryPlan:
    """Size the pool. What the pool already holds counts as available to it, so the answer is
    stable as the pool grows into its own budget.

    >>> plan_memory(available_bytes=4000 * MiB, pool_pss_bytes=0, memory_fraction=0.5,
    ...             per_worker_bytes=200 * MiB).max_workers
    10
    """
    budget = int((available_bytes + pool_pss_bytes) * memory_fraction)
    soft = soft_limit_bytes or budget
    hard = hard_limit_bytes or math.ceil(soft * 1.25)
    max_workers = configured_max_workers if configured_max_workers > 0 else max(1, soft // max(per_worker_bytes, 1))
    return MemoryPlan(max_workers=max_workers, soft_limit_bytes=soft, hard_limit_bytes=hard,
                      per_worker_bytes=per_worker_bytes)
