"""The bounds of a sandboxed worker without a CLI: its cgroup on this host's kernel, the rlimits, and
the measure of its workspace (tests/test_real_cli_bounds.py holds a real worker to them)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from claudepool.pool import cgroups
from claudepool.pool.confinement import disk_usage_bytes


def test_a_worker_cgroup_holds_what_it_starts_and_goes_with_it() -> None:
    host = cgroups.host()
    assert host is not None, "no cgroup to bound workers with here: see claudepool.pool.cgroups"
    group = host.create(f"t-{os.getpid()}", cgroups.Bounds(max_processes=8, max_memory_bytes=256 * 2**20))
    try:
        # Born inside: the shell enters the cgroup and then execs, so even the first fork is counted.
        forks = "for i in $(seq 20); do sleep 5 >/dev/null 2>&1 & done; echo started"
        done = subprocess.run(group.enter(["sh", "-c", forks]), capture_output=True, text=True, timeout=30, check=False)
        assert "Cannot fork" in done.stderr + done.stdout, done
        assert 0 < len(group.pids()) < 8  # the sleeps that could start
        assert not group.remove()  # the kernel keeps a cgroup that holds processes
        group.kill()
        deadline = time.monotonic() + 5
        while not group.remove() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(d.exists() for d in group.dirs)
    finally:
        group.kill()
        group.remove()


def test_without_a_cgroup_the_bound_is_a_rlimit_no_file_passes(tmp_path: Path) -> None:
    bounds = cgroups.Bounds(max_processes=64, max_memory_bytes=None, max_file_bytes=2**20)
    argv = bounds.prlimit(["sh", "-c", f"head -c 3000000 /dev/zero > {tmp_path / 'f'}"], processes=True)
    assert "--nproc=64:64" in argv and "--fsize=1048576:1048576" in argv
    subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert (tmp_path / "f").stat().st_size == 2**20
    assert cgroups.Bounds(None, None).prlimit(["true"], processes=True) == ["true"]


def test_the_workspace_measure_counts_what_is_written_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 4 * 2**20)
    workspace = tmp_path / "w"
    (workspace / "deep" / "er").mkdir(parents=True)
    (workspace / "deep" / "er" / "f").write_bytes(b"y" * 2**20)
    (workspace / "link").symlink_to(outside)
    (workspace / "dirlink").symlink_to(tmp_path)
    used = disk_usage_bytes(workspace)
    assert used is not None and 2**20 <= used < 2 * 2**20
    for i in range(30):
        (workspace / f"e{i}").touch()
    assert disk_usage_bytes(workspace, max_entries=20) is None  # too many entries to measure is full


def test_a_cgroup_v2_worker_cgroup_enters_lists_and_kills_through_the_kernel(tmp_path: Path) -> None:
    # This host's cgroup v2 hierarchy offers no pids or memory controller (they are v1's here), so
    # `host` picks v1; the v2 mechanics (entering before exec, cgroup.procs, cgroup.kill, rmdir) are
    # the kernel's all the same, and tested here on its real cgroup2 mount without bounds.
    mounts = cgroups._mounts()
    assert "" in mounts, "no cgroup2 mount here"
    parent = mounts[""][0] / f"claudepool-test-{os.getpid()}"
    parent.mkdir()
    host = cgroups.Cgroups([parent], v2=True)
    try:
        group = host.create("w1", cgroups.Bounds(max_processes=None, max_memory_bytes=None))
        sleeper = subprocess.Popen(group.enter(["sh", "-c", "sleep 30 & sleep 30"]))
        deadline = time.monotonic() + 5
        while len(group.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeper.pid in group.pids() and len(group.pids()) == 3  # born inside: the shell and both sleeps
        group.kill()  # cgroup.kill: every process in it, at once
        assert sleeper.wait(timeout=5) == -9
        while not group.remove() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group.dirs[0].exists()
    finally:
        host.close()
    assert not parent.exists()
