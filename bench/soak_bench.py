"""Soak and fairness (issue 16, goal 4): steady under load, and a quiet tenant unharmed by a noisy one.

Soak: a ``claudepool serve`` process on fake-CLI workers (tests/fakes/fake_claude.py: no model, so
2 cores can hold 1,000 clients) and a load process of its own (`bench.soak_load`: 1,000 concurrent
clients full, 100 quick, over the socket and HTTP, JSON and SSE, five tenants, session turns, jobs).
Injected: worker crashes mid-turn, upstream 529 and 429 answers and retries (as the CLI reports
them: the fake plays the CLI's side of a failed call; no real CLI and no gateway traffic here, its
429/529 paths are the gateway section's), stalls the watchdog must cut, slow streams, and clients
hanging up mid-stream (socket and SSE) every few seconds. Every few seconds /metrics is scraped for
the daemon's RSS and event-loop lag (``claudepool_event_loop_lag_seconds``); zombies among the
daemon's children are counted at each sample. At the end: each request's terminal answers as the
load counted them from the raw bytes, cross-checked with the daemon's ``claudepool_requests_total``;
after the daemon stops, no process whose cwd or command line is under the run's directory.

Fairness: a daemon with 4 workers; a quiet tenant sends one request a second alone, then beside a
noisy tenant keeping 50 requests in flight; its p95 queue wait (the result's ``queue_ms``) under
noise against solo. Twice: beside a tenant bound by the fair queue alone, then beside one whose
``max_concurrency`` is one below the pool (the headroom a quiet tenant needs never to wait for a
turn to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.daemon_proc import DaemonProc, daemon_process
from bench.metrics_bench import FAKE
from bench.pool_bench import percentile
from bench.suite import REPO, Options, Report, table
from claudepool.client import AsyncClient

NAME = "soak"
ADMIN = "soak-admin-0123"
TENANTS = [f"soak{i}" for i in range(5)]
LAG = "claudepool_event_loop_lag_seconds"

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def progress(t0: float, what: str) -> None:
    print(f"  soak +{time.monotonic() - t0:.1f} s: {what}", file=sys.stderr, flush=True)


def key_of(tenant: str) -> str:
    return f"{tenant}-key-0123"


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), sorted,
    the last one +Inf. Linear inside the bucket; a quantile in the +Inf bucket is the last finite bound.

    >>> histogram_quantile(0.5, [(0.1, 0), (0.2, 10), (float("inf"), 10)])
    0.15
    >>> histogram_quantile(0.99, [(1.0, 0), (float("inf"), 0)]) is None
    True
    """
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below) if count > below else bound
        lower, below = bound, count
    return lower


async def scrape(d: DaemonProc) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(
            f"{d.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for k, v in samples.get(name, {}).items() if labels.items() <= dict(k).items())


def lag_buckets(samples: Samples, since: Samples | None = None) -> list[tuple[float, float]]:
    def of(s: Samples) -> dict[float, float]:
        return {float(dict(k)["le"]): v for k, v in s.get(f"{LAG}_bucket", {}).items()}

    now, then = of(samples), of(since) if since else {}
    return sorted((le, v - then.get(le, 0.0)) for le, v in now.items())


def soak_config(tmp: Path, workers: int) -> dict[str, Any]:
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 100_000,
                   "max_connections": 4096},
        "pool": {"claude_bin": str(FAKE), "min_idle": workers, "max_workers": workers, "workdir": str(tmp / "w"),
                 # A stalled turn is cut after 3 s without output (the [[hang]] fault).
                 "timeouts": {"ready_timeout_s": 30, "turn_idle_timeout_s": 3}},
        "sessions": {"min_idle": 1, "max_workers": 3 if workers < 10 else 6, "dir": str(tmp / "sessions"),
                     "max_sessions": 1000,
                     "park_idle_s": 5},
        "jobs": {"path": str(tmp / "jobs.sqlite3"), "batch_lane": False, "poll_interval_s": 0.2, "max_running": 2},
        "tenants": {t: {"key": key_of(t), "requests_per_minute": 0, "max_queued": 0} for t in TENANTS},
    }


