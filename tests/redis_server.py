"""A real, throwaway ``redis-server`` for tests, and the ``redis_url`` fixture built on it.

The server listens only on a Unix socket in its own temporary directory. It runs daemonized (its own
session, reparented away from pytest) so the suite's leaked-process guard, which fails any test
that leaves a child behind, does not see a session-long server as a leak. The reaper helper holds
its process group, so it still dies with pytest even if pytest is killed.

Use it from a test module::

    from tests.redis_server import _redis_server, redis_url

    __all__ = ["_redis_server", "redis_url"]  # re-exported for pytest, not unused

    async def test_x(redis_url: str) -> None:
        store = RedisStore(redis_url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import psutil
import pytest

from claudepool.pool.reaper import default_reaper

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class RedisServer:
    """One ``redis-server`` on a Unix socket. ``persistent=True`` keeps data across `restart`."""

    def __init__(self, *, persistent: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.persistent = persistent
        self.extra_args = list(extra_args)  # more redis-server options, e.g. ["--requirepass", "pw"]
        # Not pytest's tmp_path: a Unix socket path must stay under ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="cp-redis-"))
        self.socket = self.dir / "redis.sock"
        self._pidfile = self.dir / "redis.pid"
        self._log = self.dir / "redis.log"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.pid is not None else "stopped"
        return f"<RedisServer {self.socket} {state}{' persistent' if self.persistent else ''}>"

    def start(self) -> None:
        """Start the server and return once it answers PING; raise with its log tail if it does not."""
        if self.pid is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._pidfile.unlink(missing_ok=True)
        args = [
            REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--save", "", "--dir", str(self.dir), "--daemonize", "yes", "--pidfile", str(self._pidfile),
            "--logfile", str(self._log),
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        args += self.extra_args
        launcher = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=START_TIMEOUT_S,
                                  check=False)
        if launcher.returncode != 0:
            raise RuntimeError(f"redis-server exited {launcher.returncode}: {launcher.stderr.decode()!r}"
                               f"{self._log_tail()}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.pid is None and self._pidfile.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):  # half-written file; died at once
                    pid = int(self._pidfile.read_text().strip())
                    # Daemonized redis leads its own session and process group: the reaper kills that
                    # group if pytest dies without stopping it.
                    default_reaper().register(os.getpgid(pid))
                    self.pid = pid
            if self.pid is not None and self._answers_ping():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S}s{self._log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF and removes the socket), wait; SIGKILL if it lingers."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash. A persistent server with ``appendfsync always`` loses nothing acknowledged."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        if self.pid is not None:
            self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        pid, self.pid = self.pid, None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT_S
            time.sleep(0.01)
        default_reaper().unregister(pid)  # registered as its process group, whose id is its pid

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(1.0)
                conn.connect(str(self.socket))
                conn.sendall(b"PING\r\n")
                # With --requirepass the answer is NOAUTH: still, the server is up.
                return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self._log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return " (no log)"
        return "\n--- redis log tail ---\n" + "\n".join(tail)


def _alive(pid: int) -> bool:
    # Not our child, so we cannot reap it: a zombie waiting for init counts as gone.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Every test module that imports the fixtures registers its own copy of the session fixture; the
# copies share one server per process (per xdist worker) and the last one to finish stops it.
_shared: RedisServer | None = None
_users = 0


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[RedisServer]:
    global _shared, _users
    if _shared is None:
        _shared = RedisServer()
        _shared.start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            server, _shared = _shared, None
            server.close()


@pytest.fixture
def redis_url(_redis_server: RedisServer) -> str:
    """The URL of this worker's Redis, emptied (FLUSHALL) for this test."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5.0)
        conn.connect(str(_redis_server.socket))
        conn.sendall(b"FLUSHALL\r\n")
        reply = conn.recv(64)
    assert reply.startswith(b"+OK"), reply
    return _redis_server.url
