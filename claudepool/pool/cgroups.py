"""Bounds on what one sandboxed worker runs: its processes and its memory, by cgroup.

A tool can fork without end or allocate without end; the sandbox's namespaces do not stop either.
A cgroup per worker does, for the CLI and every process its tools start, and its ``cgroup.procs``
lists them all. Two layouts are used, found once per daemon by `host`:

* **cgroup v2 with a delegated subtree** (systemd ``Delegate=yes``): the daemon's own cgroup is
  writable and offers the pids and memory controllers. The daemon moves itself into a leaf
  ``daemon/`` (v2 lets only a cgroup without processes give controllers to its children) and makes
  ``workers/<worker>`` for each worker.
* **cgroup v1** with writable pids and memory hierarchies (root in a container):
  ``claudepool-<pid>/<worker>`` under the daemon's own cgroup in each.

Else there is no cgroup to use, and `Bounds.prlimit` is what is left (``RLIMIT_NPROC`` binds only
a daemon that is not root; memory then has only the pool's PSS recycling).

A worker enters its cgroup before anything of it runs: `WorkerCgroup.enter` prefixes the command
with a shell that writes its own pid into each ``cgroup.procs`` and then execs bubblewrap, so no
process of the sandbox is ever born outside.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("pids", "memory")


@dataclass(frozen=True)
class Bounds:
    """A worker's bounds, None for none: processes (threads count, as the kernel counts tasks) and memory."""

    max_processes: int | None
    max_memory_bytes: int | None
    max_file_bytes: int | None = None  # RLIMIT_FSIZE: no file a tool writes grows past this

    def prlimit(self, argv: Sequence[str], *, processes: bool) -> list[str]:
        """``argv`` under util-linux's ``prlimit`` with the rlimits these bounds ask for (soft and
        hard: no capability is left in the sandbox to raise them); ``processes``: include NPROC."""
        limits = []
        if processes and self.max_processes is not None:
            limits.append(f"--nproc={self.max_processes}:{self.max_processes}")
        if self.max_file_bytes is not None:
            limits.append(f"--fsize={self.max_file_bytes}:{self.max_file_bytes}")
        prlimit = shutil.which("prlimit")
        if not limits or prlimit is None:
            return list(argv)
        return [prlimit, *limits, "--", *argv]


