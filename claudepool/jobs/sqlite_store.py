"""The embedded job store: one SQLite file, for a daemon that runs alone.

Every method is one ``BEGIN IMMEDIATE`` transaction (it takes the write lock up front, so two
read-modify-writes never interleave, even from two processes on one file). The file is in WAL mode
with ``synchronous=FULL``: a committed transaction survives a crash of the process and of the
machine. All database work runs on one dedicated thread, never on the event loop; that thread owns
the connection (sqlite3 connections are not to be shared between threads).

Usage::

    store = SqliteJobStore("/var/lib/claudepool/jobs.db")
    await store.start()
    [(job, created)] = await store.submit([record])
    ...
    await store.close()

The record itself is kept as JSON; the columns beside it are copies of the fields the queries
filter and sort on, rewritten with it in the same statement.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from claudepool.errors import JobNotFound, StoreError, TooManyJobs
from claudepool.jobs import model
from claudepool.jobs.model import JobRecord, JobStatus, Lane, Outcome, TransitionRefused, WebhookDelivery

T = TypeVar("T")

# How long a transaction waits for another process's write lock before failing.
_BUSY_TIMEOUT_MS = 5000
# A bounded close: the worker thread finishes the statement it runs, then the connection closes.
_CLOSE_TIMEOUT_S = 10.0
_PURGE_PAGE = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    lane TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    idempotency_key TEXT,
    visible_at REAL,
    record BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (lane, status, priority, created_at);
CREATE INDEX IF NOT EXISTS jobs_visible ON jobs (lane, status, visible_at);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (tenant, status);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (status, finished_at);
"""

# interactive (0) before batch (1): the claim sorts on this column.
_PRIORITY_RANK = {name: rank for rank, name in enumerate(model.PRIORITIES)}


def _dumps(job: JobRecord) -> bytes:
    return orjson.dumps(job.model_dump(mode="json"))


def _loads(raw: bytes | str) -> JobRecord:
    # Strict models accept JSON's own types (an integral float written as 1.0 or 1) in JSON mode.
    return JobRecord.model_validate_json(raw)


