"""The benchmark suite's own plumbing (its sections run end to end in CI's `python -m bench --quick`)."""

from __future__ import annotations

import tomllib

from bench.daemon_proc import to_toml
from bench.soak_bench import histogram_quantile, lag_buckets
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


def test_histogram_quantile_interpolates_as_prometheus_does() -> None:
    inf = float("inf")
    # 100 observations: 90 at or below 1 ms, 9 in (1 ms, 10 ms], 1 in (10 ms, 100 ms].
    buckets = [(0.001, 90.0), (0.01, 99.0), (0.1, 100.0), (inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == 0.001 * 50 / 90
    assert abs((histogram_quantile(0.99, buckets) or 0) - 0.01) < 1e-12  # the 99th: the 1-10 ms bucket's last
    assert abs((histogram_quantile(0.995, buckets) or 0) - 0.055) < 1e-12
    # Past the last finite bound: that bound (nothing is known above it); no observation: None.
    assert histogram_quantile(0.99, [(0.1, 0.0), (inf, 5.0)]) == 0.1
    assert histogram_quantile(0.99, [(0.1, 0.0), (inf, 0.0)]) is None


def test_lag_buckets_are_the_difference_between_two_scrapes() -> None:
    def scrape(counts: dict[str, float]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        return {"claudepool_event_loop_lag_seconds_bucket": {(("le", le),): v for le, v in counts.items()}}

    before = scrape({"0.01": 5, "0.1": 6, "+Inf": 6})
    after = scrape({"0.01": 8, "0.1": 10, "+Inf": 11})
    assert lag_buckets(after, before) == [(0.01, 3.0), (0.1, 4.0), (float("inf"), 5.0)]
