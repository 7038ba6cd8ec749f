"""The sandbox's parts without a CLI: the bubblewrap command line, the CLI's bind, the gateway's
per-worker sockets. The sandbox itself is tested on the real CLI (tests/test_real_cli_sandbox.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import cast

import pytest

from claudepool.gateway.sockets import WorkerSockets
from claudepool.pool import sandbox
from claudepool.pool.worker import Worker


def test_the_command_line_isolates_and_binds_only_the_workers_own_paths(tmp_path: Path) -> None:
    layout = sandbox.Layout(worker_dir=tmp_path / "w", cli_root=tmp_path / "cli", gateway_socket=tmp_path / "g.sock")
    argv = sandbox.wrap(["claude", "-p"], layout, bwrap="bwrap", socat="socat", etc=tmp_path / "etc")
    joined = " ".join(argv)
    for flag in ("--die-with-parent", "--new-session", "--unshare-user", "--disable-userns", "--unshare-pid",
                 "--unshare-net", "--cap-drop ALL", "--remount-ro /dev", f"--size {sandbox.TMPFS_BYTES} --tmpfs /tmp"):
        assert flag in joined
    assert f"--bind {tmp_path / 'w'} {tmp_path / 'w'}" in joined  # read-write, its own directory only
    assert f"--ro-bind {tmp_path / 'cli'} {tmp_path / 'cli'}" in joined
    assert f"--bind {tmp_path / 'g.sock'} {sandbox.GATEWAY_SOCKET}" in joined
    assert f"--ro-bind {tmp_path / 'etc' / 'passwd'} /etc/passwd" in joined
    binds = [argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--ro-bind")]
    assert not any(b.startswith(("/root", "/home", "/var", "/run", "/srv")) for b in binds), binds
    etc = [b for b in binds if b.startswith("/etc")]
    assert "/etc" not in etc and "/etc/shadow" not in etc and "/etc/ssl/certs" in etc  # a list, not the lot
    assert argv[-2:] == ["claude", "-p"]
    assert sandbox.base_url() == f"http://127.0.0.1:{sandbox.RELAY_PORT}"


def test_the_sandboxes_own_etc_files_name_no_host_account() -> None:
    etc = sandbox.etc_dir()
    passwd = (etc / "passwd").read_text()
    assert f":{sandbox.SANDBOX_UID}:" in passwd and "root" not in passwd
    assert not os.access(etc / "passwd", os.W_OK) or os.geteuid() == 0  # root may write anything
    assert oct((etc / "passwd").stat().st_mode & 0o777) == "0o444"


def test_an_npm_install_is_bound_at_its_package_root(tmp_path: Path) -> None:
    package = tmp_path / "node_modules" / "@anthropic-ai" / "claude-code"
    (package / "bin").mkdir(parents=True)
    (package / "package.json").write_text("{}")
    (package / "bin" / "claude.exe").write_text("")
    (tmp_path / "node_modules" / ".bin").mkdir()
    (tmp_path / "node_modules" / ".bin" / "claude").symlink_to(package / "bin" / "claude.exe")
    binary = sandbox.cli_binary(str(tmp_path / "node_modules" / ".bin" / "claude"))
    assert binary == package / "bin" / "claude.exe"
    assert sandbox.cli_root(binary) == package
    assert sandbox.cli_root(tmp_path / "plain" / "claude") == tmp_path / "plain"


async def test_each_worker_gets_a_socket_of_its_own_gone_when_it_closes() -> None:
    sockets = WorkerSockets()
    sockets.start(asyncio.Protocol)
    a, b = cast(Worker, object()), cast(Worker, object())  # only their identity matters here
    path_a, path_b = await sockets.open(a), await sockets.open(b)
    assert path_a != path_b and path_a.is_socket() and oct(path_a.stat().st_mode & 0o777) == "0o600"
    assert sockets.owner(str(path_a)) is a and sockets.owner(str(path_b)) is b
    assert sockets.owner(("127.0.0.1", 8080)) is None  # the loopback listener's sockname
    sockets.close(a)
    assert not path_a.exists() and sockets.owner(str(path_a)) is None and not sockets.has_socket(a)
    directory = path_b.parent
    sockets.close_all()
    assert not directory.exists()
    with pytest.raises(RuntimeError):
        await sockets.open(a)
