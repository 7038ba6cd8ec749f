"""The `claudepool` command.

    claudepool check [--claude PATH]    start one worker, reset it, report timings and memory
    claudepool version
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from claudepool import __version__
from claudepool.errors import ClaudepoolError
from claudepool.pool.memory import MiB
from claudepool.pool.profile import Profile
from claudepool.pool.worker import Worker


async def _check(claude_bin: str) -> int:
    """Prove the installed CLI speaks the protocol the pool relies on. Needs no upstream: the
    handshake and ``/clear`` make no model call."""
    with tempfile.TemporaryDirectory(prefix="claudepool-check-") as tmp:
        worker = Worker(Profile(name="check", claude_bin=claude_bin), workdir_root=Path(tmp))
        t0 = time.perf_counter()
        try:
            await worker.start()
            ready_ms = (time.perf_counter() - t0) * 1000
            worker.dirty = True  # force a real /clear round trip
            t1 = time.perf_counter()
            await worker.reset()
            reset_ms = (time.perf_counter() - t1) * 1000
            pss = worker.measure_memory()
        except ClaudepoolError as exc:
            print(f"check failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await worker.close()
    print(f"ok: {claude_bin} is ready in {ready_ms:.0f} ms, resets in {reset_ms:.0f} ms, "
          f"PSS {pss / MiB if pss else 0:.0f} MiB")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="claudepool", description="A multi-tenant pool of warm Claude Code CLIs.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="start one worker and reset it, to validate the installed CLI")
    check.add_argument("--claude", default="claude", help="path of the claude binary (default: claude on PATH)")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return
    sys.exit(asyncio.run(_check(args.claude)))
