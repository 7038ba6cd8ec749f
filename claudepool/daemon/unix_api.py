"""The Unix-socket front end: NDJSON frames, many requests multiplexed on one connection.

Frames are handled one at a time, in the order they arrive. What answers what:

- ``prompt``, accepted: a task keyed by the frame's ``id``; with ``stream``, zero or more ``delta``,
  ``tool_use`` and ``tool_result`` frames as the turn runs; then exactly one terminal frame,
  ``result`` or ``error``, and nothing more under that id (the id may then be reused).
  Authentication, limits and every failure after acceptance end in that ``error``.
  Past ``server.max_requests_per_connection`` prompts in flight, a prompt is refused at once with
  ``error``/``too_many_in_flight`` under its id.
- ``cancel``: one ``cancelled`` frame ``{"target", "found"}``. ``found`` is true when the target was
  in flight and not finished; it then ends with its one terminal frame, normally ``error``/``cancelled``
  (an answer already complete may win the race). An unknown or finished target is ``found: false``
  and changes nothing.
- ``status``, ``usage``, ``session.create``, ``session.delete``: one frame, ``status``, ``usage``,
  ``session`` or ``session_deleted``, or an ``error``.
- A frame refused before it runs (not JSON, not an object, unknown op, bad fields, larger than
  ``server.max_frame_bytes``): one ``error`` under its id when it has a valid one (for an oversize
  frame, when the id is its first key), else under ``"id": null``.
- Any frame whose id is a prompt in flight on this connection (a second prompt, an invalid frame,
  a status, a cancel, an oversize frame), whatever its op: one ``error`` under ``"id": null``
  whose message names the id. The prompt in flight is not touched and still ends once.

Frames of concurrent requests are written whole, so they interleave only at line boundaries. When
the client disconnects, its requests are cancelled and their workers interrupted and reset. See
`claudepool.protocol.wire` for the frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from claudepool.daemon import unix_jobs
from claudepool.daemon.admission import new_request_id
from claudepool.daemon.facade import Api
from claudepool.errors import (
    BadRequest,
    Cancelled,
    ClaudepoolError,
    ConfigError,
    CorruptFrame,
    FrameTooLarge,
    TooManyConnections,
    TooManyInFlight,
)
from claudepool.jobs.door import JobDoor
from claudepool.protocol.framing import LineFramer, decode_object
from claudepool.protocol.wire import (
    CancelFrame,
    JobFrame,
    PromptFrame,
    PromptRequest,
    SessionCreateFrame,
    SessionDeleteFrame,
    StatusFrame,
    StreamItem,
    error_frame,
    event_frame,
    frame_id_of,
    leading_frame_id,
    parse_frame,
    result_frame,
    stream_frame,
)

log = logging.getLogger(__name__)

_READ_CHUNK_BYTES = 1 << 16


class UnixFrontEnd:
    """The listening sockets and the open connections, so shutdown can close both."""

    def __init__(self, api: Api, *, max_connections: int = 1024, max_frame_bytes: int = 2 << 20,
                 max_requests_per_connection: int = 256, jobs: JobDoor | None = None) -> None:
        self.api = api
        self.jobs = jobs
        # Clients here are local and hold one connection for many requests, idle in between, so
        # there is no idle timeout: this bound is what caps connections a client can open and hold.
        self.max_connections = max_connections
        self.max_frame_bytes = max_frame_bytes
        self.max_requests_per_connection = max_requests_per_connection
        self.refused = 0
        self.servers: list[asyncio.Server] = []
        self.connections: dict[_Connection, asyncio.Task[Any]] = {}
        # Paths we bound ourselves and so remove on close (never a socket systemd handed us).
        self.bound_paths: list[str] = []

    async def listen(self, path: str, mode: int, sock: socket.socket | None = None, *, backlog: int = 1024) -> None:
        """Listen on ``sock`` (inherited from systemd) or bind ``path`` with ``mode``.

        asyncio calls listen(``backlog``) on an inherited socket too (its default is 100), so the
        backlog applies to both."""
        if sock is not None:
            self.servers.append(await asyncio.start_unix_server(self._on_connection, sock=sock, backlog=backlog))
            return
        try:
            _prepare_socket_path(Path(path))
            self.servers.append(await asyncio.start_unix_server(self._on_connection, path=path, backlog=backlog))
            os.chmod(path, mode)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        self.bound_paths.append(path)

    async def close(self, timeout_s: float) -> None:
        """Stop listening and close every connection (call once requests are done or stopped)."""
        for server in self.servers:
            server.close()
        for path in self.bound_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for connection in list(self.connections):
            connection.writer.close()
        tasks = list(self.connections.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_connections:
            await self._refuse(writer)
            return
        connection = _Connection(self.api, writer, jobs=self.jobs, max_frame_bytes=self.max_frame_bytes,
                                 max_requests=self.max_requests_per_connection)
        task = asyncio.current_task()
        assert task is not None
        self.connections[connection] = task
        try:
            await connection.serve(reader)
        finally:
            del self.connections[connection]


    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """One connection-level error frame (``id`` null), then close, unread."""
        self.refused += 1
        writer.write(error_frame(None, TooManyConnections(
            f"the daemon holds its {self.max_connections} socket connections; retry shortly")))
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


def _prepare_socket_path(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(target.lstat().st_mode):
            raise ConfigError(f"{target} exists and is not a socket; refusing to replace it")
        if _has_listener(target):
            # Unlinking it would silently steal the path from a live daemon (its clients would
            # reach us and it would serve nobody on the socket again).
            raise ConfigError(f"another process is listening on {target}; each daemon needs a server.socket "
                              'of its own (or "" for none)')
        target.unlink()  # a stale socket from a previous run


def _has_listener(path: Path) -> bool:
    """Whether something accepts on the Unix socket ``path`` (a stale file refuses connections)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a listener with a full backlog blocks connect: it is live
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a timeout (full backlog) or EAGAIN: someone holds it
        return True


