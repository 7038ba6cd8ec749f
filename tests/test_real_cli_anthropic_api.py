"""A model per request and the Anthropic front door on the real CLI, against the loopback fake
upstream, which records the model each call asks for and the usage it answered (issue 14)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anthropic
import pytest

from claudepool.testing.fake_upstream import FakeUpstream, RecordedRequest
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_sessions import say

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

PROFILE_MODEL = "claude-sonnet-4-5"


def turn_calls(upstream: FakeUpstream) -> list[RecordedRequest]:
    """The model calls of turns, without the CLI's check of a model new to its process."""
    return [r for r in upstream.message_requests() if not is_model_check(r)]


def model_checks(upstream: FakeUpstream) -> list[str]:
    return [r.model for r in upstream.message_requests() if is_model_check(r)]


def is_model_check(r: RecordedRequest) -> bool:
    # What the real CLI (2.1.328) sends on a set_model to a model it has not used yet.
    return bool(r.json()["max_tokens"] == 1 and r.contains('"text":"Hi"'))


@pytest.fixture
async def real_daemon(
    make_daemon: Callable[..., Awaitable[RunningDaemon]], real_claude: str, upstream: FakeUpstream
) -> RunningDaemon:
    # One worker: the request after a switch runs on the very process that was switched.
    return await make_daemon(pool={
        "claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30},
    }, upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"model": PROFILE_MODEL, "upstream_max_retries": 0}, "lean": {}, "other": {}},
        tenants={"acme": {"models": ["haiku"]}})


async def test_the_upstream_sees_the_switched_model_for_that_request_only(
        real_daemon: RunningDaemon, upstream: FakeUpstream) -> None:
    status, body = await say(real_daemon, None, "[[reply:switched]]", model="haiku")
    assert status == 200, body
    assert body["model"] == "claude-haiku-4-5"
    assert [r.model for r in turn_calls(upstream)] == ["claude-haiku-4-5"]
    # The CLI checks each model new to its process with one call: the switch's, then the restore's,
    # made within the lease (the gateway lets them through and bills them to this request).
    assert model_checks(upstream) == ["claude-haiku-4-5", PROFILE_MODEL]
    await real_daemon.idle()  # reset: /clear, and the profile's model checked with get_settings
    status, body = await say(real_daemon, None, "[[reply:as configured]]")
    assert status == 200, body
    assert [r.model for r in turn_calls(upstream)] == ["claude-haiku-4-5", PROFILE_MODEL]
    assert body["model"] == PROFILE_MODEL
    status, body = await say(real_daemon, None, "[[reply:again]]", model="haiku")
    assert (status, body["model"]) == (200, "claude-haiku-4-5"), body
    assert len(model_checks(upstream)) == 2  # known to this process now: no more checks
    pool = real_daemon.pool()
    assert pool.stats.resets >= 2 and pool.stats.reset_failures == 0
    assert pool.stats.spawned == 1  # the same warm process throughout, never respawned


async def test_the_sdk_on_the_real_cli_gets_the_upstreams_usage(
        real_daemon: RunningDaemon, upstream: FakeUpstream) -> None:
    async with anthropic.AsyncAnthropic(base_url=real_daemon.url, api_key=KEYS["acme"], max_retries=0) as c:
        message = await c.messages.create(model="sonnet", max_tokens=256,
                                          messages=[{"role": "user", "content": "[[reply:hello from the CLI]]"}])
        first = turn_calls(upstream)[-1]
        async with c.messages.stream(model="haiku", max_tokens=256, messages=[
                {"role": "user", "content": "[[reply:one two three four five six]] [[chunks:3]]"}]) as stream:
            chunks = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        second = turn_calls(upstream)[-1]
    assert message.content[0].text == "hello from the CLI"  # type: ignore[union-attr]
    assert message.model == PROFILE_MODEL and first.model == PROFILE_MODEL
    assert first.usage is not None
    assert message.usage.output_tokens == first.usage["output_tokens"]
    assert message.usage.input_tokens == first.usage["input_tokens"]
    assert (message.usage.cache_read_input_tokens or 0) == first.usage.get("cache_read_input_tokens", 0)
    assert (message.usage.cache_creation_input_tokens or 0) == first.usage.get("cache_creation_input_tokens", 0)
    assert "".join(chunks) == "one two three four five six" and len(chunks) == 3
    assert second.model == "claude-haiku-4-5" and final.model == "claude-haiku-4-5"
    assert second.usage is not None
    assert final.usage.output_tokens == second.usage["output_tokens"]
