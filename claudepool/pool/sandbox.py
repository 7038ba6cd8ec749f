"""The OS sandbox of a tool-using worker: bubblewrap, with the gateway as its only way out.

A profile with tools runs each worker as ``bwrap … -- sh -c 'socat … & exec claude …'``:

* **Namespaces**: its own user (the worker runs as uid/gid 1000 inside, with no capability over the
  host: read-only binds cannot be remounted writable, which root inside a mount namespace could
  do), PID (it sees its own processes only; /proc is that namespace's), network (loopback only),
  IPC and UTS namespaces. ``--die-with-parent``: the sandbox goes when the daemon does.
* **Files**: the system read-only (/usr, its /bin, /lib links, /etc with its secrets masked), the
  CLI's install directory read-only, the worker's private directory (HOME, TMPDIR, cwd) read-write
  at its host path, a fresh /dev, /proc and /tmp. Nothing else of the host: no other worker's
  directory, no sessions directory, no /root or /home, no daemon config, state or runtime directory.
* **Network**: none but the gateway. The gateway listens on a Unix socket of this worker's own
  (attribution by socket), bind-mounted at `GATEWAY_SOCKET`; socat inside relays a loopback port
  of the sandbox's own network namespace to it, and the worker's ``ANTHROPIC_BASE_URL`` names that
  port (what the CLI's own sandbox does). The host's loopback services are out of reach.

bubblewrap is the mechanism (Debian ``bubblewrap``; the CLI's own Bash sandbox uses it too);
`probe` checks once that it exists and can create these namespaces, else a sandboxed profile
refuses to start (no fallback to an unsandboxed worker).

>>> layout = Layout(worker_dir=Path("/w/d"), cli_root=Path("/opt/cli"), gateway_socket=Path("/w/d.sock"))
>>> argv = wrap(["claude", "-p"], layout, bwrap="/usr/bin/bwrap", socat="/usr/bin/socat", masked=())
>>> argv[:2], "--unshare-net" in argv, argv[-2:]
(['/usr/bin/bwrap', '--die-with-parent'], True, ['claude', '-p'])
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from claudepool.errors import ConfigError

# Where the worker's gateway socket appears inside, and the loopback port the relay listens on
# (inside the sandbox's own network namespace: no other process can take it).
GATEWAY_SOCKET = "/run/claudepool/gateway.sock"
RELAY_PORT = 8080
SANDBOX_UID = 1000
# The egress proxy's socket and its relay's port, when the profile allows outbound hosts
# (`claudepool.gateway.egress`); the worker's proxy variables name that port.
EGRESS_SOCKET = "/run/claudepool/egress.sock"
EGRESS_PORT = 3128
# Host files and directories under /etc a tool must not read (bound over with nothing).
MASKED_ETC = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssh", "/etc/ssl/private",
              "/etc/claudepool", "/etc/sudoers", "/etc/sudoers.d", "/etc/redis")


class SandboxUnavailable(ConfigError):
    """A sandboxed profile cannot start: bubblewrap (or socat) is missing, or cannot create the
    namespaces it needs."""

    code = "sandbox_unavailable"


@dataclass(frozen=True)
class Layout:
    """A worker's paths on the host, as its sandbox binds them."""

    worker_dir: Path  # holds home/, tmp/ and cwd/: bound read-write at the same path
    cli_root: Path  # the CLI's install directory: bound read-only at the same path
    gateway_socket: Path  # the gateway's socket for this worker: bound at GATEWAY_SOCKET
    egress_socket: Path | None = None  # its egress proxy socket, if it has one: bound at EGRESS_SOCKET


def proxy_env() -> dict[str, str]:
    """A worker's variables when it has an egress socket: every HTTP client through the relay to
    it, but the gateway's relay (127.0.0.1) directly."""
    proxy = f"http://127.0.0.1:{EGRESS_PORT}"
    return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def base_url() -> str:
    """What the sandboxed worker's ``ANTHROPIC_BASE_URL`` is: the relay inside its sandbox."""
    return f"http://127.0.0.1:{RELAY_PORT}"


def cli_binary(claude_bin: str) -> Path:
    """The CLI's executable itself, links resolved (npm's ``.bin/claude`` is a link out of the package)."""
    return Path(shutil.which(claude_bin) or claude_bin).resolve()


def cli_root(binary: Path) -> Path:
    """The directory to bind for the CLI: its package root when installed from npm (the binary is
    ``…/@anthropic-ai/claude-code/bin/claude.exe``), else the binary's own directory."""
    if binary.parent.name == "bin" and (binary.parent.parent / "package.json").exists():
        return binary.parent.parent
    return binary.parent


def wrap(argv: Sequence[str], layout: Layout, *, bwrap: str, socat: str, masked: Iterable[str]) -> list[str]:
    """``argv`` run inside the sandbox (see the module's docstring); ``masked``: host paths under a
    bound directory that are bound over with nothing."""
    out = [bwrap, "--die-with-parent", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
           "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = Path("/") / link
        if target.is_symlink():
            out += ["--symlink", os.readlink(target), str(target)]
        elif target.is_dir():
            out += ["--ro-bind", str(target), str(target)]
    out += ["--ro-bind", "/etc", "/etc"]
    for path in masked:
        out += ["--tmpfs", path] if Path(path).is_dir() else ["--ro-bind", "/dev/null", path]
    out += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--ro-bind", str(layout.cli_root), str(layout.cli_root),
            "--bind", str(layout.worker_dir), str(layout.worker_dir),
            "--bind", str(layout.gateway_socket), GATEWAY_SOCKET]
    relays = [(RELAY_PORT, GATEWAY_SOCKET)]
    if layout.egress_socket is not None:
        out += ["--bind", str(layout.egress_socket), EGRESS_SOCKET]
        relays.append((EGRESS_PORT, EGRESS_SOCKET))
    out += ["--chdir", str(layout.worker_dir / "cwd"),
            "--", "/bin/sh", "-c",
            # The relays in the background; the CLI replaces the shell (its pid, its stdin and stdout).
            "".join(f"{socat} TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{path} "
                    "</dev/null >/dev/null 2>&1 & " for port, path in relays) + 'exec "$@"', "sh", *argv]
    return out


def masked_paths(extra: Iterable[Path] = ()) -> tuple[str, ...]:
    """`MASKED_ETC` and ``extra`` (e.g. the daemon's config file when it is under /etc), those that exist."""
    paths = [*MASKED_ETC, *(str(p) for p in extra if str(p).startswith("/etc/"))]
    return tuple(dict.fromkeys(p for p in paths if os.path.lexists(p)))


@functools.cache
def probe() -> tuple[str, str]:
    """The paths of bwrap and socat, once they have been seen to create the sandbox's namespaces;
    `SandboxUnavailable` with what is missing otherwise."""
    bwrap, socat = shutil.which("bwrap"), shutil.which("socat")
    missing = [name for name, path in (("bubblewrap (bwrap)", bwrap), ("socat", socat)) if path is None]
    if missing:
        raise SandboxUnavailable(f"a profile with tools runs its workers in a sandbox, and {' and '.join(missing)} "
                                 "is not installed (Debian: apt-get install bubblewrap socat); "
                                 "set profiles.NAME.sandbox = false to run it unsandboxed, knowingly")
    assert bwrap is not None and socat is not None
    try:
        done = subprocess.run([bwrap, "--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-net",
                               "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap cannot run: {exc}") from None
    if done.returncode != 0:
        raise SandboxUnavailable("bubblewrap cannot create user, pid and network namespaces here: "
                                 + done.stderr.decode(errors="replace").strip()[:300])
    return bwrap, socat
