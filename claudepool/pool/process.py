"""The OS side of one worker: its private directories, its process group and its three pipes.

`WorkerProcess` is the transport under `claudepool.pool.exchange` (as the Agent SDK's
``SubprocessCLITransport`` is under its ``Query``): it writes lines to stdin, frames stdout into lines
(bounded by ``max_line_bytes``), keeps a tail of stderr and forwards its lines to the log, and stops
the process by escalation: EOF on stdin → SIGTERM → SIGKILL of the group, each step bounded, then
SIGKILL of the group again for tool subprocesses that outlived the CLI. It knows nothing of
stream-json.

The process is started through ``loop.subprocess_exec`` with a protocol of our own, rather than
``asyncio.create_subprocess_exec``: that keeps the `asyncio.SubprocessTransport` in hand, so the
pipes can be closed through public API when a grandchild outside the group still holds them, and
the leader's exit is seen at once (``Process.wait()`` waits for the pipes too).

It dies with the daemon: in its own session (its group is the unit the reaper kills), and started as
``setpriv --pdeathsig KILL -- claude …`` so the kernel SIGKILLs it when the daemon dies (see
`claudepool.pool.reaper` for what that covers and what it does not). No ``preexec_fn``: Python runs
it between fork and exec, which is unsafe in a process with threads, and this daemon has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from claudepool.errors import ProtocolError, WorkerStartError
from claudepool.logs import RateLimitedLog, scrub
from claudepool.pool.memory import descendants
from claudepool.pool.reaper import Reaper
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.protocol.framing import LineFramer

log = logging.getLogger(__name__)
stderr_log = logging.getLogger("claudepool.worker.stderr")

_STDERR_TAIL_BYTES = 8192
# Completed stdout lines waiting for the reader past this pause the pipe (the StreamReader this
# replaces paused at twice its 64 KiB limit).
_PAUSE_READING_BYTES = 1 << 17


@functools.cache
def pdeathsig_argv() -> tuple[str, ...]:
    """The exec wrapper that sets ``PR_SET_PDEATHSIG=SIGKILL`` and then execs the worker (same pid);
    empty, with one warning, where util-linux's ``setpriv`` is missing."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: workers will not die with the daemon by PDEATHSIG; "
                    "only the reaper helper kills their groups if the daemon is killed")
        return ()
    return (setpriv, "--pdeathsig", "KILL", "--")


class _Pipes(asyncio.SubprocessProtocol):
    """asyncio's documented subprocess callbacks, turned into state that `WorkerProcess` awaits."""

    def __init__(self, framer: LineFramer, on_stderr: Callable[[bytes], None]) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self._framer = framer
        self._on_stderr = on_stderr
        self.lines: deque[bytes] = deque()
        self.line_bytes = 0
        self.error: Exception | None = None  # an oversize line, or a failed read
        self.stdout_done = False
        self.stdin_lost = False
        self._open = {1, 2}
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.exited = asyncio.Event()
        self.drained = asyncio.Event()  # stdout and stderr both at EOF

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (``server.event_loop = "uvloop"``)
        # have asyncio's methods without subclassing its transport classes.
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        if fd == 2:
            self._on_stderr(data)
            return
        if self.error is not None:
            return  # the stream is no longer trusted; the process is about to be killed
        try:
            lines = self._framer.feed(data)
        except ProtocolError as exc:
            self.error = exc
            self._stdout_pipe_pause()  # as the old reader stopped reading: nothing more is wanted
        else:
            self.lines.extend(lines)
            self.line_bytes += sum(map(len, lines))
            if self.line_bytes > _PAUSE_READING_BYTES:
                self._stdout_pipe_pause()
        self.readable.set()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.stdin_lost = True
            self.writable.set()  # wake a drain, which then reports the loss
            return
        if fd == 1:
            if exc is not None and self.error is None:
                self.error = exc
            elif self.error is None and (tail := self._framer.finish()):
                self.lines.append(tail)  # a last line without its newline
            self.stdout_done = True
            self.readable.set()
        self._open.discard(fd)
        if not self._open:
            self.drained.set()
        self._close_when_done()

    def process_exited(self) -> None:
        self.exited.set()
        self._close_when_done()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _close_when_done(self) -> None:
        # What asyncio's own subprocess protocol does: a transport whose pipes and process are all
        # done is closed (else it warns when collected).
        if self.drained.is_set() and self.exited.is_set() and self.transport is not None:
            self.transport.close()

    def _stdout_pipe(self) -> asyncio.ReadTransport | None:
        pipe = self.transport.get_pipe_transport(1) if self.transport is not None else None
        return cast(asyncio.ReadTransport, pipe)  # (a cast: see connection_made)

    def _stdout_pipe_pause(self) -> None:
        pipe = self._stdout_pipe()
        if pipe is not None:
            pipe.pause_reading()

    def stdout_pipe_resume(self) -> None:
        pipe = self._stdout_pipe()
        if pipe is not None and not pipe.is_reading() and self.error is None:
            pipe.resume_reading()


