"""The benchmark suite's own plumbing (its sections run end to end in CI's `python -m bench --quick`)."""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

from bench.daemon_proc import to_toml
from bench.memory_bench import unix_accepted
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


def test_cost_cells_match_ledger_records_to_the_upstream_log_and_price_the_batch_tier() -> None:
    from bench.cost_bench import aggregate, pricing

    index = {"req_1": ({"input_tokens": 10, "output_tokens": 5}, False),
             "msg_b": ({"input_tokens": 100, "output_tokens": 10}, True),
             "req_2": ({"input_tokens": 7, "output_tokens": 1}, False)}
    records = [
        {"upstream_request_id": "req_1", "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.000105,
         "requests": 1, "model": "m"},
        # A batch request: matched by its message id, priced at half.
        {"message_id": "msg_b", "input_tokens": 100, "output_tokens": 10, "cost_usd": 0.000225, "requests": 1,
         "model": "m", "service_tier": "batch"},
        # Billed with other tokens than the upstream reported: a mismatch, priced as the upstream saw it.
        {"upstream_request_id": "req_2", "input_tokens": 8, "output_tokens": 1, "cost_usd": 0.000039,
         "requests": 0, "model": "m"},
        {"upstream_request_id": "req_nowhere", "input_tokens": 1, "cost_usd": 0.000003, "requests": 1, "model": "m"},
    ]
    cell = aggregate("default", "prompt", "pool", 2, records, index, pricing())
    assert (cell.mismatched, cell.unmatched, cell.ledger_requests, cell.calls_per_request) == (1, 1, 3, 2.0)
    assert cell.tokens_per_request["input_tokens"] == 59.5  # (10 + 100 + 8 + 1) / 2 requests
    assert cell.usd_per_1000 == round((0.000105 + 0.000225 + 0.000039 + 0.000003) / 2 * 1000, 4)
    # The upstream side: the three matched calls at $3 in / $15 out, the batch one at 50%.
    assert cell.upstream_usd_per_1000 == round((0.000105 + 0.000225 + 0.000036) / 2 * 1000, 4)
    # The input side: the ledger's $ less its output tokens at the output price (batch at 50%).
    output_usd = (5 + 1) * 15e-6 + 10 * 15e-6 * 0.5
    assert cell.input_usd_per_1000 == round((0.000372 - output_usd) / 2 * 1000, 4)


def test_cost_by_turn_sums_each_request_s_calls_and_indexes_requests_by_when_they_ended() -> None:
    from bench.cost_bench import usd_by_turn

    records = [{"request_id": "b", "at": 2.0, "cost_usd": 0.003}, {"request_id": "a", "at": 1.0, "cost_usd": 0.001},
               {"request_id": "b", "at": 2.5, "cost_usd": 0.001},  # b's second call: one request, one turn
               {"request_id": "c", "at": 3.0, "cost_usd": 0.003}]
    # a: turn 1, b: turn 2, c: turn 1 of the next conversation.
    assert usd_by_turn(records, 2) == [2.0, 4.0]


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


def test_request_lines_count_every_request_line_and_each_job_s_serves() -> None:
    """The soak's cross-check: the daemon counts a job once per serve, named by its job id."""
    import orjson

    from bench.soak_bench import RequestLines

    def line(request_id: str, outcome: str = "ok", logger: str = "claudepool.request") -> str:
        return orjson.dumps({"logger": logger, "msg": "request", "request_id": request_id,
                             "outcome": outcome}).decode() + "\n"

    lines = RequestLines()
    for text in (line("0f3a"), line("job_ab-1", "worker_died"), line("job_ab-1"), line("job_cd-2"),
                 line("x", "error"), line("job_zz-1", logger="claudepool.daemon"), "not json \"claudepool.request\"\n"):
        lines(text)
    assert lines.count == 5
    assert lines.serves_per_job == {"job_ab": 2, "job_cd": 1}
    assert [r["request_id"] for r in lines.unclassified] == ["x"]
