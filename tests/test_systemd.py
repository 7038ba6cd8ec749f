"""systemd integration: sd_notify over a real datagram socket, socket activation in a real child
process (fds 3, 4, … as systemd passes them), and the shipped unit files and example config."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from claudepool.daemon.listen_fds import InheritedSocket, inherited_sockets, split_by_kind
from claudepool.daemon.notify import SERVICE_ENV_VARS, Notifier, unset_environment
from claudepool.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
SERVICE = UNIT_DIR / "claudepool.service"
SOCKET_UNIT = UNIT_DIR / "claudepool.socket"
EXAMPLE_CONFIG = UNIT_DIR / "claudepool.toml"

RECV_TIMEOUT_S = 2.0


# -- sd_notify -----------------------------------------------------------------------------------


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket standing in for systemd's notify socket: (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECV_TIMEOUT_S)
    with sock:
        yield str(path), sock


@pytest.fixture
def make_notifier() -> Iterator[Callable[[dict[str, str]], Notifier]]:
    notifiers: list[Notifier] = []

    def make(env: dict[str, str]) -> Notifier:
        notifier = Notifier(env)
        notifiers.append(notifier)
        return notifier

    yield make
    for notifier in notifiers:
        notifier.close()


def _nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(RECV_TIMEOUT_S)
    return False


def test_ready_stopping_status_each_send_one_datagram(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    notifier = make_notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    notifier.ready()
    assert listener.recv(4096) == b"READY=1"
    notifier.stopping()
    assert listener.recv(4096) == b"STOPPING=1"
    # A newline would split the datagram into a bogus second field: status() flattens it.
    notifier.status("serving\n4 idle, 0 busy")
    assert listener.recv(4096) == b"STATUS=serving 4 idle, 0 busy"
    notifier.watchdog()
    assert listener.recv(4096) == b"WATCHDOG=1"
    assert _nothing_pending(listener)


def test_several_fields_go_in_one_datagram(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    notifier = make_notifier({"NOTIFY_SOCKET": address})
    notifier.notify("READY=1", "STATUS=warming 2 workers", f"MAINPID={os.getpid()}")
    assert listener.recv(4096) == f"READY=1\nSTATUS=warming 2 workers\nMAINPID={os.getpid()}".encode()
    assert _nothing_pending(listener)


def test_abstract_socket_name_starting_with_at(make_notifier: Callable[[dict[str, str]], Notifier]) -> None:
    name = f"claudepool-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(RECV_TIMEOUT_S)
        notifier = make_notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert listener.recv(4096) == b"READY=1"
        assert "@" + name in repr(notifier)


def test_malformed_field_is_a_caller_bug(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    notifier = make_notifier({"NOTIFY_SOCKET": address})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.notify("READY")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.notify("STATUS=a\nREADY=1")
    assert _nothing_pending(listener)


def test_watchdog_interval_is_half_of_watchdog_usec(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, _ = notify_listener
    assert make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}).watchdog_interval_s == 1.0
    own = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert make_notifier(own).watchdog_interval_s == 1.0
    assert make_notifier({"NOTIFY_SOCKET": address}).watchdog_interval_s is None
    assert make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None
    assert make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None


def test_watchdog_pid_of_another_process_disables_the_watchdog(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, _ = notify_listener
    other_pid = str(os.getppid())
    notifier = make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other_pid})
    assert notifier.enabled  # notification itself still works; only the watchdog is someone else's
    assert notifier.watchdog_interval_s is None


async def test_run_watchdog_pings_on_schedule_until_cancelled(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    listener.setblocking(False)
    notifier = make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    assert notifier.watchdog_interval_s == pytest.approx(0.1)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(notifier.run_watchdog())
    pings: list[bytes] = []
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                while True:
                    pings.append(await loop.sock_recv(listener, 4096))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await task
    assert len(pings) >= 2
    assert set(pings) == {b"WATCHDOG=1"}
    # Half of 200 ms: about five pings in 0.5 s; far more would mean the loop does not sleep.
    assert len(pings) <= 8


async def test_run_watchdog_returns_at_once_when_disabled(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    async with asyncio.timeout(1):
        await make_notifier({"NOTIFY_SOCKET": address}).run_watchdog()
        await make_notifier({}).run_watchdog()
    assert _nothing_pending(listener)


def test_without_notify_socket_everything_is_a_silent_no_op(
    make_notifier: Callable[[dict[str, str]], Notifier],
) -> None:
    notifier = make_notifier({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    notifier.close()


def test_default_environment_is_os_environ(
    monkeypatch: pytest.MonkeyPatch, notify_listener: tuple[str, socket.socket]
) -> None:
    address, listener = notify_listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    try:
        notifier.ready()
        assert listener.recv(4096) == b"READY=1"
    finally:
        notifier.close()


def test_missing_socket_path_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    notifier = make_notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="claudepool.daemon.notify"):
        notifier.ready()
        notifier.stopping()
    failures = [r for r in caplog.records if r.levelno == logging.DEBUG and "failed" in r.getMessage()]
    assert len(failures) == 2


def test_unsupported_notify_socket_disables(make_notifier: Callable[[dict[str, str]], Notifier]) -> None:
    assert not make_notifier({"NOTIFY_SOCKET": "relative/notify.sock"}).enabled


def test_close_stops_sending(
    notify_listener: tuple[str, socket.socket], make_notifier: Callable[[dict[str, str]], Notifier]
) -> None:
    address, listener = notify_listener
    notifier = make_notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready()
    assert _nothing_pending(listener)


def test_unset_environment_removes_only_systemd_variables() -> None:
    env = {name: "1" for name in SERVICE_ENV_VARS} | {"PATH": "/usr/bin", "HOME": "/var/lib/claudepool/home"}
    unset_environment(env)
    assert env == {"PATH": "/usr/bin", "HOME": "/var/lib/claudepool/home"}
    assert set(SERVICE_ENV_VARS) == {
        "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
    }  # fmt: skip
    unset_environment(env)  # idempotent: absent names are fine


# -- socket activation -----------------------------------------------------------------------

# Runs in a child so that fds 3 and 4 can be replaced, as systemd would pass them, without
# clobbering pytest's own. argv[1] is a JSON spec: the fds to move to 3, 4, …, the LISTEN_*
# variables (LISTEN_PID is the child's own pid unless given) and whether to accept one connection.
CHILD = textwrap.dedent(
    """
    import json, os, select, socket, sys
    from claudepool.daemon.listen_fds import inherited_sockets, split_by_kind
    from claudepool.errors import ConfigError

    spec = json.loads(sys.argv[1])
    # Copy high first: a passed fd may itself be 3 or 4 and be overwritten by the first dup2.
    copies = [os.dup(fd) for fd in spec["fds"]]
    for target, fd in enumerate(copies, start=3):
        os.dup2(fd, target)
        os.set_inheritable(target, True)  # as systemd passes them (dup2 onto itself changes nothing)
    for fd in set(copies + spec["fds"]) - set(range(3, 3 + len(copies))):
        os.close(fd)
    os.environ.update(spec["env"])
    os.environ.setdefault("LISTEN_PID", str(os.getpid()))
    try:
        found = inherited_sockets()
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    out = {"sockets": [], "unix": [], "inet": []}
    for s in found:
        item = {"fd": s.fd, "name": s.name, "family": socket.AddressFamily(s.family).name,
                "sock_fd": s.sock.fileno(), "blocking": s.sock.getblocking(),
                "inheritable": os.get_inheritable(s.fd)}
        if spec.get("accept"):
            assert select.select([s.sock], [], [], 5)[0], "no pending connection"
            conn, _ = s.sock.accept()
            with conn:
                conn.setblocking(True)
                conn.sendall(s.name.encode())
            item["accepted"] = True
        out["sockets"].append(item)
    unix, inet = split_by_kind([s.sock for s in found])
    out["unix"] = [s.fileno() for s in unix]
    out["inet"] = [s.fileno() for s in inet]
    print(json.dumps(out))
    """
)


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    fds = spec["fds"]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        pass_fds=fds,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listening Unix socket and a listening TCP socket on 127.0.0.1, as a socket unit makes them."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with unix, tcp:
        unix.bind(str(tmp_path / "api.sock"))
        unix.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        yield unix, tcp


def test_inherited_sockets_are_found_at_fd_3_and_up_and_accept(
    listeners: tuple[socket.socket, socket.socket],
) -> None:
    unix, tcp = listeners
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c_unix,
        socket.create_connection(tcp.getsockname(), timeout=5) as c_tcp,
    ):
        # Both connections wait in the listeners' backlogs until the child accepts them.
        c_unix.settimeout(5)
        c_unix.connect(unix.getsockname())
        result = _run_child(
            {
                "fds": [unix.fileno(), tcp.fileno()],
                "env": {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix:http"},
                "accept": True,
            }
        )
        # The child answered each connection with the name it gave the socket that accepted it.
        assert c_unix.recv(100) == b"unix"
        assert c_tcp.recv(100) == b"http"

    assert "error" not in result, result
    assert result["sockets"] == [
        {"fd": 3, "name": "unix", "family": "AF_UNIX", "sock_fd": 3, "blocking": False, "inheritable": False,
         "accepted": True},
        {"fd": 4, "name": "http", "family": "AF_INET", "sock_fd": 4, "blocking": False, "inheritable": False,
         "accepted": True},
    ]  # fmt: skip
    assert result["unix"] == [3]
    assert result["inet"] == [4]


def test_inherited_sockets_default_name_is_unknown(listeners: tuple[socket.socket, socket.socket]) -> None:
    unix, tcp = listeners
    # Reversed order: the kind comes from the socket, not from its position.
    result = _run_child({"fds": [tcp.fileno(), unix.fileno()], "env": {"LISTEN_FDS": "2"}})
    assert [(s["fd"], s["name"], s["family"]) for s in result["sockets"]] == [
        (3, "unknown", "AF_INET"),
        (4, "unknown", "AF_UNIX"),
    ]
    assert result["unix"] == [4]
    assert result["inet"] == [3]


def test_inherited_fd_that_is_not_a_socket_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("x")
    with path.open() as f:
        result = _run_child({"fds": [f.fileno()], "env": {"LISTEN_FDS": "1"}})
    assert "fd 3" in result["error"]
    assert "not a socket" in result["error"]


def test_announced_fd_that_is_not_open_is_a_config_error(listeners: tuple[socket.socket, socket.socket]) -> None:
    unix, _ = listeners
    result = _run_child({"fds": [unix.fileno()], "env": {"LISTEN_FDS": "2"}})
    assert "fd 4 is not open" in result["error"]


def test_listen_pid_of_another_process_means_no_sockets() -> None:
    # Returns before touching any fd: pytest's own fds 3 and 4 are safe.
    assert inherited_sockets({"LISTEN_PID": str(os.getppid()), "LISTEN_FDS": "2"}) == []
    assert inherited_sockets({}) == []
    assert inherited_sockets({"LISTEN_FDS": "2"}) == []


@pytest.mark.parametrize("raw", ["two", "0", "-1", "", "1.5"])
def test_garbage_listen_fds_is_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        inherited_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": raw})


def test_garbage_listen_pid_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LISTEN_PID"):
        inherited_sockets({"LISTEN_PID": "me", "LISTEN_FDS": "1"})


def test_listen_fdnames_count_must_match() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDNAMES"):
        inherited_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix:http:extra"})


def test_config_error_maps_to_its_wire_code() -> None:
    assert ConfigError.code == "config_error"
    assert ConfigError.status == 500


def test_split_by_kind_keeps_order_and_families(tmp_path: Path) -> None:
    socks = [
        socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
    ]
    try:
        socks[0].bind(("127.0.0.1", 0))
        socks[1].bind(str(tmp_path / "a.sock"))
        socks[2].bind(("::1", 0))
        socks[3].bind(str(tmp_path / "b.sock"))
        for s in socks:
            s.listen()
        unix, inet = split_by_kind(socks)
        assert unix == [socks[1], socks[3]]
        assert inet == [socks[0], socks[2]]
        # The dataclass carries the same socket, for callers that start from inherited_sockets().
        item = InheritedSocket(fd=socks[1].fileno(), name="unix", family=socks[1].family, sock=socks[1])
        assert split_by_kind([item.sock]) == ([socks[1]], [])
    finally:
        for s in socks:
            s.close()


def test_split_by_kind_rejects_datagram_and_non_listening_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(ConfigError, match="stream"):
        split_by_kind([udp])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(ConfigError, match="Accept=no"):
        split_by_kind([tcp])


# -- unit files and example config ---------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def read_unit(path: Path) -> Unit:
    """systemd's INI dialect: repeated keys accumulate (Environment=, ListenStream=), so keep all."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{lineno}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}:{lineno}: setting outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{lineno}: not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= is set {len(found)} times: {found}"
    return found[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    return float(value)


@pytest.fixture(scope="module")
def service() -> Unit:
    return read_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return read_unit(SOCKET_UNIT)


@pytest.fixture(scope="module")
def example_config() -> dict[str, Any]:
    with EXAMPLE_CONFIG.open("rb") as f:
        return tomllib.load(f)


def test_service_lifecycle_settings(service: Unit, example_config: dict[str, Any]) -> None:
    assert set(service) == {"Unit", "Service", "Install"}
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "main"
    assert one(service, "Service", "ExecStart") == (
        "/usr/local/bin/claudepool serve --config /etc/claudepool/claudepool.toml"
    )
    assert one(service, "Service", "KillMode") == "mixed"
    assert one(service, "Service", "KillSignal") == "SIGTERM"
    assert one(service, "Service", "OOMPolicy") == "continue"
    assert one(service, "Service", "Restart") == "on-failure"
    timeout_stop_s = seconds(one(service, "Service", "TimeoutStopSec"))
    assert timeout_stop_s >= 45
    # systemd must not SIGKILL the daemon while it is still inside its own drain deadline.
    assert timeout_stop_s >= example_config["server"]["drain_timeout_s"] + 15
    assert seconds(one(service, "Service", "WatchdogSec")) > 0
    assert one(service, "Install", "WantedBy") == "multi-user.target"


def test_service_memory_and_directories(service: Unit) -> None:
    assert one(service, "Service", "MemoryMax")
    assert one(service, "Service", "MemoryHigh")
    assert one(service, "Service", "User") == "claudepool"
    assert one(service, "Service", "Group") == "claudepool"
    assert one(service, "Service", "RuntimeDirectory") == "claudepool"
    assert one(service, "Service", "RuntimeDirectoryMode") == "0750"
    state = one(service, "Service", "StateDirectory")
    assert state == "claudepool"
    assert one(service, "Service", "StateDirectoryMode") == "0700"
    state_dir = f"/var/lib/{state}"
    assert one(service, "Service", "WorkingDirectory") == state_dir
    env = dict(v.partition("=")[::2] for v in values(service, "Service", "Environment"))
    # With ProtectSystem=strict and ProtectHome=yes, only the state directory is writable.
    assert env["HOME"].startswith(state_dir + "/")
    assert env["CLAUDEPOOL_POOL__WORKDIR"].startswith(state_dir + "/")


def test_service_hardening_keeps_the_jit_working(service: Unit) -> None:
    all_keys = {k for settings in service.values() for k, _ in settings}
    # Node/Bun JIT-compile: W^X enforcement kills the CLI at start.
    assert "MemoryDenyWriteExecute" not in all_keys
    for key in (
        "NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
        "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
    ):  # fmt: skip
        assert one(service, "Service", key) == "yes", key
    # What the bubblewrap sandbox of a tool-using worker creates, and nothing else (no cgroup, time).
    assert set(one(service, "Service", "RestrictNamespaces").split()) == {"user", "mnt", "pid", "net", "ipc", "uts"}
    assert one(service, "Service", "ProtectSystem") == "strict"
    assert one(service, "Service", "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one(service, "Service", "SystemCallArchitectures") == "native"
    assert one(service, "Service", "CapabilityBoundingSet") == ""
    assert one(service, "Service", "DevicePolicy") == "closed"
    assert one(service, "Service", "UMask") == "0007"


def test_socket_unit_matches_service_and_config(
    socket_unit: Unit, service: Unit, example_config: dict[str, Any]
) -> None:
    assert set(socket_unit) == {"Unit", "Socket", "Install"}
    unix_path, http = values(socket_unit, "Socket", "ListenStream")
    assert unix_path == "/run/claudepool/claudepool.sock"
    assert http == "127.0.0.1:8787"
    # The socket lives in the service's RuntimeDirectory, and the example config names the same ones.
    assert unix_path.startswith(f"/run/{one(service, 'Service', 'RuntimeDirectory')}/")
    assert example_config["server"]["socket"] == unix_path
    assert example_config["server"]["http"] == http
    assert one(socket_unit, "Socket", "FileDescriptorName") == "claudepool"
    assert one(socket_unit, "Socket", "Accept") == "no"
    assert one(socket_unit, "Socket", "SocketMode") == "0660"
    assert one(socket_unit, "Socket", "SocketUser") == "claudepool"
    assert one(socket_unit, "Socket", "SocketGroup") == "claudepool"
    assert one(socket_unit, "Install", "WantedBy") == "sockets.target"


def test_example_config_has_every_documented_key(example_config: dict[str, Any]) -> None:
    server = example_config["server"]
    assert set(server) == {"socket", "http", "admin_key", "drain_timeout_s"}
    assert server["admin_key"] == "sha256:" + hashlib.sha256(b"change-me").hexdigest()
    assert server["drain_timeout_s"] == 30
    pool = example_config["pool"]
    assert pool == {
        "claude_bin": "/usr/local/lib/claudepool/node_modules/.bin/claude",
        "min_idle": 2,
        "max_workers": 0,
    }  # the API key is not in the file: `env` is only a comment
    assert example_config["profiles"] == {"default": {"args": []}}
    acme = example_config["tenants"]["acme"]
    assert set(acme) == {"key", "profile", "profiles"}
    prefix, _, digest = acme["key"].partition(":")
    assert prefix == "sha256"
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    # The daemon refuses a tenant key equal to the admin key.
    assert acme["key"] != server["admin_key"]
    assert acme["profile"] == "default"
    assert acme["profiles"] == ["default"]
    assert acme["profile"] in example_config["profiles"]


def test_example_config_loads_with_the_units_environment(service: Unit, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon accepts the example as the unit runs it: the file plus the unit's Environment= lines."""
    from claudepool.config import load_settings

    for name in list(os.environ):
        if name.startswith("CLAUDEPOOL_"):
            monkeypatch.delenv(name)
    for assignment in values(service, "Service", "Environment"):
        name, _, value = assignment.partition("=")
        monkeypatch.setenv(name, value)
    settings = load_settings(EXAMPLE_CONFIG)
    assert settings.server.socket == "/run/claudepool/claudepool.sock"
    assert settings.server.drain_timeout_s == 30
    assert settings.pool.workdir == Path("/var/lib/claudepool/workers")
    assert settings.pool.max_workers == 0
    assert settings.profile("default").claude_bin == "/usr/local/lib/claudepool/node_modules/.bin/claude"
    assert settings.tenants["acme"].allowed_profiles() == {"default"}
    # READY=1 waits for warm pools: systemd must not time the start out before the daemon gives up.
    assert seconds(one(service, "Service", "TimeoutStartSec")) > settings.server.ready_timeout_s
    assert seconds(one(service, "Service", "TimeoutStopSec")) > settings.server.drain_timeout_s


def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # .ci/run installs it (Debian package systemd): a skip would hide a bad unit
        pytest.fail("systemd-analyze is not installed: run .ci/run, or install the systemd package")
    # verify checks that ExecStart= is executable: point it at a stub, keep everything else.
    stub = tmp_path / "claudepool"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = SERVICE.read_text()
    exec_start = "ExecStart=/usr/local/bin/claudepool "
    assert exec_start in text
    (tmp_path / SERVICE.name).write_text(text.replace(exec_start, f"ExecStart={stub} "))
    shutil.copy(SOCKET_UNIT, tmp_path / SOCKET_UNIT.name)

    proc = subprocess.run(
        [analyze, "verify", f"./{SERVICE.name}", f"./{SOCKET_UNIT.name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    print(f"systemd-analyze verify: rc={proc.returncode}\n{output}")
    # verify only warns (rc 0) about unknown or unparsable settings: look for those ourselves.
    bad = [
        line
        for line in output.splitlines()
        if any(
            marker in line
            for marker in ("Unknown key", "Unknown section", "Invalid", "Failed to parse", "ignoring", "deprecated")
        )
    ]
    assert bad == []
    environment_only = ("Failed to connect to bus", "container", "Failed to initialize manager")
    if proc.returncode != 0:
        assert any(reason in output for reason in environment_only), output
