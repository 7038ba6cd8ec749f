"""The fake upstream's prompt-cache simulation, which the session benchmark's token numbers rest on."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from claudepool.testing.fake_upstream import FakeUpstream

CACHED = {"type": "ephemeral"}


def text(value: str, cached: bool = False) -> dict[str, Any]:
    return {"type": "text", "text": value, **({"cache_control": CACHED} if cached else {})}


async def usage(upstream: FakeUpstream, messages: list[dict[str, Any]]) -> dict[str, int]:
    body = {"model": "m", "max_tokens": 10, "system": [text("S" * 400, cached=True)], "messages": messages}
    async with aiohttp.ClientSession() as session, session.post(
        f"{upstream.base_url}/v1/messages", data=orjson.dumps(body), headers={"x-api-key": "k"}
    ) as resp:
        answer = await resp.json()
        result: dict[str, int] = answer["usage"]
        return result


async def test_a_conversation_reads_what_its_previous_turn_wrote(upstream: FakeUpstream) -> None:
    turn_one = [{"role": "user", "content": [text("U" * 200, cached=True)]}]
    first = await usage(upstream, turn_one)
    assert (first["input_tokens"], first["cache_read_input_tokens"]) == (0, 0)
    assert first["cache_creation_input_tokens"] > (400 + 200) // 4  # everything up to the breakpoint
    # Turn two: the breakpoint moved to the new message; the old prefix is still read from the cache.
    turn_two = [{"role": "user", "content": [text("U" * 200)]},
                {"role": "assistant", "content": [text("A" * 40)]},
                {"role": "user", "content": [text("V" * 80, cached=True)]}]
    second = await usage(upstream, turn_two)
    prefix = first["cache_creation_input_tokens"]
    assert second["cache_read_input_tokens"] == prefix
    assert second["cache_creation_input_tokens"] > 0
    assert second["input_tokens"] == 0
    # A different conversation shares only the system prompt.
    other = await usage(upstream, [{"role": "user", "content": [text("W" * 200, cached=True)]}])
    assert 0 < other["cache_read_input_tokens"] < prefix


async def test_a_string_and_its_text_block_are_the_same_prefix(upstream: FakeUpstream) -> None:
    as_block = [{"role": "user", "content": [text("X" * 120)]}, {"role": "assistant", "content": [text("ok")]},
                {"role": "user", "content": [text("next", cached=True)]}]
    as_string: list[dict[str, Any]] = [{"role": "user", "content": "X" * 120}, *as_block[1:]]
    first = await usage(upstream, as_block)
    second = await usage(upstream, as_string)
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
