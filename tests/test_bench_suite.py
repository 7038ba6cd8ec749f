"""The benchmark suite's own plumbing (its sections run end to end in CI's `python -m bench --quick`)."""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

from bench.daemon_proc import to_toml
from bench.memory_bench import unix_accepted
from bench.suite import table


def test_to_toml_round_trips_the_config_shapes_the_benchmarks_write() -> None:
    config = {"server": {"socket": "/tmp/a \"b\".sock", "http": "127.0.0.1:0", "max_queued": 10},
              "pool": {"min_idle": 2, "ratio": 0.5, "on": True, "args": ["--x", "y"],
                       "timeouts": {"ready_timeout_s": 60}},
              "tenants": {"bench": {"key": "k\\1"}}, "top": 1}
    assert tomllib.loads(to_toml(config)) == config


def test_table_is_markdown_with_one_row_per_entry() -> None:
    assert table(["a", "b"], [[1, 2], ["x", None]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |",
                                                                    "| x | None |"]


def test_unix_accepted_counts_the_accepted_connections_of_a_socket_not_its_listener(tmp_path: Path) -> None:
    # The memory section counts the daemon's open socket connections this way: psutil shows the
    # listener with the same path and no peer, so it would count one connection too many.
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        listener.bind(path)
        listener.listen(8)
        assert unix_accepted(os.getpid(), path) == 0
        for _ in range(3):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(path)
            clients.append(client)
            accepted.append(listener.accept()[0])
        assert unix_accepted(os.getpid(), path) == 3
        accepted.pop().close()
        assert unix_accepted(os.getpid(), path) == 2
    finally:
        for s in [listener, *clients, *accepted]:
            s.close()
