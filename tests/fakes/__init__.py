"""The fakes tests and benchmarks drive: the fake CLI (`fake_claude.py`), an MCP server, a pool host."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def fake_claude_executable() -> Path:
    """The fake CLI, as an executable whose shebang names this interpreter.

    Through its own ``#!/usr/bin/env python3`` every spawn starts whatever ``python3`` PATH finds
    first; behind a version manager's shim (a shell script) that costs ~0.1 CPU-s per spawn instead
    of ~0.035, and the suite spawns the fake well over a thousand times. Only the first line changes,
    so tracebacks keep the source's line numbers. The benchmarks spawn it by the hundred too."""
    source = Path(__file__).resolve().parent / "fake_claude.py"
    shebang = f"#!{sys.executable}"
    if len(shebang) > 120 or any(c.isspace() for c in sys.executable):
        return source  # the kernel would truncate or split it: keep the portable shebang
    body = shebang + "\n" + source.read_text().split("\n", 1)[1]
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"claudepool-tests-{os.getuid()}" / f"fake_claude-{digest}"
    if not target.exists():
        target.parent.mkdir(mode=0o700, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}")  # xdist workers write it at once
        partial.write_text(body)
        partial.chmod(0o755)
        os.replace(partial, target)
    return target
