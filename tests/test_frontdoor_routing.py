"""Routing and a request's budget through the front doors (issue 14), with the official SDKs as
clients on the fake CLI: the kind comes in the ``x-claudepool-kind`` header or as a body field
(``extra_body``), ``model="default"`` leaves the model to the route, and claudepool's errors come
as the SDKs' exception classes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_routing import HAIKU, OPUS, ROUTES, SONNET, TIERS

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
SETTINGS = [{"role": "user", "content": "[[settings]]"}]


def config() -> dict[str, Any]:
    return {"pool": {"max_workers": 1}, "routes": ROUTES, "tiers": TIERS, "tenants": {
        "acme": {"tier": "free", "models": ["haiku", "sonnet", "opus"], "max_request_budget_usd": 1.0}}}


def anthropic_client(d: RunningDaemon) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=d.url, api_key=KEYS["acme"], max_retries=0)


def openai_client(d: RunningDaemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key=KEYS["acme"], max_retries=0)


async def test_the_messages_api_takes_the_kind_as_a_header_or_in_the_body(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with anthropic_client(d) as c:
        by_header = await c.messages.create(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                            extra_headers={"x-claudepool-kind": "code_review"})
        by_body = await c.messages.create(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                          extra_body={"kind": "security_audit", "max_budget_usd": 0.5})
        own_model = await c.messages.create(model="sonnet", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                            extra_headers={"x-claudepool-kind": "code_review"})
        with pytest.raises(anthropic.BadRequestError, match="unknown kind 'poetry'"):
            await c.messages.create(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                    extra_headers={"x-claudepool-kind": "poetry"})
        with pytest.raises(anthropic.BadRequestError, match="differ"):
            await c.messages.create(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                    extra_headers={"x-claudepool-kind": "code_review"},
                                    extra_body={"kind": "simple_qa"})
        with pytest.raises(anthropic.BadRequestError, match="over this tenant's cap"):
            await c.messages.create(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                    extra_body={"max_budget_usd": 2})
    texts = [orjson.loads(m.content[0].text) for m in (by_header, by_body, own_model)]  # type: ignore[union-attr]
    assert texts == [{"model": HAIKU, "effort": "medium"}, {"model": OPUS, "effort": "high"},
                     {"model": SONNET, "effort": "medium"}]
    assert by_header.model == HAIKU


async def test_chat_completions_take_the_kind_as_a_header_or_in_the_body(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with openai_client(d) as c:
        by_header = await c.chat.completions.create(model="default", messages=SETTINGS,  # type: ignore[arg-type]
                                                    extra_headers={"x-claudepool-kind": "code_review"})
        by_body = await c.chat.completions.create(model="default", messages=SETTINGS,  # type: ignore[arg-type]
                                                  extra_body={"kind": "security_audit"})
        with pytest.raises(openai.BadRequestError, match="unknown kind"):
            await c.chat.completions.create(model="default", messages=SETTINGS,  # type: ignore[arg-type]
                                            extra_body={"kind": "poetry"})
    texts = [orjson.loads(r.choices[0].message.content or "") for r in (by_header, by_body)]
    assert texts == [{"model": HAIKU, "effort": "medium"}, {"model": OPUS, "effort": "high"}]


async def test_a_routed_stream_names_the_routed_model_and_takes_the_routed_profiles_system(
    make_daemon: MakeDaemon
) -> None:
    d = await make_daemon(**config())
    async with anthropic_client(d) as c:
        async with c.messages.stream(model="default", max_tokens=64, messages=SETTINGS,  # type: ignore[arg-type]
                                     extra_headers={"x-claudepool-kind": "code_review"}) as stream:
            started = [event async for event in stream if event.type == "message_start"]
        assert started[0].message.model == HAIKU  # before the CLI said so: as admission resolves it
        # simple_qa runs on the lean profile: its system prompt ("brief") is the one a client may send
        message = await c.messages.create(model="default", max_tokens=64, system="brief",
                                          messages=[{"role": "user", "content": "[[reply:ok]]"}],
                                          extra_headers={"x-claudepool-kind": "simple_qa"})
        assert message.content[0].text == "ok"  # type: ignore[union-attr]
        # Unrouted, the default profile's: "brief" is then a prompt of the tenant's own, which it may not send.
        with pytest.raises(anthropic.PermissionDeniedError, match="allow_custom_system_prompt"):
            await c.messages.create(model="default", max_tokens=64, system="brief",
                                    messages=[{"role": "user", "content": "[[reply:ok]]"}])
