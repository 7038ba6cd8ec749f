"""Structured output per profile on the real CLI (issue 14): a profile's ``json_schema`` becomes
``--json-schema``, the CLI has the model answer through its ``StructuredOutput`` tool (here the fake
upstream's tool call), validates it, and the answer carries it as ``structured_output``: in the
JSON body, the SSE result and the socket's result frame. A profile without a schema answers none."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from claudepool.client import AsyncClient
from claudepool.protocol.wire import PromptResult
from claudepool.testing.fake_upstream import FakeUpstream
from tests.daemon_fixtures import KEYS, RunningDaemon, make_daemon

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
ANSWER = '[[tool:StructuredOutput:{"name": "Ada", "age": 36}]]'


@pytest.mark.parametrize("transport", ["json", "sse", "socket"])
async def test_a_profiles_schema_comes_back_as_structured_output(
    make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, transport: str
) -> None:
    d = await make_daemon(
        pool={"claude_bin": real_claude, "min_idle": 1, "max_workers": 1, "timeouts": {"ready_timeout_s": 30}},
        upstream={"base_url": upstream.base_url, "api_key": "sk-ant-test"},
        profiles={"default": {"json_schema": PERSON, "upstream_max_retries": 0}, "plain": {"min_idle": 1},
                  "lean": {"min_idle": 0}, "other": {"min_idle": 0}},
        tenants={"acme": {"profiles": ["default", "plain"]}})
    client = AsyncClient(key=KEYS["acme"], url=None if transport == "socket" else d.url,
                         socket_path=d.socket if transport == "socket" else None)
    async def ask(prompt: str, **options: str) -> PromptResult:
        if transport != "sse":
            return await client.prompt(prompt, timeout_s=60, **options)
        pieces = [piece async for piece in client.stream(prompt, timeout_s=60, **options)]
        assert isinstance(pieces[-1], PromptResult)
        return pieces[-1]

    async with client:
        result = await ask(ANSWER)
        plain = await ask("[[reply:just text]]", profile="plain")
    assert result.structured_output == {"name": "Ada", "age": 36}, result
    assert not result.is_error
    assert plain.structured_output is None and plain.text == "just text"
    offered = [r for r in upstream.requests if r.path == "/v1/messages" and b'"StructuredOutput"' in r.body]
    assert offered  # the schema reached the model as the CLI's StructuredOutput tool
