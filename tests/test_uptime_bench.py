"""The uptime benchmark's machinery on a tiny run, so it cannot rot between the runs that matter."""

from __future__ import annotations

from bench import uptime_bench


async def test_the_uptime_bench_measures_the_daemons_own_cpu_per_block() -> None:
    blocks = await uptime_bench.run(requests=200, block=100, clients=4, workers=2, tenants=2, warmup=20)
    assert [b.requests for b in blocks] == [100, 200]
    for block in blocks:
        # The daemon's own CPU: some per request (it parses, schedules, meters), far less than a turn's.
        assert 0 < block.cpu_ms_per_request < 50, block
        assert block.requests_per_s > 0 and block.rss_mib > 10, block
    table = uptime_bench.table(blocks)
    assert table.count("\n") == 3 and "| 200 |" in table
