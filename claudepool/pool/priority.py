"""CPU priority of a worker's processes: its background work yields the cores to live turns.

A worker's reset (``/clear``, the settings check, the workspace clean) is work no caller waits for,
yet at normal priority it competes for the cores with the turn a caller is waiting on. So while a
worker is cleaned, every thread of its process tree can run at a high nice value
(``pool.reset_nice``, off by default), and it is put back before the worker can be lent again. (On a
2-core machine this moved the c=1 p50 by less than the noise and cost the daemon 0.3-0.5 ms of CPU
per request, walking and setting the CLI's threads twice per reset: bench/RESULTS.md.)

Putting it back lowers the nice value, which Linux allows only with ``CAP_SYS_NICE`` or an
``RLIMIT_NICE`` that reaches the daemon's own value (systemd: ``LimitNICE=``); without either the
worker could never get its priority back, so the pool then leaves priorities alone (`can_restore`).
Nice values are per thread: every thread of every process under the worker is set, and a thread
started later inherits its creator's value.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from claudepool.pool.memory import descendants

_CAP_SYS_NICE = 23
_PROC = Path("/proc")


def own_nice() -> int:
    """The daemon's nice value: what a worker (its child) started with and goes back to."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def can_restore(baseline: int | None = None) -> bool:
    """Whether a thread set to a higher nice value may be put back to ``baseline`` (default: ours)."""
    target = own_nice() if baseline is None else baseline
    soft, _hard = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - target <= soft:
        return True
    return _has_cap_sys_nice()


def _has_cap_sys_nice() -> bool:
    try:
        for line in (_PROC / "self" / "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now."""
    return [pid, *descendants(pid)]


def threads_of(pids: list[int]) -> list[int]:
    """Every thread id of ``pids`` (a snapshot; processes that ended are skipped)."""
    threads: list[int] = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            threads.extend(int(t) for t in os.listdir(_PROC / str(pid) / "task"))
    return threads


def set_nice(pids: list[int], nice: int) -> int:
    """Set every thread of ``pids`` to ``nice``; return how many were set.

    Threads that ended meanwhile are skipped; a refusal (`PermissionError`) is raised: a worker
    that could not be put back must not be lent at the lower priority unnoticed."""
    count = 0
    for tid in threads_of(pids):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue
        count += 1
    return count


def thread_nices(pids: list[int]) -> dict[int, int]:
    """Each thread of ``pids`` and its nice value."""
    out: dict[int, int] = {}
    for tid in threads_of(pids):
        with contextlib.suppress(OSError):
            out[tid] = os.getpriority(os.PRIO_PROCESS, tid)
    return out
