"""Sessions at rest: ``DIR/<tenant>/<session>.jsonl`` (the CLI's transcript, checkpointed after every turn),
``<session>.meta.json`` (the record as of that checkpoint, so a restart with the memory store
finds the session again) and ``<session>.workspace.tar`` (its workspace, saved when it parks).

Copying a transcript takes time proportional to the conversation, so every copy runs in a thread:
a long conversation must not hold up every other tenant's turn. The small metadata operations
(a stat, an unlink, a rename, a meta file of a few hundred bytes) stay on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import orjson

from claudepool.store.base import SessionRecord


def _write_checkpoint(source: Path, target: Path, meta_path: Path, meta: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = target.with_suffix(".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # a cancelled caller leaves the old checkpoint or the new, never half
    meta_path.write_bytes(meta)


def _stage_copy(source: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=".claudepool-resume-", suffix=".jsonl", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:
            shutil.copyfileobj(src, dst)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


class SessionFiles:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def transcript(self, record: SessionRecord) -> Path:
        return self.dir / record.tenant / f"{record.id}.jsonl"

    def meta(self, record: SessionRecord) -> Path:
        return self.dir / record.tenant / f"{record.id}.meta.json"

    def workspace(self, record: SessionRecord) -> Path:
        """The workspace saved when the session parked (`claudepool.sessions.workspace_archive`)."""
        return self.dir / record.tenant / f"{record.id}.workspace.tar"

    async def checkpoint(self, source: Path, record: SessionRecord, meta: bytes) -> None:
        """Copy the CLI's transcript to the session's file at rest (write, then rename), then its meta."""
        await asyncio.to_thread(_write_checkpoint, source, self.transcript(record), self.meta(record), meta)

    async def stage(self, record: SessionRecord, directory: Path) -> Path:
        """A copy of the session's transcript in ``directory``, made in a thread, for `place` to move
        into a resuming worker's HOME at spawn in one rename. ``directory`` must be on the worker's
        filesystem (its workdir root). The caller removes the copy if it is never placed; if the caller
        is cancelled meanwhile, the copy is removed once the thread is done with it."""
        copy = asyncio.get_running_loop().run_in_executor(None, _stage_copy, self.transcript(record), directory)
        try:
            return await asyncio.shield(copy)
        except asyncio.CancelledError:
            copy.add_done_callback(_discard)
            raise

    @staticmethod
    def place(staged: Path, target: Path) -> None:
        """Move a staged transcript to where the CLI looks for it: a rename, no copy."""
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def read_meta(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The record kept beside the tenant's checkpoint, or None."""
        meta = self.dir / tenant / f"{session_id}.meta.json"
        try:
            record = SessionRecord.from_dict(orjson.loads(meta.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            return None
        return record if record.tenant == tenant and record.id == session_id else None

    def write_meta(self, record: SessionRecord) -> None:
        """Rewrite an existing meta file (a closed session must not revive after a restart)."""
        with contextlib.suppress(OSError):
            meta = self.meta(record)
            if meta.exists():
                meta.write_bytes(orjson.dumps(record.to_dict()))

    def remove(self, record: SessionRecord) -> None:
        self.drop_data(record)
        self.meta(record).unlink(missing_ok=True)

    def drop_data(self, record: SessionRecord) -> int:
        """Delete the transcript and the saved workspace (the meta file stays); the bytes freed."""
        freed = 0
        for path in (self.transcript(record), self.workspace(record)):
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    async def disk_usage(self) -> int:
        return await asyncio.to_thread(self._disk_usage)

    def _disk_usage(self) -> int:
        total = 0
        for root, _, files in os.walk(self.dir):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total


def _discard(copy: asyncio.Future[Path]) -> None:
    if not copy.cancelled() and copy.exception() is None:
        copy.result().unlink(missing_ok=True)
