"""Soak and fairness (issue 16, goal 4): steady under load, and a quiet tenant unharmed by a noisy one.

Soak: a ``claudepool serve`` process on fake-CLI workers (tests/fakes/fake_claude.py: no model, so
2 cores can hold 1,000 clients) and a load process of its own (`bench.soak_load`: 1,000 concurrent
clients full, 40 quick, over the socket and HTTP, JSON and SSE, five tenants, session turns, jobs,
half of them ``priority: interactive``). Sized so the pool is loaded, not overloaded (`Sizes`: the
offered rate and the workers' busy share are reported). Injected: worker crashes mid-turn, upstream
529 and 429 answers and retries (as the CLI reports them: the fake plays the CLI's side of a failed
call; no real CLI and no gateway traffic here, its 429/529 paths are the gateway section's), stalls
the watchdog must cut, slow streams, and clients hanging up mid-stream (socket and SSE). Every few
seconds /metrics is scraped for the daemon's RSS and event-loop lag
(``claudepool_event_loop_lag_seconds``), the loop thread's ``schedstat`` is read (time on a CPU, time
waiting for one: a late loop that was waiting was not scheduled), and zombies among the daemon's
children are counted. At the end, every job submitted has ended (bounded wait; the store is asked
for any still queued or running), and each request's terminal answers as the load counted them from
the raw bytes are cross-checked with ``claudepool_requests_total``, which counts what the daemon
served: every prompt, and each serve of a job (from the daemon's ``request`` log lines, a job's
request id being its job id). After the daemon stops: no process whose cwd or command line is under
the run's directory. The store's bounds are small (`soak_config`) so that the warm-up fills them and
a flat RSS after it means nothing else grows.

Fairness: a daemon with 4 workers; a quiet tenant sends a request every 0.1 s (200 per arm full, for
a p95), alone, then beside a noisy tenant keeping 50 requests in flight; its p95 queue wait as the
daemon measures it (the result's ``queue_ms``) under noise against solo, with the noisy tenant's
``max_concurrency`` one below the pool (as README's tenancy section advises); informational arms:
two below, and bound by the fair queue alone (where waiting for a turn to end is by design).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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


def soak_config(tmp: Path, workers: int, session_workers: int) -> dict[str, Any]:
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 100_000,
                   "max_connections": 4096},
        "pool": {"claude_bin": str(FAKE), "min_idle": workers, "max_workers": workers, "workdir": str(tmp / "w"),
                 # A stalled turn is cut after 3 s without output (the [[hang]] fault).
                 "timeouts": {"ready_timeout_s": 30, "turn_idle_timeout_s": 3}},
        # The in-memory store's bounded structures at sizes the warm-up fills, so that a flat RSS after
        # it means nothing else grows (at the defaults, 100,000 ledger records and as many settled ids
        # fill over hours).
        "store": {"ledger_max_records": 2000, "settled_max_ids": 2000},
        "sessions": {"min_idle": 1, "max_workers": session_workers, "dir": str(tmp / "sessions"),
                     "max_sessions": 1000, "park_idle_s": 5, "retention_s": 20},
        "jobs": {"path": str(tmp / "jobs.sqlite3"), "batch_lane": False, "poll_interval_s": 0.2, "max_running": 4,
                 "retention_s": 60},
        "tenants": {t: {"key": key_of(t), "requests_per_minute": 0, "max_queued": 0} for t in TENANTS},
    }


def sched_ns(pid: int) -> tuple[int, int]:
    """The main thread's (event loop's) time on a CPU and time runnable but waiting for one, in ns
    (``/proc/PID/task/PID/schedstat``): a late loop that waited for a CPU was not scheduled, one that
    ran the whole time was blocked by its own work."""
    with contextlib.suppress(OSError, ValueError):
        on_cpu, waiting, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        return int(on_cpu), int(waiting)
    return 0, 0


def ledger_record_bytes(records: int = 5000) -> float:
    """What one record costs the in-memory store (its ledger entry and its settled id), measured with
    tracemalloc: at the default ``store.ledger_max_records`` the ledger fills over hours, so a soak
    at the defaults sees RSS grow by this much per turn until then."""
    import tracemalloc
    import uuid

    from claudepool.store.base import UsageRecord
    from claudepool.store.memory import SettledIds
    from claudepool.store.memory_ledger import RecordLog

    ledger, settled = RecordLog(records), SettledIds(max_ids=records, max_age_s=1e9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(records):
            request_id = uuid.uuid4().hex
            record = UsageRecord(record_id=f"turn:{request_id}", request_id=request_id, tenant=TENANTS[i % 5],
                                 profile="default", model="claude-sonnet-4-5", outcome="ok", at=time.time(),
                                 input_tokens=10, output_tokens=5, cost_usd=0.001)
            ledger.append(record)
            settled.add(record.record_id, time.time())
        return (tracemalloc.get_traced_memory()[0] - before) / records
    finally:
        tracemalloc.stop()


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


@dataclass(frozen=True)
class Sizes:
    """The soak's load against the pool's capacity. A turn holds a fake worker ~0.35 s on average
    (`bench.soak_load.FAULTS`) plus its reset; a client sends one request per think time (its mean,
    plus the request), so the offered rate is ~clients / mean think and the pool's busy share is
    reported as measured (``utilization``): loaded, not overloaded, in steady state."""

    clients: int
    duration_s: float
    warmup_s: float
    every_s: float
    workers: int
    session_workers: int
    think_s: tuple[float, float]
    request_timeout_s: float
    settle_timeout_s: float  # how long the jobs still open at the end may take to end


QUICK = Sizes(clients=40, duration_s=5.0, warmup_s=2.0, every_s=1.0, workers=4, session_workers=2,
              think_s=(2.0, 6.0), request_timeout_s=15.0, settle_timeout_s=10.0)
FULL = Sizes(clients=1000, duration_s=600.0, warmup_s=60.0, every_s=5.0, workers=20, session_workers=10,
             think_s=(10.0, 40.0), request_timeout_s=120.0, settle_timeout_s=120.0)


@dataclass
class RequestLines:
    """The daemon's canonical ``request`` log lines (one per request it counted, refused or served),
    counted as they come: all of them, and those of job serves by job (a job's request id is
    ``<job id>-<delivery>``)."""

    count: int = 0
    serves_per_job: dict[str, int] = field(default_factory=dict)
    unclassified: list[dict[str, Any]] = field(default_factory=list)  # outcome "error": the first few

    def __call__(self, line: str) -> None:
        if '"claudepool.request"' not in line:
            return
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if record.get("msg") != "request":
                return
            self.count += 1
            if record.get("outcome") == "error" and len(self.unclassified) < 5:
                self.unclassified.append(record)
            request_id = str(record.get("request_id", ""))
            if request_id.startswith("job_"):
                job_id = request_id.rsplit("-", 1)[0]
                self.serves_per_job[job_id] = self.serves_per_job.get(job_id, 0) + 1


async def job_counts(d: DaemonProc) -> dict[str, int]:
    """What the job store holds still open (queued, running), per status, over every tenant."""
    open_jobs: dict[str, int] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        for tenant in TENANTS:
            for status in ("queued", "running"):
                async with http.get(f"{d.url}/v1/jobs", params={"tenant": tenant, "status": status,
                                                                "limit": "1000"}) as resp:
                    body = orjson.loads(await resp.read())
                open_jobs[status] = open_jobs.get(status, 0) + len(body.get("jobs", []))
    return open_jobs


async def soak(opts: Options, z: Sizes | None = None) -> dict[str, Any]:
    z = z or (QUICK if opts.quick else FULL)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="claudepool-soak-") as tmp_s:
        tmp = Path(tmp_s)
        timeline: list[dict[str, Any]] = []
        lines = RequestLines()
        async with daemon_process(soak_config(tmp, z.workers, z.session_workers), on_line=lines) as d:
            progress(began, f"daemon ready; {z.clients} clients for {z.duration_s:g} s")
            plan = {"socket": d.socket, "url": d.url, "keys": [key_of(t) for t in TENANTS], "clients": z.clients,
                    "duration_s": z.duration_s, "think_s": z.think_s, "hangup_p": 0.05,
                    "request_timeout_s": z.request_timeout_s, "session_turns": 2 if opts.quick else 3,
                    "job_poll_s": 0.3 if opts.quick else 1.0}
            start = await scrape(d)
            assert lines.count == 0, "requests before the load: the cross-check would be off"
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.soak_load", orjson.dumps(plan).decode(), cwd=REPO,
                stdout=asyncio.subprocess.PIPE, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            t0, previous = time.monotonic(), start
            sched0 = sched_prev = sched_ns(d.proc.pid)
            t_prev = t0
            out = asyncio.create_task(load.communicate())
            max_zombies = 0
            while not out.done():
                await asyncio.wait({out}, timeout=z.every_s)
                now = await scrape(d)
                max_zombies = max(max_zombies, zombies(d))
                sched, t_now = sched_ns(d.proc.pid), time.monotonic()
                wall_ns = max((t_now - t_prev) * 1e9, 1.0)
                timeline.append({"t_s": round(time.monotonic() - t0, 1),
                                 "loop_cpu_share": round((sched[0] - sched_prev[0]) / wall_ns, 3),
                                 "loop_runq_share": round((sched[1] - sched_prev[1]) / wall_ns, 3),
                                 "rss_mib": round(total(now, "claudepool_daemon_rss_bytes") / 2**20, 1),
                                 "lag_p99_ms": _ms(histogram_quantile(0.99, lag_buckets(now, previous))),
                                 "in_flight": total(now, "claudepool_in_flight_requests"),
                                 "workers": len(daemon_tree(d))})
                previous, sched_prev, t_prev = now, sched, t_now
            stdout, _ = out.result()
            load_s = time.monotonic() - t0
            loop_cpu_s, loop_runq_s = ((b - a) / 1e9 for a, b in zip(sched0, sched_prev, strict=True))
            progress(began, "load done")
            summary = orjson.loads(stdout.splitlines()[-1]) if stdout.strip() else {
                "error": f"the load exited {load.returncode}"}
            # Every job submitted ends before the count (bounded): the store's own count of ended ones.
            settle_by = time.monotonic() + z.settle_timeout_s
            while True:
                end = await scrape(d)
                submitted = delta(start, end, "claudepool_jobs_submitted_total")
                ended = delta(start, end, "claudepool_jobs_ended_total")
                if (ended >= submitted and total(end, "claudepool_in_flight_requests") == 0) \
                        or time.monotonic() > settle_by:
                    break
                await asyncio.sleep(0.2)
            still_open = await job_counts(d)
            # The daemon's log lines are read by a task of their own: let it catch up with the counter.
            counted = delta(start, end, "claudepool_requests_total")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while lines.count < counted:
                        await asyncio.sleep(0.1)
            warm = next((s for s in timeline if s["t_s"] >= z.warmup_s), timeline[0])
            lag_all = lag_buckets(end, start)
            end_zombies = zombies(d)
            progress(began, "requests and jobs ended")
        orphans = left_behind(tmp)
        progress(began, "daemon stopped")
    outcomes: dict[str, int] = {}
    for k, v in end["claudepool_requests_total"].items():  # summed over tenants
        outcome = dict(k)["outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + int(v - start["claudepool_requests_total"].get(k, 0.0))
    outcomes = {k: v for k, v in outcomes.items() if v}
    serves_per_job = lines.serves_per_job
    ended_by: dict[str, int] = {}
    for k, v in end.get("claudepool_jobs_ended_total", {}).items():
        status = dict(k)["status"]
        ended_by[status] = ended_by.get(status, 0) + int(v - start.get("claudepool_jobs_ended_total", {}).get(k, 0.0))
    busy_s = (delta(start, end, "claudepool_request_duration_seconds_sum")
              - delta(start, end, "claudepool_queue_wait_seconds_sum"))
    window_s = 60.0 if not opts.quick else z.duration_s / 4
    first = [s["rss_mib"] for s in timeline if warm["t_s"] <= s["t_s"] < warm["t_s"] + window_s]
    last = [s["rss_mib"] for s in timeline if s["t_s"] >= timeline[-1]["t_s"] - window_s]
    return {"clients": z.clients, "duration_s": z.duration_s, "workers": z.workers,
            "session_workers": z.session_workers, "plan": plan, "load": summary, "load_wall_s": round(load_s, 1),
            "daemon_outcomes": outcomes, "daemon_requests": int(counted), "daemon_request_lines": lines.count,
            "job_serves": sum(serves_per_job.values()),
            "jobs_served_more_than_once": sum(n > 1 for n in serves_per_job.values()),
            "jobs_submitted": int(submitted), "jobs_ended": {k: v for k, v in ended_by.items() if v},
            "jobs_still_open": still_open,
            "offered_per_s": round(counted / z.duration_s, 1),
            "utilization": round(busy_s / ((z.workers + z.session_workers) * z.duration_s), 3),
            "queue_wait_mean_ms": _ms(_mean_delta(start, end, "claudepool_queue_wait_seconds")),
            "loop_cpu_s": round(loop_cpu_s, 1), "loop_runq_s": round(loop_runq_s, 1),
            "unclassified_requests": lines.unclassified,
            "exits": {dict(k)["reason"]: int(v) for k, v in end["claudepool_worker_exits_total"].items() if v},
            "lag_p50_ms": _ms(histogram_quantile(0.5, lag_all)), "lag_p99_ms": _ms(histogram_quantile(0.99, lag_all)),
            "lag_max_bucket_s": max((le for le, c in lag_all if c < lag_all[-1][1]), default=0.0),
            "rss_first_mib": round(sum(first) / len(first), 1) if first else None,
            "rss_last_mib": round(sum(last) / len(last), 1) if last else None,
            "max_zombies_seen": max_zombies, "zombies_at_end": end_zombies, "orphans": orphans, "timeline": timeline}


def delta(start: Samples, end: Samples, name: str) -> float:
    return total(end, name) - total(start, name)


def _mean_delta(start: Samples, end: Samples, name: str) -> float | None:
    count = delta(start, end, f"{name}_count")
    return delta(start, end, f"{name}_sum") / count if count else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- fairness -----------------------------------------------------------------------------------------


def fair_config(tmp: Path, workers: int) -> dict[str, Any]:
    """A quiet tenant, and noisy ones: ``capped`` as README's tenancy section has an operator
    configure a tenant that floods (``max_concurrency`` below the pool's size, here one below),
    ``capped2`` two below (one worker for the quiet tenant's turn, one for the reset after it), and
    ``noisy`` bound by the fair queue alone (one of them floods at a time)."""
    open_tenant = {"requests_per_minute": 0, "max_queued": 0}
    return {
        "server": {"socket": str(tmp / "cp.sock"), "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 10_000},
        "pool": {"claude_bin": str(FAKE), "min_idle": workers, "max_workers": workers, "workdir": str(tmp / "w")},
        "sessions": {"min_idle": 0, "dir": str(tmp / "sessions")},
        "jobs": {"enabled": False},
        "tenants": {"quiet": {"key": key_of("quiet"), **open_tenant}, "noisy": {"key": key_of("noisy"), **open_tenant},
                    "capped": {"key": key_of("capped"), **open_tenant, "max_concurrency": workers - 1},
                    "capped2": {"key": key_of("capped2"), **open_tenant, "max_concurrency": workers - 2}},
    }


async def quiet_waits(d: DaemonProc, count: int, every_s: float) -> dict[str, Any]:
    """The quiet tenant: ``count`` requests, one every ``every_s``; the daemon's queue wait of each
    (the result's ``queue_ms``: admission to a worker leased), and the loop lag meanwhile."""
    before = await scrape(d)
    async with AsyncClient(key=key_of("quiet"), socket_path=d.socket) as quiet:
        tasks = []
        for _ in range(count):
            tasks.append(asyncio.create_task(quiet.prompt("[[reply:quiet]]")))
            await asyncio.sleep(every_s)
        waits = [result.queue_ms for result in await asyncio.gather(*tasks)]
    lag = lag_buckets(await scrape(d), before)
    return {"p50_ms": round(percentile(waits, 0.5), 2), "p95_ms": round(percentile(waits, 0.95), 2),
            "max_ms": round(max(waits), 2), "requests": len(waits),
            "lag_p95_ms": _ms(histogram_quantile(0.95, lag))}


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
        await asyncio.sleep(0.5)  # the queue fills first
        try:
            yield done
        finally:
            # Hang up rather than wait for 50 queued turns: closing the stream cancels each one.
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


CAPPED_ARM = "noisy, max_concurrency {n} (as README advises)"
CAPPED2_ARM = "noisy, max_concurrency {n} (informational)"
FAIR_ARM = "noisy, fair queue only (informational)"


FAIR_WORKERS = 4


async def fairness(opts: Options, d: DaemonProc) -> dict[str, Any]:
    """The arms, on a daemon of `fair_config`."""
    # ≥ 200 quiet requests per arm in the full run, for a p95 that is not the single worst request;
    # 10 a second: about what the capped arm's one free worker does, a turn and its reset, unloaded.
    count, every_s = (20, 0.08) if opts.quick else (200, 0.1)
    workers, noisy = FAIR_WORKERS, 50
    arms: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    arms["solo"] = await quiet_waits(d, count, every_s)
    async with noise(d, "capped", noisy) as served:
        arms[CAPPED_ARM.format(n=workers - 1)] = {**await quiet_waits(d, count, every_s), "noisy_answers": served[0]}
    progress(began, "fairness: capped arm done")
    if not opts.quick:  # informational arms (the quick run's time is short)
        async with noise(d, "capped2", noisy) as served:
            arms[CAPPED2_ARM.format(n=workers - 2)] = {**await quiet_waits(d, count, every_s),
                                                       "noisy_answers": served[0]}
        # The fair queue shares turns, not seconds: 4 requests a second, below the ~8 turns a second
        # the noisy tenant's half of the workers gives it, keep the quiet tenant quiet.
        async with noise(d, "noisy", noisy) as served:
            arms[FAIR_ARM] = {**await quiet_waits(d, int(count * every_s / 0.25), 0.25), "noisy_answers": served[0]}
    progress(began, "fairness: arms done")
    return {"workers": workers, "noisy_in_flight": noisy, "quiet_requests": count, "quiet_every_s": every_s,
            "arms": arms}


# -- the section ------------------------------------------------------------------------------------------


async def run(opts: Options) -> Report:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="claudepool-fair-") as fair_tmp:
        async with contextlib.AsyncExitStack() as stack:
            fair_daemon = daemon_process(fair_config(Path(fair_tmp), FAIR_WORKERS))
            if opts.quick:
                # The fairness daemon boots (and idles) beside the soak: its boot is a few seconds
                # of a 30-second budget. Not in the full run, where it would idle 10 minutes.
                async with asyncio.TaskGroup() as tg:
                    soaked = tg.create_task(soak(opts))
                    booted = tg.create_task(stack.enter_async_context(fair_daemon))
                s, d = soaked.result(), booted.result()
            else:
                s = await soak(opts)
                d = await stack.enter_async_context(fair_daemon)
            t1 = time.monotonic()
            f = await fairness(opts, d)
    s["wall_s"], f["wall_s"] = round(t1 - t0, 1), round(time.monotonic() - t1, 1)
    s["ledger_record_bytes"] = round(ledger_record_bytes())
    return report(s, f, opts)


def report(s: dict[str, Any], f: dict[str, Any], opts: Options) -> Report:
    load = s["load"]
    anomalies = sum(load.get("anomalies", {}).values())
    answered = sum(load.get("answers", {}).values())
    prompts = load.get("requests", 0)
    # requests_total counts each request the service admitted or refused: every prompt the clients
    # sent, and each serve of a job (a job is served again after a worker died under it, or after a
    # refusal it waits out), which its log line names by the job's id.
    expected = prompts + s["job_serves"]
    open_jobs = sum(s["jobs_still_open"].values())
    ended_jobs = sum(s["jobs_ended"].values())
    checks = [
        ("soak: every request one terminal answer (client side)", anomalies == 0 and "error" not in load,
         f"{answered} answered, {anomalies} anomalies {load.get('anomalies', {})}"),
        ("soak: daemon's request count matches the clients' prompts + the job serves it logged",
         s["daemon_requests"] == expected and s["daemon_request_lines"] == s["daemon_requests"],
         f"requests_total {s['daemon_requests']}; clients {prompts} prompts + {s['job_serves']} job serves "
         f"({s['jobs_served_more_than_once']} jobs served more than once); {s['daemon_request_lines']} request lines"),
        ("soak: every job submitted ended (none lost)",
         open_jobs == 0 and ended_jobs == s["jobs_submitted"] == load.get("jobs", -1),
         f"{load.get('jobs')} submitted (clients), {s['jobs_submitted']} stored, ended {s['jobs_ended']}, "
         f"still open in the store {s['jobs_still_open']}"),
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
    solo = arms["solo"]
    for name, arm in arms.items():
        if name.startswith("noisy, max_concurrency") and "informational" not in name:
            ratio = arm["p95_ms"] / solo["p95_ms"] if solo["p95_ms"] else float("inf")
            checks.append((f"fairness ({name}): quiet p95 queue wait ≤ 1.5× solo", ratio <= 1.5,
                           f"{arm['p95_ms']} ms vs {solo['p95_ms']} ms solo ({ratio:.2f}×, "
                           f"+{arm['p95_ms'] - solo['p95_ms']:.2f} ms; loop lag p95 {arm['lag_p95_ms']} ms "
                           f"vs {solo['lag_p95_ms']} ms solo), {arm['requests']} quiet requests"))
    answers = sorted(load.get("answers_by_kind", {}).items(), key=lambda kv: -kv[1])
    md = [f"{s['clients']} concurrent clients for {s['duration_s']:g} s ({'quick' if opts.quick else 'full'}) "
          f"against one daemon with {s['workers']} fake-CLI workers (+{s['session_workers']} for sessions); think "
          f"time {s['plan']['think_s']} s; {s['plan']['hangup_p']:.0%} of streams hung up mid-way; half the jobs "
          f"`priority: interactive`, half `batch`. Requests by kind: {load.get('by_kind')}.", "",
          f"Load against capacity: the daemon counted {s['offered_per_s']} requests/s; its workers were busy "
          f"{s['utilization']:.0%} of the time (request time less queue wait, over workers × duration); mean "
          f"queue wait {s['queue_wait_mean_ms']} ms. The load ended {load.get('tail_s')} s (per client kind) "
          "after its deadline, the last requests in flight then.", "",
          table(["client kind:answer", "count"], [[k, v] for k, v in answers]), "",
          table(["daemon outcome (requests_total)", "count"],
                sorted(s["daemon_outcomes"].items(), key=lambda kv: -kv[1])), "",
          "What each count counts: the clients count one request per prompt they send (socket, SSE, HTTP, "
          "session turn; a hang-up included) and one per job they submit; `claudepool_requests_total` "
          "counts each request the service admitted or refused, so a job counts once per serve (again after "
          f"a worker died under it): {s['job_serves']} serves of {s['jobs_submitted']} jobs here, read from "
          "the daemon's `request` log lines (a job's request id is its job id).", "",
          f"Jobs: ended {s['jobs_ended']}; still queued or running in the store at the end: "
          f"{s['jobs_still_open']}. Worker exits: {s['exits']}. Event-loop lag over the run: p50 "
          f"{s['lag_p50_ms']} ms, p99 {s['lag_p99_ms']} ms; over the {s['load_wall_s']} s of load the loop's "
          f"thread ran {s['loop_cpu_s']} s on a CPU and waited {s['loop_runq_s']} s runnable for one "
          "(`schedstat`: a lag the wait explains is the machine's, not a callback blocking the loop). "
          f"Daemon RSS {s['rss_first_mib']} → {s['rss_last_mib']} MiB (store bounds small enough for the "
          "warm-up to fill them: `store.ledger_max_records` and `store.settled_max_ids` 2,000, "
          "`jobs.retention_s` 60, "
          f"`sessions.retention_s` 20). At the defaults RSS grows until the ledger is full: a record and its "
          f"settled id take {s.get('ledger_record_bytes')} B (tracemalloc), "
          f"{s.get('ledger_record_bytes', 0) * 100_000 / 2**20:.0f} MiB at 100,000 records.", "",
          f"Fairness: {f['workers']} workers, a noisy tenant keeping {f['noisy_in_flight']} requests in flight "
          f"([[sleep:0.5]] each), the quiet one {f['quiet_requests']} requests, one every {f['quiet_every_s']} s, "
          "per arm. Queue wait as the daemon measures it (the result's `queue_ms`: admission to a worker). "
          "Beside a tenant bound by the fair queue alone the quiet one waits for a turn to end whenever all "
          "workers are busy (by design: a turn is not pre-empted; and the queue shares turns, not seconds, "
          "so that arm's quiet tenant sends 4 a second, under its share of turns); `max_concurrency` below the "
          "pool's size leaves it a worker, and that worker is reset after each of its turns: one below, a "
          "request that comes while the reset runs waits for it; two below, one worker is free while the "
          "other resets (compare the two arms).", "",
          table(["arm", "quiet p50 ms", "quiet p95 ms", "quiet max ms", "requests", "loop lag p95 ms"],
                [[k, v["p50_ms"], v["p95_ms"], v["max_ms"], v["requests"], v["lag_p95_ms"]] for k, v in arms.items()])]
    return Report(NAME, {"soak": s, "fairness": f}, "\n".join(md), checks)


def plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    timeline = rep.data["soak"]["timeline"]
    t = [p["t_s"] for p in timeline]
    fig, (ax, below) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 2))
    ax.plot(t, [p["rss_mib"] for p in timeline], color="tab:blue", label="daemon RSS (MiB)")
    ax.set_ylabel("daemon RSS, MiB", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [p["lag_p99_ms"] or 0 for p in timeline], color="tab:red", label="event-loop lag p99 (ms)")
    ax2.set_ylabel("event-loop lag p99 per sample, ms", color="tab:red")
    ax.set_title(f"Soak: {rep.data['soak']['clients']} clients, RSS and event-loop lag")
    # Whether a late loop was busy (on a CPU) or not scheduled (runnable, waiting for one).
    below.plot(t, [p.get("loop_cpu_share", 0) for p in timeline], color="tab:green", label="on a CPU")
    below.plot(t, [p.get("loop_runq_share", 0) for p in timeline], color="tab:orange", label="waiting for a CPU")
    below.set_ylabel("loop thread, share of time")
    below.set_xlabel("seconds")
    below.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path = out_dir / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
