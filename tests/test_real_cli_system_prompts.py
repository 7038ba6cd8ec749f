"""A request's system prompt and a tenant's persona on the real CLI, through the Anthropic SDK: each
reaches the upstream's request ``system`` field, on workers of a pool made on demand whose model
calls pass the gateway like any other (attributed and billed to the request)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import pytest

from claudepool.testing.fake_upstream import FakeUpstream, RecordedRequest
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

PIRATE = "You are a pirate captain. MARKER-SYSTEM-5521"
PERSONA = "You are beta's concierge. MARKER-PERSONA-0917"


def system_text(request: RecordedRequest) -> str:
    system: Any = request.json().get("system")
    if isinstance(system, list):
        return "\n".join(block.get("text", "") for block in system if isinstance(block, dict))
    return system or ""


@pytest.fixture
async def real_daemon(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream
) -> RunningDaemon:
    return await make_daemon(pool={
        "claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30},
    }, upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"system_prompt": "You are the default profile.", "upstream_max_retries": 0},
                  "lean": {}, "other": {}},
        tenants={"acme": {"allow_custom_system_prompt": True}, "beta": {"system_prompt": PERSONA}})


async def ask(d: RunningDaemon, tenant: str, **extra: Any) -> str:
    async with anthropic.AsyncAnthropic(base_url=d.url, api_key=KEYS[tenant], max_retries=0) as c:
        message = await c.messages.create(model="default", max_tokens=256,
                                          messages=[{"role": "user", "content": "[[reply:aye]]"}], **extra)
    block = message.content[0]
    assert block.type == "text"
    return str(block.text)


async def test_a_requests_system_and_a_tenants_persona_reach_the_upstream(
        real_daemon: RunningDaemon, upstream: FakeUpstream) -> None:
    assert await ask(real_daemon, "acme", system=PIRATE) == "aye"
    call = upstream.message_requests()[-1]
    assert PIRATE in system_text(call) and "default profile" not in system_text(call)
    assert await ask(real_daemon, "beta") == "aye"  # sends none: its persona
    call = upstream.message_requests()[-1]
    assert PERSONA in system_text(call) and PIRATE not in system_text(call)
    assert await ask(real_daemon, "acme") == "aye"  # none, no persona: the profile's own, on its pool
    call = upstream.message_requests()[-1]
    assert "You are the default profile." in system_text(call)
    assert PIRATE not in system_text(call) and PERSONA not in system_text(call)
    reg = real_daemon.daemon.pool_registry
    # Each first message starts a conversation (a session) on its system prompt's session-capable pool.
    assert reg.made == 2 and reg.configured_sessions["default"].stats.leases == 1
    # Each call was attributed to its request at the gateway and billed: one record per call.
    ledger = await real_daemon.daemon.store.ledger(None, since=None, limit=100)
    calls = [r for r in ledger if r.kind == "call"]
    assert {r.tenant for r in calls} == {"acme", "beta"} and len(calls) == 3
    async with anthropic.AsyncAnthropic(base_url=real_daemon.url, api_key=KEYS["beta"], max_retries=0) as c:
        with pytest.raises(anthropic.PermissionDeniedError):  # beta may not send its own
            await c.messages.create(model="default", max_tokens=256, system=PIRATE,
                                    messages=[{"role": "user", "content": "[[reply:no]]"}])
