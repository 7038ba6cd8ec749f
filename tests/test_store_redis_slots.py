"""Every script and transaction touches the keys of one hash slot, so the key layout holds on Redis Cluster.

A cluster refuses a script or a MULTI block whose keys hash to different slots (CROSSSLOT); a key a
script names itself, outside KEYS, must be in the slot of the declared ones too. The test drives
every store operation and the shared rate limiter against a real redis-server while a MONITOR
connection records what the server ran: each client command, each command a script ran (shown as
coming from ``lua``), and each MULTI block. The keys of every command are asked of the server
itself (``COMMAND GETKEYS``), and their slots of redis-py's `key_slot` (the hash-tag rule).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import redis.asyncio
import redis.exceptions
from redis.crc import key_slot

from claudepool.store.base import SessionRecord, UsageRecord, Window
from claudepool.store.redis import RedisStore, script_file, script_source
from claudepool.tenancy.limits import RateLimiter

_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b"\\": b"\\", b'"': b'"'}
# Shared code prepended to the scripts, not scripts of their own.
_LIBRARIES = {"clock", "reservations"}


def unescape(raw: bytes) -> bytes:
    """One MONITOR argument as Redis quoted it (sdscatrepr) back to its bytes."""
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and i + 1 < len(raw):
            nxt = raw[i + 1 : i + 2]
            if nxt == b"x":
                out += bytes([int(raw[i + 2 : i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt)
            i += 2
            continue
        out += raw[i : i + 1]
        i += 1
    return bytes(out)


@dataclass
class Unit:
    """What the server ran as one atomic step: a command, a script with what it called, or a MULTI block."""

    commands: list[list[bytes]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.commands[0][0].decode().upper()


class Monitor:
    """MONITOR on a Unix socket, collecting every command the server runs until `stop`."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path
        self.lines: list[tuple[str, list[bytes]]] = []  # (source: "lua" or a client, arguments)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[bytes, asyncio.Event] = {}

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=2**24)
        self._writer.write(b"MONITOR\r\n")
        assert (await self._reader.readline()).startswith(b"+OK")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._reader is not None
        while line := await self._reader.readline():
            head, _, rest = line.rstrip(b"\r\n").partition(b"] ")
            source = head.partition(b"[")[2].split(b" ", 1)[1].decode()
            args = [unescape(a) for a in _ARG.findall(rest)]
            self.lines.append(("lua" if source == "lua" else "client", args))
            if len(args) == 2 and args[0].upper() == b"ECHO" and args[1] in self._seen:
                self._seen[args[1]].set()

    async def stop(self, client: redis.asyncio.Redis) -> None:
        """Return once the server has shown everything it ran before this call."""
        marker = f"end-of-watch-{uuid.uuid4()}".encode()
        self._seen[marker] = asyncio.Event()
        await client.echo(marker)
        async with asyncio.timeout(10):
            await self._seen[marker].wait()
        assert self._task is not None and self._writer is not None
        self._task.cancel()
        self._writer.close()
        await asyncio.gather(self._task, return_exceptions=True)
        self.lines = [(source, args) for source, args in self.lines if args[:2] != [b"echo", marker]]

    def units(self) -> list[Unit]:
        """The commands grouped as they ran: a script's own calls join it; MULTI .. EXEC is one unit.
        The clients under watch run one operation at a time, so no other command interleaves."""
        units: list[Unit] = []
        in_multi = False
        for source, args in self.lines:
            name = args[0].upper()
            if source == "lua" or in_multi:
                units[-1].commands.append(args)
                in_multi = in_multi and name not in (b"EXEC", b"DISCARD")
                continue
            units.append(Unit([args]))
            in_multi = name == b"MULTI"
        return units


async def keys_of(client: redis.asyncio.Redis, command: list[bytes]) -> list[bytes]:
    """The key arguments of ``command``, by the server's own command table."""
    try:
        found: list[bytes | str] = await client.command_getkeys(*command)
    except redis.exceptions.ResponseError:
        return []  # a command without keys (TIME, PING, CLIENT, SCRIPT, ...)
    return [k.encode() if isinstance(k, str) else k for k in found]


