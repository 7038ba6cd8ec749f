"""A conversation keeps its workspace for its life: saved when it parks, restored when it resumes.

While a session is active its worker's cwd is its workspace (the worker is not reset between turns).
When it parks, `SessionWorkspaces.save` archives that cwd beside the transcript
(`claudepool.sessions.workspace_archive`), before the worker is reset for others; the next turn's
worker gets it back (`restore`) before that turn runs. Policy, when a save cannot be made (the
workspace is over ``sessions.max_saved_workspace_bytes``, or the disk fails): the park still happens
(the worker is needed elsewhere, and the conversation itself is safe in its transcript), no workspace
is kept (an older archive would be stale), the record says why in ``workspace``, and it is logged and
counted (``workspace_dropped``). ``sessions.save_workspace = false`` keeps no workspace at all.

Reading the files of a session (`claudepool.daemon.facade`) goes to the live cwd while the session
is active here, to the archive while it is parked.
"""

from __future__ import annotations

import asyncio
import logging
import tarfile
from collections import Counter
from pathlib import Path

from claudepool.errors import ClaudepoolError
from claudepool.sessions import workspace_archive
from claudepool.sessions.files import SessionFiles
from claudepool.sessions.settings import SessionSettings
from claudepool.store.base import SessionRecord

log = logging.getLogger(__name__)


class SessionWorkspaces:
    def __init__(self, files: SessionFiles, settings: SessionSettings, events: Counter[str]) -> None:
        self.files = files
        self.settings = settings
        self.events = events

    def archive(self, record: SessionRecord) -> Path:
        return self.files.workspace(record)

    async def save(self, record: SessionRecord, cwd: Path | None) -> None:
        """Archive the parking session's workspace (in a thread); never raises for the workspace's
        sake: see the module's docstring for what happens when it cannot be saved."""
        if not self.settings.save_workspace or cwd is None:
            return
        bound = self.settings.max_saved_workspace_bytes
        try:
            saved = await asyncio.to_thread(workspace_archive.save, cwd, self.archive(record), bound)
        except (workspace_archive.WorkspaceTooLarge, OSError) as exc:
            self.archive(record).unlink(missing_ok=True)
            over = isinstance(exc, workspace_archive.WorkspaceTooLarge)
            why = f"over sessions.max_saved_workspace_bytes ({bound})" if over else (
                f"not saved: {getattr(exc, 'strerror', None) or type(exc).__name__}")
            record.workspace = f"dropped: {why}"
            self.events["workspace_dropped"] += 1
            log.warning("session %s: its workspace is not kept at park (%s); the conversation is", record.id, why)
            return
        record.workspace = "saved" if saved.bytes else ""
        if saved.bytes:
            self.events["workspace_saved"] += 1
        if saved.skipped:
            log.info("session %s: %d links or special files of its workspace not saved", record.id, saved.skipped)

    async def restore(self, record: SessionRecord, cwd: Path | None) -> None:
        """Put the saved workspace into the cwd of the worker that now holds the session, before its
        first turn there. An archive that cannot be read is logged; the turn runs without it (or with the
        files extracted before the failure)."""
        archive = self.archive(record)
        if not self.settings.save_workspace or cwd is None or not archive.exists():
            return
        try:
            files = await asyncio.to_thread(workspace_archive.restore, archive, cwd)
        except (tarfile.TarError, OSError, ClaudepoolError) as exc:  # a damaged archive, a full disk
            self.events["workspace_restore_failed"] += 1
            log.error("session %s: its saved workspace could not be restored: %r", record.id, exc)
            return
        self.events["workspace_restored"] += 1
        log.debug("session %s: %d files of its workspace restored", record.id, files)
