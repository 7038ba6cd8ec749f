"""Conversations recognised from the message history (issue 14) on the fake CLI, through both front
doors and their official SDKs: a chat that resends its history continues one session; what must
not be recognised (another tenant, an edited history, a replay already claimed, a failed turn, an
expired or evicted conversation, an opted-out request) is not. The fake CLI's ``[[echo]]`` answers
every user text its conversation holds, i.e. what the model would see. (It reads directives from
the whole prompt: a history that may be flattened into one holds no ``[[reply:…]]``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from claudepool.frontdoor.conversation import OPT_OUT_HEADER, SESSION_HEADER
from claudepool.sessions import conversations
from claudepool.sessions.conversations import Thread, digest
from tests import test_anthropic_api, test_openai_api
from tests.daemon_fixtures import RunningDaemon, make_daemon
from tests.helpers import eventually
from tests.test_sessions import call

__all__ = ["make_daemon"]

MakeDaemon = Callable[..., Awaitable[RunningDaemon]]
Message = dict[str, str]


def conversations_config(**sessions: Any) -> dict[str, Any]:
    return {"sessions": {"min_idle": 0, "max_workers": 3, "maintenance_interval_s": 0.05, "sweep_interval_s": 0.05,
                         "park_idle_s": 600, **sessions}}


async def send(d: RunningDaemon, door: str, messages: list[Message], *, stream: bool = False, tenant: str = "acme",
               headers: dict[str, str] | None = None, system: str | None = None) -> tuple[str, str | None]:
    """One request of ``messages`` through ``door`` ("anthropic" | "openai") with its SDK: the
    answer's text as the client assembles it, and the session it ran in (None: stateless).
    ``system``: Anthropic's ``system``, or OpenAI's leading system message."""
    extra: dict[str, Any] = {"extra_headers": headers} if headers else {}
    if system is not None and door == "anthropic":
        extra["system"] = system
    elif system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if door == "anthropic":
        async with test_anthropic_api.client(d, tenant) as a:
            if stream:
                async with a.messages.stream(model="default", max_tokens=256, messages=messages,  # type: ignore[arg-type]
                                             **extra) as s:
                    text = "".join([t async for t in s.text_stream])
                    return text, s.response.headers.get(SESSION_HEADER)
            raw = await a.messages.with_raw_response.create(model="default", max_tokens=256,
                                                            messages=messages, **extra)  # type: ignore[arg-type]
            message = await raw.parse()
            return "".join(b.text for b in message.content if b.type == "text"), raw.headers.get(SESSION_HEADER)
    async with test_openai_api.client(d, tenant) as o:
        if stream:
            chunks = await o.chat.completions.create(model="default", messages=messages, stream=True,  # type: ignore[arg-type]
                                                     **extra)
            assert isinstance(chunks, openai.AsyncStream)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            return text, chunks.response.headers.get(SESSION_HEADER)
        raw_chat = await o.chat.completions.with_raw_response.create(model="default", messages=messages,  # type: ignore[arg-type]
                                                                     **extra)
        return raw_chat.parse().choices[0].message.content or "", raw_chat.headers.get(SESSION_HEADER)


class Chat:
    """A chat client as chat UIs are: each turn resends the whole history, then keeps the answer."""

    def __init__(self, d: RunningDaemon, door: str = "anthropic", **kw: Any) -> None:
        self.d, self.door, self.kw = d, door, kw
        self.history: list[Message] = []
        self.sessions: list[str | None] = []

    async def say(self, text: str) -> str:
        messages = [*self.history, {"role": "user", "content": text}]
        answer, session = await send(self.d, self.door, messages, **self.kw)
        self.history = [*messages, {"role": "assistant", "content": answer}]
        self.sessions.append(session)
        return answer


async def session_view(d: RunningDaemon, session: str | None, tenant: str = "acme") -> dict[str, Any]:
    assert session is not None
    status, view = await call(d, "GET", f"/v1/sessions/{session}", tenant=tenant)
    assert status == 200, view
    return dict(view)


def test_the_module_doctests_pass() -> None:
    import doctest

    assert doctest.testmod(conversations).failed == 0


def test_the_digest_covers_everything_that_makes_two_conversations_different() -> None:
    thread = Thread("acme", "default", "claude-sonnet-4-5", "")
    history = [("user", "hi"), ("assistant", "hello"), ("user", "and?")]
    base = digest(thread, history)
    others = [
        digest(Thread("beta", "default", "claude-sonnet-4-5", ""), history),
        digest(Thread("acme", "lean", "claude-sonnet-4-5", ""), history),
        digest(Thread("acme", "default", "claude-haiku-4-5", ""), history),
        digest(Thread("acme", "default", "claude-sonnet-4-5", "Be terse."), history),
        digest(thread, [("user", "hi"), ("user", "hello"), ("user", "and?")]),  # a role
        digest(thread, [("user", "hi "), ("assistant", "hello"), ("user", "and?")]),  # a user's exact text
        digest(thread, [("user", "hi"), ("assistant", "hello"), ("user", "and")]),
        digest(thread, history[:1]),
        digest(thread, [("user", "hi\u001f"), ("assistant", "hello"), ("user", "and?")]),
    ]
    assert len({base, *others}) == len(others) + 1
    assert base == digest(thread, [("user", "hi"), ("assistant", "\n hello \n"), ("user", "and?")])
    assert len(base) == 64 and int(base, 16) >= 0  # sha256, hex


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("door", ["anthropic", "openai"])
async def test_a_chat_resending_its_history_continues_one_session(
        make_daemon: MakeDaemon, door: str, stream: bool) -> None:
    d = await make_daemon(**conversations_config())
    chat = Chat(d, door, stream=stream)
    assert await chat.say("the word is HERON-7 [[reply:noted]]") == "noted"
    await chat.say("second [[reply:  spaced answer  ]]")  # a client may trim it: still the conversation
    chat.history[-1]["content"] = chat.history[-1]["content"].strip()
    echo = await chat.say("third [[echo]]")
    # The CLI got each message once, as it was sent, in one conversation: no flattened history.
    assert echo == "the word is HERON-7 [[reply:noted]]\nsecond [[reply:  spaced answer  ]]\nthird [[echo]]"
    assert len(set(chat.sessions)) == 1 and chat.sessions[0] is not None
    view = await session_view(d, chat.sessions[0])
    assert view["turns"] == 3 and view["conversation"] is True
    events = d.daemon.sessions.events
    assert (events["conversation_started"], events["conversation_continued"]) == (1, 2)


async def test_a_conversation_goes_on_from_either_door(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    chat = Chat(d, "anthropic")
    await chat.say("first [[reply:one]]")
    chat.door = "openai"
    assert await chat.say("[[echo]]") == "first [[reply:one]]\n[[echo]]"
    assert len(set(chat.sessions)) == 1


async def test_opted_out_the_history_runs_statelessly_as_one_flattened_prompt(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    history: list[Message] = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"},
                              {"role": "user", "content": "[[echo]]"}]
    for door in ("anthropic", "openai"):
        text, session = await send(d, door, history, headers={OPT_OUT_HEADER: "off"})
        assert session is None
        assert "[user]\nfirst" in text and "[assistant]\nanswer" in text
    assert (await call(d, "GET", "/v1/sessions"))[1]["sessions"] == []
    with pytest.raises(anthropic.BadRequestError, match=OPT_OUT_HEADER):
        await send(d, "anthropic", history, headers={OPT_OUT_HEADER: "maybe"})


async def test_disabled_every_request_is_stateless(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config(conversations=False))
    chat = Chat(d, "openai")
    await chat.say("first")
    assert "[user]\nfirst" in await chat.say("[[echo]]")
    assert chat.sessions == [None, None]


async def test_identical_histories_of_two_tenants_never_meet(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    acme = Chat(d, tenant="acme")
    assert await acme.say("same words") == "ok: same words"
    # beta replays acme's very history: not acme's conversation, and acme's is still acme's.
    beta_text, beta_session = await send(d, "anthropic", [*acme.history, {"role": "user", "content": "[[echo]]"}],
                                         tenant="beta")
    assert "[assistant]\nok: same words" in beta_text  # a new conversation, seeded with the history
    assert beta_session not in acme.sessions
    assert await acme.say("[[echo]]") == "same words\n[[echo]]"
    assert len(set(acme.sessions)) == 1
    assert (await call(d, "GET", f"/v1/sessions/{acme.sessions[0]}", tenant="beta"))[0] == 404


@pytest.mark.parametrize("door", ["anthropic", "openai"])
async def test_a_conversation_keeps_its_own_system_prompt_and_another_prompt_is_another_conversation(
        make_daemon: MakeDaemon, door: str) -> None:
    d = await make_daemon(**conversations_config(), tenants={"acme": {"allow_custom_system_prompt": True}})
    pirate = Chat(d, door, system="You are a pirate. PIRATE-77")
    await pirate.say("first words")
    # [[system]]: the fake answers the --system-prompt its worker started with.
    assert await pirate.say("[[system]]") == "You are a pirate. PIRATE-77"
    assert len(set(pirate.sessions)) == 1
    assert (await session_view(d, pirate.sessions[0]))["custom_system_prompt"] is True
    # The same history under another system prompt is another conversation, seeded afresh.
    # (Its first turn only: a flattened seed holding [[system]] would answer that instead.)
    replay: list[Message] = [*pirate.history[:2], {"role": "user", "content": "[[echo]]"}]
    poet_text, poet_session = await send(d, door, replay, system="You answer in verse.")
    assert poet_session not in pirate.sessions and "[user]\nfirst words" in poet_text
    # And without one it is the profile's conversation, not the pirate's.
    plain_text, plain_session = await send(d, door, replay)
    assert plain_session not in (*pirate.sessions, poet_session) and "[user]\nfirst words" in plain_text
    assert await pirate.say("[[echo]]") == "first words\n[[system]]\n[[echo]]"


async def test_a_tenant_may_not_start_a_conversation_with_a_system_prompt_it_may_not_send(
        make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    with pytest.raises(anthropic.PermissionDeniedError, match="allow_custom_system_prompt"):
        await send(d, "anthropic", [{"role": "user", "content": "hi"}], system="You are a pirate.")
    assert (await call(d, "GET", "/v1/sessions"))[1]["sessions"] == []


@pytest.mark.parametrize("edit", ["user", "assistant"])
async def test_an_edited_history_starts_a_new_conversation(make_daemon: MakeDaemon, edit: str) -> None:
    d = await make_daemon(**conversations_config())
    chat = Chat(d)
    await chat.say("first question")
    await chat.say("second question")
    index = 0 if edit == "user" else 1
    chat.history[index]["content"] += " (edited)"
    echo = await chat.say("[[echo]]")
    assert chat.sessions[2] != chat.sessions[0]  # not continued: its context would not be this history
    assert "(edited)" in echo and "[user]" in echo  # seeded with the history as the client has it
    assert (await session_view(d, chat.sessions[0]))["turns"] == 2


async def test_of_two_concurrent_replays_of_one_history_one_continues(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    chat = Chat(d, "openai")
    await chat.say("shared start")
    replay = [*chat.history, {"role": "user", "content": "[[echo]][[sleep:0.3]]"}]
    (a, sa), (b, sb) = await asyncio.gather(send(d, "openai", replay), send(d, "openai", replay))
    assert [sa, sb].count(chat.sessions[0]) == 1  # exactly one continued the conversation
    continued, started = (a, b) if sa == chat.sessions[0] else (b, a)
    assert continued == "shared start\n[[echo]][[sleep:0.3]]"
    assert "[user]\nshared start" in started  # the other started its own, seeded with the history
    assert (await session_view(d, chat.sessions[0]))["turns"] == 2


async def test_a_failed_turn_does_not_advance_the_conversation(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config(), server={"max_prompt_bytes": 400})
    chat = Chat(d)
    await chat.say("first")
    started = chat.sessions[0]
    # Refused before it ran (too large): the conversation is as it was, and a retry continues it.
    with pytest.raises(anthropic.APIStatusError) as refused:
        await chat.say("x" * 500)
    assert refused.value.status_code == 413
    chat.history = chat.history[:2]
    assert await chat.say("[[echo]]") == "first\n[[echo]]"
    assert chat.sessions[-1] == started
    # A turn that ran and failed: its session holds the failed prompt, so it is not continued; the
    # client's retry of the same history starts a conversation without it.
    before = list(chat.history)
    with pytest.raises(anthropic.APIStatusError):
        await chat.say("doomed [[api_error:529]]")
    chat.history = before
    echo = await chat.say("[[echo]] again")
    assert chat.sessions[-1] != started and "doomed" not in echo and "[user]\nfirst\n" in echo
    assert (await session_view(d, started))["where"]["state"] == "closed"
    assert d.daemon.sessions.events["conversation_dropped"] == 1


async def test_an_expired_conversation_is_not_recognised(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config(conversation_idle_ttl_s=0.3))
    chat = Chat(d)
    await chat.say("first")

    async def expired() -> bool:
        return bool((await session_view(d, chat.sessions[0]))["where"]["state"] == "closed")

    await eventually(expired)
    assert "[user]\nfirst" in await chat.say("[[echo]]")
    assert chat.sessions[1] != chat.sessions[0]


async def test_past_its_bound_a_tenant_loses_its_least_recently_used_conversation(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config(max_conversations=2))
    chats = [Chat(d) for _ in range(3)]
    for n, chat in enumerate(chats):
        await chat.say(f"chat {n}")
    # The third closed the first (least recently used); the second and third go on.
    assert (await session_view(d, chats[0].sessions[0]))["where"]["state"] == "closed"
    assert await chats[2].say("[[echo]]") == "chat 2\n[[echo]]"
    assert await chats[1].say("[[echo]]") == "chat 1\n[[echo]]"
    assert "[user]\nchat 0" in await chats[0].say("[[echo]]")  # starts afresh, closing chat 2's
    assert (await session_view(d, chats[2].sessions[0]))["where"]["state"] == "closed"
    assert d.daemon.sessions.events["conversation_evicted"] == 2


async def test_a_tenant_at_its_max_sessions_gives_up_a_conversation_not_the_request(
        make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config(), tenants={"acme": {"max_sessions": 2}})
    status, own = await call(d, "POST", "/v1/sessions", {})
    assert status == 201
    first, second = Chat(d, "openai"), Chat(d, "openai")
    await first.say("one [[reply:1]]")
    await second.say("two [[reply:2]]")  # at max_sessions: the first conversation gives way
    assert (await session_view(d, first.sessions[0]))["where"]["state"] == "closed"
    assert (await session_view(d, own["id"]))["where"]["state"] != "closed"  # a client's session stays
    # A session a client creates gives nothing up: the tenant's bound is as it always was.
    assert (await call(d, "POST", "/v1/sessions", {}))[0] == 429


async def test_a_conversation_at_a_session_limit_starts_afresh_rather_than_rolling_over(
        make_daemon: MakeDaemon) -> None:
    # With rollover its next turn would run in a fresh session holding none of the history.
    d = await make_daemon(**conversations_config(max_turns=2, rollover=True))
    chat = Chat(d)
    await chat.say("first")
    await chat.say("second")
    echo = await chat.say("[[echo]]")
    assert "[user]\nfirst" in echo and "[user]\nsecond" in echo  # seeded with the whole history
    assert chat.sessions[2] != chat.sessions[0]
    assert (await session_view(d, chat.sessions[0]))["where"]["state"] == "closed"


async def test_a_conversation_another_daemon_holds_is_started_afresh_here(make_daemon: MakeDaemon) -> None:
    d = await make_daemon(**conversations_config())
    chat = Chat(d, "openai")
    await chat.say("first")
    assert await d.daemon.sessions.park(chat.sessions[0] or "")  # its worker is not this daemon's any more
    store = d.daemon.sessions.store
    record = await store.session_get("acme", chat.sessions[0] or "")
    assert record is not None
    # As a daemon sharing the store sees it while another one serves the session.
    record.state, record.owner, record.last_used_at = "active", "elsewhere:1:abc", time.time()
    await store.session_put(record)
    echo = await chat.say("[[echo]]")  # answered here, not 409 session_elsewhere
    assert chat.sessions[1] != chat.sessions[0] and "[user]\nfirst" in echo


async def test_two_daemons_on_one_redis_continue_one_conversation(
        make_daemon: MakeDaemon, redis_url: str, tmp_path: Path) -> None:
    shared = {**conversations_config(), "store": {"url": redis_url}}
    first = await make_daemon(**shared)
    second = await make_daemon(**shared, server={"socket": str(tmp_path / "second.sock")})
    chat = Chat(first, "anthropic")
    await chat.say("remember OSPREY-3")
    assert await first.daemon.sessions.park(chat.sessions[0] or "")
    chat.d = second  # the client's next turn lands on the other daemon
    assert await chat.say("[[echo]]") == "remember OSPREY-3\n[[echo]]"  # resumed there, history intact
    assert chat.sessions[1] == chat.sessions[0]
    assert second.daemon.sessions.events["resumed"] == 1


async def test_a_turn_cut_by_its_deadline_is_never_continued_from(make_daemon: MakeDaemon) -> None:
    # Its prompt reached the CLI (and stays in the session's context) though no turn was counted.
    # The deadline covers the first turn's worker spawn too, which a loaded CI machine took 0.5 s for.
    d = await make_daemon(**conversations_config(), server={"default_timeout_s": 2.5})
    chat = Chat(d)
    await chat.say("first")
    before = list(chat.history)
    with pytest.raises(anthropic.APIStatusError) as cut:
        await chat.say("slow [[sleep:8]]")
    assert cut.value.status_code == 504
    chat.history = before
    echo = await chat.say("[[echo]]")
    assert "slow" not in echo and "[user]\nfirst" in echo
    assert chat.sessions[-1] != chat.sessions[0]
