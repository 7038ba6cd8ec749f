"""Tokens and dollars per 1,000 requests, at list prices, from the daemon's own ledger.

A ``claudepool serve`` process on the real CLI, the loopback fake upstream in this process (its
request log is the cross-check; its cache simulation reads what an earlier call wrote). Cells:

* profile: ``default`` (the safe profile: ``--bare``, ``--tools ""``, the CLI's own system prompt),
  ``lean`` (the same with a one-line ``system_prompt``, README Routing's ``lean``). Both are bare, so
  three more say what the default saves: ``unbare`` (``bare = false``), ``tools`` (the CLI's tool set)
  and ``stock`` (both: the CLI as it comes). Quick runs default, lean and stock;
* turn kind, all on the pool lane: ``prompt`` (stateless ``/v1/prompt``), ``session`` (the turns of
  one ``/v1/sessions`` session), ``conversation`` (``POST /v1/messages`` with the growing history,
  recognised: only the new message runs) and ``resent`` (the same history with
  ``x-claudepool-conversation: off``: flattened and re-paid every turn). Each kind sends the same
  user messages, ``turns`` per conversation, each asking for an answer of ``ANSWER_TOKENS``;
* lane: jobs (`bench.jobs_bench.run_lane`, short classification prompts) on the pool lane and on the
  batch lane (the fake's Message Batches API, billed at the batch multiplier).

Each cell is a tenant of its own, so the ledger's records (``GET /v1/ledger``, one per model call)
say which cell each call was billed to. Tokens per request and $ per 1,000 requests are those
records' sums over the requests sent. Every record is matched to the fake's log (by the provider's
request id, or a batch request's message id) and its tokens compared; the fake's calls that no
record bills are counted. Each pool has one worker, warmed past its first turn (`warm_up`), so every
measured turn is a steady-state one. Profiles run side by side, each its cells in turn: the fake's
cache is keyed by content, so the tokens do not depend on the interleaving (runs give the same
numbers to the token).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.daemon_proc import daemon_process
from bench.jobs_bench import LIST_PRICES, run_lane
from bench.suite import Options, Report, table
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.settings import PriceSettings
from claudepool.testing.fake_upstream import FakeUpstream

NAME = "cost"
ADMIN = "bench-admin-0123"
LEAN_PROMPT = "Answer in one short paragraph."
ANSWER_TOKENS = 150
# Profile -> its [profiles.NAME] table.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "lean": {"system_prompt": LEAN_PROMPT},
    "unbare": {"bare": False},
    # The CLI's own tool set, unsandboxed: safe here only because the fake upstream never asks for a
    # tool call (no [[tool:…]] directive in any prompt), so no tool ever runs.
    "tools": {"tools": ["default"], "sandbox": False},
    # Both: the CLI as it comes, against which the safe default's savings add up.
    "stock": {"bare": False, "tools": ["default"], "sandbox": False},
}
KINDS = ("prompt", "session", "conversation", "resent")
TOKEN_KEYS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
SHORT = {"input_tokens": "input", "cache_read_input_tokens": "cache read",
         "cache_creation_input_tokens": "cache write", "output_tokens": "output"}


@dataclass
class Cell:
    profile: str
    kind: str  # prompt | session | conversation | resent | job
    lane: str  # pool | batch
    requests: int  # sent (and answered)
    ledger_requests: int  # what the ledger counts (its records' ``requests``)
    calls_per_request: float
    tokens_per_request: dict[str, float]
    usd_per_1000: float  # the daemon's ledger
    input_usd_per_1000: float  # of which the input side (input, cache reads and writes): what profiles change
    upstream_usd_per_1000: float  # the fake's log of the same calls, priced with the same table
    unmatched: int  # records the fake's log has no call for
    mismatched: int  # records whose tokens differ from the fake's
    # $ per 1,000 requests at each turn of the cell's conversations (kinds other than job).
    usd_per_1000_by_turn: list[float] = field(default_factory=list)


def tenant_of(profile: str, kind: str, lane: str) -> str:
    return f"{profile}-{kind}-{lane}"


def key_of(tenant: str) -> str:
    return f"key-{tenant}-0123"


def pricing() -> PricingTable:
    return PricingTable.of({m: PriceSettings(**p) for m, p in LIST_PRICES.items()})


def upstream_index(upstream: FakeUpstream) -> dict[str, tuple[dict[str, int], bool]]:
    """Every billable call of the fake's log: provider request id (a /v1/messages call) or message id
    (a batch request) -> (its usage, whether it was a batch request)."""
    index: dict[str, tuple[dict[str, int], bool]] = {}
    for rec in upstream.message_requests():
        if rec.usage is not None:
            index[rec.request_id] = (rec.usage, False)
    for item in upstream.batches.billable():
        if item.usage is not None and item.result is not None:
            index[str(item.result["message"]["id"])] = (dict(item.usage), True)
    return index


def aggregate(profile: str, kind: str, lane: str, requests: int, records: Iterable[Mapping[str, Any]],
              index: Mapping[str, tuple[dict[str, int], bool]], prices: PricingTable) -> Cell:
    """One cell from its ledger records, cross-checked call by call against the fake's log (a record
    is matched by the provider's request id, or a batch request's message id)."""
    totals = dict.fromkeys(TOKEN_KEYS, 0)
    usd = upstream_usd = output_usd = 0.0
    calls = ledger_requests = unmatched = mismatched = 0
    for r in records:
        calls += 1
        ledger_requests += int(r.get("requests", 0))
        usd += float(r.get("cost_usd", 0.0))
        output_usd += prices.cost(str(r.get("model", "")), output_tokens=int(r.get("output_tokens", 0)),
                                  batch=r.get("service_tier") == "batch")
        for k in TOKEN_KEYS:
            totals[k] += int(r.get(k, 0))
        seen = index.get(str(r.get("upstream_request_id") or "")) or index.get(str(r.get("message_id") or ""))
        if seen is None:
            unmatched += 1
            continue
        usage, batch = seen
        if any(int(usage.get(k, 0)) != int(r.get(k, 0)) for k in TOKEN_KEYS):
            mismatched += 1
        upstream_usd += prices.cost(str(r.get("model", "")), batch=batch, **{k: int(usage.get(k, 0))
                                                                              for k in TOKEN_KEYS})
    n = max(requests, 1)
    return Cell(profile, kind, lane, requests, ledger_requests, round(calls / n, 2),
                {k: round(v / n, 1) for k, v in totals.items()}, round(usd / n * 1000, 4),
                round((usd - output_usd) / n * 1000, 4), round(upstream_usd / n * 1000, 4), unmatched, mismatched)


def usd_by_turn(records: Iterable[Mapping[str, Any]], turns: int) -> list[float]:
    """$ per 1,000 requests at each turn index: the cell's requests in the order they ended (a
    request's records together, by its ``request_id``), the i-th one being turn ``i % turns``."""
    ended: dict[str, float] = {}
    usd: dict[str, float] = {}
    for r in records:
        rid = str(r["request_id"])
        ended[rid] = max(ended.get(rid, 0.0), float(r["at"]))
        usd[rid] = usd.get(rid, 0.0) + float(r.get("cost_usd", 0.0))
    sums, counts = [0.0] * turns, [0] * turns
    for i, rid in enumerate(sorted(ended, key=lambda k: ended[k])):
        sums[i % turns] += usd[rid]
        counts[i % turns] += 1
    return [round(total / n * 1000, 4) if n else 0.0 for total, n in zip(sums, counts, strict=True)]


