"""The OpenAI Chat Completions front door (issue 14), driven by the official ``openai`` SDK as the
client: ``POST /v1/chat/completions`` (plain and streamed, with usage), ``GET /v1/models``, and
errors as the SDK's own exception classes. On the fake CLI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from claudepool.errors import BudgetExhausted, ClaudepoolError, PoolTimeout, RequestBudgetExhausted, UnknownKind
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.test_anthropic_api import FAKE_DEFAULT, ScriptedMessages, config, scripted

__all__ = ["make_daemon", "scripted"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]


def client(d: RunningDaemon | str, tenant: str = "acme", **kw: Any) -> openai.AsyncOpenAI:
    url = d if isinstance(d, str) else d.url
    # No retries: each test sees the daemon's first answer.
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", KEYS[tenant]), max_retries=0, **kw)


async def usage(d: RunningDaemon) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}/v1/usage",
                                                   headers={"Authorization": f"Bearer {KEYS['acme']}"}) as resp:
        total: dict[str, Any] = (await resp.json())["tenants"]["acme"]["total"]
        return total


async def test_create_answers_a_completion_with_the_metered_usage(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with client(d) as c:
        completion = await c.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "[[reply:hello there]]"}])
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == FAKE_DEFAULT
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content == "hello there"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    total = await usage(d)
    # OpenAI's prompt tokens are every input token, cached ones included; the cached ones are named.
    assert completion.usage.prompt_tokens == (total["input_tokens"] + total["cache_read_input_tokens"]
                                              + total["cache_creation_input_tokens"])
    assert completion.usage.completion_tokens == total["output_tokens"] > 0
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == total["cache_read_input_tokens"]
    assert total["requests"] == 1 and d.requests_by_outcome()["ok"] == 1


async def test_stream_sends_the_text_as_it_comes_then_the_usage_then_done(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with client(d) as c:
        stream = await c.chat.completions.create(
            model="haiku", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "[[reply:one two three four]][[sleep:0.2]]"}])
        chunks = [chunk async for chunk in stream]
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(texts) > 1 and "".join(texts) == "one two three four"  # streamed, not one piece at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk, last
    assert chunks[-1].usage.completion_tokens == (await usage(d))["output_tokens"]
    assert {ch.model for ch in chunks} == {"claude-haiku-4-5"}  # switched for this request
    async with client(d) as c:  # without include_usage: no usage chunk
        plain = [ch async for ch in await c.chat.completions.create(
            model="default", stream=True, messages=[{"role": "user", "content": "[[reply:hi]]"}])]
    assert all(ch.usage is None for ch in plain) and plain[-1].choices[0].finish_reason == "stop"


async def test_a_history_with_the_profiles_system_message_is_flattened(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(), profiles={"default": {"system_prompt": "You are terse."}})
    async with client(d) as c:
        completion = await c.chat.completions.create(model="default", temperature=0.2, seed=7, user="u1", messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "[[echo]] second question"}]}])
    text = completion.choices[0].message.content or ""
    assert "[user]\nfirst question" in text and "[assistant]\nfirst answer" in text, text
    assert text.index("first answer") < text.index("second question")
    assert "You are terse." not in text.split("[user]", 1)[-1]  # the system message is the profile's, not the prompt


@pytest.mark.parametrize(("extra", "messages", "named"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, None, "tools"),
    ({"stop": ["END"]}, None, "stop"),
    ({"n": 2}, None, "n must be 1"),
    ({"response_format": {"type": "json_object"}}, None, "response_format"),
    ({}, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "'image_url'"),
    ({}, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "prefill"}], "last message"),
    ({"extra_body": {"reasoning_effort_x": 1}}, None, "reasoning_effort_x"),
])
async def test_what_the_cli_cannot_honour_is_a_bad_request(
    make_daemon: MakeDaemon, extra: dict[str, Any], messages: list[Any] | None, named: str
) -> None:
    d = await make_daemon(**config())
    async with client(d) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="default", messages=messages or [{"role": "user", "content": "x"}],
                                            **extra)
    assert named in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert d.requests_by_outcome().get("ok", 0) == 0


async def test_errors_are_the_sdks_exception_classes(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(tenants={"acme": {"models": ["haiku"], "requests_per_minute": 1}}))
    hello: list[Any] = [{"role": "user", "content": "[[reply:hi]]"}]
    async with client(d, api_key="not-a-key") as c:
        with pytest.raises(openai.AuthenticationError) as auth:
            await c.chat.completions.create(model="default", messages=hello)
    assert auth.value.code == "invalid_api_key"
    async with client(d) as c:
        with pytest.raises(openai.NotFoundError) as missing:  # a model the tenant may not use
            await c.chat.completions.create(model="opus", messages=hello)
        assert missing.value.code == "model_not_found"
        await c.chat.completions.create(model="default", messages=hello)
        with pytest.raises(openai.RateLimitError) as limited:
            await c.chat.completions.create(model="default", messages=hello)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    async with client(d) as c:
        assert [m.id for m in (await c.models.list()).data] == ["default", "claude-haiku-4-5"]


@pytest.mark.parametrize(("error", "sdk_class", "status", "code"), [
    (BudgetExhausted("spent"), openai.RateLimitError, 429, "insufficient_quota"),  # as OpenAI answers a spent quota
    (RequestBudgetExhausted("this request's"), openai.RateLimitError, 429, "insufficient_quota"),
    (UnknownKind("poetry"), openai.BadRequestError, 400, "unknown_kind"),
    (PoolTimeout("busy", retry_after_s=2), openai.InternalServerError, 503, "pool_timeout"),
    (ClaudepoolError("boom"), openai.InternalServerError, 500, "internal_error"),
])
async def test_each_status_is_openais(scripted: tuple[str, ScriptedMessages], error: ClaudepoolError,
                                      sdk_class: type[openai.APIStatusError], status: int, code: str) -> None:
    url, api = scripted
    api.error = error
    async with client(url) as c:
        with pytest.raises(sdk_class) as caught:
            await c.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    assert caught.value.body == {"message": str(error), "type": caught.value.body["type"],  # type: ignore[index]
                                 "param": None, "code": code}


async def test_a_failure_mid_stream_is_an_error_chunk(scripted: tuple[str, ScriptedMessages]) -> None:
    url, api = scripted
    api.deltas, api.error = ["partial "], PoolTimeout("gone")
    seen: list[str] = []

    async def read_stream() -> None:
        async with client(url) as c:
            async for chunk in await c.chat.completions.create(
                    model="default", stream=True, messages=[{"role": "user", "content": "x"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    seen.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError) as caught:
        await read_stream()
    assert seen == ["partial "]
    assert "gone" in caught.value.message
