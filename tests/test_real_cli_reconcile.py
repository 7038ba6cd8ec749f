"""Reconciliation on the real CLI behind a real daemon (issue 12, "Reconciliation"): after mixed traffic
(stateless prompts, a session, an upstream error the CLI retries, a stream cut mid-way, a tool loop)
`claudepool reconcile` finds the ledger and the provider's usage and cost reports equal, to the token
and the dollar; a call made to the provider past the gateway shows as the gap it is."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.client import AsyncClient
from claudepool.tenancy.budgets import PricingTable
from claudepool.tenancy.settings import PriceSettings
from claudepool.testing.fake_upstream import FakeUpstream
from tests.conftest import REPO
from tests.daemon_fixtures import ADMIN_KEY, KEYS, RunningDaemon, make_daemon
from tests.helpers import eventually, until

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

ADMIN = "sk-ant-admin01-reconcile-e2e-org"
CALL_KEY = "sk-ant-api03-reconcile-e2e-calls"
# Both sides price alike: the daemon's [pricing] and the fake provider's table.
PRICES = {"default": {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cache_read_per_mtok": 0.3,
                      "cache_write_per_mtok": 3.75}}


@pytest.fixture
async def org() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream(admin_key=ADMIN, pricing=PricingTable.of({
        name: PriceSettings(**price) for name, price in PRICES.items()}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def reconcile(*args: str) -> tuple[int, str, str]:
    """``python -m claudepool reconcile ARGS``, as an operator runs it: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "claudepool", "reconcile", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_reconcile_finds_no_difference_after_mixed_traffic_and_the_gap_of_a_call_past_the_gateway(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, org: FakeUpstream, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    first_day = datetime.now(UTC).date() - timedelta(days=1)  # a run across midnight stays in range
    ledger_file = tmp_path / "ledger.jsonl"
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 2, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": org.base_url, "api_key": CALL_KEY, "admin_key": ADMIN},
        profiles={"default": {"upstream_max_retries": 1}, "lean": {}, "other": {},
                  "tools": {"tools": ["Bash"], "args": ["--allowedTools", "Bash"], "upstream_max_retries": 0,
                            "min_idle": 0}},
        tenants={"acme": {"profiles": ["default", "tools"]}},
        metering={"ledger_file": str(ledger_file)}, pricing=PRICES)
    async with AsyncClient(key=KEYS["acme"], url=d.url) as acme, AsyncClient(key=KEYS["beta"], url=d.url) as beta:
        stateless = [await acme.prompt("first [[reply:one]]"), await beta.prompt("second, a longer prompt " * 20)]
        session = (await acme.create_session())["id"]
        turns = [await acme.prompt("remember PELICAN-7 [[reply:noted]]", session=session),
                 await acme.prompt("what was it? [[reply:PELICAN-7]]", session=session)]
        failed = await acme.prompt("fails upstream [[status:529]]")  # 529, retried once: 529 again
        tool = await acme.prompt("run it [[tool:Bash:echo hi]]", profile="tools")  # two calls
    assert [a.text for a in (*stateless[:1], *turns)] == ["one", "noted", "PELICAN-7"]
    assert failed.is_error and tool.text.strip() == "hi"
    # A stream cut mid-way: the client leaves after its first text; the turn is interrupted and the
    # CLI abandons the call while the provider is still sending.
    async with aiohttp.ClientSession() as http, http.post(
        f"{d.url}/v1/prompt", data=orjson.dumps({"prompt": "stream then leave [[stall]]", "stream": True}),
        headers={"Authorization": f"Bearer {KEYS['beta']}"},
    ) as resp:
        assert (await resp.content.readline()).startswith(b"event: delta")
    calls = org.message_requests()
    await until(lambda: any(r.cut for r in calls), 20)

    async def settled() -> bool:
        return d.daemon.meter.backlog == 0 and len(await d.daemon.store.ledger()) == len(calls)

    await eventually(settled, 20)
    assert len(calls) == 9  # 2 stateless, 2 session turns, the 529 and its retry, the tool loop's 2, the cut one
    assert sorted(r.status for r in calls).count(529) == 2 and sum(r.cut for r in calls) == 1
    (cut,) = [r for r in calls if r.cut]
    assert cut.usage is not None and cut.usage["output_tokens"] == 1  # message_start's count: all it reported

    config = tmp_path / "claudepool.toml"
    config.write_text(f'[upstream]\nbase_url = "{org.base_url}"\nadmin_key = "{ADMIN}"\n')
    last_day = datetime.now(UTC).date()
    days = ("--since", first_day.isoformat(), "--until", last_day.isoformat(), "--config", str(config))
    code, out, err = await reconcile(*days, "--url", d.url, "--key", ADMIN_KEY, "--json")
    assert code == 0, out + err
    report: dict[str, Any] = json.loads(out)
    rows = report["rows"]
    assert report["ledger"]["calls"] == len(calls) and report["within_tolerance"] is True
    for row in rows:
        diff = row["difference"]
        assert all(diff[k] == 0 for k in diff if k.endswith("_tokens")), row
        assert abs(diff["cost_usd"]) < 1e-9, row
    sent = {k: sum((r.usage or {}).get(k, 0) for r in calls) for k in ("input_tokens", "output_tokens",
                                                                     "cache_read_input_tokens",
                                                                     "cache_creation_input_tokens")}
    ours = {k: sum(row["ledger"][k] for row in rows) for k in ("uncached_input_tokens", "output_tokens",
                                                               "cache_read_input_tokens",
                                                               "cache_write_5m_input_tokens")}
    assert list(ours.values()) == list(sent.values())  # what the provider's log says it sent, to the token
    assert sent["output_tokens"] > 0 and sent["cache_creation_input_tokens"] > 0
    assert sum(row["ledger"]["cost_usd"] for row in rows) > 0
    print("reconcile after mixed traffic:", json.dumps(rows))
    # The same from the ledger file alone, as when the daemon is down.
    code, text, err = await reconcile(*days, "--ledger-file", str(ledger_file))
    assert code == 0, text + err
    assert f"ledger: {len(calls)} calls from {ledger_file}" in text and f"0 of {len(rows)} rows beyond" in text
    print(text)

    # One call straight to the provider, past the gateway: no ledger record, but the provider bills it.
    model = max(rows, key=lambda row: row["ledger"]["calls"])["model"]
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "[[reply:off the books]]"}]}
    async with aiohttp.ClientSession() as http, http.post(f"{org.base_url}/v1/messages", data=orjson.dumps(body),
                                                          headers={"x-api-key": CALL_KEY}) as resp:
        assert resp.status == 200
    bypass = org.message_requests()[-1]
    assert bypass.usage is not None
    code, out, err = await reconcile(*days, "--url", d.url, "--key", ADMIN_KEY, "--json")
    assert code == 1, out + err
    gap = json.loads(out)
    day = datetime.fromtimestamp(bypass.received_unix, UTC).date().isoformat()
    (row,) = [r for r in gap["rows"] if not r["within_tolerance"]]
    assert (row["day"], row["model"]) == (day, model)
    assert row["difference"] == {
        "uncached_input_tokens": bypass.usage["input_tokens"], "output_tokens": bypass.usage["output_tokens"],
        "cache_read_input_tokens": bypass.usage["cache_read_input_tokens"],
        "cache_write_5m_input_tokens": bypass.usage["cache_creation_input_tokens"], "cache_write_1h_input_tokens": 0,
        "cost_usd": pytest.approx(org.pricing.cost(model, **dict[str, Any](bypass.usage)), abs=1e-9)}
    assert row["difference"]["output_tokens"] > 0 and row["difference"]["cost_usd"] > 0
    code, text, _ = await reconcile(*days, "--url", d.url, "--key", ADMIN_KEY, "--tolerance-usd", "0.0")
    assert code == 1 and "DIFF" in text
    print(text)
    # The admin key reached no model call, no worker and no log line.
    assert org.requests_containing(ADMIN) == []
    for pool in (*d.daemon.pools.values(), *d.daemon.session_pools.values()):
        for worker in pool.workers():
            if worker.pid:
                assert ADMIN.encode() not in Path(f"/proc/{worker.pid}/environ").read_bytes()
    assert ADMIN not in caplog.text
