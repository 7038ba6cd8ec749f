"""The facade between the front ends and the core (issue 11), on a daemon that is composed but never
run: no front end, no worker process. Who may read what, the ledger read bound, and the prompt
pipeline's refusals, each counted once in the registry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from claudepool.config import load_settings
from claudepool.daemon.app import Daemon
from claudepool.daemon.notify import Notifier
from claudepool.errors import BadRequest, Forbidden, NotFound, TooManyInFlight, Unauthorized
from claudepool.protocol.wire import PromptRequest
from claudepool.store.base import UsageRecord
from tests.conftest import FAKE_CLAUDE

ADMIN = "admin-key-0123"
SCRAPER = "scrape-key-0123"
KEYS = {"acme": "acme-key-0123", "beta": "beta-key-0123"}


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    settings = load_settings(
        None, server={"socket": "", "http": "", "admin_key": ADMIN, "max_ledger_reads_per_tenant": 2,
                      "ledger_page_records": 3},
        metrics={"key": SCRAPER},
        pool={"claude_bin": str(FAKE_CLAUDE), "min_idle": 1, "workdir": str(tmp_path / "w")},
        profiles={"default": {}, "lean": {"min_idle": 0}},
        sessions={"dir": str(tmp_path / "sessions")},
        tenants={"acme": {"key": KEYS["acme"], "daily_budget_usd": 2.0}, "beta": {"key": KEYS["beta"]}},
    )
    d = Daemon(settings, notifier=Notifier({}))
    yield d
    await d.store.close()
    await d.limiter.close()


def requests(d: Daemon, tenant: str, outcome: str) -> float | None:
    return d.registry.get_sample_value("claudepool_requests_total", {"tenant": tenant, "outcome": outcome})


async def settle(d: Daemon, tenant: str, count: int, cost_usd: float = 0.25) -> None:
    now = time.time()
    for i in range(count):
        await d.store.settle(UsageRecord(record_id=f"{tenant}-{i}", request_id=f"r-{tenant}-{i}", tenant=tenant,
                                         profile="default", model="m", outcome="ok", at=now - 10 + i,
                                         output_tokens=10, cost_usd=cost_usd))


async def test_a_tenant_reads_only_its_own_usage_and_the_admin_any(daemon: Daemon) -> None:
    api = daemon.facade
    await settle(daemon, "acme", 2)
    await settle(daemon, "beta", 1)
    assert api.scope(KEYS["acme"]) == ["acme"]
    assert api.scope(ADMIN) is None
    assert api.scope(ADMIN, "beta") == ["beta"]
    with pytest.raises(Forbidden):
        api.scope(KEYS["acme"], "beta")
    for key in ("wrong", None, SCRAPER):
        with pytest.raises(Unauthorized):
            api.scope(key)

    own = await api.usage(KEYS["acme"])
    assert set(own["tenants"]) == {"acme"}
    acme = own["tenants"]["acme"]
    assert acme["total"]["output_tokens"] == 20
    assert acme["budget"]["daily_limit_usd"] == 2.0
    assert acme["budget"]["day_spent_usd"] == pytest.approx(0.5)
    everyone = await api.usage(ADMIN)
    assert set(everyone["tenants"]) == {"acme", "beta"}
    with pytest.raises(BadRequest, match="bad usage window"):
        await api.usage(ADMIN, window="fortnight")


async def test_ledger_pages_are_bounded_and_reads_in_flight_are_bounded_per_reader(daemon: Daemon) -> None:
    api = daemon.facade
    await settle(daemon, "acme", 5)
    async with api.ledger(KEYS["acme"], tenant=None, since=None, limit=100) as page:
        assert page.limit == 3  # server.ledger_page_records
        assert [r.record_id for r in page.records] == ["acme-0", "acme-1", "acme-2"]  # oldest first
    async with api.ledger(KEYS["acme"], tenant=None, since=None, limit=10) as first, \
            api.ledger(KEYS["acme"], tenant=None, since=None, limit=10) as second:
        assert first.records and second.records
        with pytest.raises(TooManyInFlight):
            async with api.ledger(KEYS["acme"], tenant=None, since=None, limit=10):
                pass
        # Another reader has reads of its own.
        async with api.ledger(ADMIN, tenant="acme", since=None, limit=10) as admin:
            assert len(admin.records) == 3
    async with api.ledger(KEYS["acme"], tenant=None, since=None, limit=1) as again:
        assert len(again.records) == 1  # the reads ended: room again
    with pytest.raises(Forbidden):
        async with api.ledger(KEYS["beta"], tenant="acme", since=None, limit=10):
            pass


async def test_status_pools_and_metrics_each_need_their_key(daemon: Daemon) -> None:
    api = daemon.facade
    ready, detail = api.readiness()
    assert (ready, detail["draining"], set(detail["pools"])) == (False, False, {"default", "lean"})  # not warm yet
    assert api.status(KEYS["beta"]) == detail
    admin_view = api.status(ADMIN)
    assert set(admin_view["pools"]) == {"default", "default.sessions", "lean", "lean.sessions"}
    assert api.pool_status(ADMIN)["pools"].keys() == admin_view["pools"].keys()
    with pytest.raises(Forbidden):
        api.pool_status(KEYS["acme"])
    for key in ("wrong", None):
        with pytest.raises(Unauthorized):
            api.status(key)
        with pytest.raises(Unauthorized):
            api.metrics(key)
    with pytest.raises(Forbidden):
        api.metrics(KEYS["acme"])
    for key in (SCRAPER, ADMIN):
        assert b'claudepool_requests_total{outcome="ok",tenant="acme"} 0.0' in api.metrics(key)


async def test_handle_refuses_a_bad_key_before_it_reads_the_body(daemon: Daemon) -> None:
    api = daemon.facade
    reads: list[str] = []

    async def read() -> PromptRequest:
        reads.append("read")
        return PromptRequest(prompt="hello")

    with pytest.raises(Unauthorized):
        await api.handle("wrong", read)
    assert reads == []
    assert requests(daemon, "__unauthenticated__", "unauthorized") == 1


async def test_handle_counts_each_refusal_once_under_its_tenant(daemon: Daemon) -> None:
    api = daemon.facade

    async def unreadable() -> PromptRequest:
        raise BadRequest("the body is not valid JSON")

    with pytest.raises(BadRequest):
        await api.handle(KEYS["acme"], unreadable)
    assert requests(daemon, "acme", "bad_request") == 1
    with pytest.raises(Forbidden):  # beta may use only its own profile
        await api.handle(KEYS["beta"], PromptRequest(prompt="hi", profile="lean"))
    with pytest.raises(NotFound):
        await api.handle(KEYS["beta"], PromptRequest(prompt="hi", profile="absent"))
    assert (requests(daemon, "beta", "forbidden"), requests(daemon, "beta", "not_found")) == (1, 1)
    # A refusal the front end made itself, with or without a good key.
    api.refused(BadRequest("a frame it cannot read"), key=KEYS["beta"])
    api.refused(BadRequest("a frame it cannot read"))
    assert requests(daemon, "beta", "bad_request") == 1
    assert requests(daemon, "__unauthenticated__", "bad_request") == 1
    assert daemon.service.in_flight == 0 and daemon.service.queued == 0
    assert daemon.registry.get_sample_value("claudepool_request_duration_seconds_count") == 0  # none admitted


async def test_sessions_are_the_callers_own(daemon: Daemon) -> None:
    api = daemon.facade
    acme = api.authenticate(KEYS["acme"])
    view: dict[str, Any] = await api.create_session(acme, None)
    assert (view["tenant"], view["profile"], view["where"]) == ("acme", "default", {"state": "new"})
    assert [s["id"] for s in await api.list_sessions("acme")] == [view["id"]]
    assert await api.list_sessions("beta") == []
    assert [s["id"] for s in await api.list_sessions(None)] == [view["id"]]  # the admin's view: all
    with pytest.raises(NotFound):
        await api.get_session("beta", view["id"])  # another tenant's id is unknown to it
    assert (await api.get_session("acme", view["id"]))["id"] == view["id"]
    await api.delete_session("acme", view["id"])
    assert await api.list_sessions("acme") == []
