"""The state store interface: budgets, usage aggregates and the usage ledger.

Two backends implement it: `MemoryStore` (the default, one daemon) and `RedisStore` (several daemons
share one Redis). Both pass one conformance suite, shipped for any other backend to run too
(`claudepool.testing.store_conformance`).

Budgets are reserve-then-settle. Before a turn the daemon *reserves* an upper bound of its cost; the
reservation succeeds only if spend plus every live reservation plus this one stays within the
tenant's daily and monthly budgets. After the turn, *settle* atomically drops the reservation, adds
the real cost to spend, adds the usage to the aggregates and appends the ledger record. A
reservation expires after its TTL, so a daemon that crashes mid-turn cannot hold budget forever.
Concurrent requests therefore never push spend past a budget by more than the reservations in
flight, as long as a reservation bounds its turn's cost.

Time buckets are UTC days (``YYYYMMDD``) and months (``YYYYMM``). A settled turn counts in the
buckets of its own time (``UsageRecord.at``), so records flushed late still land in the right day.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from claudepool.errors import BudgetExhausted

WindowKind = Literal["day", "month"]
USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens", "cost_usd")

# How long settled record ids are remembered, so that settling one again counts nothing. A repeat
# comes from the metering buffer: it retries only the record at its head, and only after a failure
# (a settle whose reply was lost), as soon as the store answers again: seconds later, or when an
# outage ends. That daemon settles nothing else meanwhile. Both stores keep an id for
# `SETTLED_MEMORY_S` (longer than any outage a daemon's buffer would sit through) and keep at most
# `SETTLED_MAX_IDS` of the newest: per tenant in Redis, where other daemons may go on settling that
# tenant's records during one daemon's partition; in all in the memory store, where a settle cannot
# lose its reply and the memory only guards against a caller settling twice. The bound keeps a
# busy tenant from growing the memory (and each settle's work) with uptime.
SETTLED_MEMORY_S = 3 * 86400.0
SETTLED_MAX_IDS = 100_000


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One settled model call (``kind="call"``, measured at the gateway) or turn (``kind="turn"``,
    as the CLI reported it, for a turn the gateway saw no call of): the unit of metering, of budget
    settlement and of the ledger. ``requests`` is what the record adds to the request count (1 on
    the first record of a request, 0 on its other calls), so aggregates count requests, not calls.

    Slotted: the memory store's ledger holds up to ``ledger_max_records`` of them."""

    record_id: str  # idempotency key: settling the same record twice counts it once
    request_id: str
    tenant: str
    profile: str
    model: str
    outcome: str  # ok | model_error | interrupted | failed
    at: float  # unix seconds when the turn ended
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0
    session: str | None = None
    # The budget reservation this turn settles, if any.
    reservation_id: str | None = None
    kind: str = "turn"
    requests: int = 1
    # Of a call: the 1-hour part of cache_creation_input_tokens, the gateway's and the provider's ids
    # of the call, the message id, the HTTP status relayed, its duration and time to first token.
    cache_write_1h_input_tokens: int = 0
    call_id: str | None = None
    upstream_request_id: str | None = None
    message_id: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    first_token_ms: float | None = None
    # Of a call: how the provider bills it, "standard" (a /v1/messages call) or "batch" (a request
    # of a Message Batch, priced at [pricing] batch_multiplier); reconciled in a row of its own.
    service_tier: str = "standard"

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class SessionRecord:
    """A conversation: who owns it, where it lives, and what it has cost so far."""

    id: str
    tenant: str
    profile: str
    created_at: float
    last_used_at: float
    state: str = "active"  # active (holds a worker) | parked (transcript on disk) | closed
    cli_session_id: str = ""  # the CLI's own conversation id, what --resume takes
    owner: str = ""  # the daemon holding its worker while active
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0
    context_tokens: int = 0
    transcript: str = ""  # the parked transcript, relative to the sessions directory
    workspace: str = ""  # its workspace at the last park: "" (none), "saved", or "dropped: why"
    closed_at: float | None = None
    close_reason: str | None = None
    # Its system prompt when not its profile's own (a custom one, or the tenant's persona): what
    # finds, or makes again after a restart, the pool its turns run on.
    system_prompt: str | None = None
    # Started by a front door recognising a chat history (`claudepool.sessions.conversations`):
    # bounded per tenant and expired sooner than sessions a client created.
    conversation: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class UsageTotals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.requests += record.requests
        self.input_tokens += record.input_tokens
        self.output_tokens += record.output_tokens
        self.cache_read_input_tokens += record.cache_read_input_tokens
        self.cache_creation_input_tokens += record.cache_creation_input_tokens
        self.cost_usd += record.cost_usd

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_usd": round(self.cost_usd, 10)}


@dataclass(frozen=True)
class BudgetState:
    day_spent_usd: float
    month_spent_usd: float
    reserved_usd: float


