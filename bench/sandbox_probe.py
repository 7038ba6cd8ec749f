"""The isolation probes of `bench.sandbox_eval`, run inside a sandbox by the system's python3.

Standard library only (the sandbox has /usr, not the project's venv). It takes one JSON argument
(what to try: paths, ports, pids, the gateway's addresses) and prints one JSON object: for each
probe, ``"reached: …"`` when the sandboxed process got at the thing, else ``"blocked: …"`` with why.
Writes are only attempted here; `bench.sandbox_eval` checks on the host whether they landed.

    /usr/bin/python3 sandbox_probe.py '{"read": {"shadow": "/etc/shadow"}, ...}'
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import urllib.request
from typing import Any

CLONE_NEWUSER = 0x10000000


def read(path: str, marker: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as exc:
        return f"blocked: {exc.strerror}"
    if marker and marker.encode() not in data:
        return f"blocked: read {len(data)} bytes without the marker"
    return f"reached: {len(data)} bytes"


def tcp(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            return f"reached: {s.recv(64).decode(errors='replace').strip()}"
    except OSError as exc:
        return f"blocked: {exc.strerror or exc}"


def write(path: str) -> str:
    try:
        with open(path, "w") as f:
            f.write("written from the sandbox\n")
    except OSError as exc:
        return f"blocked: {exc.strerror}"
    return "written (the host checks where it landed)"


def http(attempt: dict[str, Any]) -> str:
    """GET the gateway: over a Unix socket directly, or a URL (through a proxy when named)."""
    try:
        if "unix" in attempt:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect(attempt["unix"])
                s.sendall(b"GET / HTTP/1.0\r\nHost: gateway\r\n\r\n")
                body = s.recv(4096).decode(errors="replace")
        else:
            proxy = os.environ.get(attempt["proxy_env"], "") if "proxy_env" in attempt else ""
            if proxy:  # srt's NO_PROXY lists 127.0.0.1: a client honouring it goes straight at a
                # network namespace with nothing in it (urllib does, even with an explicit proxy)
                for var in ("NO_PROXY", "no_proxy"):
                    os.environ.pop(var, None)
            handler = urllib.request.ProxyHandler({"http": proxy} if proxy else {})
            with urllib.request.build_opener(handler).open(attempt["url"], timeout=5) as resp:
                body = resp.read(4096).decode(errors="replace")
    except OSError as exc:
        return f"blocked: {getattr(exc, 'strerror', None) or exc}"
    return f"reached: {body.strip().splitlines()[-1][:80]}" if body.strip() else "blocked: empty answer"


def status_fields() -> dict[str, str]:
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f if ":" in line)
        fields = {k: v.strip() for k, v in pairs}
    return {k: fields.get(k, "?") for k in ("Uid", "CapEff", "NoNewPrivs", "Seccomp")}


def fs_size(path: str) -> str:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return f"absent: {exc.strerror}"
    writable = os.access(path, os.W_OK)
    return f"{st.f_blocks * st.f_frsize / 2**30:.1f} GiB, {'writable' if writable else 'read-only'}"


def nested_userns() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if os.fork() == 0:  # unshare in a child: this process stays as it was
        os._exit(0 if libc.unshare(CLONE_NEWUSER) == 0 else ctypes.get_errno())
    _, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    return "reached: created a user namespace" if code == 0 else f"blocked: {os.strerror(code)}"


def main() -> None:
    spec = json.loads(sys.argv[1])
    out: dict[str, str] = {}
    for name, var in spec.get("env", {}).items():
        out[name] = "reached: in the environment" if var in os.environ else "blocked: not in the environment"
    for name, (path, marker) in spec.get("read", {}).items():
        out[name] = read(path, marker)
    try:
        with open("/proc/1/cmdline", "rb") as f:
            pid1 = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError as exc:
        pid1 = f"unreadable: {exc.strerror}"
    out["proc1"] = ("reached: " if pid1 == spec["host_pid1"] else "blocked: its own init, ") + os.path.basename(pid1)
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    out["processes"] = (f"{'reached' if str(spec['victim_pid']) in pids else 'blocked'}: "
                        f"{len(pids)} processes visible")
    for name, port in spec.get("tcp", {}).items():
        out[name] = tcp(port)
    for name, path in spec.get("write", {}).items():
        out[name] = write(path)
    for name, attempt in spec.get("gateway", {}).items():
        out[name] = http(attempt)
    for name, paths in spec.get("read_any", {}).items():
        readable = [p for p in paths if read(p, "").startswith("reached")]
        out[name] = f"reached: {' '.join(readable)}" if readable else f"blocked: none of {len(paths)}"
    out["status"] = " ".join(f"{k}={v.split()[0]}" for k, v in status_fields().items())
    out["tmp"] = fs_size("/tmp")
    out["dev_shm"] = fs_size("/dev/shm")
    out["userns"] = nested_userns()
    out["session"] = f"sid {os.getsid(0)}, pid {os.getpid()}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
