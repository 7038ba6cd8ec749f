"""The OS side of a worker (pool/process.py) on plain processes, without a CLI: the PDEATHSIG wrapper,
kill escalation, pipes, framing and directories (issue 11)."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from claudepool.errors import FrameTooLarge, WorkerStartError
from claudepool.pool import process
from claudepool.pool.process import WorkerProcess
from claudepool.pool.reaper import Reaper
from claudepool.pool.timeouts import WorkerTimeouts
from tests.conftest import REPO
from tests.helpers import pid_gone, until

FAST = WorkerTimeouts(close_eof_timeout_s=0.3, close_term_timeout_s=0.3, close_kill_timeout_s=2.0,
                      close_pipes_timeout_s=0.5, remove_dirs_timeout_s=2.0)

# Reports what the kernel holds for it (PR_GET_PDEATHSIG is 2), then waits for stdin to end.
REPORT_PDEATHSIG = """
import ctypes, json, os, sys
sig = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "pdeathsig": sig.value}), flush=True)
sys.stdin.read()
"""


class RecordingReaper(Reaper):
    """Keeps the register/unregister calls instead of telling a helper process."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def register(self, pgid: int) -> None:
        self.calls.append(("+", pgid))

    def unregister(self, pgid: int) -> None:
        self.calls.append(("-", pgid))


@pytest.fixture
async def make_process(tmp_path: Path) -> AsyncIterator[Callable[..., WorkerProcess]]:
    made: list[WorkerProcess] = []

    def make(**kw: object) -> WorkerProcess:
        kw.setdefault("timeouts", FAST)
        kw.setdefault("reaper", RecordingReaper())
        kw.setdefault("max_line_bytes", 1 << 20)
        p = WorkerProcess(f"p-{len(made)}", workdir_root=tmp_path / "w", **kw)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        await p.stop(graceful=False)
        await p.remove_dirs()


async def spawn_python(p: WorkerProcess, code: str) -> None:
    p.make_dirs()
    await p.spawn([sys.executable, "-c", code], {"PATH": os.environ["PATH"]})


async def first_line(p: WorkerProcess) -> bytes:
    async with asyncio.timeout(10):
        async for line in p.read_lines():
            return line
    raise AssertionError("stdout ended without a line")


@pytest.mark.parametrize("wrapped", [True, False], ids=["setpriv", "control-no-wrapper"])
async def test_the_exec_wrapper_sets_pdeathsig_and_keeps_the_pid(
    make_process: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch, wrapped: bool
) -> None:
    """The worker's pid is the program's own (setpriv execs it), a direct child of the daemon, and
    the kernel holds SIGKILL as its parent-death signal. The control shows the check can fail."""
    if not wrapped:
        monkeypatch.setattr(process, "pdeathsig_argv", lambda: ())
    else:
        assert process.pdeathsig_argv(), "setpriv (util-linux) is needed: .ci/run installs it"
    p = make_process()
    await spawn_python(p, REPORT_PDEATHSIG)
    report = orjson.loads(await first_line(p))
    assert report["pid"] == p.pid
    assert report["ppid"] == os.getpid()  # no wrapper process left in between
    assert report["pdeathsig"] == (signal.SIGKILL if wrapped else 0)


