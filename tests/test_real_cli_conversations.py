"""Conversations recognised from the message history on the real CLI (issue 14): a 5-turn chat
through each official SDK, resending its whole history each turn as chat clients do, reaches the
upstream as one growing conversation read from the prompt cache, and costs no more upstream tokens
than the same 5 turns through ``/v1/sessions``. With recognition off, the same chat is five
unrelated prompts, each paying for the whole history again (the negative control)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from claudepool.testing.fake_upstream import FakeUpstream, RecordedRequest
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.test_conversations import Chat
from tests.test_real_cli_sessions import real_config
from tests.test_sessions import new_session, say

pytestmark = pytest.mark.real_cli
__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
TURNS = 5


def prompts(tag: str) -> list[str]:
    return [f"{tag} turn {n}: tell me about item {n} [[reply:item {n} is fine, {tag}]]" for n in range(1, TURNS + 1)]


@dataclass
class Run:
    """What the upstream saw of one chat: its model calls, in order."""

    calls: list[RecordedRequest]

    def messages(self, call: RecordedRequest) -> list[tuple[str, list[str]]]:
        """Each message's role and texts, without cache_control (which moves from turn to turn)."""
        out = []
        for m in call.json()["messages"]:
            content = m["content"]
            texts = [content] if isinstance(content, str) else [b.get("text", "") for b in content]
            out.append((m["role"], texts))
        return out

    def one_growing_conversation(self) -> bool:
        """Each call is the one before, its answer and one new user message."""
        lists = [self.messages(c) for c in self.calls]
        return all(len(b) == len(a) + 2 and b[:len(a)] == a for a, b in itertools.pairwise(lists))

    def cache_reads(self) -> list[int]:
        return [c.usage["cache_read_input_tokens"] if c.usage else 0 for c in self.calls]

    def prompt_tokens(self) -> list[int]:
        return [sum(c.usage[k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
                if c.usage else 0 for c in self.calls]

    def tokens(self) -> int:
        return sum(self.prompt_tokens()) + sum(c.usage["output_tokens"] if c.usage else 0 for c in self.calls)


async def chat_run(d: RunningDaemon, upstream: FakeUpstream, door: str, tag: str) -> tuple[Run, Chat]:
    start = len(upstream.message_requests())
    chat = Chat(d, door, stream=door == "openai")  # one door streamed, the other not
    for prompt in prompts(tag):
        await chat.say(prompt)
    return Run(upstream.message_requests()[start:]), chat


async def sessions_run(d: RunningDaemon, upstream: FakeUpstream, tag: str) -> Run:
    start = len(upstream.message_requests())
    sid = await new_session(d)
    for prompt in prompts(tag):
        status, body = await say(d, sid, prompt)
        assert status == 200, body
    return Run(upstream.message_requests()[start:])


def config(real_claude: str, upstream: FakeUpstream, **sessions: Any) -> dict[str, Any]:
    return real_config(real_claude, upstream, **sessions)


@pytest.mark.parametrize("door", ["anthropic", "openai"])
async def test_a_five_turn_chat_is_one_conversation_upstream_and_costs_no_more_than_a_session(
        make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream, door: str) -> None:
    d = await make_daemon(**config(real_claude, upstream))
    # First, with a tag as long as "chat" (the same byte counts): it warms the shared prefix, not the chat.
    sessions = await sessions_run(d, upstream, "sess")
    run, chat = await chat_run(d, upstream, door, "chat")
    assert len(run.calls) == TURNS and len(set(chat.sessions)) == 1 and chat.sessions[0] is not None
    assert run.one_growing_conversation(), [run.messages(c) for c in run.calls]
    reads, prompt_tokens = run.cache_reads(), run.prompt_tokens()
    # Turns 2-5 read all of the turn before from the cache: the conversation, not just the system prompt.
    assert all(reads[k] >= prompt_tokens[k - 1] for k in range(1, TURNS)), (reads, prompt_tokens)
    assert run.tokens() <= sessions.tokens(), (run.tokens(), sessions.tokens())
    print(f"{door}: conversation {run.tokens()} tokens {prompt_tokens} reads {reads}; "
          f"/v1/sessions {sessions.tokens()} tokens {sessions.prompt_tokens()}")


async def test_without_recognition_the_same_chat_is_five_unrelated_prompts(
        make_daemon: MakeDaemon, real_claude: str, upstream: FakeUpstream) -> None:
    d = await make_daemon(**config(real_claude, upstream, conversations=False))
    sessions = await sessions_run(d, upstream, "sess")  # a tag as long as "chat": the same byte counts
    run, chat = await chat_run(d, upstream, "anthropic", "chat")
    assert chat.sessions == [None] * TURNS
    assert not run.one_growing_conversation()
    # Each its own single prompt (after a reset's caveat), the history flattened into it.
    assert all([role for role, _ in run.messages(c)].count("user") == 1 for c in run.calls)
    reads, prompt_tokens = run.cache_reads(), run.prompt_tokens()
    assert not all(reads[k] >= prompt_tokens[k - 1] for k in range(1, TURNS)), (reads, prompt_tokens)
    assert run.tokens() > sessions.tokens(), (run.tokens(), sessions.tokens())
    print(f"stateless: {run.tokens()} tokens {prompt_tokens} reads {reads}; /v1/sessions {sessions.tokens()}")
