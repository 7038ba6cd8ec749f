"""A parked session's workspace at rest: ``<sessions dir>/<tenant>/<session>.workspace.tar``.

Saved when the session parks (`save`), from its worker's cwd; restored into the resuming worker's cwd
before its first turn (`restore`); read by the files API while the session is parked (`entries`,
`read`).

What is saved: directories and regular files, walked by descriptor without following anything
(`claudepool.pool.workspace_files`). What is not: symbolic links (wherever they point: a link to
``/etc/shadow`` or to another tenant's file must not bring back its target, and a link stored as a
link is what every tarfile extraction bypass of the last years used), hard-linked files (their content
may be another name's), FIFOs, sockets and devices. They are counted and logged, never read.

Why the stdlib ``tarfile`` with ``filter="data"`` on restore: the archive holds only regular files
and directories whose names we checked, so the filter has no link to judge; it still refuses absolute
names, ``..``, and names resolving outside the cwd, drops owners (no chown to the archive's uids) and
set-id and group/other write bits. It is the extraction policy Python ships for untrusted archives,
kept up to date with the interpreter, and `restore` first refuses an archive holding anything but
files and directories (a sessions directory shared between daemons is data we did not just write).

The archive is bounded by ``sessions.max_saved_workspace_bytes`` as it is written (headers included, so
a tree of a million empty files is bounded too). Over it, nothing is kept (`WorkspaceTooLarge`): a
workspace missing some of its files would be a different workspace.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from claudepool.errors import NotFound, WorkspaceFilesTooLarge, WorkspacePathRefused
from claudepool.pool.workspace_files import Entry, check_path, open_regular, walk

_BLOCK_BYTES = tarfile.BLOCKSIZE  # 512: a member's header, and its data's unit


class WorkspaceTooLarge(Exception):
    """The workspace is over the bound; nothing was saved."""


@dataclass(frozen=True)
class Saved:
    bytes: int  # of the archive
    files: int
    skipped: int  # links, hard-linked and special files: not saved


class _Exactly:
    """A file's data as exactly ``size`` bytes (what its header said) even if it changes meanwhile:
    cut if it grew, padded with zeros if it shrank, so the archive stays well formed."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._left = fd, size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = os.read(self._fd, n) if n else b""
        if len(data) < n:
            data += b"\0" * (n - len(data))
        self._left -= len(data)
        return data


def save(cwd: Path, target: Path, max_bytes: int) -> Saved:
    """Archive ``cwd`` to ``target`` (written beside it, then renamed); with nothing to save, no
    archive (``bytes`` 0, an earlier one removed). `WorkspaceTooLarge` if it would exceed ``max_bytes``."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = skipped = members = 0
    try:
        with open(partial, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # The whole tree cannot have more members than the bound has headers.
            for parts, st, dir_fd, name in walk(cwd, max_bytes // _BLOCK_BYTES + 1):
                path = "/".join(parts)
                info = tarfile.TarInfo(path)
                info.mtime = int(st.st_mtime)
                if stat.S_ISDIR(st.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o700
                    _check_room(raw.tell() + _BLOCK_BYTES * 3, max_bytes)
                    tar.addfile(info)
                    members += 1
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    skipped += 1
                    continue
                _check_room(raw.tell() + _BLOCK_BYTES * 3 + st.st_size, max_bytes)
                try:
                    fd, opened = open_regular(dir_fd, name, path)
                except (WorkspacePathRefused, NotFound):
                    skipped += 1  # swapped or removed since the walk saw it
                    continue
                try:
                    info.size, info.mode = opened.st_size, stat.S_IMODE(opened.st_mode) & 0o755
                    _check_room(raw.tell() + _BLOCK_BYTES * 3 + info.size, max_bytes)
                    tar.addfile(info, _Exactly(fd, info.size))
                finally:
                    os.close(fd)
                files += 1
                members += 1
        if not members:
            partial.unlink()
            target.unlink(missing_ok=True)  # an earlier save is stale now
            return Saved(0, 0, skipped)
        size = partial.stat().st_size
        _check_room(size, max_bytes)
        os.replace(partial, target)  # a crash leaves the old archive or the new one, never half
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Saved(size, files, skipped)


def _check_room(would_be_bytes: int, max_bytes: int) -> None:
    if would_be_bytes > max_bytes:
        raise WorkspaceTooLarge(f"the workspace is over {max_bytes} bytes as an archive")


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, each a regular file or a directory under a clean relative name."""
    members = tar.getmembers()
    for member in members:
        if not (member.isreg() or member.isdir()):
            raise WorkspacePathRefused(f"the saved workspace holds {member.name!r}, neither file nor directory")
        check_path(member.name)
    return members


def restore(archive: Path, cwd: Path) -> int:
    """Extract a saved workspace into ``cwd`` (see the module's docstring); how many files."""
    with tarfile.open(archive, mode="r:") as tar:
        members = _members(tar)
        tar.extractall(cwd, members=members, filter="data")
    return sum(1 for m in members if m.isreg())


def entries(archive: Path, max_entries: int) -> tuple[list[Entry], bool]:
    """A saved workspace's listing, like `claudepool.pool.workspace_files.list_entries`."""
    if not archive.exists():
        return [], False
    with tarfile.open(archive, mode="r:") as tar:
        listed = [Entry(m.name, "file" if m.isreg() else "dir", m.size if m.isreg() else 0)
                  for m in _members(tar)]
    return listed[:max_entries], len(listed) > max_entries


def read(archive: Path, path: str, max_bytes: int) -> bytes:
    """One file of a saved workspace."""
    check_path(path)
    if not archive.exists():
        raise NotFound(f"{path!r} is not in the workspace")
    with tarfile.open(archive, mode="r:") as tar:
        for member in _members(tar):
            if member.name != path:
                continue
            if not member.isreg():
                raise WorkspacePathRefused(f"{path!r} is not a regular file (a directory)")
            if member.size > max_bytes:
                raise WorkspaceFilesTooLarge(f"{path!r} is {member.size} bytes, over the bound of {max_bytes}")
            data: IO[bytes] | None = tar.extractfile(member)
            assert data is not None
            return data.read()
    raise NotFound(f"{path!r} is not in the workspace")