class WorkerProcess:
    """One worker's process, pipes and directories. The exchange uses `write`, `drain`,
    `read_lines` and `wait_exit`; the worker uses the rest, in this order: `make_dirs`, `spawn`,
    `stop`, `remove_dirs`.

    >>> async def demo(reaper, argv, env):                       # doctest: +SKIP
    ...     process = WorkerProcess("w-1", workdir_root=None, reaper=reaper, timeouts=WorkerTimeouts())
    ...     process.make_dirs()
    ...     await process.spawn(argv, env)
    ...     process.write(b'{"type":"control_request",...}\\n')
    ...     async for line in process.read_lines():
    ...         print(line)
    ...     await process.stop(graceful=True)
    ...     await process.remove_dirs()
    """

    def __init__(
        self,
        name: str,
        *,
        workdir_root: Path | None,
        reaper: Reaper,
        timeouts: WorkerTimeouts,
        max_line_bytes: int,
        log_fields: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self.name = name
        self.pid: int | None = None
        # Recorded once `stop` has run: the exit status, or None if the process could not be reaped.
        self.returncode: int | None = None
        self.dir: Path | None = None
        self._workdir_root = workdir_root
        self._reaper = reaper
        self._timeouts = timeouts
        self._max_line_bytes = max_line_bytes
        self._log_fields = log_fields or (lambda: {"worker": name})
        self._transport: asyncio.SubprocessTransport | None = None
        self._pipes: _Pipes | None = None
        self._registered = False
        self._stopped = False
        self._stderr_tail = bytearray()
        self._stderr_pending = b""
        self._stderr_forward = RateLimitedLog(stderr_log)
        # The processes `freeze` stopped, to continue at `thaw` (empty: running).
        self._frozen: tuple[int, ...] = ()

    # -- directories -------------------------------------------------------------------------

    @property
    def home(self) -> Path | None:
        return self.dir / "home" if self.dir is not None else None

    @property
    def cwd(self) -> Path | None:
        return self.dir / "cwd" if self.dir is not None else None

    @property
    def tmp(self) -> Path | None:
        return self.dir / "tmp" if self.dir is not None else None

    def make_dirs(self) -> None:
        """Create the private HOME, TMPDIR and cwd (0700) under a fresh directory of the root."""
        root = self._workdir_root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=root))
        for sub in ("home", "tmp", "cwd"):
            (self.dir / sub).mkdir(mode=0o700)

    async def remove_dirs(self) -> None:
        """Remove the directories in a thread (a large HOME would hold up the event loop), bounded."""
        if self.dir is None:
            return
        try:
            async with asyncio.timeout(self._timeouts.remove_dirs_timeout_s):
                await asyncio.to_thread(shutil.rmtree, self.dir, ignore_errors=True)
        except TimeoutError:
            log.warning("worker %s: removing %s takes over %gs; left to finish in its thread",
                        self.name, self.dir, self._timeouts.remove_dirs_timeout_s)

    # -- the process -------------------------------------------------------------------------

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        """Start ``argv`` in its own session, with the private cwd, and register its group."""
        assert self.dir is not None and self._transport is None
        cwd = self.dir / "cwd"
        wrapper = pdeathsig_argv()
        if wrapper:
            # setpriv would report a missing binary only by exiting 127: say it as plainly as exec would.
            _check_executable(argv[0], env.get("PATH", os.defpath), cwd)
        pipes = _Pipes(LineFramer(self._max_line_bytes), self._on_stderr)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: pipes,
                *wrapper, *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerStartError(f"cannot execute {argv[0]!r}: {exc.strerror}") from None
        self._transport, self._pipes = transport, pipes
        self.pid = transport.get_pid()
        self._reaper.register(self.pid)
        self._registered = True

    def exit_code(self) -> int | None:
        """The exit status once the process has exited and been reaped; None before."""
        return self._transport.get_returncode() if self._transport is not None else None

    async def wait_exit(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the process to exit; its exit status, or None."""
        if self._pipes is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._pipes.exited.wait()
        return self.exit_code()

    async def stop(self, *, graceful: bool) -> None:
        """Stop the process: EOF on stdin (if ``graceful``; an idle CLI exits at once) → SIGTERM →
        SIGKILL of the group, each bounded; then SIGKILL the group for leftovers, let the pipes reach
        EOF (bounded), close them, and unregister the group once its leader has been reaped."""
        transport, pipes = self._transport, self._pipes
        if transport is None or pipes is None or self._stopped:
            return
        # Once only: a second SIGKILL to the group, long after, could reach a reused id.
        self._stopped = True
        self.thaw()  # a frozen CLI would sit out the EOF and the SIGTERM, each to its deadline
        t = self._timeouts
        if graceful and self.exit_code() is None:
            stdin = self._stdin()
            if stdin is not None:
                stdin.close()
            await self.wait_exit(t.close_eof_timeout_s)
        if self.exit_code() is None:
            self._signal_group(signal.SIGTERM)
            await self.wait_exit(t.close_term_timeout_s)
        if self.exit_code() is None:
            self._signal_group(signal.SIGKILL)
            await self.wait_exit(t.close_kill_timeout_s)
        # Tool subprocesses that outlived the CLI share its group.
        self._signal_group(signal.SIGKILL)
        self.returncode = self.exit_code()
        # The dead process's last words are still in the pipes (a start failure reports its stderr).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(t.close_pipes_timeout_s):
                await pipes.drained.wait()
        # A grandchild outside the group may hold the pipes open: close our ends regardless.
        transport.close()
        if self.returncode is not None and self._registered:
            # A group leaves the reaper's list only once its leader has been reaped.
            self._reaper.unregister(self.pid)  # type: ignore[arg-type]
            self._registered = False

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    def freeze(self) -> None:
        """Stop the process and its descendants (SIGSTOP): an idle CLI then takes no CPU at all.

        The group first, at once (nothing in it can fork past the stop), then descendants that left it
        (a sandbox's ``--new-session``). Their pids stay valid while frozen: a stopped process cannot
        exit, only be killed, and the pids are continued before anything of ours kills them."""
        if self.pid is None or self._frozen or self._stopped or self.exit_code() is not None:
            return
        self._signal_group(signal.SIGSTOP)
        stopped = [self.pid]
        for child in descendants(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGSTOP)
                stopped.append(child)
        self._frozen = tuple(stopped)

    def thaw(self) -> None:
        """Continue what `freeze` stopped (SIGCONT; a no-op when running). Before a lease and before any
        stop: a stopped process reads no EOF and a SIGTERM waits for SIGCONT (only SIGKILL acts)."""
        frozen, self._frozen = self._frozen, ()
        if not frozen:
            return
        self._signal_group(signal.SIGCONT)
        for pid in frozen[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    # -- the pipes (the exchange's transport) --------------------------------------------------

    def write(self, line: bytes) -> None:
        """Queue one line for stdin. Raises `BrokenPipeError` once stdin is closed."""
        stdin = self._stdin()
        if stdin is None or stdin.is_closing() or self._pipes is None or self._pipes.stdin_lost:
            raise BrokenPipeError(f"worker {self.name} has no open stdin")
        stdin.write(line)

    async def drain(self) -> None:
        """Wait until stdin has taken what was written (pipe backpressure). Raises
        `ConnectionResetError` if stdin is lost meanwhile."""
        pipes, stdin = self._pipes, self._stdin()
        if pipes is None or stdin is None:
            raise ConnectionResetError(f"worker {self.name} has no stdin")
        if stdin.is_closing():
            await asyncio.sleep(0)  # let a pending connection_lost arrive, as StreamWriter.drain does
        while not pipes.writable.is_set() and not pipes.stdin_lost:
            await pipes.writable.wait()
        if pipes.stdin_lost:
            raise ConnectionResetError(f"worker {self.name}: stdin closed")

    async def read_lines(self) -> AsyncIterator[bytes]:
        """Every stdout line (without its newline) until EOF, the last one even if unterminated.
        Raises `FrameTooLarge` after the lines before an oversize one."""
        pipes = self._pipes
        assert pipes is not None
        while True:
            while pipes.lines:
                line = pipes.lines.popleft()
                pipes.line_bytes -= len(line)
                yield line
            pipes.stdout_pipe_resume()
            if pipes.error is not None:
                raise pipes.error
            if pipes.stdout_done:
                return
            pipes.readable.clear()
            await pipes.readable.wait()

    def _stdin(self) -> asyncio.WriteTransport | None:
        pipe = self._transport.get_pipe_transport(0) if self._transport is not None else None
        return cast(asyncio.WriteTransport, pipe)  # (a cast: see `_Pipes.connection_made`)

    # -- stderr ------------------------------------------------------------------------------

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", "replace")

    def _on_stderr(self, chunk: bytes) -> None:
        self._stderr_tail += chunk
        del self._stderr_tail[:-_STDERR_TAIL_BYTES]
        *lines, pending = (self._stderr_pending + chunk).split(b"\n")
        self._stderr_pending = pending[-_STDERR_TAIL_BYTES:]
        for line in lines:
            if line.strip():
                fields: dict[str, Any] = {**self._log_fields(),
                                          "line": scrub(line[:2048].decode("utf-8", "replace"))}
                self._stderr_forward.info("worker stderr", fields)


def _check_executable(program: str, path: str, cwd: Path) -> None:
    """Raise `WorkerStartError` as exec would if ``program`` cannot be executed (a relative path
    with a slash is looked up from the child's cwd, as exec does after chdir)."""
    candidate = program if os.sep not in program or os.path.isabs(program) else str(cwd / program)
    if shutil.which(candidate, path=path) is not None:
        return
    code = errno.EACCES if os.sep in candidate and os.path.exists(candidate) else errno.ENOENT
    raise WorkerStartError(f"cannot execute {program!r}: {os.strerror(code)}")
