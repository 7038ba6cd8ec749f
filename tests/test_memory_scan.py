"""The process-table scan behind every worker memory measurement (pool/memory.py): /proc read directly,
without psutil's per-process objects (issue 16, daemon overhead: it runs every maintenance interval
over every process on the host)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from claudepool.pool.memory import children_by_parent, measure_trees


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A shell with a sleeping grandchild, and a child whose name has parentheses and spaces in it
    (``/proc/PID/stat`` shows it between parentheses: a naive split reads the wrong parent)."""
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    odd = subprocess.Popen([sys.executable, "-c",
                            "open('/proc/self/comm', 'w').write('x) (y 1 2'); import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while (len(psutil.Process(shell.pid).children()) < 1
               or psutil.Process(odd.pid).name() != "x) (y 1 2") and time.monotonic() < deadline:
            time.sleep(0.02)
        yield shell, odd
    finally:
        for proc in (shell, odd):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def test_the_scan_finds_every_descendant_without_psutil_objects(
        tree: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    shell, odd = tree
    expected = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}

    def no_process_iter(*args: object, **kwargs: object) -> None:
        raise AssertionError("the /proc scan must not build a psutil.Process per entry")

    monkeypatch.setattr(psutil, "process_iter", no_process_iter)
    children = children_by_parent()
    found, stack = set(), list(children.get(os.getpid(), ()))
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, ()))
    assert found == expected
    assert odd.pid in children[os.getpid()]  # its parent read right, despite the ") (" in its name
    (shell_tree,) = measure_trees([shell.pid])
    (shell_alone,) = measure_trees([psutil.Process(shell.pid).children()[0].pid])
    assert shell_tree is not None and shell_alone is not None
    assert shell_tree.rss_bytes > shell_alone.rss_bytes  # the shell and its sleeping child
