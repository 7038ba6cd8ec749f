"""The scale section's own logic: its load generator's counting window, and its verdict."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import web

from bench.http_load import Tally, connection, request_bytes
from bench.scale_bench import Point, report
from bench.suite import Options
from tests.helpers import serving


def point(daemons: int, req_per_s: float, *, others_cpu_pct: float = 0.0) -> Point:
    return Point(daemons=daemons, window_s=5.0, req_per_s=req_per_s, errors=0, p50_ms=1.0, p95_ms=2.0,
                 daemon_cpu_pct=[90.0] * daemons, workers_cpu_pct=40.0 * daemons, redis_cpu_pct=5.0,
                 load_cpu_pct=3.0, served=[100] * daemons, idle_cpu_pct=1.0, others_cpu_pct=others_cpu_pct,
                 load_average=1.0)


def test_the_load_generator_counts_answers_completed_in_its_window_only() -> None:
    tally = Tally(start_at=10.0, stop_at=20.0)
    tally.done(9.0, 9.9, 200)  # before the window
    tally.done(9.5, 10.5, 200)  # sent before, answered inside: counted
    tally.done(12.0, 12.5, 503)
    tally.done(19.0, 20.5, 200)  # answered after the stop
    assert (tally.ok, tally.errors, tally.latencies_s) == (1, 1, [1.0])


async def test_a_load_generator_connection_reads_answers_by_their_length_and_stops() -> None:
    answered = 0

    async def prompt(request: web.Request) -> web.Response:
        nonlocal answered
        assert request.headers["Authorization"] == "Bearer k"
        assert await request.json() == {"prompt": "p"}
        answered += 1
        return web.json_response({"text": "ok" * answered}, status=200 if answered % 5 else 503)

    app = web.Application()
    app.router.add_post("/v1/prompt", prompt)
    async with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        now = time.monotonic()
        tally = Tally(start_at=now, stop_at=now + 0.3)
        request = request_bytes("127.0.0.1", port, "k", b'{"prompt": "p"}')
        async with asyncio.timeout(10):  # each connection ends once the window has passed
            await asyncio.gather(*(connection("127.0.0.1", port, request, tally) for _ in range(2)))
    assert tally.ok > 4 and tally.errors > 0  # bodies of growing length were all read: the next head parsed
    assert tally.ok + tally.errors <= answered


def test_the_verdict_needs_the_ratio_on_a_host_not_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    opts = Options(quick=False, claude="claude", repeats=3)
    quiet = report([[point(1, 100.0), point(2, 180.0), point(3, 170.0)]], opts)
    (_, met, measured), = quiet.checks
    assert met and measured.startswith("1.80×")
    assert quiet.data["points"][0]["total_cpu_pct"] == 90 + 40 + 5 + 3
    # The same ratio while other processes took the cores measures the scheduler's share, not us.
    busy = report([[point(1, 100.0, others_cpu_pct=120.0), point(2, 180.0)]], opts)
    (_, met, measured), = busy.checks
    assert not met
    assert "other processes took up to 120%" in measured
    low = report([[point(1, 100.0), point(2, 120.0)]], opts)
    (_, met, measured), = low.checks
    assert not met
    # 13.8 ms an answer, 9 of them in the daemon's loop: 2 cores give 2 * 9 / 13.8 of one daemon.
    assert "an answer costs 13.8 ms of CPU, 9.0 ms of it in the daemon's loop" in measured
    assert "so at most 1.30×" in measured