def conversations(count: int, turns: int, tag: str) -> list[list[str]]:
    """User messages, unique per conversation (a recognised history must not match another's)."""
    return [[f"Conversation {tag}-{c}, turn {t}: name one benefit of a warm process pool. "
             f"[[tokens:{ANSWER_TOKENS}]]" for t in range(turns)] for c in range(count)]


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                headers: dict[str, str]) -> tuple[dict[str, Any], Mapping[str, str]]:
    async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
        raw = await resp.read()
        if resp.status not in (200, 201):
            raise RuntimeError(f"{url} answered {resp.status}: {raw[:300]!r}")
        return orjson.loads(raw), resp.headers


async def run_kind(http: aiohttp.ClientSession, url: str, key: str, kind: str, convs: list[list[str]]) -> int:
    """Send ``convs`` as turns of ``kind``; the number of requests sent."""
    auth = {"Authorization": f"Bearer {key}"}
    sent = 0
    for conv in convs:
        if kind == "prompt":
            for text in conv:
                answer, _ = await _post(http, f"{url}/v1/prompt", {"prompt": text}, auth)
                assert not answer["is_error"], answer
                sent += 1
        elif kind == "session":
            session, _ = await _post(http, f"{url}/v1/sessions", {}, auth)
            for text in conv:
                answer, _ = await _post(http, f"{url}/v1/prompt", {"prompt": text, "session": session["id"]}, auth)
                assert not answer["is_error"], answer
                sent += 1
            async with http.delete(f"{url}/v1/sessions/{session['id']}", headers=auth) as resp:
                assert resp.status == 204, await resp.text()
        else:
            headers = {"x-api-key": key, **({"x-claudepool-conversation": "off"} if kind == "resent" else {})}
            history: list[dict[str, str]] = []
            sid = ""
            for text in conv:
                history.append({"role": "user", "content": text})
                answer, got = await _post(http, f"{url}/v1/messages",
                                          {"model": "default", "max_tokens": 1024, "messages": history}, headers)
                history.append({"role": "assistant", "content": "".join(
                    b.get("text", "") for b in answer["content"] if b.get("type") == "text")})
                sid = got.get("x-claudepool-session", sid)
                sent += 1
            if sid:  # the recognised conversation's session: give its worker back now
                async with http.delete(f"{url}/v1/sessions/{sid}", headers=auth) as resp:
                    assert resp.status == 204, await resp.text()
    return sent


