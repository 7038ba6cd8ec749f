"""Sessions at rest (claudepool/sessions/files.py) on real files: copies run in a thread, a resume's
transcript is only renamed into the worker's HOME at spawn, and a cancelled copy leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from claudepool.sessions.files import SessionFiles
from claudepool.store.base import SessionRecord
from tests.helpers import release_fifo, until


def session(tenant: str = "acme") -> SessionRecord:
    now = time.time()
    return SessionRecord(id="s_filesfiles01", tenant=tenant, profile="default", created_at=now, last_used_at=now)


async def test_a_checkpoint_replaces_the_transcript_and_writes_the_meta(tmp_path: Path) -> None:
    files = SessionFiles(tmp_path / "sessions")
    record = session()
    source = tmp_path / "cli.jsonl"
    source.write_bytes(b'{"turn": 1}\n')
    await files.checkpoint(source, record, b'{"meta": 1}')
    source.write_bytes(b'{"turn": 1}\n{"turn": 2}\n')
    await files.checkpoint(source, record, b'{"meta": 2}')
    assert files.transcript(record).read_bytes() == source.read_bytes()
    assert files.meta(record).read_bytes() == b'{"meta": 2}'
    assert stat.S_IMODE(files.transcript(record).parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in files.transcript(record).parent.iterdir()) == [
        "s_filesfiles01.jsonl", "s_filesfiles01.meta.json"]  # no .partial left


async def test_a_staged_transcript_is_placed_by_a_rename(tmp_path: Path) -> None:
    files = SessionFiles(tmp_path / "sessions")
    record = session()
    files.transcript(record).parent.mkdir(parents=True)
    files.transcript(record).write_bytes(b"x" * 300_000)
    workers = tmp_path / "workers"
    staged = await files.stage(record, workers)
    assert staged.parent == workers
    assert staged.read_bytes() == files.transcript(record).read_bytes()
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600  # a tenant's conversation, readable by us only
    inode = staged.stat().st_ino
    target = workers / "w-1" / "home" / ".claude" / "projects" / "slug" / "cli-id.jsonl"
    files.place(staged, target)  # what runs at spawn, on the event loop
    assert target.stat().st_ino == inode  # moved, not copied
    assert not staged.exists()


async def test_a_stage_that_cannot_read_the_transcript_raises_and_leaves_nothing(tmp_path: Path) -> None:
    files = SessionFiles(tmp_path / "sessions")
    with pytest.raises(FileNotFoundError):
        await files.stage(session(), tmp_path / "workers")
    assert list((tmp_path / "workers").iterdir()) == []


async def test_a_stage_cancelled_mid_copy_removes_its_copy_once_the_thread_is_done(tmp_path: Path) -> None:
    files = SessionFiles(tmp_path / "sessions")
    record = session()
    slow = files.transcript(record)
    slow.parent.mkdir(parents=True)
    os.mkfifo(slow)  # a disk that answers only later: the copy thread waits in open()
    workers = tmp_path / "workers"
    staging = asyncio.create_task(files.stage(record, workers))
    try:
        await until(lambda: any(workers.glob(".claudepool-resume-*")), 5)  # the thread made its file
        staging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staging
        assert any(workers.glob(".claudepool-resume-*"))  # still in use by the thread
        await asyncio.wait_for(asyncio.to_thread(slow.write_bytes, b"late\n"), 10)  # the disk answers
        await until(lambda: not any(workers.glob(".claudepool-resume-*")), 5)
    finally:
        release_fifo(slow)
