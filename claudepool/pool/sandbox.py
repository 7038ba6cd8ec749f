"""The OS sandbox of a tool-using worker: bubblewrap, with the gateway as its only way out.

A profile with tools runs each worker as ``bwrap … -- sh -c 'socat … & exec claude …'``:

* **Namespaces**: its own user (the worker runs as uid/gid 1000 inside, with no capability over the
  host: read-only binds cannot be remounted writable, which root inside a mount namespace could
  do), PID (it sees its own processes only; /proc is that namespace's), network (loopback only),
  IPC and UTS namespaces. ``--die-with-parent``: the sandbox goes when the daemon does.
* **Files**: the system read-only (/usr and its /bin, /lib links; of /etc only `ETC_ALLOWED`, what
  programs need to run, with a passwd, group and hosts of the sandbox's own: no host account, key,
  service configuration or the daemon's config), the CLI's install directory read-only, the worker's
  private directory (HOME, TMPDIR, cwd) read-write at its host path, fresh /proc, a read-only /dev,
  and /tmp and /dev/shm as tmpfs of `TMPFS_BYTES` each (memory: unsized, a tool could fill RAM).
  Nothing else of the host: no other worker's directory, no sessions directory, no /root or /home,
  no daemon state or runtime directory.
* **Processes**: ``--new-session`` (no terminal to inject keystrokes into), ``--disable-userns`` (no
  nested user namespace from which to regain capabilities), and the bounds of `claudepool.pool.cgroups`.
* **Network**: none but the gateway. The gateway listens on a Unix socket of this worker's own
  (attribution by socket), bind-mounted at `GATEWAY_SOCKET`; socat inside relays a loopback port
  of the sandbox's own network namespace to it, and the worker's ``ANTHROPIC_BASE_URL`` names that
  port (what the CLI's own sandbox does). The host's loopback services are out of reach.

bubblewrap is the mechanism (Debian ``bubblewrap``; the CLI's own Bash sandbox uses it too);
`probe` checks once that it exists and can create these namespaces, else a sandboxed profile
refuses to start (no fallback to an unsandboxed worker).

>>> layout = Layout(worker_dir=Path("/w/d"), cli_root=Path("/opt/cli"), gateway_socket=Path("/w/d.sock"))
>>> argv = wrap(["claude", "-p"], layout, bwrap="/usr/bin/bwrap", socat="/usr/bin/socat", etc=Path("/e"))
>>> argv[:2], "--unshare-net" in argv, argv[-2:]
(['/usr/bin/bwrap', '--die-with-parent'], True, ['claude', '-p'])
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
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
SANDBOX_USER = "claude"
# /tmp and /dev/shm are memory: each a tmpfs of this size at most (TMPDIR is on the worker's disk).
TMPFS_BYTES = 64 * 1024 * 1024
# What of the host's /etc a sandbox sees: the dynamic loader's, the shell's, locale, time, TLS
# certificates, MIME and file-type data, the alternatives links. An allow-list, not a deny-list: a
# file this list does not name (a service's secrets, /etc/shadow, the daemon's config) is not there.
ETC_ALLOWED = ("alternatives", "bash.bashrc", "ca-certificates", "ca-certificates.conf", "debian_version",
               "environment", "gai.conf", "host.conf", "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
               "locale.alias", "localtime", "magic", "magic.mime", "mime.types", "nsswitch.conf", "os-release",
               "perl", "profile", "protocols", "python3", "services", "shells", "ssl/certs", "ssl/openssl.cnf",
               "terminfo", "timezone")
# Written by `etc_dir` and bound over the host's: the sandbox's one user, and no host names.
ETC_OWN = {
    "passwd": f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:claudepool worker:/nonexistent:/bin/sh\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "group": f"{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
}

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
    read_only: tuple[Path, ...] = ()  # more host paths bound read-only at the same path (an MCP server's)


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


def wrap(argv: Sequence[str], layout: Layout, *, bwrap: str, socat: str, etc: Path) -> list[str]:
    """``argv`` run inside the sandbox (see the module's docstring); ``etc``: the directory `etc_dir`
    wrote the sandbox's own /etc files in."""
    out = [bwrap, "--die-with-parent", "--new-session", "--unshare-user", "--disable-userns",
           "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
           "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--cap-drop", "ALL",
           "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        out += _system_path(Path("/") / link)
    for name in ETC_ALLOWED:
        out += _system_path(Path("/etc") / name)
    for name in ETC_OWN:
        out += ["--ro-bind", str(etc / name), f"/etc/{name}"]
    # /tmp first: the worker's directory may lie below the host's /tmp, and is bound into this one.
    out += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/dev/shm", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
            "--ro-bind", str(layout.cli_root), str(layout.cli_root),
            *(arg for path in layout.read_only for arg in ("--ro-bind", str(path), str(path))),
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


def _system_path(path: Path) -> list[str]:
    """The bubblewrap arguments that show a host path read-only: a link as the same link."""
    if path.is_symlink():
        return ["--symlink", os.readlink(path), str(path)]
    if path.exists():
        return ["--ro-bind", str(path), str(path)]
    return []


@functools.cache
def etc_dir() -> Path:
    """A directory, made once per daemon, holding `ETC_OWN`'s files (read-only for the sandboxes:
    outside every worker's directory, so no tenant changes what the next one finds)."""
    directory = Path(tempfile.mkdtemp(prefix="claudepool-etc-"))
    for name, text in ETC_OWN.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o444)
    directory.chmod(0o755)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


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
        done = subprocess.run([bwrap, "--die-with-parent", "--new-session", "--unshare-user", "--disable-userns",
                               "--unshare-pid", "--unshare-net",
                               "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap cannot run: {exc}") from None
    if done.returncode != 0:
        raise SandboxUnavailable("bubblewrap cannot create user, pid and network namespaces here: "
                                 + done.stderr.decode(errors="replace").strip()[:300])
    return bwrap, socat