class SqliteJobStore:
    """`JobStore` in one SQLite file (``path``; ``":memory:"`` for a throwaway one)."""

    backend = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteJobStore({self.path!r})"

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claudepool-jobs-sqlite")
        await self._run(self._open)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await loop.run_in_executor(executor, self._close_connection)
        finally:
            executor.shutdown(wait=False)

    # -- the interface ---------------------------------------------------------------------------

    async def submit(self, jobs: Sequence[JobRecord], *, max_open_per_tenant: int = 0
                     ) -> list[tuple[JobRecord, bool]]:
        def submit(db: sqlite3.Connection) -> list[tuple[JobRecord, bool]]:
            out = [self._submit_one(db, job) for job in jobs]
            if max_open_per_tenant:
                for tenant in {job.tenant for job, created in out if created}:
                    (count,) = db.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status IN"
                                          " ('queued', 'running')", (tenant,)).fetchone()
                    if count > max_open_per_tenant:
                        raise TooManyJobs(f"{count} jobs would be open for this tenant, over its limit of "
                                          f"{max_open_per_tenant}")  # rolls the transaction back
            return out

        return await self._transaction(submit)

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        return await self._transaction(lambda db: self._load(db, tenant, job_id))

    async def list_jobs(self, tenant: str, *, status: JobStatus | None = None, since: float | None = None,
                        limit: int = 100) -> list[JobRecord]:
        if limit <= 0:
            return []
        sql = "SELECT record FROM jobs WHERE tenant = ? AND created_at >= ?"
        args: list[Any] = [tenant, -1e300 if since is None else since]
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created_at, rowid LIMIT ?"
        args.append(limit)
        rows = await self._transaction(lambda db: db.execute(sql, args).fetchall())
        return [_loads(raw) for (raw,) in rows]

    async def claim(self, lane: Lane, consumer: str, *, visibility_timeout_s: float, limit: int = 1,
                    now: float | None = None, ended: list[JobRecord] | None = None) -> list[JobRecord]:
        at = time.time() if now is None else now

        def claim(db: sqlite3.Connection) -> list[JobRecord]:
            out: list[JobRecord] = []
            # A candidate past its deadline or its delivery cap ends instead: fetch again for the rest.
            while len(out) < limit:
                rows = db.execute(
                    "SELECT record FROM (SELECT record, priority, created_at, rowid AS r FROM jobs"
                    " WHERE lane = ? AND status = 'queued'"
                    " UNION ALL SELECT record, priority, created_at, rowid AS r FROM jobs"
                    " WHERE lane = ? AND status = 'running' AND visible_at <= ?)"
                    " ORDER BY priority, created_at, r LIMIT ?",
                    (lane, lane, at, limit - len(out))).fetchall()
                if not rows:
                    break
                for (raw,) in rows:
                    job = _loads(raw)
                    try:
                        moved = model.claimed(job, consumer, at, visibility_timeout_s)
                    except TransitionRefused:  # not from this query's rows; never loop on one
                        continue
                    self._write(db, moved)
                    if moved.status == "running":
                        out.append(moved)
                    elif ended is not None:
                        ended.append(moved)
            return out

        return await self._transaction(claim)

    async def heartbeat(self, tenant: str, job_id: str, token: str, *, visibility_timeout_s: float) -> bool:
        now = time.time()
        return await self._move(tenant, job_id, lambda job: model.heartbeat(job, token, now, visibility_timeout_s))

    async def note_batch(self, tenant: str, job_id: str, token: str, batch_id: str) -> bool:
        now = time.time()
        return await self._move(tenant, job_id, lambda job: model.with_batch(job, token, batch_id, now))

    async def settle(self, tenant: str, job_id: str, outcome: Outcome) -> tuple[JobRecord, bool]:
        now = time.time()
        return await self._transaction(
            lambda db: self._apply(db, tenant, job_id, lambda job: model.settled(job, outcome, now)))

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        now = time.time()
        job, _ = await self._transaction(
            lambda db: self._apply(db, tenant, job_id, lambda job: model.cancelled(job, now)))
        return job

    async def set_webhook(self, tenant: str, job_id: str, delivery: WebhookDelivery) -> None:
        await self._transaction(
            lambda db: self._apply(db, tenant, job_id, lambda job: job.model_copy(update={"webhook": delivery})))

    async def purge(self, finished_before: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            total = 0
            for status in model.TERMINAL:
                total += db.execute("DELETE FROM jobs WHERE status = ? AND finished_at < ?",
                                    (status, finished_before)).rowcount
            return total

        return await self._transaction(purge)

    async def dead_letters(self, limit: int = 100) -> list[JobRecord]:
        rows = await self._transaction(lambda db: db.execute(
            "SELECT record FROM jobs WHERE status = 'dead' ORDER BY finished_at, rowid LIMIT ?",
            (max(limit, 0),)).fetchall())
        return [_loads(raw) for (raw,) in rows]

    # -- on the database thread ------------------------------------------------------------------

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _submit_one(self, db: sqlite3.Connection, job: JobRecord) -> tuple[JobRecord, bool]:
        if job.idempotency_key is not None:
            row = db.execute("SELECT record FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                             (job.tenant, job.idempotency_key)).fetchone()
            if row is not None:
                return _loads(row[0]), False
        db.execute(
            "INSERT INTO jobs (id, tenant, status, lane, priority, created_at, finished_at, idempotency_key,"
            " visible_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.id, job.tenant, job.status, job.lane, _PRIORITY_RANK[job.priority], job.created_at,
             job.finished_at, job.idempotency_key, job.visible_at, _dumps(job)))
        return job, True

    @staticmethod
    def _load(db: sqlite3.Connection, tenant: str, job_id: str) -> JobRecord:
        row = db.execute("SELECT record FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _loads(row[0])

    @staticmethod
    def _write(db: sqlite3.Connection, job: JobRecord) -> None:
        db.execute("UPDATE jobs SET status = ?, finished_at = ?, visible_at = ?, record = ? WHERE id = ?",
                   (job.status, job.finished_at, job.visible_at, _dumps(job), job.id))

    def _apply(self, db: sqlite3.Connection, tenant: str, job_id: str,
               move: Callable[[JobRecord], JobRecord]) -> tuple[JobRecord, bool]:
        """The record after ``move`` and True; as it stands and False when the move is refused."""
        job = self._load(db, tenant, job_id)
        try:
            moved = move(job)
        except TransitionRefused:
            return job, False
        self._write(db, moved)
        return moved, True

    async def _move(self, tenant: str, job_id: str, move: Callable[[JobRecord], JobRecord]) -> bool:
        _, moved = await self._transaction(lambda db: self._apply(db, tenant, job_id, move))
        return moved

    async def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            db = self._conn
            if db is None:
                raise StoreError(f"{self!r} is not started")
            db.execute("BEGIN IMMEDIATE")
            try:
                result = body(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(run)

    async def _run(self, work: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError(f"{self!r} is not started")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except sqlite3.Error as exc:
            raise StoreError(f"job database {self.path} failed: {exc}") from exc