@dataclass(frozen=True)
class Window:
    """A usage window: one UTC day (``key`` YYYYMMDD) or one UTC month (``key`` YYYYMM)."""

    kind: WindowKind
    key: str = field(default="")

    @classmethod
    def current(cls, kind: WindowKind, at: float | None = None) -> Window:
        stamp = time.time() if at is None else at
        return cls(kind, day_key(stamp) if kind == "day" else month_key(stamp))

    @classmethod
    def parse(cls, kind: str, value: str | None) -> Window:
        """From an API query: ``day`` with ``2026-11-24`` or ``month`` with ``2026-11``; default now."""
        if kind not in ("day", "month"):
            raise ValueError("window must be 'day' or 'month'")
        if not value:
            return cls.current(kind)  # type: ignore[arg-type]
        fmt = "%Y-%m-%d" if kind == "day" else "%Y-%m"
        try:
            parsed = datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            # Not strptime's message: it quotes the value, and errors never echo what was sent.
            raise ValueError(f"date must be {'YYYY-MM-DD' if kind == 'day' else 'YYYY-MM'} "
                             f"for a {kind} window") from None
        return cls.current(kind, parsed.timestamp())  # type: ignore[arg-type]

    def label(self) -> str:
        k = self.key
        return f"{k[:4]}-{k[4:6]}-{k[6:]}" if self.kind == "day" else f"{k[:4]}-{k[4:]}"


def day_key(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y%m%d")


def month_key(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y%m")


Usage = dict[str, dict[str, UsageTotals]]  # tenant -> model -> totals


def grant(amount_usd: float, min_usd: float | None, reserved_usd: float,
          windows: Iterable[tuple[float, float, str]]) -> float:
    """What a reservation may hold, given each window's (limit, spent, name) and what the others hold.

    All of ``amount_usd`` when it fits in the room every limit leaves (limit - spent - reserved);
    with ``min_usd`` set, otherwise the room itself if it is at least ``min_usd`` and more than
    nothing (a call then lowers what it may spend to fit). store/scripts/reserve.lua computes the
    same, in the same order of operations.

    >>> grant(0.5, None, 0.25, [(1.0, 0.0, "daily")])
    0.5
    >>> grant(2.0, 0.5, 0.25, [(1.0, 0.0, "daily"), (0.0, 9.0, "monthly")])
    0.75
    """
    room, tightest = math.inf, None
    for limit, spent, name in windows:
        if limit > 0 and limit - spent - reserved_usd < room:
            room, tightest = limit - spent - reserved_usd, (name, limit, spent)
    if amount_usd <= room:
        return amount_usd
    if min_usd is not None and room >= min_usd and room > 0:
        return room
    assert tightest is not None
    name, limit, spent = tightest
    raise budget_refused(name, limit, spent, reserved_usd, amount_usd if min_usd is None else min_usd,
                         at_least=min_usd is not None)


def budget_refused(name: str, limit_usd: float, spent_usd: float, reserved_usd: float, needs_usd: float, *,
                   at_least: bool) -> BudgetExhausted:
    """The refusal both stores raise, word for word."""
    return BudgetExhausted(f"the {name} budget of ${limit_usd:g} cannot cover this call (spent ${spent_usd:.4f}, "
                           f"reserved ${reserved_usd:.4f}, needs {'at least' if at_least else 'up to'} "
                           f"${needs_usd:.4f})")


class Store(Protocol):
    """What limits, budgets and metering need from shared state. Raise `StoreError` on outage."""

    backend: str

    async def reserve(self, tenant: str, reservation_id: str, amount_usd: float, *, daily_limit_usd: float,
                      monthly_limit_usd: float, ttl_s: float, min_usd: float | None = None) -> float:
        """Hold budget and return how much: ``amount_usd`` if it fits under both limits (0: none); with
        ``min_usd``, else all that is left, if that is at least ``min_usd`` (see `grant`). Raises
        `BudgetExhausted` when neither fits."""
        ...

    async def settle(self, record: UsageRecord) -> bool:
        """Drop the record's reservation, add its cost and usage, append it to the ledger; atomically.
        Returns False (and changes nothing) if this ``record_id`` was settled before."""
        ...

    async def release(self, tenant: str, reservation_id: str) -> None:
        """Drop a reservation without spending (the request never ran a turn)."""
        ...

    async def budget(self, tenant: str) -> BudgetState: ...

    async def usage(self, window: Window, tenants: list[str] | None = None) -> Usage:
        """Aggregates per tenant and model for one window; ``None`` means every tenant with data."""
        ...

    async def ledger(self, tenant: str | None = None, *, since: float | None = None,
                     limit: int = 1000) -> list[UsageRecord]:
        """Settled records, oldest first."""
        ...

    async def session_put(self, record: SessionRecord) -> None:
        """Create or replace a session record."""
        ...

    async def session_create(self, record: SessionRecord, *, max_open: int) -> bool:
        """Store a new session record unless its tenant already has ``max_open`` open (not closed)
        sessions; 0 means no bound. The count and the insert are one atomic step, so concurrent
        creates never overshoot, and the count costs O(1), not a listing. False if refused."""
        ...

    async def session_get(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The tenant's session, or None: another tenant's id is simply not found."""
        ...

    async def session_list(self, tenant: str | None = None) -> list[SessionRecord]:
        """A tenant's sessions, or every tenant's (``None``), oldest first."""
        ...

    async def session_delete(self, tenant: str, session_id: str) -> None: ...

    async def conversation_put(self, tenant: str, digest: str, session_id: str, ttl_s: float) -> None:
        """Point the tenant's conversation ``digest`` (a chat history's sha256) at ``session_id`` for
        ``ttl_s`` seconds, replacing what it pointed at."""
        ...

    async def conversation_claim(self, tenant: str, digest: str) -> str | None:
        """The session the tenant's ``digest`` points at, removed in the same atomic step (of two
        concurrent claims one gets it, the other None); None if absent or expired."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