async def warm_up(http: aiohttp.ClientSession, url: str, profile: str) -> None:
    """Steady state before the profile's cells: the provider's cache holds its prefix, and each of its
    workers is past its first turn. A fresh worker's first turn follows no ``/clear``: it carries a
    block of its own before the cache breakpoint (so it reads nothing from the cache) and none of the
    reset's caveat text; later turns all follow a reset, and workers are recycled only every
    ``max_turns``, so the first turn is left out."""
    auth = {"Authorization": f"Bearer {key_of('warm')}"}
    for i in range(2):
        await _post(http, f"{url}/v1/prompt", {"prompt": f"warm-up {i}", "profile": profile}, auth)
    session, _ = await _post(http, f"{url}/v1/sessions", {"profile": profile}, auth)
    await _post(http, f"{url}/v1/prompt", {"prompt": "warm-up", "session": session["id"]}, auth)
    async with http.delete(f"{url}/v1/sessions/{session['id']}", headers=auth) as resp:
        assert resp.status == 204, await resp.text()


async def run_cell(http: aiohttp.ClientSession, url: str, cell: tuple[str, str, str], n_convs: int, turns: int,
                   n_jobs: int) -> int:
    """Run one cell under its own tenant; the number of requests it sent."""
    profile, kind, lane = cell
    tenant = tenant_of(profile, kind, lane)
    if kind != "job":
        return await run_kind(http, url, key_of(tenant), kind, conversations(n_convs, turns, tenant))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key_of(tenant)}"}) as h:
        done = await run_lane(h, url, "batch_api" if lane == "batch" else "pool", n_jobs)
    assert done["succeeded"] == n_jobs, done
    return n_jobs


def daemon_config(opts: Options, base_url: str, tmp: Path, tenants: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "server": {"socket": "", "http": "127.0.0.1:0", "admin_key": ADMIN, "max_queued": 10_000},
        # One stateless worker per profile: every stateless turn follows a /clear, as in steady state.
        "pool": {"claude_bin": opts.claude, "min_idle": 1, "max_workers": 1, "batch_max_share": 1.0,
                 "workdir": str(tmp / "w"), "timeouts": {"ready_timeout_s": 60}},
        "profiles": {name: {"min_idle": 1, **PROFILES[name]} for name in profiles(opts)},
        "upstream": {"base_url": base_url, "api_key": "sk-ant-bench"},
        "pricing": LIST_PRICES,
        # One session worker per profile too: the cells run one session at a time and close it, so
        # every session's first turn follows a reset, as on a pool in steady state.
        "sessions": {"min_idle": 1, "max_workers": 1, "dir": str(tmp / "sessions")},
        "jobs": {"path": str(tmp / "jobs.sqlite3"), "max_running": 2, "batch_window_s": 0.3,
                 "max_batch_requests": 10_000, "batch_poll_first_s": 0.2, "batch_poll_max_s": 0.5,
                 "poll_interval_s": 0.1},
        "tenants": {t: {"key": key_of(t), "profile": p, "profiles": profiles(opts), "requests_per_minute": 0,
                        "max_queued": 0} for t, p in tenants},
    }


