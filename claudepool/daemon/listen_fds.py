"""Socket activation: take over the listening sockets systemd opened for us (``sd_listen_fds``).

With ``claudepool.socket`` enabled, systemd binds the Unix socket and the HTTP port itself, so it
can accept connections while the daemon (re)starts and the daemon needs no right to create them.
It passes them as fds 3, 4, … and describes them in the environment:

  LISTEN_PID      the pid they are meant for; anyone else (a child that inherited the variables)
                  must ignore them
  LISTEN_FDS      how many fds, starting at ``SD_LISTEN_FDS_START`` = 3
  LISTEN_FDNAMES  colon-separated names from ``FileDescriptorName=`` ("unknown" when unset)

A socket unit gives one ``FileDescriptorName=`` to all its sockets, so the daemon tells the front
ends apart by address family (`split_by_kind`): AF_UNIX → the Unix API, AF_INET/AF_INET6 → HTTP.

>>> unix, tcp = split_by_kind([s.sock for s in inherited_sockets()])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from claudepool.errors import ConfigError

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class InheritedSocket:
    """One socket passed by systemd; ``family`` is an ``socket.AF_*`` value."""

    fd: int
    name: str
    family: int
    sock: socket.socket


def inherited_sockets(env: Mapping[str, str] | None = None) -> list[InheritedSocket]:
    """The sockets systemd passed to this process, in order; [] when not socket-activated.

    Raises ConfigError when the variables are malformed or an announced fd is not a socket: a
    unit that passes sockets we cannot use must fail loudly, not serve nothing. The sockets are
    made non-blocking (for asyncio) and close-on-exec (workers must not hold them open).
    """
    env = os.environ if env is None else env
    raw_pid, raw_count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if raw_pid is None or raw_count is None:
        return []
    pid = _positive_int(raw_pid)
    if pid is None:
        raise ConfigError(f"LISTEN_PID={raw_pid!r} is not a process id")
    if pid != os.getpid():
        return []  # meant for our parent: we inherited the environment, not the sockets
    count = _positive_int(raw_count)
    if count is None:
        raise ConfigError(f"LISTEN_FDS={raw_count!r} is not a positive integer")
    raw_names = env.get("LISTEN_FDNAMES")
    names = raw_names.split(":") if raw_names else ["unknown"] * count
    if len(names) != count:
        raise ConfigError(f"LISTEN_FDNAMES={raw_names!r} names {len(names)} sockets but LISTEN_FDS={count}")

    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    # Check every fd before wrapping any, so a failure leaves no half-built socket objects behind.
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ConfigError(f"LISTEN_FDS={count} but fd {fd} is not open: {exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"fd {fd} passed by systemd (LISTEN_FDS={count}) is not a socket")

    result = []
    for fd, name in zip(fds, names, strict=True):
        sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
        sock.setblocking(False)
        # systemd passes the fds inheritable; a worker holding a copy would keep the port open.
        sock.set_inheritable(False)
        result.append(InheritedSocket(fd=fd, name=name, family=sock.family, sock=sock))
    return result


def is_unix_stream(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM


def is_inet_stream(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def split_by_kind(sockets: Iterable[socket.socket]) -> tuple[list[socket.socket], list[socket.socket]]:
    """(Unix stream sockets for the Unix API, TCP sockets for HTTP), each in the given order.

    Raises ConfigError for any other socket (datagram, netlink, …) or one that is not listening
    (a unit with ``Accept=yes`` passes connections): ignoring it would leave a dead endpoint.
    """
    unix: list[socket.socket] = []
    inet: list[socket.socket] = []
    for sock in sockets:
        if is_unix_stream(sock):
            target = unix
        elif is_inet_stream(sock):
            target = inet
        else:
            raise ConfigError(
                f"inherited socket fd {sock.fileno()} is {_kind(sock)}; "
                "claudepool serves only AF_UNIX and AF_INET/AF_INET6 stream sockets"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"inherited socket fd {sock.fileno()} is not listening; the socket unit needs Accept=no")
        target.append(sock)
    return unix, inet


def _positive_int(raw: str) -> int | None:
    try:
        value = int(raw, 10)
    except ValueError:
        return None
    return value if value > 0 else None


def _kind(sock: socket.socket) -> str:
    # Families and types unknown to the socket module come back as plain ints.
    family, kind = sock.family, sock.type
    return f"{getattr(family, 'name', family)}/{getattr(kind, 'name', kind)}"
