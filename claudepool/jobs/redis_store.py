"""The shared job store: one Redis, many daemons claiming from it.

Each job's record is a hash (``r`` the JSON, ``v`` its version, ``e`` its stream entry); every
move reads it, applies the pure function of `claudepool.jobs.model` here, and writes back with a
compare-and-set on the version (``cas.lua``): a consumer that lost the race skips the job (a claim)
or reads again (every other move). The queue is a Redis Stream per (lane, priority) read by one
consumer group: a claim takes new entries with XREADGROUP and entries idle longer than its
visibility timeout with XAUTOCLAIM, so a dead daemon's jobs go to the others. A heartbeat resets
the entry's idle time (XCLAIM) as it moves the record's ``visible_at``: the two clocks of a claim
move together. An ended job's entry is acked and deleted.

Usage::

    store = RedisJobStore(redis.asyncio.Redis.from_url(url, decode_responses=True))
    [(job, created)] = await store.submit([record])
    [claimed] = await store.claim("pool", "daemon-1", visibility_timeout_s=60)

Keys (prefix ``cp:jobs:``, tenant ``acme``); a tenant's keys carry its name in braces:

=================================  ======  =================================================================
``cp:jobs:{acme}:job:<id>``        HASH    ``r`` record JSON, ``v`` version, ``e`` stream entry id, ``d``
                                           dead-letter entry id; deleted by `purge`
``cp:jobs:{acme}:idem:<key>``      STRING  the id of the tenant's job with this idempotency key
``cp:jobs:{acme}:list``            ZSET    job id -> created_at, for `list_jobs`
``cp:jobs:q:<lane>:<priority>``    STREAM  one entry per unended job (``j`` id, ``t`` tenant), group
                                           ``claudepool``
``cp:jobs:dead``                   STREAM  dead-lettered jobs, oldest first
``cp:jobs:ended``                  ZSET    record key -> finished_at, for `purge`
=================================  ======  =================================================================

The client is the caller's: `close` leaves it open. Every Redis failure surfaces as `StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import Any, cast

import orjson
import redis.asyncio
import redis.exceptions

from claudepool.errors import JobConflict, JobNotFound, StoreError, TooManyJobs
from claudepool.jobs import model
from claudepool.jobs.model import JobPriority, JobRecord, JobStatus, Lane, Outcome, TransitionRefused, WebhookDelivery

# Reads again after a lost compare-and-set at most this often before giving up with `JobConflict`.
_CAS_TRIES = 32
_PAGE = 200
_PURGE_PAGE = 500


def _script(name: str) -> str:
    return resources.files("claudepool.jobs").joinpath("scripts", f"{name}.lua").read_text("utf-8")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: Any) -> dict[str, str]:
    """A stream entry's fields, whether the client decodes replies or not."""
    return {_text(name): _text(value) for name, value in raw.items()}


def _dumps(job: JobRecord) -> str:
    return orjson.dumps(job.model_dump(mode="json")).decode()


