"""Files into and out of a worker's workspace (its cwd), safe against whatever a tool left there.

A tool runs in the workspace and may plant anything: a symbolic link to ``/etc/shadow`` or to another
tenant's file, a link to a directory outside, a FIFO (opening one to read blocks until a writer
comes: the daemon's thread would hang), a socket, a hard link. The daemon reads and writes there with
its own rights, which are more than the tool's. So every operation here walks by file descriptor,
one path component at a time, each directory opened ``O_DIRECTORY | O_NOFOLLOW`` relative to the
last (a link anywhere on the path fails, even one swapped in while we walk: no name is ever resolved
from the root again), and a file is first ``lstat``-ed (only a regular file with one link is opened at
all: a device is never opened), then opened ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in opens at
once instead of blocking) and ``fstat``-ed: it must be the same regular file, or it is refused.

Paths are relative POSIX paths: no leading ``/``, no ``.``, ``..`` or empty component, no NUL
(`check_path`). They are checked before anything is touched, and a set of input files is written all
or nothing (`write_files`).

>>> check_path("out/report.txt")
('out', 'report.txt')
>>> matches(("out", "a.txt"), ("out", "*.txt")), matches(("a", "b", "c.md"), ("**", "*.md"))
(True, True)
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from claudepool.errors import NotFound, WorkspaceFilesTooLarge, WorkspacePathRefused

MAX_PATH_BYTES = 1024
# Deeper trees are not walked (each level holds one descriptor open).
MAX_DEPTH = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_CHUNK_BYTES = 1 << 20

Kind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class FileBounds:
    """The ``[server]`` bounds on files in and out (see `claudepool.config.ServerSettings`)."""

    max_input_files: int = 32
    max_input_file_bytes: int = 1 << 20
    max_input_bytes: int = 4 << 20
    max_return_files: int = 32
    max_return_bytes: int = 4 << 20
    max_listed_files: int = 1000
    max_file_read_bytes: int = 8 << 20


@dataclass(frozen=True)
class InputFile:
    """One file a request puts into the workspace before its prompt runs."""

    path: str
    data: bytes


@dataclass(frozen=True)
class Entry:
    """One entry of a workspace, as a listing shows it (a symlink's target is never read)."""

    path: str
    kind: Kind
    size_bytes: int


@dataclass(frozen=True)
class Collected:
    """What `collect` found for a request's ``return_files``: the files, and what matched but was left
    out, with why (``symlink``, ``not_regular``, ``too_large``, ``over_total``, ``too_many``)."""

    files: list[tuple[str, bytes]]
    omitted: list[tuple[str, str]]


def check_path(path: str) -> tuple[str, ...]:
    """The components of a relative path confined to the workspace, or `WorkspacePathRefused`."""
    if not path or "\x00" in path:
        raise WorkspacePathRefused("a workspace path must be non-empty and hold no NUL")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise WorkspacePathRefused(f"a workspace path is at most {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise WorkspacePathRefused(f"{path!r}: an absolute path; give one relative to the workspace")
    parts = tuple(path.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise WorkspacePathRefused(f"{path!r}: '..', '.' and empty components are refused")
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in parts):
        raise WorkspacePathRefused(f"{path!r}: a component is over 255 bytes")
    return parts


def check_pattern(pattern: str) -> tuple[str, ...]:
    """A ``return_files`` glob (``*``, ``?``, ``[…]`` within a component; ``**`` for any depth)."""
    return check_path(pattern)


def matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether a path's components match a pattern's, component by component (``*`` never crosses a
    ``/``; a ``**`` component matches any number of components, none included)."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(matches(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and matches(parts[1:], rest)


# -- descriptors -------------------------------------------------------------------------------------


def _open_dir(parent_fd: int, name: str, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WorkspacePathRefused(f"{path!r}: {name!r} is a symbolic link or not a directory") from None
        raise


@contextlib.contextmanager
def _walk_to(root: Path, parts: Sequence[str], path: str, *, create: bool = False,
             created: list[tuple[int, str]] | None = None) -> Iterator[int]:
    """A descriptor of the directory ``parts`` names under ``root`` (created if ``create``; each
    directory made is noted in ``created``), reached without following a link."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in parts:
            try:
                child = _open_dir(fd, name, path)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"{path!r} is not in the workspace") from None
                os.mkdir(name, 0o700, dir_fd=fd)
                if created is not None:
                    created.append((os.dup(fd), name))
                child = _open_dir(fd, name, path)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def kind_of(st: os.stat_result) -> Kind:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(st.st_mode) else "other"


def open_regular(dir_fd: int, name: str, path: str) -> tuple[int, os.stat_result]:
    """Open a regular file of ``dir_fd`` to read it, and its fstat; `WorkspacePathRefused` for a link,
    a hard-linked file (its content may be another's), a directory or a special file."""
    before = _lstat(dir_fd, name)
    if before is None:
        raise NotFound(f"{path!r} is not in the workspace")
    _refuse_unless_plain(before, path)  # before opening: a device is never opened
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotFound(f"{path!r} is not in the workspace") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WorkspacePathRefused(f"{path!r} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        _refuse_unless_plain(st, path)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise WorkspacePathRefused(f"{path!r} changed while it was opened")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _refuse_unless_plain(st: os.stat_result, path: str) -> None:
    kind = kind_of(st)
    if kind == "symlink":
        raise WorkspacePathRefused(f"{path!r} is a symbolic link")
    if kind != "file":
        raise WorkspacePathRefused(f"{path!r} is not a regular file ({'a directory' if kind == 'dir' else 'special'})")
    if st.st_nlink > 1:
        raise WorkspacePathRefused(f"{path!r} has other hard links")


def read_fd(fd: int, max_bytes: int, path: str) -> bytes:
    """At most ``max_bytes`` of ``fd``, or `WorkspaceFilesTooLarge` (the file may grow as we read)."""
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, min(_READ_CHUNK_BYTES, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise WorkspaceFilesTooLarge(f"{path!r} is over {max_bytes} bytes")
    return b"".join(chunks)


# -- the operations ------------------------------------------------------------------------------


def read_file(root: Path, path: str, max_bytes: int) -> bytes:
    """One regular file's bytes (see the module's docstring for what is refused)."""
    parts = check_path(path)
    with _walk_to(root, parts[:-1], path) as dir_fd:
        fd, st = open_regular(dir_fd, parts[-1], path)
        try:
            if st.st_size > max_bytes:
                raise WorkspaceFilesTooLarge(f"{path!r} is {st.st_size} bytes, over the bound of {max_bytes}")
            return read_fd(fd, max_bytes, path)
        finally:
            os.close(fd)


def walk(root: Path, max_entries: int) -> Iterator[tuple[tuple[str, ...], os.stat_result, int, str]]:
    """Every entry under ``root``, depth first in name order, as (components, lstat, its directory's
    descriptor, its name), at most ``max_entries``; links and special files are reported, never
    followed or opened. The descriptor is valid only until the next item."""
    count = 0
    root_fd = os.open(root, _DIR_FLAGS)

    def below(fd: int, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], os.stat_result, int, str]]:
        nonlocal count
        with os.scandir(fd) as listing:
            names = sorted(e.name for e in listing)
        for name in names:
            if count >= max_entries:
                return
            st = _lstat(fd, name)
            if st is None:
                continue  # removed meanwhile
            count += 1
            yield (*prefix, name), st, fd, name
            if stat.S_ISDIR(st.st_mode) and len(prefix) + 1 < MAX_DEPTH:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue  # swapped for a link or removed meanwhile: not followed
                try:
                    yield from below(child, (*prefix, name))
                finally:
                    os.close(child)

    try:
        yield from below(root_fd, ())
    finally:
        os.close(root_fd)


def list_entries(root: Path, max_entries: int) -> tuple[list[Entry], bool]:
    """The workspace's entries (path, kind, size), at most ``max_entries``; and whether there were more."""
    entries = [Entry("/".join(parts), kind_of(st), st.st_size if stat.S_ISREG(st.st_mode) else 0)
               for parts, st, _, _ in walk(root, max_entries + 1)]
    return entries[:max_entries], len(entries) > max_entries


def collect(root: Path, patterns: Sequence[str], *, max_files: int, max_file_bytes: int, max_total_bytes: int,
            max_entries: int) -> Collected:
    """The regular files whose paths match any of ``patterns`` (see `matches`), read safely, within
    the bounds; what matched and was left out is named in ``omitted`` with why."""
    compiled = [check_pattern(p) for p in patterns]
    files: list[tuple[str, bytes]] = []
    omitted: list[tuple[str, str]] = []
    total = 0
    for parts, st, dir_fd, name in walk(root, max_entries):
        if stat.S_ISDIR(st.st_mode) or not any(matches(parts, p) for p in compiled):
            continue
        path = "/".join(parts)
        kind = kind_of(st)
        if kind != "file" or st.st_nlink > 1:
            omitted.append((path, "symlink" if kind == "symlink" else "not_regular"))
        elif len(files) >= max_files:
            omitted.append((path, "too_many"))
        elif st.st_size > max_file_bytes:
            omitted.append((path, "too_large"))
        elif total + st.st_size > max_total_bytes:
            omitted.append((path, "over_total"))
        else:
            try:
                fd, _ = open_regular(dir_fd, name, path)
            except (WorkspacePathRefused, NotFound):
                omitted.append((path, "not_regular"))
                continue
            try:
                data = read_fd(fd, min(max_file_bytes, max_total_bytes - total), path)
            except WorkspaceFilesTooLarge:
                omitted.append((path, "too_large"))  # it grew while we read
                continue
            finally:
                os.close(fd)
            files.append((path, data))
            total += len(data)
    return Collected(files, omitted)


def write_files(root: Path, files: Sequence[InputFile]) -> None:
    """Write ``files`` under ``root``, all or none: every path is checked first (no link on its way,
    nothing but a regular file or nothing at its end), each file is written to a temporary name in
    its directory, then all are renamed into place. A failure before the renames (a full disk, a link
    planted meanwhile) removes every temporary file and directory it made."""
    seen: set[str] = set()
    for item in files:
        parts = check_path(item.path)
        if item.path in seen:
            raise WorkspacePathRefused(f"{item.path!r} is given twice")
        seen.add(item.path)
        try:
            with _walk_to(root, parts[:-1], item.path) as dir_fd:
                existing = _lstat(dir_fd, parts[-1])
        except NotFound:
            continue  # its directories are still to be made: nothing there to refuse
        if existing is not None:
            _refuse_unless_plain(existing, item.path)
    created_dirs: list[tuple[int, str]] = []
    staged: list[tuple[int, str, str]] = []  # (directory fd, temporary name, final name)
    done = False
    try:
        for item in files:
            parts = check_path(item.path)
            with _walk_to(root, parts[:-1], item.path, create=True, created=created_dirs) as dir_fd:
                temp = f".claudepool-in-{secrets.token_hex(6)}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
                staged.append((os.dup(dir_fd), temp, parts[-1]))
                with os.fdopen(fd, "wb") as out:
                    out.write(item.data)
        for dir_fd, _, name in staged:
            existing = _lstat(dir_fd, name)
            if existing is not None:
                _refuse_unless_plain(existing, name)  # planted since the check (a tool still running)
        for dir_fd, temp, name in staged:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a name, never follows it
        done = True
    finally:
        for dir_fd, temp, _ in staged:
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
            os.close(dir_fd)
        for dir_fd, name in reversed(created_dirs):
            if not done:
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=dir_fd)
            os.close(dir_fd)
