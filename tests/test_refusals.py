"""Requests refused before admission get their one canonical log line and their count, like any other.

Issue item 10 (and 9): refusals at admission (429, 402, 503) left no ``request`` log line although the
README promises one per request, and refusals before admission (401, 403, 404, 410) were missing from
``claudepool_requests_total``. Each kind is sent through HTTP and through the Unix socket; each must
add exactly one line (with its outcome, never the prompt or the key) and one count.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from claudepool.store.base import SessionRecord
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import spend, until
from tests.test_observability import json_logs
from tests.test_unix_api import connect

__all__ = ["json_logs", "make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
SECRET = "PROMPT-SECRET-5521"
WRONG_KEY = "WRONG-KEY-SECRET-9043"
MAX_PROMPT_BYTES = 2000
TENANTS: dict[str, dict[str, Any]] = {
    "acme": {"key": KEYS["acme"], "profiles": ["default", "lean"]},
    "limited": {"key": "limited-key-0123", "requests_per_minute": 1},
    "broke": {"key": "broke-key-0123", "daily_budget_usd": 0.0000001},
    "queued": {"key": "queued-key-0123", "max_concurrency": 1, "max_queued": 1},
}
KEY_OF = {name: str(t["key"]) for name, t in TENANTS.items()}


class Front:
    """One front end, seen the way a client sees it: send a prompt, get its code back. Each socket
    request has a connection of its own, so concurrent ones do not share a reader."""

    def __init__(self, d: RunningDaemon, kind: str) -> None:
        self.d, self.kind = d, kind

    async def prompt(self, key: str | None, **body: Any) -> str:
        """``ok`` or the error code the front end answered."""
        if self.kind == "http":
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            async with aiohttp.ClientSession() as session, session.post(
                    f"{self.d.url}/v1/prompt", data=orjson.dumps(body), headers=headers) as resp:
                answer = await resp.json()
                return "ok" if resp.status == 200 else str(answer["error"]["code"])
        async with connect(self.d) as client:
            await client.send({"id": "r1", "op": "prompt", "key": key or "", **body})
            frame = await client.read_until(lambda f: f.get("id") == "r1" and f["event"] in ("result", "error"))
        return "ok" if frame["event"] == "result" else str(frame["code"])

    async def raw(self, data: bytes) -> str:
        """Bytes as the request: a body for HTTP (acme's key), a line for the socket; the code answered."""
        if self.kind == "http":
            async with aiohttp.ClientSession() as session, session.post(
                    f"{self.d.url}/v1/prompt", data=data, headers={"Authorization": f"Bearer {KEYS['acme']}"}) as resp:
                return str((await resp.json())["error"]["code"])
        async with connect(self.d) as client:
            await client.send(data)
            frame = await client.read_until(lambda f: f["event"] == "error")
        return str(frame["code"])


@pytest.fixture(params=["http", "unix"])
async def front(request: pytest.FixtureRequest, make_daemon: MakeDaemon) -> Front:
    d = await make_daemon(tenants=TENANTS, server={"max_prompt_bytes": MAX_PROMPT_BYTES, "max_frame_bytes": 8192},
                          pool={"max_workers": 3})
    return Front(d, str(request.param))


class Ledger:
    """What the daemon logged and counted since the last `taken`."""

    def __init__(self, d: RunningDaemon, logs: io.StringIO) -> None:
        self.d, self.logs = d, logs
        self.lines_seen = 0
        self.counts = self._counts()

    def _counts(self) -> dict[tuple[str, str], float]:
        out = {}
        for family in self.d.daemon.registry.collect():
            for sample in family.samples:
                if sample.name == "claudepool_requests_total":
                    out[(sample.labels["tenant"], sample.labels["outcome"])] = sample.value
        return out

    def _lines(self) -> list[dict[str, Any]]:
        lines = [orjson.loads(line) for line in self.logs.getvalue().splitlines()]
        return [line for line in lines if line["logger"] == "claudepool.request"]

    def taken(self) -> tuple[list[dict[str, Any]], dict[tuple[str, str], float]]:
        """The request lines logged and the request counts added since the last call."""
        lines = self._lines()
        new_lines, self.lines_seen = lines[self.lines_seen:], len(lines)
        counts = self._counts()
        added = {k: v - self.counts.get(k, 0) for k, v in counts.items() if v != self.counts.get(k, 0)}
        self.counts = counts
        return new_lines, added

    def expect_one(self, tenant: str | None, outcome: str) -> dict[str, Any]:
        lines, added = self.taken()
        assert [(line["tenant"], line["outcome"]) for line in lines] == [(tenant, outcome)]
        assert added == {(tenant or "__unauthenticated__", outcome): 1}
        line = lines[0]
        assert isinstance(line["request_id"], str) and len(line["request_id"]) == 32
        assert (line["worker_slot"], line["input_tokens"], line["cost_usd"]) == (None, 0, 0.0)
        return line


async def test_every_refusal_has_one_line_and_one_count(front: Front, json_logs: io.StringIO) -> None:
    d = front.d
    ledger = Ledger(d, json_logs)
    acme = KEYS["acme"]
    await spend(d.daemon.store, "broke", 0.0000001)

    # Before any tenant is known.
    assert await front.prompt(WRONG_KEY, prompt=SECRET) == "unauthorized"
    ledger.expect_one(None, "unauthorized")
    assert await front.prompt(None, prompt=SECRET) == "unauthorized"
    ledger.expect_one(None, "unauthorized")
    # Bodies and frames the front end cannot read.
    if front.kind == "http":
        assert await front.raw(b"{not json " + SECRET.encode()) == "bad_request"
        ledger.expect_one("acme", "bad_request")
        assert await front.prompt(acme, prompt=SECRET, bogus=1) == "bad_request"
        ledger.expect_one("acme", "bad_request")
        assert await front.raw(orjson.dumps({"prompt": "x" * (MAX_PROMPT_BYTES + 70_000)})) == "prompt_too_large"
        ledger.expect_one("acme", "prompt_too_large")
    else:
        assert await front.raw(b"{not json " + SECRET.encode() + b"\n") == "bad_request"
        ledger.expect_one(None, "bad_request")
        assert await front.prompt(acme, prompt=SECRET, bogus=1) == "bad_request"
        ledger.expect_one(None, "bad_request")
        line = orjson.dumps({"id": "big", "op": "prompt", "key": acme, "prompt": "x" * 9000}) + b"\n"
        assert await front.raw(line) == "frame_too_large"
        ledger.expect_one(None, "frame_too_large")
        # Not a prompt: not a request either.
        assert await front.raw(orjson.dumps({"id": "s", "op": "status", "key": 1}) + b"\n") == "bad_request"
        assert ledger.taken() == ([], {})

    # What admission refuses.
    assert await front.prompt(acme, prompt="x" * (MAX_PROMPT_BYTES + 1)) == "prompt_too_large"
    ledger.expect_one("acme", "prompt_too_large")
    assert await front.prompt(acme, prompt=SECRET, profile="other") == "forbidden"
    assert ledger.expect_one("acme", "forbidden")["profile"] == "other"
    assert await front.prompt(acme, prompt=SECRET, profile="nope") == "not_found"
    ledger.expect_one("acme", "not_found")
    assert await front.prompt(acme, prompt=SECRET, session="s_nope_0001") == "not_found"
    assert ledger.expect_one("acme", "not_found")["session"] == "s_nope_0001"
    now = time.time()
    await d.daemon.store.session_put(SessionRecord(id="s_closed_0001", tenant="acme", profile="default", created_at=now,
                                                   last_used_at=now, state="closed", close_reason="expired"))
    assert await front.prompt(acme, prompt=SECRET, session="s_closed_0001") == "session_closed"
    ledger.expect_one("acme", "session_closed")

    assert await front.prompt(KEY_OF["limited"], prompt="first") == "ok"
    assert ledger.taken()[1] == {("limited", "ok"): 1}
    assert await front.prompt(KEY_OF["limited"], prompt=SECRET) == "rate_limited"
    ledger.expect_one("limited", "rate_limited")
    assert await front.prompt(KEY_OF["broke"], prompt=SECRET) == "budget_exhausted"
    ledger.expect_one("broke", "budget_exhausted")

    # One running, one waiting for the tenant's slot: the next is past its queue bound.
    running = asyncio.create_task(front.prompt(KEY_OF["queued"], prompt="[[sleep:1]]"))
    await until(lambda: d.daemon.service.in_flight == 1 and d.daemon.service.queued == 0)
    waiting = asyncio.create_task(front.prompt(KEY_OF["queued"], prompt="[[sleep:0.1]]"))
    await until(lambda: d.daemon.service.queued == 1)
    ledger.taken()
    assert await front.prompt(KEY_OF["queued"], prompt=SECRET) == "queue_full"
    ledger.expect_one("queued", "queue_full")
    assert list(await asyncio.gather(running, waiting)) == ["ok", "ok"]
    ledger.taken()

    d.daemon.service.draining = True
    try:
        assert await front.prompt(acme, prompt=SECRET) == "draining"
        ledger.expect_one("acme", "draining")
    finally:
        d.daemon.service.draining = False

    logged = json_logs.getvalue()
    for needle in (SECRET, WRONG_KEY, *KEY_OF.values()):
        assert needle not in logged
    rejected = d.daemon.registry.get_sample_value
    assert rejected("claudepool_rejections_total", {"tenant": "limited", "kind": "requests_per_minute"}) == 1
    assert rejected("claudepool_rejections_total", {"tenant": "queued", "kind": "queue_full"}) == 1
    assert rejected("claudepool_rejections_total", {"tenant": "broke", "kind": "budget"}) == 1
    # Refused requests are counted, not timed: the histograms hold admitted requests only.
    assert rejected("claudepool_request_duration_seconds_count") == 3


async def test_a_second_prompt_under_an_id_in_flight_is_one_refusal(make_daemon: MakeDaemon,
                                                                    json_logs: io.StringIO) -> None:
    d = await make_daemon()
    ledger = Ledger(d, json_logs)
    async with connect(d) as client:
        await client.send({"id": "dup", "op": "prompt", "key": KEYS["acme"], "prompt": "[[sleep:0.5]]"})
        await until(lambda: d.daemon.service.in_flight == 1)
        await client.send({"id": "dup", "op": "prompt", "key": KEYS["acme"], "prompt": SECRET})
        frame = await client.read_until(lambda f: f["event"] == "error")
        # Under id null, naming the id: an error under "dup" would read as the first one's answer.
        assert (frame["id"], frame["code"]) == (None, "bad_request")
        assert "'dup'" in frame["message"]
        ledger.expect_one(None, "bad_request")
        await client.read_until(lambda f: f["event"] == "result")
        lines, added = ledger.taken()
        assert [line["outcome"] for line in lines] == ["ok"] and added == {("acme", "ok"): 1}


async def test_unauthenticated_series_exist_at_zero_and_never_name_a_key(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    value = d.daemon.registry.get_sample_value
    for outcome in ("unauthorized", "bad_request", "prompt_too_large", "frame_too_large"):
        assert value("claudepool_requests_total", {"tenant": "__unauthenticated__", "outcome": outcome}) == 0
    for outcome in ("unauthorized", "forbidden", "not_found", "session_closed", "queue_full"):
        assert value("claudepool_requests_total", {"tenant": "acme", "outcome": outcome}) == 0
    async with aiohttp.ClientSession() as session, session.post(
            f"{d.url}/v1/prompt", data=b"{}", headers={"Authorization": f"Bearer {WRONG_KEY}"}) as resp:
        assert resp.status == 401
    assert value("claudepool_requests_total", {"tenant": "__unauthenticated__", "outcome": "unauthorized"}) == 1
    assert WRONG_KEY not in await d.metrics_text()
