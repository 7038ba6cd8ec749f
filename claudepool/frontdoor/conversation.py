"""What both front doors do with a chat history: continue the conversation it belongs to, or start
one seeded with it (`claudepool.sessions.conversations` recognises them), or, opted out with
``x-claudepool-conversation: off``, run it statelessly as one flattened prompt.

`plan` turns the history into the prompt and the session it runs in; the door then serves it and
calls `ConversationTurn.settle` with the answer's text as its client sees it (None if the request
failed), which points the conversation's new digest at the session, or does not advance it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from claudepool.errors import BadRequest, ClaudepoolError
from claudepool.frontdoor.history import Role, flatten
from claudepool.sessions.conversations import Conversations, Thread
from claudepool.store.base import SessionRecord
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

OPT_OUT_HEADER = "x-claudepool-conversation"
SESSION_HEADER = "x-claudepool-session"


def opted_out(request: web.Request) -> bool:
    """Whether the client asked for a stateless turn (``x-claudepool-conversation: off``)."""
    value = request.headers.get(OPT_OUT_HEADER, "on").strip().lower()
    if value not in ("on", "off"):
        raise BadRequest(f"{OPT_OUT_HEADER} must be 'on' or 'off'")
    return value == "off"


@dataclass
class ConversationTurn:
    """A request running in a recognised (or newly started) conversation, until it settles."""

    conversations: Conversations
    tenant: Tenant
    thread: Thread
    turns: list[tuple[Role, str]]
    record: SessionRecord  # as the request took it
    claimed: bool  # continued (else started by this request)
    begun_before: int  # the session's turns this daemon had begun when the request took it

    @property
    def session(self) -> str:
        return self.record.id

    async def settle(self, answer_text: str | None) -> None:
        """After the request: its answer's text (what the client will resend), or None if it failed.
        Never raises: the client has its answer (or its error) whatever becomes of the digest."""
        try:
            if answer_text is None:
                await self.conversations.failed(self.tenant, self.thread, self.turns[:-1], self.record,
                                                claimed=self.claimed, begun_before=self.begun_before)
            else:
                await self.conversations.advance(self.tenant, self.thread, [*self.turns, ("assistant", answer_text)],
                                                 self.record.id)
        except (ClaudepoolError, OSError) as exc:  # a store outage: the next request starts afresh
            log.warning("conversation of session %s not advanced: %r", self.record.id, exc)


@dataclass(frozen=True)
class Planned:
    """What a door runs: the prompt, the request's system prompt (None inside a conversation: its
    session keeps the one it started with), and the conversation (None: stateless)."""

    prompt: str
    system: str | None
    turn: ConversationTurn | None

    @property
    def session(self) -> str | None:
        return self.turn.session if self.turn is not None else None


async def plan(conversations: Conversations | None, tenant: Tenant, turns: Sequence[tuple[Role, str]], *,
               profile: str, model: str, system: str | None, profile_system_prompt: str | None,
               opted_out: bool) -> Planned:
    """What to run for a request of ``tenant`` with this history on ``profile`` (as routed), served by
    ``model``, asking for ``system`` (None: its default), where the profile's own system prompt is
    ``profile_system_prompt``."""
    prompt = flatten(turns)  # checks the history whichever way it runs
    if conversations is None or not conversations.enabled or opted_out:
        return Planned(prompt, system, None)
    # The system prompt the turns run with (the persona included) is part of what a conversation is;
    # a custom one the tenant may not send is refused here, as admission would.
    effective = tenant.system_prompt_for(profile_system_prompt, system)
    thread = Thread(tenant.name, profile, model, effective or "")
    turns = list(turns)
    if len(turns) > 1:
        record = await conversations.claim(tenant, thread, turns[:-1])
        if record is not None:
            begun = conversations.turns_begun(record.id)
            return Planned(turns[-1][1], None, ConversationTurn(conversations, tenant, thread, turns, record,
                                                                claimed=True, begun_before=begun))
    record = await conversations.start(tenant, thread, system=system)
    return Planned(prompt, None, ConversationTurn(conversations, tenant, thread, turns, record, claimed=False,
                                                  begun_before=0))
