"""The Redis store: budgets, usage and the ledger shared by every daemon pointed at one Redis.

Each write is one Lua script, so it is atomic exactly like a `MemoryStore` method on the event loop.
Scripts read the clock inside Redis (``TIME``), so daemons with skewed clocks still agree on when a
reservation expires and which UTC day and month a reserve counts against. A settled record counts
in the day and month of its own ``at``, as in the memory store. Key names live in `keys`.

Usage::

    store = RedisStore("redis://:password@redis.internal:6379/0", key_prefix="cp")
    await store.reserve("acme", "req-1", 0.50, daily_limit_usd=20, monthly_limit_usd=300, ttl_s=600)
    ...
    await store.settle(record)
    await store.close()

Every Redis failure (unreachable, timeout, refused command) surfaces as `StoreError`, whose message
names the server without its password. Commands are retried once on a connection error, which
heals a pooled connection broken by a Redis restart; that is safe because every script is
idempotent (reserve replaces by id, settle is keyed on record id, release deletes). A settle whose
first attempt ran but whose reply was lost therefore answers False on the retry: counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from claudepool.errors import ConfigError, StoreError
from claudepool.store import keys
from claudepool.store.base import (
    USAGE_FIELDS,
    BudgetState,
    SessionRecord,
    Usage,
    UsageRecord,
    UsageTotals,
    Window,
    budget_refused,
    day_key,
    month_key,
)

# Ledger reads for ``since`` start this far before it in stream-id time (Redis's clock at settle),
# because ``at`` is the daemon's clock: a record may carry an ``at`` slightly after its settle time.
_LEDGER_CLOCK_SKEW_S = 3600.0
_LEDGER_PAGE = 1000
# How often a tenant this store writes for is listed again, and how many it remembers listing.
_RELIST_S = 60.0
_MAX_LISTED = 10_000
# No ``health_check_interval``: in redis-py 8.1 it recurses through connect -> on_connect -> PING when
# combined with a retry (redis/redis-py#3745) and hangs forever against a server that demands AUTH.
# The one retry below replaces a dead pooled connection instead, which is what a health check is for.


def script_file(filename: str) -> str:
    """One file of ``claudepool/store/scripts``, as packaged."""
    return resources.files("claudepool.store").joinpath("scripts", filename).read_text("utf-8")


def script_source(name: str) -> str:
    """Script ``name`` as sent to Redis: the shared libraries (``clock.lua``, ``reservations.lua``), then
    the script."""
    return "\n".join(script_file(f"{part}.lua") for part in ("clock", "reservations", name))


def redact_url(url: str) -> str:
    """The URL without credentials or query (where a ``unix://`` URL may carry its password)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable Redis URL>"
    return f"{parts.scheme}://{host}{parts.path}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# An operation takes ~0.1 ms of Redis time: a few dozen connections carry thousands a second.
MAX_CONNECTIONS = 64


def connect(url: str, *, socket_timeout_s: float, client_name: str) -> redis.asyncio.Redis:
    """A client as every claudepool user of Redis wants it; raises ValueError for a bad URL.

    A *blocking* pool: past `MAX_CONNECTIONS` an operation waits for a connection (the caller's own
    deadline bounds the wait) instead of failing with "Too many connections", which a flood of
    requests would see as an outage (budgets would answer 503, rate limits fall back to local).
    No `socket_timeout` (redis-py 8 defaults to 5 s): with one, redis-py sends through
    asyncio.wait_for, which on Python 3.11 drops a cancellation that lands as the send completes.
    One quick retry: enough to replace a connection a restart broke, short enough that an outage
    fails the operation within about two socket timeouts."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=None, decode_responses=True, socket_timeout=None,
        socket_connect_timeout=socket_timeout_s, retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),
        client_name=client_name)
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)
    return client


class RedisStore:
    """`Store` on one Redis server (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    backend = "redis"

    def __init__(self, url: str, *, key_prefix: str = keys.DEFAULT_PREFIX, ledger_max_records: int = 100_000,
                 socket_timeout_s: float = 2.0, settled_max_ids: int = keys.SETTLED_MAX_IDS) -> None:
        self._prefix = key_prefix
        self._ledger_max_records = ledger_max_records
        self._settled_max_ids = settled_max_ids
        self._where = redact_url(url)
        # Each operation's deadline: two attempts and the backoff. It is ours, not a redis-py
        # `socket_timeout`: with one, redis-py sends through asyncio.wait_for, which on Python 3.11
        # drops a cancellation that lands as the send completes, so a cancelled task runs on (a
        # background loop never stops, a handler outlives its client). Our code uses asyncio.timeout.
        self._deadline_s = 2 * socket_timeout_s + 1.0
        self._secrets = self._url_secrets(url)
        try:
            self._redis = connect(url, socket_timeout_s=socket_timeout_s, client_name="claudepool")
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {self._where}: {self._scrub(str(exc))}") from None
        self._reserve = self._redis.register_script(script_source("reserve"))
        self._settle = self._redis.register_script(script_source("settle"))
        self._release = self._redis.register_script(script_source("release"))
        self._budget = self._redis.register_script(script_source("budget"))
        self._session_create = self._redis.register_script(script_file("session_create.lua"))
        self._listed: dict[str, float] = {}  # tenant -> when this store last added it to the listing

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, key_prefix={self._prefix!r})"

    async def reserve(self, tenant: str, reservation_id: str, amount_usd: float, *, daily_limit_usd: float,
                      monthly_limit_usd: float, ttl_s: float, min_usd: float | None = None) -> float:
        async with self._errors("reserve"):
            reply = await self._reserve(
                keys=self._reservation_keys(tenant),
                args=[keys.spend_prefix(self._prefix, tenant, "day"), keys.spend_prefix(self._prefix, tenant, "month"),
                      reservation_id, _num(amount_usd), _limit(daily_limit_usd), _limit(monthly_limit_usd),
                      _num(ttl_s), keys.RESERVATION_GRACE_S, "" if min_usd is None else _num(min_usd)],
            )
        if reply[0] == "ok":
            return float(reply[1])
        name, spent, reserved = reply[0], float(reply[1]), float(reply[2])
        limit = daily_limit_usd if name == "daily" else monthly_limit_usd
        raise budget_refused(name, limit, spent, reserved, amount_usd if min_usd is None else min_usd,
                             at_least=min_usd is not None)

    async def settle(self, record: UsageRecord) -> bool:
        p, t = self._prefix, record.tenant
        day, month = day_key(record.at), month_key(record.at)
        amounts: dict[str, Any] = {
            "requests": record.requests, "input_tokens": record.input_tokens, "output_tokens": record.output_tokens,
            "cache_read_input_tokens": record.cache_read_input_tokens,
            "cache_creation_input_tokens": record.cache_creation_input_tokens, "cost_usd": _num(record.cost_usd),
        }
        # (field, increment) pairs in USAGE_FIELDS order; the script adds the last one, the cost, as a float.
        fields = [x for name in USAGE_FIELDS for x in (keys.usage_field(record.model, name), amounts[name])]
        async with self._errors("settle"):
            await self._list_tenant(t)
            settled = await self._settle(
                keys=[keys.settled(p, t), *self._reservation_keys(t),
                      keys.spend(p, t, "day", day), keys.spend(p, t, "month", month),
                      keys.usage(p, t, "day", day), keys.usage(p, t, "month", month),
                      keys.ledger(p, t)],
                args=[record.record_id, "1" if record.reservation_id is not None else "0",
                      record.reservation_id or "", orjson.dumps(record.to_dict()).decode(),
                      self._ledger_max_records, keys.DAY_TTL_S, keys.MONTH_TTL_S, keys.SETTLED_TTL_S,
                      self._settled_max_ids, *fields],
            )
        return bool(settled)

    async def release(self, tenant: str, reservation_id: str) -> None:
        async with self._errors("release"):
            await self._release(keys=self._reservation_keys(tenant), args=[reservation_id])

    async def budget(self, tenant: str) -> BudgetState:
        async with self._errors("budget"):
            day, month, reserved = await self._budget(
                keys=self._reservation_keys(tenant),
                args=[keys.spend_prefix(self._prefix, tenant, "day"), keys.spend_prefix(self._prefix, tenant, "month")],
            )
        return BudgetState(day_spent_usd=float(day), month_spent_usd=float(month), reserved_usd=float(reserved))

    async def usage(self, window: Window, tenants: list[str] | None = None) -> Usage:
        async with self._errors("usage"):
            if tenants is None:
                names = sorted(_text(m) for m in await self._redis.smembers(keys.tenants(self._prefix)))
            else:
                names = list(dict.fromkeys(tenants))
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant in names:
                    pipe.hgetall(keys.usage(self._prefix, tenant, window.kind, window.key))
                replies: list[dict[str, str]] = await pipe.execute()
        out: Usage = {}
        for tenant, raw in zip(names, replies, strict=True):
            if raw:
                out[tenant] = _totals(raw)
        return out

    async def ledger(self, tenant: str | None = None, *, since: float | None = None,
                     limit: int = 1000) -> list[UsageRecord]:
        if limit <= 0 or (since is not None and not since < math.inf):  # +inf or NaN: nothing is that late
            return []
        if tenant is not None:
            return [record for _, record in await self._tenant_ledger(tenant, since, limit)]
        async with self._errors("ledger"):
            names = await self._redis.smembers(keys.tenants(self._prefix))
        merged: list[tuple[float, tuple[int, int], UsageRecord]] = []
        for name in sorted(_text(n) for n in names):
            records = await self._tenant_ledger(name, since, limit)
            merged += [(record.at, entry_id, record) for entry_id, record in records]
        # Across tenants, oldest by the record's time; ties keep the order they were settled in.
        merged.sort(key=lambda item: (item[0], item[1]))
        return [record for _, _, record in merged[:limit]]

    async def session_put(self, record: SessionRecord) -> None:
        open_ids = keys.open_sessions(self._prefix, record.tenant)
        async with self._errors("session_put"):
            await self._list_tenant(record.tenant)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.sessions(self._prefix, record.tenant), record.id, orjson.dumps(record.to_dict()))
                if record.state == "closed":
                    pipe.srem(open_ids, record.id)
                else:
                    pipe.sadd(open_ids, record.id)
                await pipe.execute()

    async def session_create(self, record: SessionRecord, *, max_open: int) -> bool:
        p, t = self._prefix, record.tenant
        async with self._errors("session_create"):
            await self._list_tenant(t)
            stored = await self._session_create(
                keys=[keys.sessions(p, t), keys.open_sessions(p, t)],
                args=[record.id, orjson.dumps(record.to_dict()).decode(), max(max_open, 0)],
            )
        return bool(stored)

    async def session_get(self, tenant: str, session_id: str) -> SessionRecord | None:
        async with self._errors("session_get"):
            raw = await self._redis.hget(keys.sessions(self._prefix, tenant), session_id)
        return SessionRecord.from_dict(orjson.loads(raw)) if raw else None

    async def session_list(self, tenant: str | None = None) -> list[SessionRecord]:
        async with self._errors("session_list"):
            names = [tenant] if tenant is not None else sorted(
                _text(m) for m in await self._redis.smembers(keys.tenants(self._prefix)))
            records: list[SessionRecord] = []
            for name in names:
                for raw in (await self._redis.hgetall(keys.sessions(self._prefix, name))).values():
                    records.append(SessionRecord.from_dict(orjson.loads(raw)))
        return sorted(records, key=lambda r: r.created_at)

    async def session_delete(self, tenant: str, session_id: str) -> None:
        async with self._errors("session_delete"), self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.sessions(self._prefix, tenant), session_id)
            pipe.srem(keys.open_sessions(self._prefix, tenant), session_id)
            await pipe.execute()

    async def conversation_put(self, tenant: str, digest: str, session_id: str, ttl_s: float) -> None:
        async with self._errors("conversation_put"):
            await self._redis.set(keys.conversation(self._prefix, tenant, digest), session_id,
                                  px=max(1, math.ceil(ttl_s * 1000)))

    async def conversation_claim(self, tenant: str, digest: str) -> str | None:
        async with self._errors("conversation_claim"):
            raw = await self._redis.getdel(keys.conversation(self._prefix, tenant, digest))
        return _text(raw) if raw else None

    async def ping(self) -> None:
        async with self._errors("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        async with self._errors("close"):
            await self._redis.aclose()

    async def _list_tenant(self, tenant: str) -> None:
        """Add the tenant to the global listing, by itself and *before* the script or transaction that
        writes its data: with the tenant's keys it would span two hash slots (CROSSSLOT on a cluster).
        Listed first, a tenant is never missing from the listing; a write that then fails leaves it
        listed with nothing to show, which every reader of the listing takes as no data.

        Once a minute per tenant at most: a round trip per settle cost ~35% more client CPU. A listing
        deleted behind the daemon's back comes back within the minute."""
        now = time.monotonic()
        if now - self._listed.get(tenant, -math.inf) < _RELIST_S:
            return
        await self._redis.sadd(keys.tenants(self._prefix), tenant)
        if len(self._listed) >= _MAX_LISTED:
            self._listed.clear()
        self._listed[tenant] = now

    def _reservation_keys(self, tenant: str) -> list[str]:
        return [keys.reservations(self._prefix, tenant), keys.reservation_amounts(self._prefix, tenant),
                keys.reservation_total(self._prefix, tenant)]

    async def _tenant_ledger(self, tenant: str, since: float | None,
                             limit: int) -> list[tuple[tuple[int, int], UsageRecord]]:
        """The first ``limit`` records of one tenant's stream with ``at >= since``, in settle order."""
        key = keys.ledger(self._prefix, tenant)
        start = "-"
        if since is not None and since - _LEDGER_CLOCK_SKEW_S > 0:
            start = f"{math.floor((since - _LEDGER_CLOCK_SKEW_S) * 1000)}-0"
        out: list[tuple[tuple[int, int], UsageRecord]] = []
        while len(out) < limit:
            async with self._errors("ledger"):
                entries = await self._redis.xrange(key, min=start, max="+", count=_LEDGER_PAGE) or []
            for raw_id, fields in entries:
                if raw_id is None or fields is None:  # only XCLAIM answers these; never XRANGE
                    continue
                start = "(" + _text(raw_id)
                record = UsageRecord.from_dict(orjson.loads(fields["r"]))
                if since is None or record.at >= since:
                    out.append((_entry_id(_text(raw_id)), record))
                    if len(out) == limit:
                        break
            if len(entries) < _LEDGER_PAGE:
                break
        return out

    @contextlib.asynccontextmanager
    async def _errors(self, op: str) -> AsyncIterator[None]:
        """One round trip under a deadline; any Redis or socket failure becomes `StoreError`, with no secret
        in its message."""
        try:
            async with asyncio.timeout(self._deadline_s):
                yield
        except TimeoutError as exc:  # the builtin: our deadline, or a socket's
            raise StoreError(f"Redis at {self._where} did not answer {op} within {self._deadline_s:g}s") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreError(f"Redis at {self._where} is unavailable ({op}): "
                             f"{self._scrub(_describe(exc))}") from exc
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"Redis at {self._where} failed {op}: {self._scrub(_describe(exc))}") from exc

    @staticmethod
    def _url_secrets(url: str) -> list[str]:
        found: list[str] = []
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            if parts.password:
                found += [parts.password, unquote(parts.password)]
            for item in parts.query.split("&"):  # unix://...?password=... as written and as parsed
                name, _, value = item.partition("=")
                if name == "password":
                    found += [value, unquote(value)]
            found += parse_qs(parts.query).get("password", [])
        # Longest first, so a secret that contains another is removed whole.
        return sorted({s for s in found if s}, key=len, reverse=True)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _num(value: float) -> str:
    """A float as the shortest decimal string that reads back as the same float."""
    return repr(float(value))


def _limit(value: float) -> str:
    """A budget limit for the script; like the memory store, anything not above 0 (or inf, NaN) is none."""
    return _num(value) if math.isfinite(value) and value > 0 else "0"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _entry_id(raw: str) -> tuple[int, int]:
    ms, _, seq = raw.partition("-")
    return int(ms), int(seq or 0)


def _totals(raw: dict[str, str]) -> dict[str, UsageTotals]:
    by_model: dict[str, UsageTotals] = {}
    for field, value in raw.items():
        model, name = keys.split_usage_field(field)
        if name not in USAGE_FIELDS:
            continue
        totals = by_model.setdefault(model, UsageTotals())
        # Rounded like UsageTotals.to_dict(), which is what the memory store returns.
        setattr(totals, name, round(float(value), 10) if name == "cost_usd" else int(value))
    return by_model
