"""The daemon as a process: config errors, signals and drain, SIGKILL, sd_notify, socket activation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import FAKE_CLAUDE
from tests.daemon_fixtures import ADMIN, KEY, DaemonProcess, post, start_daemon
from tests.helpers import pid_gone, until

__all__ = ["start_daemon"]


def write_config(tmp_path: Path, *, drain_timeout_s: float = 10, http: str = "127.0.0.1:0",
                 socket_path: str | None = None, extra: str = "", claude_bin: str = str(FAKE_CLAUDE)) -> Path:
    config = tmp_path / "claudepool.toml"
    sock = socket_path if socket_path is not None else str(tmp_path / "cp.sock")
    config.write_text(f"""
[server]
socket = "{sock}"
http = "{http}"
admin_key = "{ADMIN}"
drain_timeout_s = {drain_timeout_s}

[pool]
claude_bin = "{claude_bin}"
min_idle = 2
max_workers = 3
workdir = "{tmp_path / 'workers'}"

[pool.timeouts]
close_eof_timeout_s = 1
close_term_timeout_s = 1

[sessions]
min_idle = 0
dir = "{tmp_path / 'sessions'}"

[tenants.acme]
key = "{KEY}"
{extra}
""")
    return config


async def test_invalid_configs_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[server\nhttp = 1")
    bad_value = tmp_path / "bad-value.toml"
    bad_value.write_text('[pool]\nmin_idle = -1\n[tenants.x]\nkey = "k"\nprofile = "missing"\n')
    cases = [
        (["--config", str(bad_toml)], "is not valid TOML"),
        (["--config", str(bad_value)], "pool.min_idle: Input should be greater than or equal to 0"),
        (["--config", str(tmp_path / "absent.toml")], "does not exist"),
    ]
    for args, message in cases:
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "claudepool", "serve", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(20):
            _, err = await done.communicate()
        assert done.returncode == 2, args
        assert message in err.decode(), err.decode()


async def test_env_overrides_and_bad_env_values(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "claudepool", "serve", "--config", str(config),
        env={**os.environ, "CLAUDEPOOL_POOL__MAX_WORKERS": "lots"}, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        _, err = await done.communicate()
    assert done.returncode == 2
    assert "pool.max_workers" in err.decode()


async def test_defaults_without_a_config_file(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    daemon = await start_daemon(env={
        "XDG_RUNTIME_DIR": str(runtime), "CLAUDEPOOL_SERVER__HTTP": "127.0.0.1:0",
        "CLAUDEPOOL_POOL__CLAUDE_BIN": str(FAKE_CLAUDE), "CLAUDEPOOL_POOL__MIN_IDLE": "1",
        "CLAUDEPOOL_POOL__WORKDIR": str(tmp_path / "w"),
    }, wait_ready=False)
    assert daemon.socket == str(runtime / "claudepool" / "claudepool.sock")
    assert daemon.url.startswith("http://127.0.0.1:")
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == "0o660"
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert not os.path.exists(daemon.socket)  # the socket we bound is removed on exit


async def test_sigterm_drains_a_turn_in_flight_then_exits_0(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--config", str(write_config(tmp_path)))
    pids = await daemon.worker_pids()
    assert len(pids) == 2
    in_flight = await daemon.start_request("[[sleep:1.5]] [[reply:finished anyway]]")
    daemon.proc.send_signal(signal.SIGTERM)
    await daemon.wait_draining()
    late_status, late = await post(daemon.url, {"prompt": "too late"})
    assert (late_status, late["error"]["code"]) == (503, "draining")
    status, body = await in_flight
    assert (status, body["text"]) == (200, "finished anyway")
    assert await daemon.wait_exit() == 0
    assert all(pid_gone(pid) for pid in pids)
    assert any("shutdown: 0 requests stopped" in line for line in daemon.output)


async def test_drain_deadline_answers_stragglers_with_draining(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--config", str(write_config(tmp_path, drain_timeout_s=0.5)))
    pids = await daemon.worker_pids()
    stuck = await daemon.start_request("[[hang]]")
    daemon.proc.send_signal(signal.SIGTERM)
    status, body = await stuck
    assert (status, body["error"]["code"]) == (503, "draining")
    assert await daemon.wait_exit() == 0
    assert all(pid_gone(pid) for pid in pids)


async def test_second_signal_forces_exit(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--config", str(write_config(tmp_path, drain_timeout_s=60)))
    pids = await daemon.worker_pids()
    stuck = await daemon.start_request("[[hang]]")
    daemon.proc.send_signal(signal.SIGTERM)
    await daemon.wait_draining()
    assert daemon.proc.returncode is None  # still draining: the deadline is a minute away
    t0 = time.monotonic()
    daemon.proc.send_signal(signal.SIGINT)
    assert await daemon.wait_exit(10) == 1
    assert time.monotonic() - t0 < 8
    status, body = await stuck
    assert (status, body["error"]["code"]) == (503, "draining")
    assert all(pid_gone(pid) for pid in pids)


async def test_sigkill_of_the_daemon_leaves_no_worker(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--config", str(write_config(tmp_path)))
    stuck = await daemon.start_request("[[hang]]")
    pids = await daemon.worker_pids()
    assert len(pids) >= 2
    daemon.proc.kill()
    await daemon.wait_exit()
    await until(lambda: all(pid_gone(pid) for pid in pids), 5)
    with contextlib.suppress(aiohttp.ClientError):
        await stuck


async def test_sd_notify_ready_status_watchdog_stopping(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.setblocking(False)
    messages: list[str] = []

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(listener.recv(4096).decode())

    def seen(field: str, times: int = 1) -> bool:
        drain()
        return sum(field in m for m in messages) >= times

    try:
        daemon = await start_daemon("--config", str(write_config(tmp_path)),
                                    env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "300000"})
        await until(lambda: seen("READY=1"), 10)
        await until(lambda: seen("WATCHDOG=1", times=2), 5)
        assert any(m.startswith("STATUS=serving with 2 warm workers") for m in messages)
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
        drain()
        assert any("STOPPING=1" in m for m in messages)
        ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
        stopping_at = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
        assert ready_at < stopping_at
    finally:
        listener.close()


async def test_adopts_systemd_sockets(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    unix_path = tmp_path / "activated.sock"
    unix_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_sock.bind(str(unix_path))
    unix_sock.listen()
    tcp_sock = socket.create_server(("127.0.0.1", 0))
    port = tcp_sock.getsockname()[1]
    # Config asks for no sockets of its own: everything must come from LISTEN_FDS.
    config = write_config(tmp_path, http="", socket_path="")
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='claudepool:claudepool')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'claudepool', 'serve', '--config', sys.argv[3]])\n"
    )
    try:
        daemon = await start_daemon(argv=[sys.executable, "-c", launcher, str(unix_sock.fileno()),
                                          str(tcp_sock.fileno()), str(config)],
                                    pass_fds=(unix_sock.fileno(), tcp_sock.fileno()))
    finally:
        unix_sock.close()
        tcp_sock.close()
    assert daemon.url == f"http://127.0.0.1:{port}"
    assert daemon.socket == str(unix_path)
    status, body = await post(daemon.url, {"prompt": "[[reply:activated]]"})
    assert (status, body["text"]) == (200, "activated")
    reader, writer = await asyncio.open_unix_connection(str(unix_path))
    writer.write(orjson.dumps({"id": "a", "op": "prompt", "key": KEY, "prompt": "[[reply:via unix]]"}) + b"\n")
    async with asyncio.timeout(10):
        frame = orjson.loads(await reader.readline())
    writer.close()
    assert (frame["event"], frame["text"]) == ("result", "via unix")
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert unix_path.exists()  # an inherited socket belongs to systemd: we do not remove it


async def test_dev_mode_serves_with_a_known_key_and_a_loopback_upstream(
    tmp_path: Path, start_daemon: Callable[..., Awaitable[DaemonProcess]]
) -> None:
    daemon = await start_daemon("--dev", env={
        "XDG_RUNTIME_DIR": str(tmp_path), "CLAUDEPOOL_SERVER__HTTP": "127.0.0.1:0",
        "CLAUDEPOOL_POOL__CLAUDE_BIN": str(FAKE_CLAUDE), "CLAUDEPOOL_POOL__MIN_IDLE": "1",
        "CLAUDEPOOL_POOL__WORKDIR": str(tmp_path / "w"), "ANTHROPIC_API_KEY": "",
    })
    output = "".join(daemon.output)
    assert "answers come from a loopback fake upstream at http://127.0.0.1:" in output
    assert "tenant 'dev' has key 'dev'" in output
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{daemon.url}/v1/prompt", data=orjson.dumps({"prompt": "[[reply:hi dev]]"}),
                                headers={"Authorization": "Bearer dev"}) as resp:
            assert (resp.status, (await resp.json())["text"]) == (200, "hi dev")
        async with session.get(f"{daemon.url}/v1/pool", headers={"Authorization": "Bearer dev-admin"}) as resp:
            assert resp.status == 200
    daemon.proc.send_signal(signal.SIGINT)
    assert await daemon.wait_exit() == 0
