"""1,000 jobs through the pool lane and through the batch lane: wall time, throughput, dollars.

A daemon in this process on the real CLI, the loopback fake upstream in a process of its own. The
same jobs (short classification prompts, each its own words) are submitted in one bulk request per
lane and waited for to their end:

* pool lane: warm workers run each job as a prompt (the CLI's own system prompt and tools schema
  go with every call, mostly read from the provider's prompt cache);
* batch lane: the jobs go to the Message Batches API as bare Messages requests. The fake ends a
  batch ``--batch-delay-s`` after it was made; the provider takes minutes to hours, so the batch
  lane's wall time here is the daemon's own overhead plus that delay, not a forecast.

Dollars are what the gateway metered at list prices (Sonnet-class: $3 in, $15 out, $0.30 cache
read, $3.75 cache write per million tokens; the batch tier at 50%).

    python -m bench.jobs_bench --jobs 1000 [--workers 4] [--batch-delay-s 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.pool_bench import find_claude
from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier

KEY = "bench-key-0123"
LIST_PRICES = {"default": {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cache_read_per_mtok": 0.3,
                           "cache_write_per_mtok": 3.75}}
_ENDED = ("succeeded", "failed", "cancelled", "dead")


def prompts(count: int, lane: str) -> list[dict[str, Any]]:
    return [{"prompt": f"Review #{i} ({lane}): the parcel came two days late but the kettle itself boils fast and "
                       f"looks good on the counter. Classify the review's sentiment as positive, negative or "
                       f"mixed; answer with one word.", "lane": lane} for i in range(count)]


async def run_lane(http: aiohttp.ClientSession, url: str, lane: str, count: int) -> dict[str, Any]:
    started = time.perf_counter()
    async with http.post(f"{url}/v1/jobs/bulk", data=orjson.dumps({"jobs": prompts(count, lane)})) as resp:
        assert resp.status == 202, await resp.text()
        ids = [j["id"] for j in (await resp.json())["jobs"]]
    submitted_s = time.perf_counter() - started
    since = time.time() - 3600
    ended: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(3600):
        while len(ended) < len(ids):
            await asyncio.sleep(0.5)
            for status in _ENDED:
                offset = since
                while True:
                    async with http.get(f"{url}/v1/jobs", params={"status": status, "since": str(offset),
                                                                  "limit": "1000"}) as resp:
                        page = (await resp.json())["jobs"]
                    ended.update({j["id"]: j for j in page if j["id"] in set(ids)})
                    if len(page) < 1000:
                        break
                    offset = page[-1]["created_at"]
    wall_s = time.perf_counter() - started
    jobs = [ended[i] for i in ids]
    cost = sum(j["cost_usd"] for j in jobs)
    tokens = {k: sum(j["usage"].get(k, 0) for j in jobs) for k in (
        "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")}
    return {"lane": lane, "jobs": count, "succeeded": sum(j["status"] == "succeeded" for j in jobs),
            "submit_s": round(submitted_s, 3), "wall_s": round(wall_s, 2), "jobs_per_s": round(count / wall_s, 1),
            "usd_per_1000_jobs": round(cost / count * 1000, 4),
            "tokens_per_job": {k: round(v / count, 1) for k, v in tokens.items()}}


async def run(claude: str, base_url: str, tmp: Path, count: int, workers: int) -> list[dict[str, Any]]:
    settings = load_settings(None, server={"socket": "", "http": "127.0.0.1:0", "max_queued": 100_000}, pool={
        "claude_bin": claude, "min_idle": workers, "max_workers": workers, "workdir": str(tmp / "w"),
        "timeouts": {"ready_timeout_s": 60}},
        upstream={"base_url": base_url, "api_key": "sk-ant-bench"}, pricing=LIST_PRICES,
        sessions={"min_idle": 0, "dir": str(tmp / "sessions")},
        jobs={"path": str(tmp / "jobs.sqlite3"), "max_running": workers, "batch_window_s": 1.0,
              "max_batch_requests": 10_000, "batch_poll_first_s": 0.5, "batch_poll_max_s": 2.0,
              "poll_interval_s": 0.2},
        tenants={"bench": {"key": KEY, "requests_per_minute": 0, "max_queued": 0}})
    daemon = Daemon(settings, notifier=Notifier({}))
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        async with asyncio.timeout(120):
            while not daemon.status.readiness()[0]:
                await asyncio.sleep(0.05)
        await daemon.pools["default"].wait_ready(120, idle=workers)
        url = daemon.listening["http"]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            await run_lane(http, url, "pool", min(20, count))  # warm-up: the provider cache, the first resets
            return [await run_lane(http, url, lane, count) for lane in ("pool", "batch_api")]
    finally:
        daemon.request_stop()
        await task


def table(rows: list[dict[str, Any]], claude_version: str, delay_s: float) -> str:
    lines = [f"{claude_version}, fake upstream ending each batch {delay_s:g} s after it is made",
             "| lane | jobs | succeeded | wall s | jobs/s | $ per 1,000 jobs | input tok/job | cache read tok/job "
             "| cache write tok/job | output tok/job |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["tokens_per_job"]
        lines.append(f"| {r['lane']} | {r['jobs']} | {r['succeeded']} | {r['wall_s']} | {r['jobs_per_s']} | "
                     f"{r['usd_per_1000_jobs']:.4f} | {t['input_tokens']} | {t['cache_read_input_tokens']} | "
                     f"{t['cache_creation_input_tokens']} | {t['output_tokens']} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-delay-s", type=float, default=2.0)
    parser.add_argument("--claude", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    claude = find_claude(args.claude)
    version = subprocess.run([claude, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    upstream = subprocess.Popen([sys.executable, "-m", "claudepool.testing.fake_upstream", "--port", "0",
                                 "--batch-delay-s", str(args.batch_delay_s)], stdout=subprocess.PIPE)
    assert upstream.stdout is not None
    base_url = upstream.stdout.readline().decode().split()[-1]
    try:
        with tempfile.TemporaryDirectory(prefix="claudepool-jobs-bench-") as tmp:
            rows = await run(claude, base_url, Path(tmp), args.jobs, args.workers)
    finally:
        upstream.terminate()
        upstream.wait()
        upstream.stdout.close()
    print(table(rows, version, args.batch_delay_s))
    if args.json_out:
        Path(args.json_out).write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    asyncio.run(main())