def profiles(opts: Options) -> list[str]:
    """Quick runs the default, lean (the brief's pair) and stock (what the default saves in all)."""
    return ["default", "lean", "stock"] if opts.quick else list(PROFILES)


def job_profiles(opts: Options) -> list[str]:
    """The batch lane sends a bare Messages request whatever the profile's CLI flags (only its system
    prompt and model go with it), so quick runs lanes on the default profile only."""
    return ["default"] if opts.quick else profiles(opts)


def sizes(opts: Options) -> tuple[int, int, int]:
    """Conversations per cell, turns per conversation, jobs per lane cell."""
    return (1, 3, 3) if opts.quick else (3, 6, 20)


async def run(opts: Options) -> Report:
    n_convs, turns, n_jobs = sizes(opts)
    cells_wanted = [(p, k, "pool") for p in profiles(opts) for k in KINDS] + \
                   [(p, "job", lane) for p in job_profiles(opts) for lane in ("pool", "batch")
                    if lane == "pool" or not PROFILES[p].get("tools")]  # the batch lane refuses tools
    tenants = [("warm", "default")] + [(tenant_of(*c), c[0]) for c in cells_wanted]
    upstream = FakeUpstream(batch_delay_s=0.2)
    t0 = time.perf_counter()
    base_url = await upstream.start()
    sent: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="claudepool-cost-") as tmp_s:
            async with daemon_process(daemon_config(opts, base_url, Path(tmp_s), tenants)) as d, \
                    aiohttp.ClientSession() as http:
                print(f"  {time.perf_counter() - t0:5.1f} s: daemon ready", file=sys.stderr, flush=True)

                async def chain(profile: str) -> None:
                    # Profiles run side by side: each has its own workers and tenants, and the fake's
                    # cache is keyed by content, so no profile's tokens depend on another's timing.
                    await warm_up(http, d.url, profile)
                    for cell in (c for c in cells_wanted if c[0] == profile):
                        sent[tenant_of(*cell)] = await run_cell(http, d.url, cell, n_convs, turns, n_jobs)
                    print(f"  {time.perf_counter() - t0:5.1f} s: {profile} done", file=sys.stderr, flush=True)

                async with asyncio.TaskGroup() as tg:  # one failing cell cancels the others
                    for p in profiles(opts):
                        tg.create_task(chain(p))
                records = await ledger(http, d.url, sent)
    finally:
        await upstream.stop()
    index, prices = upstream_index(upstream), pricing()
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_tenant.setdefault(r["tenant"], []).append(r)
    cells = [aggregate(p, k, lane, sent[tenant_of(p, k, lane)], by_tenant.get(tenant_of(p, k, lane), []), index,
                       prices) for p, k, lane in cells_wanted]
    for c in cells:
        if c.kind != "job":
            c.usd_per_1000_by_turn = usd_by_turn(by_tenant.get(tenant_of(c.profile, c.kind, c.lane), []), turns)
    billed = {str(r.get("upstream_request_id") or "") for r in records} | {str(r.get("message_id") or "")
                                                                             for r in records}
    unbilled = [i for i in index if i not in billed]
    return report(cells, unbilled, len(index), opts, turns, n_convs, n_jobs)