class RedisJobStore:
    """`JobStore` on one Redis server, through the caller's ``redis.asyncio`` client."""

    backend = "redis"

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "cp:jobs:", consumer_group: str = "claudepool",
                 operation_timeout_s: float = 10.0, owns_client: bool = False) -> None:
        self._redis = client
        self._owns_client = owns_client
        self._prefix = prefix
        self._group = consumer_group
        self._timeout_s = operation_timeout_s
        self._submit = client.register_script(_script("submit"))
        self._cas = client.register_script(_script("cas"))
        self._purge = client.register_script(_script("purge"))
        self._groups_ready = False
        # Where the next XAUTOCLAIM of each stream starts: it scans a bounded page of the pending
        # entries per call, so successive claims walk the whole list instead of its head only.
        self._cursors: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RedisJobStore(prefix={self._prefix!r}, consumer_group={self._group!r})"

    # -- keys ------------------------------------------------------------------------------------

    def _record_key(self, tenant: str, job_id: str) -> str:
        return f"{self._prefix}{{{tenant}}}:job:{job_id}"

    def _idem_key(self, tenant: str, key: str) -> str:
        return f"{self._prefix}{{{tenant}}}:idem:{key}"

    def _open_key(self, tenant: str) -> str:
        return f"{self._prefix}{{{tenant}}}:open"

    def _list_key(self, tenant: str) -> str:
        return f"{self._prefix}{{{tenant}}}:list"

    def _stream(self, lane: Lane, priority: JobPriority) -> str:
        return f"{self._prefix}q:{lane}:{priority}"

    @property
    def _dead(self) -> str:
        return f"{self._prefix}dead"

    @property
    def _ended(self) -> str:
        return f"{self._prefix}ended"

    # -- the interface ---------------------------------------------------------------------------

    async def submit(self, jobs: Sequence[JobRecord], *, max_open_per_tenant: int = 0
                     ) -> list[tuple[JobRecord, bool]]:
        if not jobs:
            return []
        keys: list[str] = []
        args: list[Any] = [self._group, str(max_open_per_tenant)]
        for job in jobs:
            record = self._record_key(job.tenant, job.id)
            idem = self._idem_key(job.tenant, job.idempotency_key) if job.idempotency_key is not None else record
            keys += [idem, record, self._list_key(job.tenant), self._stream(job.lane, job.priority),
                     self._open_key(job.tenant)]
            args += ["0" if job.idempotency_key is None else "1", job.id, job.tenant, _dumps(job)]
        args += [repr(job.created_at) for job in jobs]
        try:
            async with self._errors("submit"):
                await self._ensure_groups()
                replies = await self._submit(keys=keys, args=args)
        except StoreError as exc:
            if "too_many_jobs" not in str(exc):
                raise
            raise TooManyJobs(f"{str(exc).rsplit(' ', 1)[-1]} jobs would be open for this tenant, over its limit "
                              f"of {max_open_per_tenant}") from None
        out: list[tuple[JobRecord, bool]] = []
        for job, prior in zip(jobs, replies, strict=True):
            prior_id = _text(prior)
            out.append((job, True) if not prior_id else (await self.get(job.tenant, prior_id), False))
        return out

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        job, _ = await self._load(tenant, job_id)
        return job

    async def list_jobs(self, tenant: str, *, status: JobStatus | None = None, since: float | None = None,
                        limit: int = 100) -> list[JobRecord]:
        out: list[JobRecord] = []
        low = "-inf" if since is None else repr(since)
        offset = 0
        while len(out) < limit:
            async with self._errors("list_jobs"):
                ids = [_text(i) for i in cast("list[str | bytes]", await self._redis.zrangebyscore(
                    self._list_key(tenant), low, "+inf", start=offset, num=_PAGE))]
                if not ids:
                    break
                offset += len(ids)
                raws = await self._records(tenant, ids)
            for raw in raws:
                if raw is None:  # purged meanwhile
                    continue
                job = JobRecord.model_validate_json(raw)
                if status is None or job.status == status:
                    out.append(job)
                    if len(out) == limit:
                        break
            if len(ids) < _PAGE:
                break
        return out

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        at = time.time() if now is None else now
        out: list[JobRecord] = []
        async with self._errors("claim"):
            await self._ensure_groups()
            for priority in model.PRIORITIES:
                stream = self._stream(lane, priority)
                # Expired claims first: they were queued before anything still new in this stream.
                if len(out) < limit:
                    for entry in await self._expired(stream, consumer, visibility_timeout_s, limit - len(out)):
                        await self._take(stream, entry, consumer, at, visibility_timeout_s, out, ended)
                while len(out) < limit:
                    entries = await self._new(stream, consumer, limit - len(out))
                    if not entries:
                        break
                    for entry in entries:
                        await self._take(stream, entry, consumer, at, visibility_timeout_s, out, ended)
        return out

    async def heartbeat(self, tenant: str, job_id: str, token: str, *, visibility_timeout_s: float) -> bool:
        now = time.time()
        _, moved = await self._move(tenant, job_id, "touch",
                                    lambda job: model.heartbeat(job, token, now, visibility_timeout_s))
        return moved

    async def note_batch(self, tenant: str, job_id: str, token: str, batch_id: str) -> bool:
        now = time.time()
        _, moved = await self._move(tenant, job_id, "keep", lambda job: model.with_batch(job, token, batch_id, now))
        return moved

    async def settle(self, tenant: str, job_id: str, outcome: Outcome) -> tuple[JobRecord, bool]:
        now = time.time()
        return await self._move(tenant, job_id, "end", lambda job: model.settled(job, outcome, now))

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        now = time.time()
        job, _ = await self._move(tenant, job_id, "end", lambda job: model.cancelled(job, now))
        return job

    async def set_webhook(self, tenant: str, job_id: str, delivery: WebhookDelivery) -> None:
        await self._move(tenant, job_id, "keep", lambda job: job.model_copy(update={"webhook": delivery}))

    async def purge(self, finished_before: float) -> int:
        total = 0
        while True:
            async with self._errors("purge"):
                handled, purged = await self._purge(keys=[self._ended, self._dead],
                                                    args=[repr(finished_before), _PURGE_PAGE, self._prefix])
            total += int(purged)
            if int(handled) < _PURGE_PAGE:
                return total

    async def dead_letters(self, limit: int = 100) -> list[JobRecord]:
        if limit <= 0:
            return []
        async with self._errors("dead_letters"):
            entries = await self._redis.xrange(self._dead, count=limit) or []
        out: list[JobRecord] = []
        for _, raw in entries:
            fields = _fields(raw)
            with contextlib.suppress(JobNotFound):  # purged since
                out.append(await self.get(fields["t"], fields["j"]))
        return out

    async def start(self) -> None:
        """Nothing to open: the consumer groups are made on first use (Redis may be down now)."""

    async def close(self) -> None:
        """Closes the client only when it was handed over (``owns_client``)."""
        if self._owns_client:
            await self._redis.aclose()

    # -- internals -------------------------------------------------------------------------------

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for lane in model.LANES:
            for priority in model.PRIORITIES:
                # From id 0: entries added before the group existed are delivered too.
                try:
                    await self._redis.xgroup_create(self._stream(lane, priority), self._group, id="0", mkstream=True)
                except redis.exceptions.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):  # it exists already: anything else is a real failure
                        raise
        self._groups_ready = True

    async def _records(self, tenant: str, ids: Sequence[str]) -> list[str | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self._record_key(tenant, _text(job_id)), "r")
            raws: list[str | bytes | None] = await pipe.execute()
        return [None if raw is None else _text(raw) for raw in raws]

    async def _load(self, tenant: str, job_id: str) -> tuple[JobRecord, str]:
        async with self._errors("get"):
            raw, version = await self._redis.hmget(self._record_key(tenant, job_id), ["r", "v"])
        if raw is None or version is None:
            raise JobNotFound(f"no job {job_id!r}")
        return JobRecord.model_validate_json(raw), _text(version)

    async def _write(self, before: JobRecord, version: str, after: JobRecord, action: str,
                     consumer: str | None = None) -> bool:
        record = self._record_key(before.tenant, before.id)
        async with self._errors("write"):
            written = await self._cas(
                keys=[record, self._stream(before.lane, before.priority), self._dead, self._ended,
                      self._open_key(before.tenant)],
                args=[version, _dumps(after), action, self._group, consumer or after.claimed_by or "",
                      repr(after.finished_at or 0.0), after.id, after.tenant])
        return bool(written)

    async def _move(self, tenant: str, job_id: str, action: str,
                    move: Callable[[JobRecord], JobRecord]) -> tuple[JobRecord, bool]:
        """The record after ``move`` and True; as it stands and False when the move is refused."""
        for _ in range(_CAS_TRIES):
            job, version = await self._load(tenant, job_id)
            try:
                moved = move(job)
            except TransitionRefused:
                return job, False
            if await self._write(job, version, moved, action):
                return moved, True
        raise JobConflict(f"job {job_id!r} kept moving under {_CAS_TRIES} attempts to change it")

    async def _expired(self, stream: str, consumer: str, visibility_timeout_s: float,
                       count: int) -> list[tuple[str, dict[str, str]]]:
        start = self._cursors.get(stream, "0-0")
        reply = await self._redis.xautoclaim(stream, self._group, consumer, max(1, int(visibility_timeout_s * 1000)),
                                             start_id=start, count=count)
        self._cursors[stream] = _text(reply[0])
        return [(_text(entry_id), _fields(raw)) for entry_id, raw in reply[1] if raw is not None]

    async def _new(self, stream: str, consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
        reply: Any = await self._redis.xreadgroup(self._group, consumer, {stream: ">"}, count=count)
        if not reply:
            return []
        [(_, entries)] = reply
        return [(_text(entry_id), _fields(raw)) for entry_id, raw in entries if raw is not None]

    async def _take(self, stream: str, entry: tuple[str, dict[str, str]], consumer: str, at: float,
                    visibility_timeout_s: float, out: list[JobRecord], ended: list[JobRecord] | None) -> None:
        """Claim the job of one delivered entry into ``out``, if the model lets this consumer have it."""
        entry_id, fields = entry
        try:
            job, version = await self._load(fields["t"], fields["j"])
        except JobNotFound:  # its record is gone: the entry is litter
            await self._drop(stream, entry_id)
            return
        try:
            moved = model.claimed(job, consumer, at, visibility_timeout_s)
        except TransitionRefused:
            if job.terminal:  # ended between its delivery and now; its end acked the entry already
                await self._drop(stream, entry_id)
            # Or held by a live claim (its holder asked a longer visibility than this claim): the
            # entry's idle time restarted with this delivery, so its takeover waits one more of ours.
            return
        action = {"running": "keep", "dead": "dead"}.get(moved.status, "end")
        # Lost the race: another move (a cancel) came first, so the job is not ours.
        if await self._write(job, version, moved, action, consumer):
            if moved.status == "running":
                out.append(moved)
            elif ended is not None:
                ended.append(moved)

    async def _drop(self, stream: str, entry_id: str) -> None:
        await self._redis.xack(stream, self._group, entry_id)
        await self._redis.xdel(stream, entry_id)

    @contextlib.asynccontextmanager
    async def _errors(self, op: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
            # redis-py may turn a cancellation that lands mid-command into a connection error: the
            # caller is being cancelled (a shutdown), so that is what it gets, never a StoreError to retry.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
            if isinstance(exc, TimeoutError):
                raise StoreError(f"Redis did not answer the job store's {op} within {self._timeout_s:g}s") from exc
            if isinstance(exc, redis.exceptions.ResponseError):
                if "NOGROUP" in str(exc):  # the streams were deleted behind our back: make them again next time
                    self._groups_ready = False
                raise StoreError(f"Redis failed the job store's {op}: {exc}") from exc
            raise StoreError(f"Redis is unavailable for the job store's {op}: {exc}") from exc
