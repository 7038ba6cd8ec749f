"""Make worker process groups die with the daemon, even when the daemon dies by SIGKILL.

Two mechanisms, because each covers a gap in the other:

* ``PR_SET_PDEATHSIG``: a worker is started as ``setpriv --pdeathsig KILL -- claude …``
  (`claudepool.pool.process`), so the kernel sends SIGKILL to the `claude` process the moment the
  daemon's thread that spawned it dies. It covers the window before a worker is registered, but only
  reaches the direct child, not tool subprocesses.
* A *reaper* helper process (this file run as a script) holds the read end of a pipe and a
  list of live process groups. When the daemon dies, for any reason, the kernel closes the pipe; the
  helper reads EOF and SIGKILLs every registered group, grandchildren included, then exits.

The known gap: the daemon dying after the fork but before ``setpriv`` has made its ``prctl`` call,
within setpriv's own start-up (~2 ms per spawn, measured here) and before the worker is registered.
The old ``preexec_fn`` closed it by checking the parent pid after its ``prctl``; ``setpriv`` makes no
such check, and ``preexec_fn`` is unsafe in a process with threads. What still covers it: the
child's stdin is a pipe from the daemon, and the `claude` CLI, idle and not yet sent a line, exits at
EOF on stdin, which the daemon's death gives it. A binary that ignores that EOF, started in that
window, would survive: nothing else kills it.

The helper runs in its own session and ignores SIGINT/SIGTERM so a Ctrl-C or a service manager's
SIGTERM to the daemon's group cannot take it down before the daemon has finished its own cleanup.

Process ids are reused (``pid_max`` is often 32768). A group is registered with its leader's start
time, and the helper leaves alone a group whose id now belongs to another process: a worker that
died and was reaped just before the daemon's death, before it could be unregistered, must not take
an innocent process group down with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import IO


class Reaper:
    """Client side: registers process groups with the helper process, spawning it on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: dict[int, int] = {}  # pgid -> its leader's start time (0: unknown)

    @property
    def helper_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def register(self, pgid: int) -> None:
        with self._lock:
            self._groups[pgid] = start_time(pgid)
            self._send(f"+{pgid} {self._groups[pgid]}\n")

    def unregister(self, pgid: int) -> None:
        with self._lock:
            self._groups.pop(pgid, None)
            self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Stop the helper; it kills whatever is still registered, as on the daemon's death."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _send(self, line: str) -> None:
        stdin = self._ensure_helper()
        try:
            stdin.write(line.encode())
            stdin.flush()
        except OSError:
            # The helper died (OOM killer, operator): start a new one and tell it everything.
            self._proc = None
            stdin = self._ensure_helper()
            stdin.write(line.encode())
            stdin.flush()

    def _ensure_helper(self) -> IO[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            return self._proc.stdin
        self._proc = subprocess.Popen(
            # Run as a plain script in isolated mode: no package import, starts in ~20 ms.
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        if self._groups:
            self._proc.stdin.write("".join(f"+{g} {t}\n" for g, t in self._groups.items()).encode())
            self._proc.stdin.flush()
        return self._proc.stdin


_default: Reaper | None = None


def default_reaper() -> Reaper:
    """The process-wide reaper shared by every pool of this daemon."""
    global _default
    if _default is None:
        _default = Reaper()
    return _default


def start_time(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ")".
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _is_ours(pgid: int, started: int) -> bool:
    """False when ``pgid`` now names another process: ours exited and the id was reused. While any
    member of a group lives its id cannot be given to a new process, so a leader that is gone (or
    unknown) still means a group of ours, perhaps with orphans to kill."""
    now = start_time(pgid)
    return not (started and now and now != started)


def _helper_main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: dict[int, int] = {}
    for raw in sys.stdin.buffer:
        fields = raw.split()
        if not fields:
            continue
        op, pgid = fields[0][:1], int(fields[0][1:])
        if op == b"+":
            groups[pgid] = int(fields[1]) if len(fields) > 1 else 0
        elif op == b"-":
            groups.pop(pgid, None)
    # EOF: the daemon is gone (or closed us on purpose). Nothing registered may outlive it.
    for pgid, started in groups.items():
        if _is_ours(pgid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    _helper_main()
