"""Bounded per-tenant state (issue item 8): what one tenant, or one client, can make the daemon hold.

Open sessions per tenant, queued requests under concurrency (stateless and session turns), ledger
reads, and prompts in flight on one socket connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.helpers import until
from tests.test_unix_api import TERMINAL, connect, prompt

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


# -- prompts in flight on one socket connection ---------------------------------------------------------


async def test_a_connection_holds_at_most_max_requests_per_connection_prompts(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(server={"max_requests_per_connection": 3}, pool={"max_workers": 4})
    async with connect(d) as c, connect(d) as other:
        # One write, so all five are read before any of them runs.
        await c.send(*(prompt(f"r{i}", "[[hang]]", timeout_s=20) for i in range(5)))
        refused = [await c.next(), await c.next()]
        assert [(f["id"], f["event"], f["code"]) for f in refused] == [
            ("r3", "error", "too_many_in_flight"), ("r4", "error", "too_many_in_flight")]
        assert "3 requests are in flight on this connection" in refused[0]["message"]
        # The bound is per connection: another one is served meanwhile.
        await other.send(prompt("o1", "[[reply:elsewhere]]", tenant="beta"))
        assert (await other.next())["text"] == "elsewhere"
        # Room again once one of the three has ended.
        await c.send({"id": "c1", "op": "cancel", "target": "r0"})
        await c.until_terminals("r0")
        await c.send(prompt("r5", "[[reply:room again]]"))
        await c.read_until(lambda f: f["id"] == "r5" and f["event"] in TERMINAL)
        assert c.frames[-1]["text"] == "room again"
        for frame_id in ("r1", "r2"):
            await c.send({"id": f"c-{frame_id}", "op": "cancel", "target": frame_id})
        await c.until_terminals("r1", "r2")
    await until(lambda: d.daemon.service.in_flight == 0, 10)
    assert d.daemon.service.requests_by_outcome["cancelled"] == 3
    assert d.daemon.service.requests_by_outcome["too_many_in_flight"] == 2  # refusals are counted too
