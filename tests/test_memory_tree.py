"""A worker's memory reading counts its tool subprocesses without scanning the host's process table
(goal 5 of issue 16: the idle daemon's maintenance cost must not grow with the host's process count)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from claudepool.pool import memory
from claudepool.pool.memory import MiB, measure_trees, process_memory, tree_memory

# A parent whose child starts a grandchild holding 64 MiB of written pages.
GRANDCHILD = "import time; b = bytearray(b'x') * (64 << 20); print('ready', flush=True); time.sleep(60)"
CHILD = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}]); "
         "time.sleep(60)")


@pytest.fixture
def tree() -> Iterator[psutil.Process]:
    parent = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        proc = psutil.Process(parent.pid)
        deadline = time.monotonic() + 20
        while True:
            kids = proc.children(recursive=True)
            if len(kids) == 1 and (process_memory(kids[0].pid) or memory.ProcessMemory(0, 0)).rss_bytes > 60 * MiB:
                break
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        yield proc
    finally:
        for p in [proc, *proc.children(recursive=True)]:
            p.kill()
        parent.wait(timeout=10)


def test_the_tree_is_found_from_its_own_children_files(tree: psutil.Process,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(*_: object, **__: object) -> None:
        raise AssertionError("the host's process table was scanned")

    # The adversarial part: the old reading scanned every process of the host, every round (through
    # psutil then, through /proc/PID/stat now: both are forbidden).
    monkeypatch.setattr(psutil, "process_iter", no_scan)
    monkeypatch.setattr(memory, "children_by_parent", no_scan)
    [reading] = measure_trees([tree.pid])
    own = process_memory(tree.pid)
    assert reading is not None and own is not None
    assert reading.rss_bytes - own.rss_bytes > 60 * MiB  # the grandchild's pages count
    assert tree_memory(tree.pid) is not None


def test_the_scan_stands_in_where_the_kernel_cannot_list_children(tree: psutil.Process,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_children", lambda pid: None)
    [reading] = measure_trees([tree.pid])
    own = process_memory(tree.pid)
    assert reading is not None and own is not None
    assert reading.rss_bytes - own.rss_bytes > 60 * MiB


def test_the_descendants_are_those_psutil_finds(tree: psutil.Process) -> None:
    assert sorted(memory._descendants(tree.pid) or []) == sorted(p.pid for p in tree.children(recursive=True))


def test_a_gone_process_reads_none() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=10)
    assert measure_trees([done.pid]) == [None]
