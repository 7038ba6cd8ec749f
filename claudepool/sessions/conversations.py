"""Conversations recognised from a chat history: what lets ``/v1/messages`` and
``/v1/chat/completions`` continue a session although their clients resend the whole history.

Per tenant, the store maps a *digest* of the history each conversation has reached to the session
that holds it (`Store.conversation_put`, with the idle TTL). A request whose history (all messages
but its last user message) has a digest there *claims* it (`Store.conversation_claim`, atomic: of
two clients replaying one history concurrently, one continues the session and the other starts its
own conversation) and runs only its new message in that session. After the turn the digest of
history + new message + the answer as the client will resend it points at the session; the old
digest is gone (claimed). A turn that fails does not advance: if it never reached a worker, the
old digest is put back (the client's retry continues the session); if it did (the session's context
may now hold a failed or unseen turn: an error result, a deadline mid-answer, a client gone), the
session is closed and the retry starts afresh.

A history that matches nothing starts a new session (`Conversations.start`, the one place one is
created), its first turn the history flattened with role markers by the front door
(`claudepool.frontdoor.history.flatten`). Not real prior turns: the CLI resumes only transcripts it
wrote itself, and a synthetic transcript would depend on the CLI's private, changing file format.
A flattened seed costs what the stateless door costs today, once; every later turn is a warm
continuation.

The digest is sha256 over canonical JSON (sorted keys, no whitespace) of everything that makes two
conversations different: tenant, profile, model, system prompt, and the role and text of every
message. The only normalisation: an assistant message's surrounding whitespace is stripped (chat
clients trim what they display and resend; the model's own answer is not what tells two
conversations apart). The store key is namespaced by tenant as well. No text is stored, only
digests and session ids.

Sessions started here are ordinary sessions of the tenant (limits, budgets, metering, its
``max_sessions``) marked ``conversation``: they expire after ``conversation_idle_ttl_s`` unused,
and a tenant keeps at most ``max_conversations`` open: starting one more closes its least recently
used idle one (as does a tenant at its ``max_sessions``) rather than refusing. A session that is
closed, expired, at a limit, on another profile, or held by another daemon (or with its transcript
out of this daemon's reach) is simply not recognised: the request starts its own conversation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from claudepool.errors import NotFound, SessionElsewhere, TooManySessions
from claudepool.sessions.manager import SessionManager
from claudepool.sessions.pools import system_prompt_of
from claudepool.store.base import SessionRecord, Store
from claudepool.tenancy.tenants import Tenant

log = logging.getLogger(__name__)

_DIGEST_VERSION = 1  # bumped when what a digest covers changes: old digests then simply never match


@dataclass(frozen=True)
class Thread:
    """What, beside its messages, makes a conversation this one: whose, where, on what, told what."""

    tenant: str
    profile: str
    model: str
    system: str  # "" when the request sent none


def digest(thread: Thread, messages: Sequence[tuple[str, str]]) -> str:
    """The sha256 (hex) of ``thread`` and ``messages`` (role, text), canonical.

    >>> t = Thread("acme", "default", "claude-sonnet-4-5", "")
    >>> digest(t, [("user", "hi"), ("assistant", "hello ")]) == digest(t, [("user", "hi"), ("assistant", "hello")])
    True
    >>> digest(t, [("user", "hi")]) == digest(Thread("beta", "default", "claude-sonnet-4-5", ""), [("user", "hi")])
    False
    """
    canonical = orjson.dumps({
        "v": _DIGEST_VERSION, "tenant": thread.tenant, "profile": thread.profile, "model": thread.model,
        "system": thread.system,
        "messages": [[role, text.strip() if role == "assistant" else text] for role, text in messages],
    }, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class Conversations:
    def __init__(self, store: Store, sessions: SessionManager) -> None:
        self.store = store
        self.sessions = sessions

    @property
    def enabled(self) -> bool:
        return self.sessions.config.conversations

    @property
    def idle_ttl_s(self) -> float:
        return self.sessions.config.conversation_idle_ttl_s

    async def claim(self, tenant: Tenant, thread: Thread, history: Sequence[tuple[str, str]]) -> SessionRecord | None:
        """The session holding ``history``, now this caller's to continue; None if there is none
        (or it is closed, at a limit, or another caller claimed it first)."""
        session_id = await self.store.conversation_claim(tenant.name, digest(thread, history))
        if session_id is None:
            return None
        try:
            record = await self.sessions.get(tenant.name, session_id)
        except NotFound:
            return None
        if (record.state == "closed" or record.profile != thread.profile
                or (system_prompt_of(self.sessions.pools, record) or "") != thread.system
                or not self._runs_here(record)):
            return None
        if self.sessions.limit_reached(tenant, record) is not None:
            # Its next turn would be refused or rolled over into a session without this history.
            await self.sessions.close_idle(record, "limit")
            return None
        self.sessions.events["conversation_continued"] += 1
        return record

    def _runs_here(self, record: SessionRecord) -> bool:
        """Whether its turn can run on this daemon: not held by another daemon, and its transcript
        here if it has one (a sessions directory not shared). Else this daemon starts its own."""
        try:
            self.sessions.check_not_elsewhere(record)
        except SessionElsewhere:
            return False
        return not record.cli_session_id or self.sessions.bound_worker(record.id) is not None or (
            self.sessions.files.transcript(record).exists())

    async def start(self, tenant: Tenant, thread: Thread, *, system: str | None = None) -> SessionRecord:
        """A new conversation's session, with the request's ``system`` prompt (None: the tenant's
        default): the one place one is created. Makes room under the tenant's bounds first."""
        await self._close_least_recent(tenant, keep=self.sessions.config.max_conversations - 1)
        try:
            record = await self.sessions.create(tenant, thread.profile, system=system, conversation=True)
        except TooManySessions:
            # At the tenant's max_sessions: a conversation gives way rather than the request.
            if not await self._close_least_recent(tenant, keep=None):
                raise
            record = await self.sessions.create(tenant, thread.profile, system=system, conversation=True)
        self.sessions.events["conversation_started"] += 1
        return record

    async def advance(self, tenant: Tenant, thread: Thread, messages: Sequence[tuple[str, str]],
                      session_id: str) -> None:
        """After a turn that succeeded: ``messages`` (the history, the new message, the answer) lead
        to the session."""
        await self.store.conversation_put(tenant.name, digest(thread, messages), session_id, self.idle_ttl_s)

    def turns_begun(self, session_id: str) -> int:
        """How many turns of the session this daemon has begun: compared before and after a request,
        whether its turn reached a worker (and the conversation's context)."""
        return self.sessions.turns_begun[session_id]

    async def failed(self, tenant: Tenant, thread: Thread, history: Sequence[tuple[str, str]],
                     before: SessionRecord, *, claimed: bool, begun_before: int) -> None:
        """After a turn that failed: ``before`` is the session as the request took it, when this
        daemon had begun ``begun_before`` of its turns."""
        now = await self.store.session_get(tenant.name, before.id)
        if (claimed and now is not None and now.state != "closed" and now.turns == before.turns
                and self.turns_begun(before.id) == begun_before):
            # It never reached a worker (refused at admission, a queue deadline): as it was. A turn
            # that did may be in the context although it failed (a deadline mid-answer, the client
            # gone, an error result): never continued from.
            await self.store.conversation_put(tenant.name, digest(thread, history), before.id, self.idle_ttl_s)
            return
        self.sessions.events["conversation_dropped"] += 1
        if now is not None and now.state != "closed":
            await self.sessions.close_idle(now, "conversation turn failed")

    async def _close_least_recent(self, tenant: Tenant, *, keep: int | None) -> int:
        """Close the tenant's least recently used idle conversations until ``keep`` are left (None:
        one). Returns how many it closed; one that a turn holds is skipped."""
        mine = sorted((r for r in await self.store.session_list(tenant.name)
                       if r.conversation and r.state != "closed"), key=lambda r: r.last_used_at)
        excess = 1 if keep is None else len(mine) - keep
        closed = 0
        for record in mine:
            if closed >= excess:
                break
            if await self.sessions.close_idle(record, "conversation bound"):
                closed += 1
                self.sessions.events["conversation_evicted"] += 1
        return closed
