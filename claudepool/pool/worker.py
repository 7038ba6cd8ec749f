"""One warm `claude` process in persistent stream-json mode.

A `Worker` owns the process, its private directories, and two reader tasks (stdout events, stderr
tail). It serves one exchange at a time: a turn (`run_turn`), a reset (`reset`) or the start-up
handshake. It never writes a user line while another exchange runs, because the CLI would merge the
two prompts into one turn.

Failures are sticky and fan out: when the reader sees EOF, a corrupt or oversize line, every waiter
(the running turn, pending control requests) gets the same `WorkerError` at once and the worker is
never used again. Closing escalates EOF → SIGTERM → SIGKILL of the whole process group, each step
bounded, and is shielded from the caller's cancellation.

>>> async def demo(profile):                                   # doctest: +SKIP
...     worker = Worker(profile)
...     await worker.start()
...     async for item in worker.run_turn("hello"):
...         if isinstance(item, TurnResult):
...             print(item.text, item.cost_usd)
...     await worker.reset()
...     await worker.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from claudepool.errors import (
    PromptRanAsCommand,
    ProtocolError,
    ResetFailed,
    TurnStalled,
    WorkerBusy,
    WorkerDied,
    WorkerError,
    WorkerProtocolError,
    WorkerStartError,
)
from claudepool.logs import RateLimitedLog, scrub
from claudepool.pool.memory import tree_memory
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import Reaper, child_setup, default_reaper
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.protocol.cli_events import (
    AssistantEvent,
    CliEvent,
    ControlRequestEvent,
    ControlResponseBody,
    ControlResponseEvent,
    ConversationReset,
    ResultEvent,
    StreamEvent,
    SystemInit,
    Usage,
    UserContent,
    encode_command,
    encode_control_error,
    encode_control_request,
    encode_user_message,
    parse_event,
)
from claudepool.protocol.framing import DEFAULT_MAX_LINE_BYTES, LineFramer, decode_object

# Importers name WorkerTimeouts through this module.
__all__ = ["TurnResult", "Worker", "WorkerState", "WorkerTimeouts"]

log = logging.getLogger(__name__)
stderr_log = logging.getLogger("claudepool.worker.stderr")

_READ_CHUNK_BYTES = 1 << 16
_ids = itertools.count(1)


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RESETTING = "resetting"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class TurnResult:
    """The settled outcome of one turn, parsed from its ``result`` line."""

    text: str
    is_error: bool
    subtype: str
    terminal_reason: str | None
    stop_reason: str | None
    api_error_status: int | None
    usage: Usage
    # Cost of this turn: the CLI reports a total since the last reset; this is the delta.
    cost_usd: float
    session_id: str
    duration_ms: float
    context_tokens: int
    interrupted: bool = False
    # The model that served the turn, as the CLI's system/init reported it ("" if it never said).
    model: str = ""


@dataclass
class _Channel:
    """Events of the running exchange, handed from the reader task to one consumer."""

    items: deque[CliEvent] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    def push(self, event: CliEvent) -> None:
        self.items.append(event)
        self.ready.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.ready.set()

    async def get(self) -> CliEvent:
        while not self.items:
            if self.error is not None:
                raise self.error
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()


class Worker:
    """One `claude` process. Not safe for concurrent exchanges: the pool leases it to one caller."""

    def __init__(
        self,
        profile: Profile,
        *,
        timeouts: WorkerTimeouts | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        workdir_root: Path | None = None,
        reaper: Reaper | None = None,
        on_failure: Callable[[Worker], None] | None = None,
        prepare: Callable[[Worker], None] | None = None,
    ) -> None:
        self.id = f"{profile.name}-{next(_ids)}"
        self.profile = profile
        self.timeouts = timeouts or WorkerTimeouts()
        self.max_line_bytes = max_line_bytes
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.returncode: int | None = None
        self.created_at = time.monotonic()
        self.ready_at: float | None = None
        self.last_active_at = self.created_at
        self.turns = 0
        self.resets = 0
        self.session_id = ""
        self.model = ""
        # The process settings as started: what ``get_settings`` answers at start (model, effort, …)
        # and what the first ``system/init`` reports (permission mode, tools, output style, …). Each
        # reset must leave the process exactly so, or the worker is retired.
        self.started_applied: dict[str, Any] = {}
        self.started_settings: dict[str, Any] | None = None
        self.context_tokens = 0
        self.pss_bytes: int | None = None
        self.rss_bytes: int | None = None
        # A small index, stable while the worker lives and reused after it, for metrics labels.
        self.slot = 0
        # True once a prompt reached this conversation; cleared by a confirmed reset.
        self.dirty = False
        self.failure: WorkerError | None = None
        self.on_failure = on_failure
        # Runs once the private directories exist, before the process starts (a resumed
        # conversation's transcript is put in place here).
        self.prepare = prepare
        # Receives every settled turn, including one drained after its consumer went away.
        self.on_result: Callable[[TurnResult], None] | None = None

        self._workdir_root = workdir_root
        self._reaper = reaper or default_reaper()
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: _Channel | None = None
        self._controls: dict[str, asyncio.Future[ControlResponseBody]] = {}
        self._control_ids = itertools.count(1)
        self._cost_baseline_usd = 0.0
        self._stderr_tail = bytearray()
        self._close_task: asyncio.Task[None] | None = None
        self._registered = False

    def __repr__(self) -> str:
        pss = f"{self.pss_bytes / 2**20:.0f}MiB" if self.pss_bytes else "?"
        return (f"<Worker {self.id} {self.state} pid={self.pid} turns={self.turns} "
                f"age={self.age_s():.1f}s pss={pss}>")

    # -- predicates --------------------------------------------------------------------------

    def age_s(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.created_at

    def idle_s(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.last_active_at

    def is_alive(self) -> bool:
        return self.failure is None and self.state not in (WorkerState.CLOSING, WorkerState.CLOSED)

    def is_idle(self) -> bool:
        return self.state is WorkerState.IDLE and self.failure is None

    def in_turn(self) -> bool:
        return self.state is WorkerState.BUSY

    @property
    def home(self) -> Path | None:
        return self._dir / "home" if self._dir is not None else None

    def transcript_path(self, cli_session_id: str) -> Path | None:
        """Where the CLI keeps (or, resuming, looks for) a conversation's transcript."""
        if self._dir is None:
            return None
        slug = re.sub(r"[^a-zA-Z0-9]", "-", str(self._dir / "cwd"))  # the CLI's own rule
        return self._dir / "home" / ".claude" / "projects" / slug / f"{cli_session_id}.jsonl"

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode("utf-8", "replace")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the process and wait for its answer to ``initialize`` (the ready signal)."""
        if self._proc is not None or self.state is not WorkerState.STARTING:
            raise WorkerBusy(f"worker {self.id} was already started")
        try:
            await self._spawn()
            async with asyncio.timeout(self.timeouts.ready_timeout_s):
                await self._control("initialize", self.timeouts.ready_timeout_s)
                self.started_applied = await self._applied_settings()
        except BaseException as exc:
            await self.close(graceful=False)
            if isinstance(exc, asyncio.CancelledError):
                raise
            reason = "did not confirm readiness in time" if isinstance(exc, TimeoutError) else str(exc)
            tail = self.stderr_tail.strip()[-500:]
            failure = WorkerStartError(
                f"worker {self.id} failed to start: {reason}" + (f" (stderr: {tail})" if tail else ""))
            self.failure = failure  # why this worker is gone, as the pool reports it
            raise failure from None
        self.ready_at = time.monotonic()
        self.last_active_at = self.ready_at
        self.state = WorkerState.IDLE

    async def _spawn(self) -> None:
        root = self._workdir_root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.id}-", dir=root))
        home, tmp, cwd = self._dir / "home", self._dir / "tmp", self._dir / "cwd"
        for d in (home, tmp, cwd):
            d.mkdir(mode=0o700)
        if self.prepare is not None:
            self.prepare(self)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.profile.argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.profile.environ(home=home, tmpdir=tmp),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=functools.partial(child_setup, os.getpid()),
            )
        except OSError as exc:
            raise WorkerStartError(f"cannot execute {self.profile.claude_bin!r}: {exc.strerror}") from None
        self.pid = self._proc.pid
        self._reaper.register(self.pid)
        self._registered = True
        self._tasks = [
            asyncio.create_task(self._read_events(), name=f"{self.id}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"{self.id}-stderr"),
        ]

    async def close(self, *, graceful: bool = True) -> None:
        """Stop the process and remove its directories. Idempotent; survives caller cancellation.

        ``graceful`` starts with EOF on stdin (an idle CLI exits at once); otherwise with SIGTERM.
        """
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(graceful), name=f"{self.id}-close")
        await asyncio.shield(self._close_task)

    async def _close(self, graceful: bool) -> None:
        self.state = WorkerState.CLOSING
        if self.failure is None:
            self.failure = WorkerDied(f"worker {self.id} is closed")
        self._fan_out(self.failure)
        proc = self._proc
        if proc is not None:
            t = self.timeouts
            if proc.returncode is None and graceful:
                with contextlib.suppress(Exception):
                    assert proc.stdin is not None
                    proc.stdin.close()
                await self._wait_exit(proc, t.close_eof_timeout_s)
            if proc.returncode is None:
                self._signal_group(signal.SIGTERM)
                await self._wait_exit(proc, t.close_term_timeout_s)
            if proc.returncode is None:
                self._signal_group(signal.SIGKILL)
                await self._wait_exit(proc, t.close_kill_timeout_s)
            # Tool subprocesses that outlived the CLI share its group.
            self._signal_group(signal.SIGKILL)
            self.returncode = proc.returncode
            pending: set[asyncio.Task[None]] = set()
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks, timeout=t.close_pipes_timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=t.close_pipes_timeout_s)
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                # A grandchild holding our pipes would keep the transport open past exit.
                transport.close()
            if proc.returncode is not None and self._registered and self.pid is not None:
                # A group leaves the reaper's list only once its leader has been reaped.
                self._reaper.unregister(self.pid)
                self._registered = False
        if self._dir is not None:
            await self._remove_dirs(self._dir)
        self.state = WorkerState.CLOSED

    async def _remove_dirs(self, path: Path) -> None:
        """In a thread (a large HOME would hold up the event loop), bounded."""
        try:
            async with asyncio.timeout(self.timeouts.remove_dirs_timeout_s):
                await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        except TimeoutError:
            log.warning("worker %s: removing %s takes over %gs; left to finish in its thread",
                        self.id, path, self.timeouts.remove_dirs_timeout_s)

    @staticmethod
    async def _wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await proc.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    # -- exchanges ---------------------------------------------------------------------------

    def run_turn(
        self, content: UserContent, *, idle_timeout_s: float | None = None
    ) -> AsyncIterator[CliEvent | TurnResult]:
        """Send one prompt; iterate the events of exactly that turn, ending with its `TurnResult`.

        The prompt is written at once. If the caller stops iterating early the turn keeps running
        in the CLI and the worker stays `BUSY` until `finish_abandoned_turn` settles it.
        """
        channel = self._begin(WorkerState.BUSY)
        self.dirty = True
        self._write(self._prompt_line(content))
        return self._turn_events(channel, idle_timeout_s or self.timeouts.turn_idle_timeout_s)

    @staticmethod
    def _prompt_line(content: UserContent) -> bytes:
        # Marked as text: a prompt reaches the model exactly and never runs as a slash command.
        return encode_user_message(content)

    async def _turn_events(self, channel: _Channel, idle_timeout_s: float) -> AsyncIterator[CliEvent | TurnResult]:
        try:
            await self._drain(idle_timeout_s)
        except TimeoutError:
            stalled = TurnStalled(f"the worker did not take its prompt within {idle_timeout_s:g}s; killed")
            self._poison(stalled, quiet=True)  # the watchdog's kill, as in `_on_stall`, not a crash
            await self.close(graceful=False)
            raise stalled from None
        text_parts: list[str] = []
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    event = await channel.get()
            except TimeoutError:
                await self._on_stall(channel, idle_timeout_s)
            if isinstance(event, ResultEvent):
                result = self._settle(event, channel, "".join(text_parts))  # billed either way
                command = self._ran_command(event)
                if command is not None:
                    ran = PromptRanAsCommand(f"worker {self.id}: the CLI ran the prompt as /{command}; retired")
                    self._poison(ran)
                    raise ran
                yield result
                return
            if isinstance(event, AssistantEvent):
                if event.message.usage is not None and event.parent_tool_use_id is None:
                    self.context_tokens = event.message.usage.context_tokens
                if event.parent_tool_use_id is None:
                    text_parts.append(event.text())
            yield event

    async def _on_stall(self, channel: _Channel, idle_timeout_s: float) -> NoReturn:
        """Watchdog expiry: interrupt; if even that is not confirmed, kill. Always raises."""
        log.warning("worker %s: no event for %.1fs, interrupting the turn", self.id, idle_timeout_s)
        try:
            await self._interrupt_and_settle(channel)
        except (TimeoutError, WorkerError):
            stalled = TurnStalled(
                f"no event for {idle_timeout_s:g}s and the interrupt was not confirmed; worker killed")
            self._poison(stalled, quiet=True)  # recorded as the reason this worker is gone
            await self.close(graceful=False)
            raise stalled from None
        raise TurnStalled(f"no event for {idle_timeout_s:g}s; the turn was interrupted")

    @staticmethod
    def _ran_command(event: ResultEvent) -> str | None:
        # A turn that ran a command says which (`local_command`), even one the prompt's marker should
        # have kept from running: the process state may have changed, so the worker is not reused.
        return event.local_command

    async def _applied_settings(self) -> dict[str, Any]:
        """The settings in force, as the CLI reports them (``get_settings``: model, effort, …)."""
        body = await self._control("get_settings", self.timeouts.reset_timeout_s)
        response = body.response or {}
        applied, effective = response.get("applied"), response.get("effective")
        if not isinstance(applied, dict):
            raise WorkerProtocolError(f"worker {self.id}: get_settings answered no applied settings")
        return {**applied, "effective": effective}

    async def set_model(self, model: str | None) -> str:
        """Switch the model for the next turns (None: the CLI's default); returns the model in force."""
        body = await self._control("set_model", self.timeouts.interrupt_timeout_s, model=model)
        resolved = (body.response or {}).get("model")
        if not isinstance(resolved, str):
            raise WorkerProtocolError(f"worker {self.id}: set_model answered no model")
        return resolved

    async def interrupt(self) -> None:
        """Ask the CLI to stop the running turn. Its ``result`` (``is_error``) still arrives through
        the turn's iterator; returns once the CLI acknowledged. No-op when no turn runs."""
        if self.state is WorkerState.BUSY:
            await self._control("interrupt", self.timeouts.interrupt_timeout_s)

    async def finish_abandoned_turn(self) -> TurnResult | None:
        """Settle a turn whose consumer went away: interrupt it and drain to its result.

        On failure, cancellation included, the worker is poisoned: it must be closed.
        """
        channel = self._channel
        if self.state is not WorkerState.BUSY or channel is None:
            return None
        with self._poison_on_failure("interrupted turn did not end", WorkerError):
            return await self._interrupt_and_settle(channel)

    async def _interrupt_and_settle(self, channel: _Channel) -> TurnResult:
        await self._control("interrupt", self.timeouts.interrupt_timeout_s)
        async with asyncio.timeout(self.timeouts.interrupt_timeout_s):
            while True:
                event = await channel.get()
                if isinstance(event, ResultEvent):
                    return self._settle(event, channel, "", interrupted=True)

    async def reset(self) -> None:
        """Forget the conversation with ``/clear`` (wait for ``conversation_reset`` and its result),
        restore the profile's model, and check that every process setting the CLI reports is as it
        was at start.

        On any failure, cancellation included, the worker is poisoned and must be closed: a worker
        whose reset is unconfirmed may still hold the last tenant's context or settings.
        """
        channel = self._begin(WorkerState.RESETTING)
        reported: dict[str, Any] | None = None
        applied: dict[str, Any] = {}
        with self._poison_on_failure("/clear was not confirmed", ResetFailed):
            async with asyncio.timeout(self.timeouts.reset_timeout_s):
                self._write(encode_command("/clear"))
                await self._drain(self.timeouts.reset_timeout_s)
                confirmed = False
                while True:
                    event = await channel.get()
                    if isinstance(event, ConversationReset):
                        confirmed = True
                    elif isinstance(event, SystemInit):
                        reported = event.settings()
                    elif isinstance(event, ResultEvent):
                        break
                if confirmed and not event.is_error:
                    # Process settings survive /clear: a model set for one request (or by anything
                    # else) must not serve the next.
                    applied = await self._applied_settings()
                    if applied.get("model") != self.started_applied.get("model"):
                        await self.set_model(self.profile.model)
                        applied = await self._applied_settings()
        if not confirmed or event.is_error:
            failure = ResetFailed(f"worker {self.id}: /clear ended without a conversation_reset")
            self._poison(failure)
            raise failure
        # /clear's system/init was reported before the model was restored: get_settings checks that.
        changed = _changed(self.started_applied, applied) + [
            name for name in _changed(self.started_settings or {}, reported or {}) if name != "model"]
        if changed:
            failure = ResetFailed(f"worker {self.id}: process settings changed since start ({', '.join(changed)})")
            self._poison(failure)
            raise failure
        self._channel = None
        self._cost_baseline_usd = event.total_cost_usd
        self.session_id = event.session_id
        self.context_tokens = 0
        self.dirty = False
        self.resets += 1
        self.last_active_at = time.monotonic()
        self.state = WorkerState.IDLE

    def measure_memory(self) -> int | None:
        """Refresh the PSS and RSS of the worker's process tree; return the PSS."""
        if self.pid is not None and self.is_alive():
            memory = tree_memory(self.pid)
            if memory is not None:
                self.pss_bytes, self.rss_bytes = memory.pss_bytes, memory.rss_bytes
        return self.pss_bytes

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _poison_on_failure(self, what: str, error: type[WorkerError]) -> Iterator[None]:
        """Any failure of an exchange, cancellation included, leaves the CLI in an unknown state:
        poison the worker so it is closed, never reused. Cancellation itself passes through."""
        try:
            yield
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "in time" if isinstance(exc, TimeoutError) else "(cancelled)" if cancelled else f"({exc!r})"
            failure = error(f"worker {self.id}: {what} {reason}")
            self._poison(failure, quiet=cancelled)
            if cancelled:
                raise
            raise failure from None

    def _begin(self, state: WorkerState) -> _Channel:
        if self.failure is not None:
            raise self.failure
        if self.state is not WorkerState.IDLE:
            raise WorkerBusy(f"worker {self.id} is {self.state}, not idle")
        self.state = state
        self._channel = _Channel()
        return self._channel

    def _settle(self, event: ResultEvent, channel: _Channel, streamed_text: str,
                interrupted: bool = False) -> TurnResult:
        cost = max(0.0, event.total_cost_usd - self._cost_baseline_usd)
        self._cost_baseline_usd = event.total_cost_usd
        if event.session_id:
            self.session_id = event.session_id
        result = TurnResult(
            text=event.result if event.result is not None else streamed_text,
            is_error=event.is_error,
            subtype=event.subtype,
            terminal_reason=event.terminal_reason,
            stop_reason=event.stop_reason,
            api_error_status=event.api_error_status,
            usage=event.usage,
            cost_usd=cost,
            session_id=event.session_id,
            duration_ms=event.duration_ms,
            context_tokens=self.context_tokens,
            interrupted=interrupted,
            model=self.model,
        )
        if self._channel is channel:
            self._channel = None
        self.turns += 1
        self.last_active_at = time.monotonic()
        if self.state is WorkerState.BUSY:
            self.state = WorkerState.IDLE
        if self.on_result is not None:
            self.on_result(result)
        return result

    async def _control(self, subtype: str, timeout_s: float, **fields: object) -> ControlResponseBody:
        if self.failure is not None:
            raise self.failure
        request_id = f"cp-{next(self._control_ids)}"
        future: asyncio.Future[ControlResponseBody] = asyncio.get_running_loop().create_future()
        self._controls[request_id] = future
        try:
            self._write(encode_control_request(request_id, subtype, **fields))
            async with asyncio.timeout(timeout_s):
                body = await future
        finally:
            self._controls.pop(request_id, None)
        if body.subtype != "success":
            raise WorkerError(f"worker {self.id}: {subtype} refused: {body.error}")
        return body

    def _write(self, line: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            raise self.failure or WorkerDied(f"worker {self.id} has no open stdin")
        proc.stdin.write(line)

    async def _drain(self, timeout_s: float) -> None:
        """Wait until a large prompt has been taken by the process (pipe backpressure)."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            async with asyncio.timeout(timeout_s):
                await self._proc.stdin.drain()
        except (ConnectionError, BrokenPipeError):
            raise self.failure or WorkerDied(f"worker {self.id}: stdin closed") from None

    async def _read_events(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        framer = LineFramer(self.max_line_bytes)
        try:
            while chunk := await stdout.read(_READ_CHUNK_BYTES):
                for line in framer.feed(chunk):
                    if line.strip():
                        self._dispatch(parse_event(decode_object(line)))
            tail = framer.finish()
            if tail.strip():
                self._dispatch(parse_event(decode_object(tail)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeouts.exit_after_eof_timeout_s):
                    await self._proc.wait()
            self._poison(WorkerDied(f"worker {self.id} exited with code {self._proc.returncode}"))
        except ProtocolError as exc:
            # A corrupt or oversize line: the stream can no longer be trusted to delimit turns.
            failure = WorkerProtocolError(f"worker {self.id}: {exc}")
            failure.__cause__ = exc
            self._poison(failure)
        except Exception as exc:
            log.exception("worker %s: event reader crashed", self.id)
            self._poison(WorkerDied(f"worker {self.id}: event reader crashed: {exc!r}"))

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        forward = RateLimitedLog(stderr_log)
        pending = b""
        while chunk := await self._proc.stderr.read(_READ_CHUNK_BYTES):
            self._stderr_tail += chunk
            del self._stderr_tail[:-8192]
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-8192:]
            for line in lines:
                if line.strip():
                    forward.info("worker stderr", {"worker": self.id, "slot": self.slot,
                                                   "line": scrub(line[:2048].decode("utf-8", "replace"))})

    def _dispatch(self, event: CliEvent) -> None:
        if isinstance(event, ControlResponseEvent):
            future = self._controls.get(event.response.request_id)
            if future is not None and not future.done():
                future.set_result(event.response)
            return
        if isinstance(event, ControlRequestEvent):
            # Permission prompts and hook callbacks: the safe answer is no.
            with contextlib.suppress(WorkerError):
                self._write(encode_control_error(event.request_id, "not supported by claudepool"))
            return
        if isinstance(event, SystemInit):
            self.model = event.model
            if self.started_settings is None:
                # Reported at the start of a turn, before its prompt is read: the process as started.
                self.started_settings = event.settings()
        channel = self._channel
        if channel is not None:
            channel.push(event)
        elif not isinstance(event, StreamEvent):
            log.debug("worker %s: %s event outside an exchange", self.id, event.type)

    def _poison(self, exc: WorkerError, *, quiet: bool = False) -> None:
        """Record the first failure and hand it to every waiter; the pool then closes the worker."""
        if self.failure is not None:
            return
        self.failure = exc
        closing = self.state in (WorkerState.CLOSING, WorkerState.CLOSED)
        if not closing and not quiet:
            log.warning("worker %s failed: %s", self.id, exc)
            log.debug("worker %s stderr tail: %s", self.id, self.stderr_tail[-2000:])
        self._fan_out(exc)
        if not closing and self.on_failure is not None:
            self.on_failure(self)

    def _fan_out(self, exc: WorkerError) -> None:
        if self._channel is not None:
            self._channel.fail(exc)
        for future in self._controls.values():
            if not future.done():
                future.set_exception(exc)


def _changed(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names of the settings whose values differ (a setting only one side has counts as changed)."""
    if not started or not now:
        return []  # nothing to compare with: a turn or reset that never reported
    return sorted(name for name in started.keys() | now.keys() if started.get(name) != now.get(name))