def test_no_preexec_fn_anywhere_in_the_package() -> None:
    """Python runs preexec_fn between fork and exec, unsafe in a process with threads (issue 11)."""
    offenders = []
    for path in (REPO / "claudepool").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                offenders.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
            if isinstance(node, ast.Import | ast.ImportFrom) and "ctypes" in ast.unparse(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports ctypes")
    assert offenders == []


async def test_stop_escalates_to_sigkill_and_kills_the_group(make_process: Callable[..., WorkerProcess]) -> None:
    """EOF and SIGTERM are each given their bound; SIGKILL ends a process that ignores both, and the
    group's leftovers go with it. The group leaves the reaper only once its leader is reaped."""
    reaper = RecordingReaper()
    p = make_process(reaper=reaper)
    await spawn_python(p, """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "60"])
print(child.pid, flush=True)
while True:
    time.sleep(1)
""")
    grandchild = int(await first_line(p))
    assert reaper.calls == [("+", p.pid)]
    started = time.monotonic()
    await p.stop(graceful=True)
    elapsed_s = time.monotonic() - started
    assert p.returncode == -signal.SIGKILL
    assert elapsed_s >= FAST.close_eof_timeout_s + FAST.close_term_timeout_s
    assert pid_gone(p.pid)
    await until(lambda: pid_gone(grandchild))
    assert reaper.calls == [("+", p.pid), ("-", p.pid)]


async def test_eof_alone_stops_a_process_that_exits_on_it(make_process: Callable[..., WorkerProcess]) -> None:
    p = make_process()
    await spawn_python(p, "import sys; print('up', flush=True); sys.stdin.read(); sys.exit(7)")
    assert await first_line(p) == b"up"
    started = time.monotonic()
    await p.stop(graceful=True)
    assert p.returncode == 7  # no signal was needed
    assert time.monotonic() - started < FAST.close_eof_timeout_s


async def test_pipes_a_grandchild_outside_the_group_holds_are_closed(
    make_process: Callable[..., WorkerProcess],
) -> None:
    """A grandchild in its own session keeps stdout open past the leader's exit: stop waits for EOF
    only ``close_pipes_timeout_s``, then closes our ends, and the reader ends too."""
    p = make_process()
    await spawn_python(p, """
import subprocess
child = subprocess.Popen(["sleep", "60"], start_new_session=True)
print(child.pid, flush=True)
""")
    lines = p.read_lines()
    grandchild = int(await anext(lines))
    try:
        assert await p.wait_exit(5) == 0
        reader = asyncio.ensure_future(anext(lines))
        await asyncio.sleep(0.2)
        assert not reader.done()  # the grandchild holds stdout: no EOF
        started = time.monotonic()
        await p.stop(graceful=True)
        assert time.monotonic() - started < FAST.close_pipes_timeout_s + 0.5
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(2):
                await reader
    finally:
        os.kill(grandchild, signal.SIGKILL)


async def test_stdout_is_framed_and_bounded(make_process: Callable[..., WorkerProcess]) -> None:
    """Lines come whole; past ``max_line_bytes`` the reader raises after the lines before."""
    p = make_process(max_line_bytes=1000)
    await spawn_python(p, """
import sys
sys.stdout.write('{"a":'); sys.stdout.flush()
sys.stdout.write('1}\\n'); sys.stdout.flush()
sys.stdin.readline()
sys.stdout.write("x" * 5000 + "\\n"); sys.stdout.flush()
sys.stdin.read()
""")
    lines = p.read_lines()
    assert await anext(lines) == b'{"a":1}'
    p.write(b"go\n")
    with pytest.raises(FrameTooLarge):
        async with asyncio.timeout(10):
            await anext(lines)


async def test_an_unterminated_last_line_is_read_at_eof(make_process: Callable[..., WorkerProcess]) -> None:
    p = make_process()
    await spawn_python(p, "import sys; sys.stdout.write('one\\nlast')")
    async with asyncio.timeout(10):
        assert [line async for line in p.read_lines()] == [b"one", b"last"]
    assert await p.wait_exit(5) == 0


async def test_stdin_closed_is_a_broken_pipe(make_process: Callable[..., WorkerProcess]) -> None:
    p = make_process()
    await spawn_python(p, "import os; os.close(0); print('closed', flush=True); import time; time.sleep(60)")
    assert await first_line(p) == b"closed"

    async def write_until_refused() -> None:
        while True:  # the first writes may still go into the pipe's buffer before EPIPE is seen
            p.write(b"x" * 65536 + b"\n")
            await p.drain()

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(write_until_refused(), 10)


async def test_stderr_keeps_a_bounded_tail(make_process: Callable[..., WorkerProcess]) -> None:
    p = make_process()
    await spawn_python(p, "import sys; sys.stderr.write('e' * 20000 + 'THE END'); sys.exit(1)")
    await p.wait_exit(5)
    await p.stop(graceful=False)
    assert p.stderr_tail.endswith("THE END")
    assert len(p.stderr_tail) == 8192


@pytest.mark.parametrize("wrapped", [True, False], ids=["setpriv", "no-wrapper"])
async def test_a_missing_or_unexecutable_binary_is_a_start_error(
    make_process: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wrapped: bool
) -> None:
    """The same message with or without setpriv in front (setpriv itself would only exit 127)."""
    if not wrapped:
        monkeypatch.setattr(process, "pdeathsig_argv", lambda: ())
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    for binary, reason in ((str(tmp_path / "missing"), "No such file or directory"),
                           ("no-such-claude-on-path", "No such file or directory"),
                           (str(plain), "Permission denied")):
        p = make_process()
        p.make_dirs()
        with pytest.raises(WorkerStartError, match=re.escape(f"cannot execute '{binary}': {reason}")):
            await p.spawn([binary], {"PATH": os.environ["PATH"]})
        assert p.pid is None


async def test_dirs_are_private_and_removed_in_a_thread(
    make_process: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_process()
    p.make_dirs()
    assert p.dir is not None and p.home is not None
    for sub in (p.home, p.tmp, p.cwd):
        assert sub is not None and sub.stat().st_mode & 0o777 == 0o700
    (p.home / ".claude.json").write_text("{}")
    threads: list[threading.Thread] = []
    real_rmtree = shutil.rmtree

    def recording_rmtree(path: Path, ignore_errors: bool = False) -> None:
        threads.append(threading.current_thread())
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    await p.remove_dirs()
    assert not p.dir.exists()
    assert threads and threads[0] is not threading.main_thread()


async def test_a_removal_that_hangs_is_given_up_after_its_bound(
    make_process: Callable[..., WorkerProcess], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = make_process(timeouts=FAST.model_copy(update={"remove_dirs_timeout_s": 0.2}))
    p.make_dirs()
    release = threading.Event()
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: release.wait(10))
    started = time.monotonic()
    try:
        await p.remove_dirs()
        assert time.monotonic() - started < 2.0
        assert "left to finish in its thread" in caplog.text
    finally:
        release.set()
