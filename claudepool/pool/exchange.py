"""The stream-json side of one worker: control requests, events, turns, interrupt and reset.

An `Exchange` is to its `Transport` what the Agent SDK's ``Query`` is to its
``SubprocessCLITransport``: it decides which lines to write and what the lines read mean, and reaches
the process only through the four calls of `Transport`, so it runs as well over an in-memory one.

One exchange at a time (a turn, a reset, the start-up handshake): a user line written while another
runs would be merged into its turn by the CLI. One reader task dispatches every stdout line: a
control response to the request with its id, any other event to the running exchange's channel.
Failures are sticky and fan out: on EOF, a corrupt or oversize line, every waiter gets the same
`WorkerError` at once, and the exchange is never used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from claudepool.errors import (
    PromptRanAsCommand,
    ProtocolError,
    ResetFailed,
    TurnStalled,
    WorkerBusy,
    WorkerDied,
    WorkerError,
    WorkerProtocolError,
)
from claudepool.pool.channel import Channel
from claudepool.pool.process_settings import applied_of, changed, check_effort, restored_effort
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
    encode_command,
    encode_control_error,
    encode_control_request,
    parse_event,
)
from claudepool.protocol.framing import decode_object

# The worker's logger, as before the split: operators filter on it.
log = logging.getLogger("claudepool.pool.worker")


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
    model: str = ""  # that served the turn, as the CLI's system/init said ("" if it never did)
    structured_output: Any = None  # the profile's json_schema answer (``--json-schema``), else None


class Transport(Protocol):
    """What an exchange needs of a process (`claudepool.pool.process.WorkerProcess` is one)."""

    def write(self, line: bytes) -> None:
        """Queue one line for stdin; `ConnectionError` once stdin is closed."""

    async def drain(self) -> None:
        """Wait for stdin to take what was written; `ConnectionError` if it is lost."""

    def read_lines(self) -> AsyncIterator[bytes]:
        """Stdout, line by line, until EOF; `ProtocolError` on an oversize line."""

    async def wait_exit(self, timeout_s: float) -> int | None:
        """After EOF: the exit status, or None if the process has not exited within ``timeout_s``."""


def local_command(event: ResultEvent) -> str | None:
    """The command a turn ran, if any (``local_command``)."""
    return event.local_command


class Exchange:
    """The conversation with one CLI process. One exchange at a time: the pool leases the worker to
    one caller. ``kill`` stops the process at once (the watchdog's last resort); ``on_failure(quiet)``
    hears of the first failure outside a close; ``ran_command`` tells whether a turn ran a command."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        timeouts: WorkerTimeouts,
        *,
        kill: Callable[[], Awaitable[None]],
        default_model: str | None = None,
        default_effort: str | None = None,
        on_failure: Callable[[bool], None] | None = None,
        ran_command: Callable[[ResultEvent], str | None] = local_command,
    ) -> None:
        self.id = name
        self.timeouts = timeouts
        self.state = WorkerState.STARTING
        self.failure: WorkerError | None = None
        self.last_active_at = time.monotonic()
        self.turns = 0
        self.resets = 0
        self.session_id = ""
        self.model = ""
        self.context_tokens = 0
        # True once a prompt reached this conversation; cleared by a confirmed reset.
        self.dirty = False
        # The process settings as started: what ``get_settings`` answers at start (model, effort, …)
        # and what the first ``system/init`` reports (permission mode, tools, output style, …). Each
        # reset must leave the process exactly so, or the worker is retired.
        self.started_applied: dict[str, Any] = {}
        self.started_settings: dict[str, Any] | None = None
        # Receives every settled turn, including one drained after its consumer went away.
        self.on_result: Callable[[TurnResult], None] | None = None
        self._transport = transport
        self._kill = kill
        self._default_model = default_model
        self._default_effort = default_effort
        # Set by `set_effort` to another effort than the profile's: the reset restores it (only
        # then: an effort changed any other way, a slash command, fails the reset's check).
        self._effort_switched = False
        self._on_failure = on_failure
        self._ran_command = ran_command
        self._reader: asyncio.Task[None] | None = None
        self._channel: Channel | None = None
        self._controls: dict[str, asyncio.Future[ControlResponseBody]] = {}
        self._control_ids = itertools.count(1)
        self._cost_baseline_usd = 0.0

    @property
    def pending_controls(self) -> int:
        """Control requests waiting for their response."""
        return len(self._controls)

    # -- start and close ---------------------------------------------------------------------

    def start_reading(self) -> None:
        """Start the task that reads and dispatches every line of the transport."""
        assert self._reader is None
        self._reader = asyncio.create_task(self._read_events(), name=f"{self.id}-stdout")

    async def handshake(self) -> None:
        """``initialize`` (its answer is the ready signal), note the settings as started: `IDLE`."""
        await self._control("initialize", self.timeouts.ready_timeout_s)
        self.started_applied = await self._applied_settings()
        self.state = WorkerState.IDLE

    def begin_close(self, failure: WorkerError) -> None:
        """From now on every waiter, present and future, fails (with ``failure`` if none came first)."""
        self.state = WorkerState.CLOSING
        if self.failure is None:
            self.failure = failure
        self._fan_out(self.failure)

    async def stop_reading(self, timeout_s: float) -> None:
        """Let the reader reach the end of its stream; cancel it if it takes over ``timeout_s``."""
        if self._reader is None:
            return
        done, _ = await asyncio.wait({self._reader}, timeout=timeout_s)
        if not done:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=timeout_s)

    # -- exchanges ---------------------------------------------------------------------------

    def run_turn(self, line: bytes, idle_timeout_s: float) -> AsyncIterator[CliEvent | TurnResult]:
        """Write one user line at once; iterate the events of that turn, ending with its `TurnResult`
        (see `Worker.run_turn`)."""
        channel = self._begin(WorkerState.BUSY)
        self.dirty = True
        self._write(line)
        return self._turn_events(channel, idle_timeout_s)

    async def _turn_events(self, channel: Channel, idle_timeout_s: float) -> AsyncIterator[CliEvent | TurnResult]:
        try:
            await self._drain(idle_timeout_s)
        except TimeoutError:
            stalled = TurnStalled(f"the worker did not take its prompt within {idle_timeout_s:g}s; killed")
            self.poison(stalled, quiet=True)  # the watchdog's kill, as in `_on_stall`, not a crash
            await self._kill()
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
                    self.poison(ran)
                    raise ran
                yield result
                return
            if isinstance(event, AssistantEvent):
                if event.message.usage is not None and event.parent_tool_use_id is None:
                    self.context_tokens = event.message.usage.context_tokens
                if event.parent_tool_use_id is None:
                    text_parts.append(event.text())
            yield event

    async def _on_stall(self, channel: Channel, idle_timeout_s: float) -> NoReturn:
        """Watchdog expiry: interrupt; if even that is not confirmed, kill. Always raises."""
        log.warning("worker %s: no event for %.1fs, interrupting the turn", self.id, idle_timeout_s)
        try:
            await self._interrupt_and_settle(channel)
        except (TimeoutError, WorkerError):
            stalled = TurnStalled(
                f"no event for {idle_timeout_s:g}s and the interrupt was not confirmed; worker killed")
            self.poison(stalled, quiet=True)  # recorded as the reason this worker is gone
            await self._kill()
            raise stalled from None
        raise TurnStalled(f"no event for {idle_timeout_s:g}s; the turn was interrupted")

    async def _applied_settings(self) -> dict[str, Any]:
        """The settings in force, as the CLI reports them (``get_settings``: model, effort, …)."""
        return applied_of(await self._control("get_settings", self.timeouts.reset_timeout_s), self.id)

    async def set_model(self, model: str | None) -> str:
        """Switch the model for the next turns (None: the CLI's default); returns the model in force."""
        body = await self._control("set_model", self.timeouts.reset_timeout_s, model=model)  # may call the model
        resolved = (body.response or {}).get("model")
        if not isinstance(resolved, str):
            raise WorkerProtocolError(f"worker {self.id}: set_model answered no model")
        return resolved

    async def set_effort(self, effort: str | None) -> str:
        """Switch the effort for the next turns with ``apply_flag_settings`` (None: back to the
        spawn's, as ``get_settings`` reported it at start: the CLI may have lowered the profile's
        level to what its model has); returns the effort in force, checked: the CLI ignores a level
        it does not take, silently."""
        restore = self.started_applied.get("effort") if self._default_effort is not None else None
        wanted = effort if effort is not None else restore
        self._effort_switched = self._effort_switched or wanted != restore
        await self._control("apply_flag_settings", self.timeouts.reset_timeout_s, settings={"effortLevel": wanted})
        in_force = check_effort(self.id, wanted, await self._applied_settings(), self.started_applied)
        if wanted == restore:
            self._effort_switched = False
        return in_force

    async def interrupt(self) -> None:
        """Ask the CLI to stop the running turn; its ``result`` still ends the turn's iterator."""
        if self.state is WorkerState.BUSY:
            await self._control("interrupt", self.timeouts.interrupt_timeout_s)

    async def finish_abandoned_turn(self) -> TurnResult | None:
        """Settle a turn whose consumer went away: interrupt it, drain to its result; on any
        failure, cancellation included, poison the exchange."""
        channel = self._channel
        if self.state is not WorkerState.BUSY or channel is None:
            return None
        with self._poison_on_failure("interrupted turn did not end", WorkerError):
            return await self._interrupt_and_settle(channel)

    async def _interrupt_and_settle(self, channel: Channel) -> TurnResult:
        await self._control("interrupt", self.timeouts.interrupt_timeout_s)
        async with asyncio.timeout(self.timeouts.interrupt_timeout_s):
            while True:
                event = await channel.get()
                if isinstance(event, ResultEvent):
                    return self._settle(event, channel, "", interrupted=True)

    async def reset(self) -> None:
        """``/clear`` (confirmed by ``conversation_reset`` and its result), the default model
        restored, every reported process setting as at start; else poison (see `Worker.reset`)."""
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
                        await self.set_model(self._default_model)
                        applied = await self._applied_settings()
                    if self._effort_switched:
                        await self.set_effort(None)
                        applied = await self._applied_settings()
        if not confirmed or event.is_error:
            failure = ResetFailed(f"worker {self.id}: /clear ended without a conversation_reset")
            self.poison(failure)
            raise failure
        # /clear's system/init was reported before the model was restored: get_settings checks that.
        drifted = changed(self.started_applied, restored_effort(self.started_applied, applied)) + [
            name for name in changed(self.started_settings or {}, reported or {}) if name != "model"]
        if drifted:
            failure = ResetFailed(f"worker {self.id}: process settings changed since start ({', '.join(drifted)})")
            self.poison(failure)
            raise failure
        self._channel = None
        self._cost_baseline_usd = event.total_cost_usd
        self.session_id = event.session_id
        self.context_tokens = 0
        self.dirty = False
        self.resets += 1
        self.last_active_at = time.monotonic()
        self.state = WorkerState.IDLE

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _poison_on_failure(self, what: str, error: type[WorkerError]) -> Iterator[None]:
        """Any failure of an exchange, cancellation included, leaves the CLI in an unknown state:
        poison the exchange so the worker is closed, never reused. Cancellation itself passes through."""
        try:
            yield
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            reason = "in time" if isinstance(exc, TimeoutError) else "(cancelled)" if cancelled else f"({exc!r})"
            failure = error(f"worker {self.id}: {what} {reason}")
            self.poison(failure, quiet=cancelled)
            if cancelled:
                raise
            raise failure from None

    def _begin(self, state: WorkerState) -> Channel:
        if self.failure is not None:
            raise self.failure
        if self.state is not WorkerState.IDLE:
            raise WorkerBusy(f"worker {self.id} is {self.state}, not idle")
        self.state = state
        self._channel = Channel()
        return self._channel

    def _settle(self, event: ResultEvent, channel: Channel, streamed_text: str,
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
            structured_output=event.structured_output,
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
        try:
            self._transport.write(line)
        except ConnectionError:
            raise self.failure or WorkerDied(f"worker {self.id} has no open stdin") from None

    async def _drain(self, timeout_s: float) -> None:
        """Wait until a large prompt has been taken by the process (pipe backpressure)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._transport.drain()
        except ConnectionError:
            raise self.failure or WorkerDied(f"worker {self.id}: stdin closed") from None

    async def _read_events(self) -> None:
        try:
            async for line in self._transport.read_lines():
                if line.strip():
                    self._dispatch(parse_event(decode_object(line)))
            code = await self._transport.wait_exit(self.timeouts.exit_after_eof_timeout_s)
            self.poison(WorkerDied(f"worker {self.id} exited with code {code}"))
        except ProtocolError as exc:
            # A corrupt or oversize line: the stream can no longer be trusted to delimit turns.
            failure = WorkerProtocolError(f"worker {self.id}: {exc}")
            failure.__cause__ = exc
            self.poison(failure)
        except Exception as exc:
            log.exception("worker %s: event reader crashed", self.id)
            self.poison(WorkerDied(f"worker {self.id}: event reader crashed: {exc!r}"))

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

    def poison(self, exc: WorkerError, *, quiet: bool = False) -> None:
        """Record the first failure and hand it to every waiter; the pool then closes the worker. Also
        from outside, when the worker broke a bound (`claudepool.pool.confinement`)."""
        if self.failure is not None:
            return
        self.failure = exc
        closing = self.state in (WorkerState.CLOSING, WorkerState.CLOSED)
        if not closing and not quiet:
            log.warning("worker %s failed: %s", self.id, exc)
        self._fan_out(exc)
        if not closing and self._on_failure is not None:
            self._on_failure(quiet)

    def _fan_out(self, exc: WorkerError) -> None:
        if self._channel is not None:
            self._channel.fail(exc)
        for future in self._controls.values():
            if not future.done():
                future.set_exception(exc)
