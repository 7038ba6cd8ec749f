"""The shape every section of the benchmark suite shares, and what the runner writes.

A section is a module of ``bench/`` with ``NAME`` and ``async def run(opts: Options) -> Report``
(and, if it draws, ``def plot(report: Report, out_dir: Path) -> list[Path]``). The runner
(`bench/__main__.py`) runs the sections one after another, never two at once (they measure CPU on
the same cores), and writes ``bench/results/<name>.json``, ``bench/results/SUMMARY.md`` and the
sections' PNG plots.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Options:
    """What every section is given. ``quick``: the smoke-test sizes (the whole suite under 3 min)."""

    quick: bool
    claude: str  # the real CLI
    repeats: int  # how many times a measurement is repeated (medians are reported)
    out_dir: Path = RESULTS


@dataclass
class Report:
    """One section's outcome: ``data`` goes to its JSON file, ``markdown`` into the summary,
    ``checks`` are the issue's goals as (name, met, measured) rows."""

    name: str
    data: dict[str, Any]
    markdown: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)


def machine() -> dict[str, Any]:
    """What a reader needs to reproduce a number: cores, RAM, kernel, Python."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version()}


def cli_version(claude: str) -> str:
    return subprocess.run([claude, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
