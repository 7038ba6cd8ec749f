"""The benchmark suite's own plumbing (its sections run end to end in CI's `python -m bench --quick`)."""

from __future__ import annotations

import tomllib

from bench.daemon_proc import to_toml
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