class WorkerCgroup:
    """One worker's cgroup: a directory per hierarchy (one in v2, one per controller in v1)."""

    def __init__(self, dirs: Sequence[Path], v2: bool) -> None:
        self.dirs, self._v2 = list(dirs), v2

    def enter(self, argv: Sequence[str]) -> list[str]:
        script = 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *(str(d / "cgroup.procs") for d in self.dirs), "--", *argv]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (self.dirs[0] / "cgroup.procs").read_text().split()]
        return []

    def kill(self) -> None:
        """SIGKILL every process left in the cgroup (``cgroup.kill`` where the kernel has it)."""
        if self._v2 and (self.dirs[0] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (self.dirs[0] / "cgroup.kill").write_text("1")
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup's directories; False while a process still holds one (the kernel's
        ``rmdir`` refuses), for the caller to try again."""
        removed = True
        for directory in self.dirs:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


class Cgroups:
    """Where this daemon makes its workers' cgroups."""

    def __init__(self, parents: Sequence[Path], v2: bool) -> None:
        self.parents, self.v2 = list(parents), v2

    @property
    def kind(self) -> str:
        return "cgroup v2" if self.v2 else "cgroup v1"

    def create(self, name: str, bounds: Bounds) -> WorkerCgroup:
        """A new cgroup ``name`` with ``bounds`` written into it (OSError if the kernel refuses)."""
        dirs = [parent / name for parent in self.parents]
        group = WorkerCgroup(dirs, self.v2)
        try:
            for directory in dirs:
                directory.mkdir()
                if bounds.max_processes is not None and (directory / "pids.max").exists():
                    (directory / "pids.max").write_text(str(bounds.max_processes))
                memory = directory / ("memory.max" if self.v2 else "memory.limit_in_bytes")
                if bounds.max_memory_bytes is not None and memory.exists():
                    memory.write_text(str(bounds.max_memory_bytes))
                    if self.v2 and (directory / "memory.swap.max").exists():
                        (directory / "memory.swap.max").write_text("0")  # the bound is RAM, not RAM plus swap
        except OSError:
            group.remove()
            raise
        return group

    def close(self) -> None:
        for parent in self.parents:
            with contextlib.suppress(OSError):
                parent.rmdir()


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``""`` for v2's, the controller's name for v1's."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _mounts() -> dict[str, tuple[Path, str]]:
    """Mount point and mount root per hierarchy (keys as in `_own_cgroups`)."""
    mounts: dict[str, tuple[Path, str]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            root, point = fields[3], Path(fields[4])
            if fstype == "cgroup2":
                mounts[""] = (point, root)
            elif fstype == "cgroup":
                for controller in CONTROLLERS:
                    if controller in options:
                        mounts[controller] = (point, root)
    return mounts


def _directory(mount: tuple[Path, str], path: str) -> Path:
    point, root = mount
    relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return point if relative in (".", "") else point / relative.lstrip("/")


def _delegated_v2(own: Path, is_root: bool) -> Cgroups | None:
    offered = (own / "cgroup.controllers").read_text().split()
    if not set(CONTROLLERS) <= set(offered) or not os.access(own, os.W_OK):
        return None
    enable = " ".join(f"+{c}" for c in CONTROLLERS)
    if is_root:  # the root cgroup may hold processes and give controllers at once
        workers = _own_parent(own)
    else:  # a delegated subtree (a service's cgroup): every process of it moves into a leaf first
        workers, leaf = own / "workers", own / "daemon"
        leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
    (own / "cgroup.subtree_control").write_text(enable)
    workers.mkdir(exist_ok=True)
    (workers / "cgroup.subtree_control").write_text(enable)
    return Cgroups([workers], v2=True)


def _own_parent(directory: Path) -> Path:
    """``directory/claudepool-<pid>``, for this daemon; on the way, the empty ones of daemons that
    are gone (one killed has no chance to remove its own) are removed."""
    for stale in directory.glob("claudepool-*"):
        pid = stale.name.removeprefix("claudepool-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for group in [*stale.iterdir(), stale]:
                with contextlib.suppress(OSError):
                    group.rmdir()  # only an empty cgroup goes: the kernel refuses any other
    return directory / f"claudepool-{os.getpid()}"


def _writable_v1(own: dict[str, str], mounts: dict[str, tuple[Path, str]]) -> Cgroups | None:
    if not all(c in own and c in mounts for c in CONTROLLERS):
        return None
    parents = [_own_parent(_directory(mounts[c], own[c])) for c in CONTROLLERS]
    made = []
    try:
        for parent in parents:
            parent.mkdir(exist_ok=True)
            made.append(parent)
    except OSError:
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()
        return None
    return Cgroups(parents, v2=False)


@functools.cache
def host() -> Cgroups | None:
    """This daemon's place for worker cgroups, found (and set up) once; None when it has none."""
    own, mounts = _own_cgroups(), _mounts()
    found: Cgroups | None = None
    try:
        if "" in own and "" in mounts:
            found = _delegated_v2(_directory(mounts[""], own[""]), is_root=own[""] == mounts[""][1])
        if found is None:
            found = _writable_v1(own, mounts)
    except OSError as exc:
        log.warning("worker cgroups cannot be set up here (%s): bounds fall back to rlimits", exc)
        return None
    if found is not None:
        atexit.register(found.close)
    else:
        log.info("no writable cgroup with pids and memory controllers (cgroup v2 needs a delegated "
                 "subtree, e.g. systemd Delegate=yes): sandboxed workers are bounded by rlimits only")
    return found