def daemon_tree(d: DaemonProc) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return list(psutil.Process(d.proc.pid).children(recursive=True))
    return []


def zombies(d: DaemonProc) -> int:
    count = 0
    for p in daemon_tree(d):
        with contextlib.suppress(psutil.Error):
            count += p.status() == psutil.STATUS_ZOMBIE
    return count


def left_behind(root: Path) -> list[str]:
    """Processes whose cwd or command line is under ``root`` (the run's directory)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            if str(root) in " ".join(p.info["cmdline"] or []) or (p.info["cwd"] or "").startswith(str(root)):
                found.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:120]}")
    return found


async def soak(opts: Options) -> dict[str, Any]:
    clients, duration_s, warmup_s, every_s = (100, 8.0, 2.0, 1.0) if opts.quick else (1000, 600.0, 60.0, 5.0)
    workers = 4 if opts.quick else 20
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="claudepool-soak-") as tmp_s:
        tmp = Path(tmp_s)
        timeline: list[dict[str, Any]] = []
        async with daemon_process(soak_config(tmp, workers)) as d:
            progress(began, f"daemon ready; {clients} clients for {duration_s:g} s")
            plan = {"socket": d.socket, "url": d.url, "keys": [key_of(t) for t in TENANTS], "clients": clients,
                    "duration_s": duration_s, "think_s": (0.5, 2.5) if opts.quick else (10.0, 40.0),
                    "hangup_p": 0.05, "request_timeout_s": 30.0 if opts.quick else 120.0,
                    "session_turns": 2 if opts.quick else 3, "job_poll_s": 0.3 if opts.quick else 1.0}
            start = await scrape(d)
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.soak_load", orjson.dumps(plan).decode(), cwd=REPO,
                stdout=asyncio.subprocess.PIPE, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            t0, previous = time.monotonic(), start
            out = asyncio.create_task(load.communicate())
            max_zombies = 0
            while not out.done():
                await asyncio.wait({out}, timeout=every_s)
                now = await scrape(d)
                max_zombies = max(max_zombies, zombies(d))
                timeline.append({"t_s": round(time.monotonic() - t0, 1),
                                 "rss_mib": round(total(now, "claudepool_daemon_rss_bytes") / 2**20, 1),
                                 "lag_p99_ms": _ms(histogram_quantile(0.99, lag_buckets(now, previous))),
                                 "in_flight": total(now, "claudepool_in_flight_requests"),
                                 "workers": len(daemon_tree(d))})
                previous = now
            stdout, _ = out.result()
            progress(began, "load done")
            summary = orjson.loads(stdout.splitlines()[-1]) if stdout.strip() else {
                "error": f"the load exited {load.returncode}"}
            # Let what is still running end (jobs, resets) before the last count.
            async with asyncio.timeout(60):
                while total(end := await scrape(d), "claudepool_in_flight_requests") > 0:
                    await asyncio.sleep(0.2)
            warm = next((s for s in timeline if s["t_s"] >= warmup_s), timeline[0])
            lag_all = lag_buckets(end, start)
            end_zombies = zombies(d)
            progress(began, "requests in flight ended")
        orphans = left_behind(tmp)
        progress(began, "daemon stopped")
    outcomes: dict[str, int] = {}
    for k, v in end["claudepool_requests_total"].items():  # summed over tenants
        outcome = dict(k)["outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + int(v - start["claudepool_requests_total"].get(k, 0.0))
    outcomes = {k: v for k, v in outcomes.items() if v}
    window_s = 60.0 if not opts.quick else duration_s / 4
    first = [s["rss_mib"] for s in timeline if warm["t_s"] <= s["t_s"] < warm["t_s"] + window_s]
    last = [s["rss_mib"] for s in timeline if s["t_s"] >= timeline[-1]["t_s"] - window_s]
    return {"clients": clients, "duration_s": duration_s, "workers": workers, "plan": plan, "load": summary,
            "daemon_outcomes": outcomes, "daemon_requests": sum(outcomes.values()),
            "exits": {dict(k)["reason"]: int(v) for k, v in end["claudepool_worker_exits_total"].items() if v},
            "lag_p50_ms": _ms(histogram_quantile(0.5, lag_all)), "lag_p99_ms": _ms(histogram_quantile(0.99, lag_all)),
            "lag_max_bucket_s": max((le for le, c in lag_all if c < lag_all[-1][1]), default=0.0),
            "rss_first_mib": round(sum(first) / len(first), 1) if first else None,
            "rss_last_mib": round(sum(last) / len(last), 1) if last else None,
            "max_zombies_seen": max_zombies, "zombies_at_end": end_zombies, "orphans": orphans, "timeline": timeline}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- fairness -----------------------------------------------------------------------------------------


def fair_config(tmp: Path, workers: int) -> dict[str, Any]:
    """A quiet tenant, and two noisy ones: ``noisy`` bound only by the fair queue, ``capped`` by a
    ``max_concurrency`` one below the pool (only one of them floods at a time)."""
    open_tenant = {"requests_per_minute": 0, "max_queued": 0}
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 10_000},
        "pool": {"claude_bin": str(FAKE), "min_idle": workers, "max_workers": workers, "workdir": str(tmp / "w")},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "jobs": {"enabled": False},
        "tenants": {"quiet": {"key": key_of("quiet"), **open_tenant}, "noisy": {"key": key_of("noisy"), **open_tenant},
                    "capped": {"key": key_of("capped"), **open_tenant, "max_concurrency": workers - 1}},
    }


async def quiet_waits(d: DaemonProc, seconds: float) -> list[float]:
    """The quiet tenant: one request a second for ``seconds``; its queue waits in ms."""
    waits: list[float] = []
    async with AsyncClient(key=key_of("quiet"), socket_path=d.socket) as quiet:
        tasks = []
        for _ in range(int(seconds)):
            tasks.append(asyncio.create_task(quiet.prompt("[[reply:quiet]]")))
            await asyncio.sleep(1.0)
        for result in await asyncio.gather(*tasks):
            waits.append(result.queue_ms)
    return waits


@contextlib.asynccontextmanager
async def noise(d: DaemonProc, tenant: str, in_flight: int) -> AsyncIterator[list[int]]:
    """``tenant`` keeps ``in_flight`` requests going until the block ends; yields its count of answers."""
    done = [0]
    stop = asyncio.Event()

    async def one(client: AsyncClient) -> None:
        while not stop.is_set():
            await client.prompt("[[sleep:0.5]] noise")
            done[0] += 1

    async with AsyncClient(key=key_of(tenant), socket_path=d.socket) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(in_flight)]
        await asyncio.sleep(1.0)  # the queue fills first
        try:
            yield done
        finally:
            # Hang up rather than wait for 50 queued turns: closing the stream cancels each one.
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def fairness(opts: Options) -> dict[str, Any]:
    seconds = 3.0 if opts.quick else 25.0
    workers, noisy = 4, 50
    arms: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="claudepool-fair-") as tmp_s:
        async with daemon_process(fair_config(Path(tmp_s), workers)) as d:
            arms["solo"] = await quiet_waits(d, seconds)
            async with noise(d, "noisy", noisy):
                arms["noisy, fair queue"] = await quiet_waits(d, seconds)
            async with noise(d, "capped", noisy):
                arms[f"noisy, max_concurrency {workers - 1}"] = await quiet_waits(d, seconds)
    return {"workers": workers, "noisy_in_flight": noisy, "seconds": seconds,
            "arms": {k: {"p50_ms": round(percentile(v, 0.5), 2), "p95_ms": round(percentile(v, 0.95), 2),
                         "requests": len(v)} for k, v in arms.items()}}


# -- the section ------------------------------------------------------------------------------------------


async def run(opts: Options) -> Report:
    t0 = time.monotonic()
    s = await soak(opts)
    t1 = time.monotonic()
    f = await fairness(opts)
    s["wall_s"], f["wall_s"] = round(t1 - t0, 1), round(time.monotonic() - t1, 1)
    return report(s, f, opts)


def report(s: dict[str, Any], f: dict[str, Any], opts: Options) -> Report:
    load = s["load"]
    anomalies = sum(load.get("anomalies", {}).values())
    answered = sum(load.get("answers", {}).values())
    prompts = load.get("requests", 0)
    # Every prompt the load sent is one request the daemon counted; jobs ran through the service too.
    daemon_expected = prompts + load.get("jobs", 0)
    checks = [
        ("soak: every request one terminal answer (client side)", anomalies == 0 and "error" not in load,
         f"{answered} answered, {anomalies} anomalies {load.get('anomalies', {})}"),
        ("soak: daemon's request count matches the clients'", s["daemon_requests"] == daemon_expected,
         f"daemon {s['daemon_requests']}, clients {prompts} prompts + {load.get('jobs', 0)} jobs"),
        ("soak: no orphan process, no zombie", not s["orphans"] and s["zombies_at_end"] == 0,
         f"{len(s['orphans'])} orphans, {s['zombies_at_end']} zombies at end (max seen {s['max_zombies_seen']})"),
    ]
    if s["rss_first_mib"] and s["rss_last_mib"]:
        drift = s["rss_last_mib"] / s["rss_first_mib"] - 1
        checks.append(("soak: daemon RSS flat, last minute vs first after warm-up (±10%)", abs(drift) <= 0.10,
                       f"{s['rss_first_mib']} → {s['rss_last_mib']} MiB ({drift:+.1%})"))
    checks.append(("soak: event-loop lag p99 reported", s["lag_p99_ms"] is not None,
                   f"p50 {s['lag_p50_ms']} ms, p99 {s['lag_p99_ms']} ms"))
    arms = f["arms"]
    solo = arms["solo"]["p95_ms"]
    for name, arm in arms.items():
        if name.startswith("noisy"):
            base = solo
            ratio = arm["p95_ms"] / base if base else float("inf")
            checks.append((f"fairness ({name}): quiet p95 queue wait ≤ 1.5× solo", ratio <= 1.5,
                           f"{arm['p95_ms']} ms vs {base} ms solo ({ratio:.2f}×)"))
    answers = sorted(load.get("answers", {}).items(), key=lambda kv: -kv[1])
    md = [f"{s['clients']} concurrent clients for {s['duration_s']:g} s ({'quick' if opts.quick else 'full'}) "
          f"against one daemon with {s['workers']} fake-CLI workers; think time {s['plan']['think_s']} s; "
          f"{s['plan']['hangup_p']:.0%} of streams hung up mid-way. Requests by kind: {load.get('by_kind')}.", "",
          table(["client-side answer", "count"], [[k, v] for k, v in answers]), "",
          table(["daemon outcome", "count"], sorted(s["daemon_outcomes"].items(), key=lambda kv: -kv[1])), "",
          f"Worker exits: {s['exits']}. Event-loop lag over the run: p50 {s['lag_p50_ms']} ms, p99 "
          f"{s['lag_p99_ms']} ms. Daemon RSS {s['rss_first_mib']} → {s['rss_last_mib']} MiB.", "",
          f"Fairness: {f['workers']} workers, the noisy tenant {f['noisy_in_flight']} in flight "
          f"([[sleep:0.5]] each), the quiet one 1 request/s for {f['seconds']:g} s per arm.", "",
          table(["arm", "quiet p50 queue ms", "quiet p95 queue ms", "requests"],
                [[k, v["p50_ms"], v["p95_ms"], v["requests"]] for k, v in arms.items()])]
    return Report(NAME, {"soak": s, "fairness": f}, "\n".join(md), checks)


def plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    timeline = rep.data["soak"]["timeline"]
    t = [p["t_s"] for p in timeline]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [p["rss_mib"] for p in timeline], color="tab:blue", label="daemon RSS (MiB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("daemon RSS, MiB", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [p["lag_p99_ms"] or 0 for p in timeline], color="tab:red", label="event-loop lag p99 (ms)")
    ax2.set_ylabel("event-loop lag p99 per sample, ms", color="tab:red")
    ax.set_title(f"Soak: {rep.data['soak']['clients']} clients, RSS and event-loop lag")
    fig.tight_layout()
    path = out_dir / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