async def ledger(http: aiohttp.ClientSession, url: str, sent: Mapping[str, int]) -> list[dict[str, Any]]:
    """Every tenant's records, once the ledger counts each cell's requests (a record is settled just
    after its answer; bounded: a shortfall left after 10 s is reported by the checks, not waited for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        async with http.get(f"{url}/v1/ledger", params={"limit": "10000"},
                            headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200, await resp.text()
            records = [orjson.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
        counted: dict[str, int] = {}
        for r in records:
            counted[r["tenant"]] = counted.get(r["tenant"], 0) + int(r.get("requests", 0))
        if all(counted.get(t, 0) >= n for t, n in sent.items()) or loop.time() > deadline:
            return records
        await asyncio.sleep(0.1)


def find(cells: list[Cell], profile: str, kind: str, lane: str = "pool") -> Cell | None:
    return next((c for c in cells if (c.profile, c.kind, c.lane) == (profile, kind, lane)), None)


def ratio(a: Cell | None, b: Cell | None, *, input_side: bool = False) -> float | None:
    """``a``'s $ per request over ``b``'s (None: either not measured); ``input_side``: input tokens only."""
    if a is None or b is None:
        return None
    mine, theirs = (a.input_usd_per_1000, b.input_usd_per_1000) if input_side else (a.usd_per_1000, b.usd_per_1000)
    return mine / theirs if theirs else None


# What each profile is, for the report.
ABOUT = {
    "default": 'the safe default: `--bare`, `--tools ""`, the CLI\'s own (bare) system prompt',
    "lean": f'the default with `system_prompt = "{LEAN_PROMPT}"` (README Routing\'s lean)',
    "unbare": "the default with `bare = false`: what `--bare` saves",
    "tools": '`tools = ["default"]` (the CLI\'s tool set, no tool ever called): what `--tools ""` saves',
    "stock": "`bare = false` and the CLI's tool set: the CLI as it comes, what the safe default saves in all",
}


def report(cells: list[Cell], unbilled: list[str], upstream_calls: int, opts: Options, turns: int,
           n_convs: int, n_jobs: int) -> Report:
    rows = [[c.profile, c.kind, c.lane, c.requests, c.calls_per_request,
             *(c.tokens_per_request[k] for k in TOKEN_KEYS), f"{c.usd_per_1000:.4f}",
             f"{c.input_usd_per_1000:.4f}", f"{c.upstream_usd_per_1000:.4f}"] for c in cells]
    def shown(a: Cell | None, b: Cell | None) -> str:
        r = ratio(a, b)
        return "" if r is None else f"{r:.2f}× ({ratio(a, b, input_side=True) or 0:.2f}×)"

    within = [[p, shown(find(cells, p, "job", "batch"), find(cells, p, "job")),
               shown(find(cells, p, "conversation"), find(cells, p, "resent")),
               shown(find(cells, p, "session"), find(cells, p, "prompt"))] for p in profiles(opts)]
    versus = [[p, *(shown(find(cells, p, k), find(cells, "default", k)) for k in (*KINDS, "job"))]
              for p in profiles(opts) if p != "default"]
    records = sum(round(c.calls_per_request * c.requests) for c in cells)
    mismatched = sum(c.mismatched + c.unmatched for c in cells)
    miscounted = [f"{c.profile}/{c.kind}/{c.lane}" for c in cells if c.ledger_requests != c.requests]
    usd = sum(c.usd_per_1000 * c.requests for c in cells)
    usd_gap = abs(usd - sum(c.upstream_usd_per_1000 * c.requests for c in cells)) / usd if usd else 0.0
    checks: list[tuple[str, bool, str]] = [
        ("every ledger record matches the upstream's log, token for token", mismatched == 0,
         f"{mismatched} of {records} records differ or have no upstream call"),
        ("every upstream call is billed in the ledger", not unbilled,
         f"{len(unbilled)} of {upstream_calls} calls unbilled"),
        ("ledger $ = the upstream's log priced alike (within 0.1%)", usd_gap <= 0.001, f"{usd_gap:.4%} apart"),
        ("the ledger counts each request once", not miscounted,
         ", ".join(miscounted) + " off" if miscounted else "every cell"),
    ]
    if (r := ratio(find(cells, "default", "prompt"), find(cells, "stock", "prompt"))) is not None:
        checks.append(("the safe default costs less per stateless request than the stock CLI", r < 1,
                       f"{r:.2f}× the stock CLI's $"))
    for p in PROFILES:
        if (r := ratio(find(cells, p, "job", "batch"), find(cells, p, "job"))) is not None:
            checks.append((f"{p}: batch lane ≤ 0.5× the pool lane per job", r <= 0.5, f"{r:.2f}×"))
        if (r := ratio(find(cells, p, "conversation"), find(cells, p, "resent"))) is not None:
            checks.append((f"{p}: a recognised conversation costs less than the resent history", r < 1,
                           f"{r:.2f}× over {turns} turns"))
    prices = LIST_PRICES["default"]
    about = "\n".join(f"- `{p}`: {ABOUT.get(p, '')}" for p in profiles(opts))
    markdown = (
        "Tokens per request and $ per 1,000 requests from the daemon's own ledger (`GET /v1/ledger`, one record "
        f"per model call, a tenant per cell), at list prices ${prices['input_per_mtok']:g} in, "
        f"${prices['output_per_mtok']:g} out, ${prices['cache_read_per_mtok']:g} cache read, "
        f"${prices['cache_write_per_mtok']:g} cache write per MTok, the batch lane at 50%. The real CLI against "
        "the loopback fake upstream (its prompt-cache simulation; tokens are its bytes / 4). Turn kinds: "
        f"{n_convs} conversation(s) of {turns} user messages per cell, each answered with {ANSWER_TOKENS} output "
        f"tokens; `conversation`/`resent` are `POST /v1/messages` with the growing history, recognised or with "
        f"`x-claudepool-conversation: off`; a conversation's cost grows with its length, so those ratios hold for "
        f"{turns} turns. Jobs: {n_jobs} short classification prompts per lane; the batch lane sends a bare "
        "Messages request (no CLI system prompt, whatever the profile's flags) and refuses a profile with tools. "
        "`input $`: the input side alone (input, cache reads and writes), what a profile changes; `upstream $`: "
        "the fake's own log of the same calls, priced alike. Steady state: one worker per pool, warmed past its "
        "first turn (a fresh worker's first turn follows no reset and reads nothing from the cache; workers are "
        "recycled every `max_turns`). Profiles:\n\n" + about + "\n\n"
        + table(["profile", "kind", "lane", "requests", "calls/req", *(f"{SHORT[k]} tok/req" for k in TOKEN_KEYS),
                 "$ / 1000", "input $ / 1000", "upstream $ / 1000"], rows)
        + "\n\nRatios of $ per request, all of it (the input side alone in brackets), within each profile:\n\n"
        + table(["profile", "jobs: batch / pool lane", "recognised / resent history", "session / stateless"],
                within)
        + "\n\nEach profile over the default, per turn kind:\n\n"
        + table(["profile", *KINDS, "job (pool lane)"], versus)
        + "\n\n$ per 1,000 requests at each turn of a conversation (a session's context and a resent history "
          "grow with it; the stateless prompt's turns are independent):\n\n"
        + table(["profile", "kind", *(f"turn {t + 1}" for t in range(turns))],
                [[c.profile, c.kind, *c.usd_per_1000_by_turn] for c in cells
                 if c.usd_per_1000_by_turn and c.profile in ("default", "stock")]))
    return Report(NAME, {"cells": [asdict(c) for c in cells], "unbilled_upstream_calls": unbilled,
                         "upstream_calls": upstream_calls, "turns": turns, "conversations": n_convs,
                         "jobs": n_jobs, "answer_tokens": ANSWER_TOKENS, "prices": LIST_PRICES,
                         "quick": opts.quick}, markdown, checks)


def plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    cells = rep.data["cells"]
    groups = [(k, lane) for k in (*KINDS, "job") for lane in ("pool", "batch")
              if any(c["kind"] == k and c["lane"] == lane for c in cells)]
    profiles = [p for p in PROFILES if any(c["profile"] == p for c in cells)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(profiles)
    for i, p in enumerate(profiles):
        values = [next((c["usd_per_1000"] for c in cells if (c["profile"], c["kind"], c["lane"]) == (p, k, lane)), 0)
                  for k, lane in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=p)
    ax.set_xticks([x + width * (len(profiles) - 1) / 2 for x in range(len(groups))],
                  [k if k != "job" else f"job ({lane} lane)" for k, lane in groups])
    ax.set_ylabel("$ per 1,000 requests (list prices)")
    ax.set_title("Cost per 1,000 requests by profile, turn kind and lane (daemon's ledger)")
    ax.legend(title="profile")
    fig.tight_layout()
    path = out_dir / "cost_per_1000.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
