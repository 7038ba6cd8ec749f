"""A worker frozen longer than the gateway's keep-alive (issue 16 goal 5) finds the connection it
pooled to the gateway closed by the gateway while it was stopped: its next turn must still answer,
with no error and no retry of the model call. The gateway's keep-alive is shortened to 1 s here
(aiohttp's default, the daemon's, is 75 s); the unfrozen run is the same scenario with the CLI awake
to see the close as it happens."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.protocol.cli_events import CliEvent
from claudepool.testing.fake_upstream import FakeUpstream
from tests.gateway_fixtures import MakeStack, Stack, lease_for, make_stack
from tests.helpers import collect

pytestmark = pytest.mark.real_cli
__all__ = ["make_stack"]

TIMEOUTS = WorkerTimeouts(ready_timeout_s=30, turn_idle_timeout_s=20, reset_timeout_s=10)
KEEPALIVE_S = 1.0


def profile(claude: str) -> Profile:
    return Profile(name="default", claude_bin=claude, upstream_max_retries=1, upstream_timeout_ms=20_000)


async def turn(stack: Stack, prompt: str, request_id: str) -> tuple[Any, list[CliEvent]]:
    lease = await lease_for(stack.pool, "acme", request_id)
    try:
        events, result = await collect(lease.run_turn(prompt), timeout_s=60)
        return result, events
    finally:
        lease.release()


def retries(events: list[CliEvent]) -> list[CliEvent]:
    """The CLI's own report of a model call it sends again (``system`` / ``api_retry``)."""
    return [e for e in events if getattr(e, "subtype", None) == "api_retry"]


def gateway_connections(stack: Stack, pid: int | None) -> list[str]:
    """The states of the worker's TCP connections to the gateway."""
    assert stack.gateway is not None and stack.gateway.base_url is not None and pid is not None
    port = urlsplit(stack.gateway.base_url).port
    return [c.status for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == port]


@pytest.mark.parametrize("frozen", [True, False])
async def test_a_worker_thawed_past_the_gateways_keepalive_answers_without_a_retry(
        make_stack: MakeStack, real_claude: str, upstream: FakeUpstream, frozen: bool) -> None:
    stack = await make_stack(profile(real_claude), upstream.base_url, key="sk-ant-keepalive", timeouts=TIMEOUTS,
                             gateway_options={"keepalive_timeout_s": KEEPALIVE_S},
                             freeze_idle_after_s=0.2 if frozen else 0)
    [worker] = stack.pool.workers()
    result, events = await turn(stack, "one [[reply:first]]", "req-1")
    assert result.text == "first" and not result.is_error and not retries(events)
    calls = len(upstream.message_requests())
    await asyncio.sleep(KEEPALIVE_S * 3)  # the gateway closes the worker's idle connection meanwhile
    assert worker.frozen is frozen
    if frozen:  # the scenario holds: the gateway closed it, the stopped CLI has not seen it yet
        assert "CLOSE_WAIT" in gateway_connections(stack, worker.pid)
    result, events = await turn(stack, "two [[reply:second]]", "req-2")
    assert result.text == "second" and not result.is_error
    assert not retries(events), retries(events)
    # As many model calls as the first turn made: nothing was sent twice.
    assert len(upstream.message_requests()) - calls == calls
    assert stack.pool.workers() == [worker] and stack.pool.stats.spawned == 1


async def test_a_retried_call_is_seen(make_stack: MakeStack, real_claude: str, upstream: FakeUpstream) -> None:
    """The control of the check above: a call the CLI does send again shows as ``api_retry``."""
    stack = await make_stack(profile(real_claude), upstream.base_url, key="sk-ant-keepalive", timeouts=TIMEOUTS)
    result, events = await turn(stack, "busy [[status:529]]", "req-busy")
    assert result.is_error and retries(events)
