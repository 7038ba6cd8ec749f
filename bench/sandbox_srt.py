"""Anthropic's sandbox runtime (``srt``, npm ``@anthropic-ai/sandbox-runtime``) for `bench.sandbox_eval`.

Installed on demand into ``.cache/sandbox-runtime`` (not a CI dependency: only this bench uses it).
`settings` is the tightest configuration it offers for a worker: nothing readable but the system
(/usr, /etc less its secrets), the CLI's install and the worker's own directory; nothing writable
but that directory; no domain allowed (the gateway's loopback port alone when asked); Unix sockets
blocked by its seccomp filter unless asked; and a named environment variable withheld.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from bench.pool_bench import REPO

PACKAGE = "@anthropic-ai/sandbox-runtime"
CACHE = REPO / ".cache" / "sandbox-runtime"


def install() -> Path:
    """The ``srt`` executable, installed with npm into `CACHE` the first time."""
    srt = CACHE / "node_modules" / ".bin" / "srt"
    if not srt.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), PACKAGE],
                       check=True, capture_output=True)
    if shutil.which("rg") is None:  # srt refuses to start without it (it scans for files to protect)
        raise SystemExit("srt needs ripgrep on Linux: apt-get install ripgrep")
    return srt


def version(srt: Path) -> str:
    return subprocess.run([str(srt), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def settings(*, readable: Iterable[Path], writable: Iterable[Path], masked: Iterable[str],
             withheld_env: Iterable[str] = (), gateway_port: int | None = None,
             unix_sockets: bool = False) -> bytes:
    """The settings file's JSON. ``readable``: carve-outs of the read-deny of ``/`` (the system's
    /usr and /etc are always among them); ``masked``: denied again inside those carve-outs."""
    return orjson.dumps({
        "network": {
            # An IP literal must be allow-listed for the proxy to dial a loopback address at all.
            "allowedDomains": [f"127.0.0.1:{gateway_port}"] if gateway_port is not None else [],
            "deniedDomains": [],
            "strictAllowlist": True,
            "allowLocalBinding": False,
            "allowAllUnixSockets": unix_sockets,
        },
        "filesystem": {
            "denyRead": ["/", *masked],
            # srt's own package too (its seccomp helper runs inside), and its proxy's bridge socket:
            # the read-deny of / mounts an empty /tmp over the one srt binds in, cutting the network
            # path. The glob is expanded at wrap time, so it also shows other live srt's sockets.
            "allowRead": ["/usr", "/etc", str(CACHE), "/tmp/claude-http-*.sock", *(str(p) for p in readable)],
            "allowWrite": [str(p) for p in writable],
            "denyWrite": [],
        },
        "credentials": {"envVars": [{"name": name, "mode": "deny"} for name in withheld_env]},
    }, option=orjson.OPT_INDENT_2)


def wrap(argv: Sequence[str], srt: Path, settings_file: Path) -> list[str]:
    """``argv`` run by srt with ``settings_file``."""
    return [str(srt), "--settings", str(settings_file), "--", *argv]
