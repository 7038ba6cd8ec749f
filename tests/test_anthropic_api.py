"""The Anthropic Messages API front door (issue 14), driven by the official ``anthropic`` SDK as the
client: ``POST /v1/messages`` (plain and streamed), ``GET /v1/models``, and errors as the SDK's own
exception classes. On the fake CLI; the real CLI's are in tests/test_real_cli_anthropic_api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from claudepool.daemon.http_api import build_app
from claudepool.errors import (
    BudgetExhausted,
    ClaudepoolError,
    Forbidden,
    PoolTimeout,
    RequestBudgetExhausted,
    RequestTimeout,
    UnknownKind,
)
from claudepool.protocol.wire import PromptRequest, PromptResult, StreamItem, TextDelta, UsageOut
from claudepool.tenancy.models import ModelCatalog, ProfileModel
from claudepool.tenancy.routing import Router
from claudepool.tenancy.tenants import Tenant
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon
from tests.helpers import serving

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
FAKE_DEFAULT = "claude-fake-1"  # the fake CLI's model when the profile sets none


def client(d: RunningDaemon | str, tenant: str = "acme", **kw: Any) -> anthropic.AsyncAnthropic:
    url = d if isinstance(d, str) else d.url
    # No retries: each test sees the daemon's first answer.
    return anthropic.AsyncAnthropic(base_url=url, api_key=kw.pop("api_key", KEYS[tenant]), max_retries=0, **kw)


def config(**extra: Any) -> dict[str, Any]:
    return {"tenants": {"acme": {"models": ["haiku"]}}, **extra}


async def test_create_answers_a_message_with_the_metered_usage(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with client(d) as c:
        message = await c.messages.create(model="default", max_tokens=64,
                                          messages=[{"role": "user", "content": "[[reply:hello there]]"}])
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "hello there"  # type: ignore[union-attr]
    assert message.model == FAKE_DEFAULT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    # Metered as any prompt: the tenant's usage holds it, and it is one served request.
    async with aiohttp.ClientSession() as s, s.get(f"{d.url}/v1/usage",
                                                   headers={"Authorization": f"Bearer {KEYS['acme']}"}) as resp:
        usage = await resp.json()
    total = usage["tenants"]["acme"]["total"]
    assert total["requests"] == 1, usage
    assert total["output_tokens"] == message.usage.output_tokens
    assert d.requests_by_outcome()["ok"] == 1


async def test_stream_sends_the_text_as_it_comes_and_the_usage_at_the_end(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    events: list[str] = []
    async with client(d) as c, c.messages.stream(
            model="haiku", max_tokens=64,
            messages=[{"role": "user", "content": "[[reply:one two three four]][[sleep:0.2]]"}]) as stream:
        chunks = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(chunks) > 1, chunks  # streamed, not one piece at the end
    assert "".join(chunks) == "one two three four"
    assert final.content[0].text == "one two three four"  # type: ignore[union-attr]
    assert final.model == "claude-haiku-4-5"  # switched for this request
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    # The raw sequence, as an SDK-less client sees it.
    async with aiohttp.ClientSession() as s, s.post(
            f"{d.url}/v1/messages", headers={"x-api-key": KEYS["acme"], "anthropic-version": "2023-06-01"},
            data=orjson.dumps({"model": "default", "max_tokens": 8, "stream": True,
                               "messages": [{"role": "user", "content": "[[reply:hi]]"}]})) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line.decode().split(": ", 1)[1].strip() for line in (await resp.read()).splitlines()
                  if line.startswith(b"event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}


async def test_a_history_is_flattened_with_role_markers_and_bearer_auth_works(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with client(d, api_key=None, auth_token=KEYS["acme"]) as c:
        message = await c.messages.create(model="default", max_tokens=64, messages=[
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello Ada"}]},
            {"role": "user", "content": [{"type": "text", "text": "what is my name? [[echo]]"}]}])
    text = message.content[0].text  # type: ignore[union-attr]
    assert "[user]\nmy name is Ada" in text and "[assistant]\nhello Ada" in text
    assert text.index("my name is Ada") < text.index("hello Ada") < text.index("what is my name?")


@pytest.mark.parametrize(("body", "says"), [
    ({"stop_sequences": ["END"]}, "stop_sequences"),
    ({"tools": [{"name": "t", "input_schema": {"type": "object"}}]}, "client-defined tools"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "'image' blocks are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]}, "prefill"),
    ({"max_tokens": 0}, "max_tokens"),
])
async def test_what_the_cli_cannot_honour_is_refused_as_a_bad_request(
        make_daemon: MakeDaemon, body: dict[str, Any], says: str) -> None:
    d = await make_daemon(**config())
    request: dict[str, Any] = {"model": "default", "max_tokens": 16, "messages": [{"role": "user", "content": "x"}],
                               **body}
    async with client(d) as c:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await c.messages.create(**request)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert says in caught.value.body["error"]["message"]
    assert d.requests_by_outcome()["ok"] == 0  # refused before any worker ran it


async def test_sampling_parameters_and_metadata_are_ignored_and_the_profiles_system_prompt_is_allowed(
        make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(tenants={"acme": {"profile": "lean"}}))  # lean's system prompt is "brief"
    async with client(d) as c:
        message = await c.messages.create(model="default", max_tokens=16, system=[{"type": "text", "text": "brief"}],
                                          metadata={"user_id": "u1"}, service_tier="auto",
                                          extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5},
                                          messages=[{"role": "user", "content": "[[reply:ok]]"}])
        assert message.content[0].text == "ok"  # type: ignore[union-attr]
        with pytest.raises(anthropic.BadRequestError, match="thinking"):  # anything else is refused by name
            await c.messages.create(model="default", max_tokens=2048,
                                    thinking={"type": "enabled", "budget_tokens": 1024},
                                    messages=[{"role": "user", "content": "[[reply:ok]]"}])


async def test_errors_are_the_sdks_exception_classes(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config(tenants={"acme": {"models": ["haiku"], "requests_per_minute": 1}}))
    hello: list[Any] = [{"role": "user", "content": "[[reply:hi]]"}]
    async with client(d, api_key="not-a-key") as c:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await c.messages.create(model="default", max_tokens=8, messages=hello)
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with client(d) as c:
        with pytest.raises(anthropic.NotFoundError):  # a model the tenant may not use
            await c.messages.create(model="opus", max_tokens=8, messages=hello)
        await c.messages.create(model="default", max_tokens=8, messages=hello)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await c.messages.create(model="default", max_tokens=8, messages=hello)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_models_lists_what_the_tenant_may_use_in_both_shapes(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**config())
    async with client(d) as c:
        page = await c.models.list()
        assert [m.id for m in page.data] == ["default", "claude-haiku-4-5"]
        assert page.data[1].display_name == "Claude Haiku 4.5" and page.data[1].type == "model"
        assert (await c.models.retrieve("haiku")).id == "claude-haiku-4-5"
        with pytest.raises(anthropic.NotFoundError):
            await c.models.retrieve("claude-opus-4-5")
    async with client(d, "beta") as c:
        assert [m.id for m in (await c.models.list()).data] == ["default"]
    async with aiohttp.ClientSession() as s, s.get(
            f"{d.url}/v1/models", headers={"Authorization": f"Bearer {KEYS['acme']}"}) as resp:
        body = await resp.json()  # no anthropic-version: the OpenAI shape
    assert body == {"object": "list", "data": [
        {"id": "default", "object": "model", "created": 0, "owned_by": "anthropic"},
        {"id": "claude-haiku-4-5", "object": "model", "created": 0, "owned_by": "anthropic"}]}


# -- the error statuses, over a scripted daemon (no worker can be made to answer these on cue) ------


class ScriptedMessages:
    """A `MessagesApi` that raises ``error`` (after streaming ``deltas``, if any)."""

    def __init__(self) -> None:
        self.error: ClaudepoolError | None = None
        self.deltas: list[str] = []
        self.tenant = Tenant("acme", "0" * 64, "default", frozenset({"default"}))

    async def handle(self, key: str | None, request: PromptRequest | Callable[[], Awaitable[PromptRequest]],
                     on_event: Callable[[StreamItem], Awaitable[None]] | None = None, *,
                     request_id: str | None = None) -> PromptResult:
        body = request if isinstance(request, PromptRequest) else await request()
        for text in self.deltas:
            if on_event is not None and body.stream:
                await on_event(TextDelta(text=text))
        if self.error is not None:
            raise self.error
        return PromptResult(id="r", tenant="acme", session=None, text="".join(self.deltas), is_error=False,
                            stop_reason="end_turn", usage=UsageOut(), cost_usd=0.0, duration_ms=1.0, queue_ms=0.0)

    def refused(self, exc: BaseException, *, key: str | None = None) -> None:
        pass

    def authenticate(self, key: str | None) -> Tenant:
        return self.tenant

    @property
    def catalog(self) -> ModelCatalog:
        return ModelCatalog({"default": ProfileModel(None, None)})

    @property
    def conversations(self) -> None:
        return None  # every request stateless

    @property
    def router(self) -> Router:
        return Router()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, ScriptedMessages]]:
    api = ScriptedMessages()
    app = build_app(api, max_prompt_bytes=1 << 20, messages=api)  # type: ignore[arg-type]
    async with serving(app) as url:
        yield url, api


@pytest.mark.parametrize(("error", "sdk_class", "status", "kind"), [
    (Forbidden("no"), anthropic.PermissionDeniedError, 403, "permission_error"),
    (BudgetExhausted("spent"), anthropic.APIStatusError, 402, "billing_error"),
    (RequestBudgetExhausted("this request's"), anthropic.APIStatusError, 402, "billing_error"),
    (UnknownKind("poetry"), anthropic.BadRequestError, 400, "invalid_request_error"),
    (PoolTimeout("busy", retry_after_s=2), anthropic.OverloadedError, 529, "overloaded_error"),
    (RequestTimeout("late"), anthropic.APIStatusError, 504, "timeout_error"),
    (ClaudepoolError("boom"), anthropic.InternalServerError, 500, "api_error"),
])
async def test_each_status_is_anthropics(scripted: tuple[str, ScriptedMessages], error: ClaudepoolError,
                                         sdk_class: type[anthropic.APIStatusError], status: int, kind: str) -> None:
    url, api = scripted
    api.error = error
    async with client(url) as c:
        with pytest.raises(sdk_class) as caught:
            await c.messages.create(model="default", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    assert caught.value.body == {"type": "error", "error": {"type": kind, "message": str(error)}}
    if error.retry_after_s is not None:
        assert caught.value.response.headers["retry-after"] == "2"


async def test_a_failure_mid_stream_is_an_error_event(scripted: tuple[str, ScriptedMessages]) -> None:
    url, api = scripted
    api.deltas, api.error = ["partial "], PoolTimeout("gone")
    seen: list[str] = []

    async def read_stream() -> None:
        async with client(url) as c, c.messages.stream(model="default", max_tokens=8,
                                                       messages=[{"role": "user", "content": "x"}]) as stream:
            async for text in stream.text_stream:
                seen.append(text)

    with pytest.raises(anthropic.APIStatusError) as caught:
        await read_stream()
    assert seen == ["partial "]
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "gone"}}