class _Connection:
    """One client connection: its frames in order, and its prompts in flight.

    ``requests`` maps each prompt id in flight to its task. An id enters it when its prompt is
    accepted and leaves it in `finished`, which writes that prompt's one terminal frame, so a frame
    arriving meanwhile with the same id is refused (answered with id null) whatever it is."""

    def __init__(self, api: Api, writer: asyncio.StreamWriter, *, max_frame_bytes: int, max_requests: int,
                 jobs: JobDoor | None = None) -> None:
        self.jobs = jobs
        self.api = api
        self.writer = writer
        self.max_frame_bytes = max_frame_bytes
        self.max_requests = max_requests
        self.requests: dict[str, asyncio.Task[bytes]] = {}
        self.cancelled: set[str] = set()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        framer = LineFramer(self.max_frame_bytes)
        try:
            while chunk := await reader.read(_READ_CHUNK_BYTES):
                for line in framer.feed_lenient(chunk):
                    if isinstance(line, FrameTooLarge):
                        self.api.refused(line)  # most likely a prompt; unreadable either way
                        self.refuse(leading_frame_id(line.head), line)
                    elif line.strip():
                        await self.handle(line)
        except (ConnectionError, OSError):
            pass
        finally:
            # The client is gone: its turns are abandoned, so the pool interrupts and resets them.
            tasks = list(self.requests.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.writer.wait_closed()

    def send(self, frame: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame)

    def refuse(self, frame_id: str | None, exc: ClaudepoolError) -> None:
        """Answer a frame that will not run: under its id, unless a prompt in flight holds that id.
        That prompt's one terminal frame is still to come, so this answer goes to id null and says
        which id it is about."""
        if frame_id is not None and frame_id in self.requests:
            self.send(error_frame(None, exc, about=frame_id))
        else:
            self.send(error_frame(frame_id, exc))

    async def handle(self, line: bytes) -> None:
        frame_id: str | None = None
        op: object = None
        try:
            obj = decode_object(line)
            frame_id = frame_id_of(obj)
            op = obj.get("op")
            frame = parse_frame(obj)
        except CorruptFrame as exc:
            refusal = BadRequest(str(exc))
            self.api.refused(refusal)  # a line we cannot read may be a prompt: count it
            self.refuse(None, refusal)
            return
        except BadRequest as exc:
            if op in (None, "prompt"):  # a prompt, or a frame that does not say what it is
                self.api.refused(exc)
            self.refuse(frame_id, exc)
            return
        if frame.id in self.requests:
            refusal = BadRequest("a request with this id has not ended yet; wait for its result or error before "
                                 "reusing the id")
            if isinstance(frame, PromptFrame):
                self.api.refused(refusal)  # a prompt that will not run: counted, like any refusal
            self.refuse(frame.id, refusal)
        elif isinstance(frame, PromptFrame):
            self.start_prompt(frame)
        elif isinstance(frame, CancelFrame):
            task = self.requests.get(frame.target)
            # A task already done has its terminal frame on the way (`finished` runs next): too late.
            found = task is not None and not task.done()
            if task is not None and found:
                self.cancelled.add(frame.target)
                task.cancel()
            self.send(event_frame(frame.id, "cancelled", {"target": frame.target, "found": found}))
        elif isinstance(frame, StatusFrame):
            self.send(event_frame(frame.id, "status", self.status(frame)))
        elif isinstance(frame, JobFrame):
            self.send(await unix_jobs.answer(self.jobs, frame))
        elif isinstance(frame, SessionCreateFrame | SessionDeleteFrame):
            try:
                tenant = self.api.authenticate(frame.key)
                if isinstance(frame, SessionCreateFrame):
                    view = await self.api.create_session(tenant, frame.profile, frame.system)
                    self.send(event_frame(frame.id, "session", {"session": view}))
                else:
                    await self.api.delete_session(tenant.name, frame.session)
                    self.send(event_frame(frame.id, "session_deleted", {"session": frame.session}))
            except ClaudepoolError as exc:
                self.send(error_frame(frame.id, exc))
        else:
            try:
                report = await self.api.usage(frame.key, tenant=frame.tenant, window=frame.window, date=frame.date)
            except ClaudepoolError as exc:
                self.send(error_frame(frame.id, exc))
            else:
                self.send(event_frame(frame.id, "usage", report))
        await self.writer.drain()

    def status(self, frame: StatusFrame) -> dict[str, Any]:
        """The admin's pool status, or a tenant's readiness; a bad key's error inside the frame."""
        try:
            return self.api.status(frame.key)
        except ClaudepoolError as exc:
            return {"error": {"code": exc.code, "message": str(exc)}}

    def start_prompt(self, frame: PromptFrame) -> None:
        bound = self.max_requests
        if len(self.requests) >= bound:
            refusal = TooManyInFlight(f"{bound} requests are in flight on this connection, its limit; wait for one "
                                      "to end")
            self.api.refused(refusal)  # a prompt that will not run: counted, like any refusal
            self.refuse(frame.id, refusal)
            return
        task = asyncio.create_task(self.run_prompt(frame), name=f"unix-{frame.id}")
        self.requests[frame.id] = task
        # A done callback, not a `finally`: a task cancelled before it first runs never enters its
        # coroutine, and it still owes the client its one terminal frame.
        task.add_done_callback(functools.partial(self.finished, frame.id))

    def finished(self, frame_id: str, task: asyncio.Task[bytes]) -> None:
        """The one place a prompt's terminal frame is written: once per task, after its last streamed
        frame (those are written by the task itself), and as its id leaves ``requests``."""
        del self.requests[frame_id]
        by_client = frame_id in self.cancelled
        self.cancelled.discard(frame_id)
        if task.cancelled():
            reason = "cancelled by the client" if by_client else "the connection is closing"
            self.send(error_frame(frame_id, Cancelled(reason)))
        elif task.exception() is not None:  # run_prompt answers every error; this would be a bug
            log.error("socket request %s failed", frame_id, exc_info=task.exception())
            self.send(error_frame(frame_id, ClaudepoolError("internal error")))
        else:
            self.send(task.result())

    async def run_prompt(self, frame: PromptFrame) -> bytes:
        """Serve one prompt, writing what it streams; return its terminal frame (`finished` writes it)."""
        async def on_event(item: StreamItem) -> None:
            self.send(stream_frame(frame.id, item))
            await self.writer.drain()

        request_id = new_request_id()
        try:
            request = PromptRequest.model_validate(frame.model_dump(exclude={"id", "op", "key"}))
            result = await self.api.handle(frame.key, request, on_event, request_id=request_id)
            return result_frame(frame.id, result)
        except ClaudepoolError as exc:
            return error_frame(frame.id, exc)
        except (ConnectionError, OSError):
            # The client went away while we wrote to it: nobody reads this, but it is the answer.
            return error_frame(frame.id, Cancelled("the connection failed"))
        except Exception:
            log.exception("request %s failed", request_id)
            return error_frame(frame.id, ClaudepoolError("internal error"))