def shipped_scripts() -> dict[str, str]:
    """SHA1 -> name of every script the store and the rate limiter send, as they send it."""
    files = [Path(p.name) for p in resources.files("claudepool.store").joinpath("scripts").iterdir()]
    names = sorted(f.stem for f in files if f.suffix == ".lua" and f.stem not in _LIBRARIES)
    sources = {name: script_file(f"{name}.lua") if name == "session_create" else script_source(name)
               for name in names}
    return {hashlib.sha1(text.encode()).hexdigest(): name for name, text in sources.items()}


def usage(record_id: str, tenant: str, reservation_id: str | None = None) -> UsageRecord:
    return UsageRecord(record_id=record_id, request_id=f"req-{record_id}", tenant=tenant, profile="default",
                       model="claude-sonnet-4-5", outcome="ok", at=time.time(), input_tokens=10, output_tokens=3,
                       cost_usd=0.25, reservation_id=reservation_id)


async def every_operation(store: RedisStore, limiter: RateLimiter) -> None:
    for tenant in ("acme", "beta"):
        await store.reserve(tenant, "r1", 1.0, daily_limit_usd=10, monthly_limit_usd=100, ttl_s=60)
        await store.reserve(tenant, "r2", 1.0, daily_limit_usd=0, monthly_limit_usd=0, ttl_s=60)
        assert await store.settle(usage(f"{tenant}-1", tenant, reservation_id="r1"))
        assert not await store.settle(usage(f"{tenant}-1", tenant, reservation_id="r1"))
        assert await store.settle(usage(f"{tenant}-2", tenant))
        await store.release(tenant, "r2")
        await store.budget(tenant)
        now = time.time()
        record = SessionRecord(id=f"s_slots{tenant}", tenant=tenant, profile="default", created_at=now,
                               last_used_at=now)
        assert await store.session_create(record, max_open=5)
        record.state = "active"
        await store.session_put(record)
        record.state = "closed"
        await store.session_put(record)
        await store.session_get(tenant, record.id)
        await store.session_list(tenant)
        await limiter.check(tenant, requests_per_minute=100, tokens_per_minute=10_000)
        await limiter.record_tokens(tenant, 13)
    await store.usage(Window.current("day"))
    await store.usage(Window.current("month"), ["acme", "beta"])
    await store.ledger()
    await store.ledger("acme", since=time.time() - 60)
    await store.session_list(None)
    await store.session_delete("beta", "s_slotsbeta")
    await store.ping()


async def test_every_script_and_transaction_touches_one_hash_slot(redis_url: str) -> None:
    scripts = shipped_scripts()
    assert set(scripts.values()) == {"budget", "rate_limit", "release", "reserve", "session_create", "settle"}
    inspect = redis.asyncio.Redis.from_url(redis_url)
    store, limiter = RedisStore(redis_url), RateLimiter(redis_url)
    monitor = Monitor(redis_url.removeprefix("unix://"))
    try:
        await monitor.start()
        await every_operation(store, limiter)
        await monitor.stop(inspect)
        units = monitor.units()
        ran: set[str] = set()
        problems = []
        for unit in units:
            touched = [k for command in unit.commands for k in await keys_of(inspect, command)]
            label = unit.name
            if unit.name == "EVALSHA":
                label = scripts.get(unit.commands[0][1].decode(), "an unknown script")
                if len(unit.commands) > 1:  # it ran (a first EVALSHA answers NOSCRIPT and runs nothing)
                    ran.add(label)
            if len({key_slot(k) for k in touched}) > 1:
                problems.append((label, sorted(set(touched))))
        assert not problems
        assert ran == set(scripts.values())  # each script ran (and was looked at), none unknown
        assert [u for u in units if u.name == "MULTI"]  # and the transactions did too
    finally:
        await store.close()
        await limiter.close()
        await inspect.aclose()
