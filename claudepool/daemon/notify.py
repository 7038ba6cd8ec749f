"""Tell systemd how the service is doing (``sd_notify``), without linking libsystemd.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``: a filesystem path, or an abstract socket when the name starts with ``@``. With
``Type=notify`` the unit is "starting" until ``READY=1`` arrives, "deactivating" after
``STOPPING=1``, and with ``WatchdogSec=`` systemd kills the service unless ``WATCHDOG=1`` arrives
at least once per ``$WATCHDOG_USEC``.

Notification is best effort and never raises on I/O: a lost datagram costs a status line, while an
exception would take the daemon down. The socket is non-blocking, so a stalled systemd cannot
stall the event loop either.

Read the environment once at startup, then scrub it so that no child inherits systemd's variables
(a worker that inherited ``NOTIFY_SOCKET`` could report the service ready or stopping):

>>> notifier = Notifier()                       # doctest: +SKIP
>>> unset_environment(os.environ)               # doctest: +SKIP
>>> watchdog = asyncio.create_task(notifier.run_watchdog())   # doctest: +SKIP
>>> notifier.ready()                            # doctest: +SKIP
>>> notifier.status("serving: 4 idle, 0 busy")  # doctest: +SKIP
>>> notifier.stopping(); watchdog.cancel(); notifier.close()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# Everything systemd hands the main process for notification and socket activation.
SERVICE_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def unset_environment(env: MutableMapping[str, str]) -> None:
    """Remove systemd's notification and socket-activation variables from ``env`` (e.g. os.environ).

    Call it after `Notifier` and `inherited_sockets` have read them: later children must not see
    them. Workers already start from a scrubbed environment; this covers every other subprocess.
    """
    for name in SERVICE_ENV_VARS:
        env.pop(name, None)


class Notifier:
    """Sends ``sd_notify`` datagrams; a silent no-op when not run by systemd (no ``$NOTIFY_SOCKET``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _parse_watchdog_usec(env)
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                # Python sockets are close-on-exec already: workers never inherit this one.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("sd_notify disabled: cannot create a socket: %s", exc)

    @property
    def enabled(self) -> bool:
        """True while datagrams are sent: under systemd, and not closed."""
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, as systemd advises; None if disabled.

        The watchdog needs the notify socket, so a closed or disabled notifier has no interval.
        """
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (each ``KEY=VALUE``) as one datagram. I/O errors are logged and swallowed.

        A field without ``=`` or with a newline is a caller bug and raises ValueError, sent or not.
        """
        for field in fields:
            if "=" not in field or "\n" in field:
                raise ValueError(f"sd_notify field must be one KEY=VALUE line, got {field!r}")
        if self._sock is None or self._address is None or not fields:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # Missing socket, full queue (EAGAIN), permission: none of them may stop the daemon.
            log.debug("sd_notify %s failed: %s", fields, exc)

    def ready(self) -> None:
        """The service is up: systemd starts the units ordered after it."""
        self.notify("READY=1")

    def stopping(self) -> None:
        """The service began its shutdown; systemd shows it as deactivating."""
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """One line shown by ``systemctl status``; newlines are flattened to keep the datagram valid."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Prove liveness once; `run_watchdog` does it on schedule."""
        self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every `watchdog_interval_s` until cancelled; returns at once if disabled.

        Run it as a task on the daemon's event loop: the pings then prove that the loop still turns,
        and a loop blocked for longer than ``WatchdogSec`` gets the service restarted.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """Close the socket; later notifications are no-ops. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        address = None if self._address is None else self._address.replace("\0", "@", 1)
        return f"<Notifier socket={address!r} enabled={self.enabled} watchdog_interval_s={self.watchdog_interval_s}>"


def _parse_address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: Python takes a name with a leading NUL.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # libsystemd also rejects relative paths; newer systemd may offer vsock:, which we do not speak.
    log.warning("sd_notify disabled: unsupported NOTIFY_SOCKET %r", raw)
    return None


def _parse_watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw_usec = env.get("WATCHDOG_USEC")
    if raw_usec is None:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("watchdog disabled: WATCHDOG_USEC=%r is not an integer", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process systemd watches; when it is not us (a child that inherited the
    # variables), our pings would not count, and must not be sent on its behalf.
    if raw_pid is not None and raw_pid.strip() != str(os.getpid()):
        return None
    return usec
