"""One warm `claude` process in persistent stream-json mode.

A `Worker` is what the pool leases: a `WorkerProcess` (`claudepool.pool.process`: directories,
process group, pipes) driven by an `Exchange` (`claudepool.pool.exchange`: control requests, turns,
interrupt, reset), with its lifecycle (start, close) and the predicates the pool plans with. It
serves one exchange at a time.

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
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from claudepool.errors import WorkerBusy, WorkerDied, WorkerError, WorkerStartError
from claudepool.pool import sandbox
from claudepool.pool.confinement import Confinement
from claudepool.pool.exchange import Exchange, TurnResult, WorkerState, local_command
from claudepool.pool.memory import tree_memory
from claudepool.pool.priority import process_tree
from claudepool.pool.process import WorkerProcess
from claudepool.pool.profile import Profile
from claudepool.pool.reaper import Reaper, default_reaper
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.workspace import empty_cwd
from claudepool.protocol.cli_events import CliEvent, ResultEvent, UserContent, encode_user_message
from claudepool.protocol.framing import DEFAULT_MAX_LINE_BYTES

# Importers name these through this module.
__all__ = ["TurnResult", "Worker", "WorkerCredentials", "WorkerState", "WorkerTimeouts"]

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class WorkerCredentials(Protocol):
    """What a worker presents upstream instead of the provider's key (the daemon's gateway,
    `claudepool.gateway.credentials.CredentialRegistry`, issues them). The pool never sees the key.

    ``issue`` runs once, just before the process starts, and returns the variables that point it at
    the gateway (they replace any upstream variable of the profile's); ``revoke`` runs as the worker
    begins to close, so the credential is valid only while the worker lives."""

    def issue(self, worker: Worker) -> Mapping[str, str]: ...

    async def open_socket(self, worker: Worker) -> Path:
        """A socket of the gateway's for this worker alone, bound into its sandbox."""
        ...

    async def open_egress(self, worker: Worker) -> Path | None:
        """An egress proxy socket for this worker alone, when its profile allows outbound hosts."""
        ...

    def revoke(self, worker: Worker) -> None: ...


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
        credentials: WorkerCredentials | None = None,
    ) -> None:
        self.id = f"{profile.name}-{next(_ids)}"
        self.profile = profile
        self.timeouts = timeouts or WorkerTimeouts()
        self.max_line_bytes = max_line_bytes
        self.created_at = time.monotonic()
        self.ready_at: float | None = None
        self.pss_bytes: int | None = None
        self.rss_bytes: int | None = None
        # A small index, stable while the worker lives and reused after it, for metrics labels.
        self.slot = 0
        self.on_failure = on_failure
        # Runs once the private directories exist, before the process starts (a resumed
        # conversation's transcript is put in place here).
        self.prepare = prepare
        # None: the profile's own upstream variables are used as they are (no gateway).
        self._credentials = credentials
        self._confinement: Confinement | None = None  # a sandboxed worker's cgroup, workspace and bounds
        self._process = WorkerProcess(
            self.id, workdir_root=workdir_root, reaper=reaper or default_reaper(), timeouts=self.timeouts,
            max_line_bytes=max_line_bytes, log_fields=lambda: {"worker": self.id, "slot": self.slot})
        self._exchange = Exchange(
            self.id, self._process, self.timeouts, kill=self._kill, default_model=profile.model,
            default_effort=profile.effort, on_failure=self._failed, ran_command=self._ran_command)
        self._exchange.last_active_at = self.created_at
        self._close_task: asyncio.Task[None] | None = None
        self._model_switching = False

    def __repr__(self) -> str:
        pss = f"{self.pss_bytes / 2**20:.0f}MiB" if self.pss_bytes else "?"
        return (f"<Worker {self.id} {self.state}{' frozen' if self.frozen else ''} pid={self.pid} "
                f"turns={self.turns} age={self.age_s():.1f}s pss={pss}>")

    # -- the exchange's state, as the pool reads (and sometimes sets) it ------------------------
    # Plain properties, not a descriptor: mypy checks a worker against the planner's WorkerView
    # bound without resolving descriptors.

    @property
    def state(self) -> WorkerState:
        return self._exchange.state

    @property
    def failure(self) -> WorkerError | None:
        return self._exchange.failure

    @failure.setter
    def failure(self, exc: WorkerError | None) -> None:
        self._exchange.failure = exc

    @property
    def last_active_at(self) -> float:
        return self._exchange.last_active_at

    @last_active_at.setter
    def last_active_at(self, when: float) -> None:
        self._exchange.last_active_at = when

    @property
    def on_result(self) -> Callable[[TurnResult], None] | None:
        """Receives every settled turn, including one drained after its consumer went away."""
        return self._exchange.on_result

    @on_result.setter
    def on_result(self, callback: Callable[[TurnResult], None] | None) -> None:
        self._exchange.on_result = callback

    @property
    def dirty(self) -> bool:
        """True once a prompt reached this conversation; cleared by a confirmed reset."""
        return self._exchange.dirty

    @dirty.setter
    def dirty(self, dirty: bool) -> None:
        self._exchange.dirty = dirty

    @property
    def turns(self) -> int:
        return self._exchange.turns

    @property
    def resets(self) -> int:
        return self._exchange.resets

    @property
    def session_id(self) -> str:
        return self._exchange.session_id

    @property
    def model(self) -> str:
        return self._exchange.model

    @property
    def context_tokens(self) -> int:
        return self._exchange.context_tokens

    @property
    def started_applied(self) -> dict[str, Any]:
        return self._exchange.started_applied

    @property
    def started_settings(self) -> dict[str, Any] | None:
        return self._exchange.started_settings

    # -- the process --------------------------------------------------------------------------

    @property
    def pending_controls(self) -> int:
        """Control requests written and not yet answered (a cancelled one must not linger)."""
        return self._exchange.pending_controls

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def home(self) -> Path | None:
        return self._process.home

    @property
    def cwd(self) -> Path | None:
        """The workspace: where the CLI and its tools run, emptied at every reset."""
        return self._process.cwd

    def transcript_path(self, cli_session_id: str) -> Path | None:
        """Where the CLI keeps (or, resuming, looks for) a conversation's transcript."""
        root = self._process.dir
        if root is None:
            return None
        slug = re.sub(r"[^a-zA-Z0-9]", "-", str(root / "cwd"))  # the CLI's own rule
        return root / "home" / ".claude" / "projects" / slug / f"{cli_session_id}.jsonl"

    @property
    def stderr_tail(self) -> str:
        return self._process.stderr_tail

    @property
    def frozen(self) -> bool:
        """Its processes are stopped (SIGSTOP): an idle worker the pool froze."""
        return self._process.frozen

    def freeze(self) -> None:
        """Stop an idle worker's processes; a no-op unless idle. `thaw` before any exchange."""
        if self.is_idle():
            self._process.freeze()

    def thaw(self) -> None:
        self._process.thaw()

    # -- predicates ---------------------------------------------------------------------------

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

    def in_model_switch(self) -> bool:
        """A ``set_model`` is in flight: the CLI may make its one model call to check the model."""
        return self._model_switching

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the process and wait for its answer to ``initialize`` (the ready signal)."""
        if self._process.dir is not None or self.state is not WorkerState.STARTING:
            raise WorkerBusy(f"worker {self.id} was already started")
        try:
            self._process.make_dirs()
            if self.prepare is not None:
                self.prepare(self)
            home, tmp = self._process.home, self._process.tmp
            assert home is not None and tmp is not None
            upstream = self._credentials.issue(self) if self._credentials is not None else None
            argv = self.profile.argv()
            if self.profile.sandboxed:
                argv, upstream = await self._sandboxed(argv, upstream)
            await self._process.spawn(argv, self.profile.environ(home=home, tmpdir=tmp, upstream=upstream))
            self._exchange.start_reading()
            async with asyncio.timeout(self.timeouts.ready_timeout_s):
                await self._exchange.handshake()
            if self._confinement is not None:
                assert self._process.pid is not None and self._process.cwd is not None
                self._confinement.ready(self._process.pid, home, tmp, self._process.cwd, self._exchange.poison)
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

    async def _sandboxed(self, argv: list[str], upstream: Mapping[str, str] | None) -> tuple[
            list[str], Mapping[str, str]]:
        """``argv`` in the worker's sandbox, and the variables that point it at its gateway socket."""
        bwrap, socat = sandbox.probe()
        if self._credentials is None or upstream is None or self._process.dir is None:
            raise WorkerStartError(f"worker {self.id}: a sandboxed worker reaches the provider only through "
                                   "the daemon's gateway, and this pool has none")
        socket = await self._credentials.open_socket(self)
        egress = await self._credentials.open_egress(self) if self.profile.allowed_hosts else None
        binary = sandbox.cli_binary(self.profile.claude_bin)
        layout = sandbox.Layout(self._process.dir, sandbox.cli_root(binary), socket, egress,
                                tuple(Path(p) for p in self.profile.sandbox_read_only))
        wrapped = sandbox.wrap([str(binary), *argv[1:]], layout, bwrap=bwrap, socat=socat,
                               etc=sandbox.etc_dir())
        self._confinement = Confinement(self.id, self.profile, self._process.dir,
                                        self.timeouts.workspace_check_interval_s)
        return self._confinement.command(wrapped), {**upstream, "ANTHROPIC_BASE_URL": sandbox.base_url(),
                                                    **(sandbox.proxy_env() if egress is not None else {})}

    async def close(self, *, graceful: bool = True) -> None:
        """Stop the process and remove its directories. Idempotent; survives caller cancellation.

        ``graceful`` starts with EOF on stdin (an idle CLI exits at once); otherwise with SIGTERM.
        """
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(graceful), name=f"{self.id}-close")
        await asyncio.shield(self._close_task)

    async def _close(self, graceful: bool) -> None:
        if self._credentials is not None:
            # First: whatever still runs in the process tree while it is stopped can call nothing.
            self._credentials.revoke(self)
        self._exchange.begin_close(WorkerDied(f"worker {self.id} is closed"))
        await self._process.stop(graceful=graceful)
        if self._confinement is not None:
            await self._confinement.close(self.timeouts.close_kill_timeout_s)
        await self._exchange.stop_reading(self.timeouts.close_pipes_timeout_s)
        await self._process.remove_dirs()
        self._exchange.state = WorkerState.CLOSED

    async def _kill(self) -> None:
        await self.close(graceful=False)

    def _failed(self, quiet: bool) -> None:
        if not quiet:
            log.debug("worker %s stderr tail: %s", self.id, self.stderr_tail[-2000:])
        if self.on_failure is not None:
            self.on_failure(self)

    # -- exchanges ----------------------------------------------------------------------------

    def run_turn(
        self, content: UserContent, *, idle_timeout_s: float | None = None
    ) -> AsyncIterator[CliEvent | TurnResult]:
        """Send one prompt; iterate the events of exactly that turn, ending with its `TurnResult`.

        The prompt is written at once. If the caller stops iterating early the turn keeps running
        in the CLI and the worker stays `BUSY` until `finish_abandoned_turn` settles it.
        """
        return self._exchange.run_turn(self._prompt_line(content),
                                       idle_timeout_s or self.timeouts.turn_idle_timeout_s)

    @staticmethod
    def _prompt_line(content: UserContent) -> bytes:
        # Marked as text: a prompt reaches the model exactly and never runs as a slash command.
        return encode_user_message(content)

    @staticmethod
    def _ran_command(event: ResultEvent) -> str | None:
        # A turn that ran a command says which (`local_command`), even one the prompt's marker should
        # have kept from running: the process state may have changed, so the worker is not reused.
        return local_command(event)

    async def set_model(self, model: str | None) -> str:
        """Switch the model for the next turns (None: the CLI's default); returns the model in force."""
        # The real CLI (2.1.328) checks a model new to its process with one small model call
        # (``max_tokens: 1``) before it answers; the gateway lets a leased worker make it meanwhile
        # (`in_model_switch`), billed to the lease's request. The reset's own restore holds no lease.
        self._model_switching = True
        try:
            return await self._exchange.set_model(model)
        finally:
            self._model_switching = False

    async def set_effort(self, effort: str | None) -> str:
        """Switch the effort for the next turns (None: the profile's); returns the effort in force.
        The reset restores the profile's (a process setting survives ``/clear``)."""
        return await self._exchange.set_effort(effort)

    async def interrupt(self) -> None:
        """Ask the CLI to stop the running turn. Its ``result`` (``is_error``) still arrives through
        the turn's iterator; returns once the CLI acknowledged. No-op when no turn runs."""
        await self._exchange.interrupt()

    async def finish_abandoned_turn(self) -> TurnResult | None:
        """Settle a turn whose consumer went away: interrupt it and drain to its result.

        On failure, cancellation included, the worker is poisoned: it must be closed.
        """
        return await self._exchange.finish_abandoned_turn()

    async def reset(self) -> None:
        """Forget the conversation with ``/clear``, restore the profile's model, and check that every
        process setting the CLI reports is as it was at start.

        On any failure, cancellation included, the worker is poisoned and must be closed: a worker
        whose reset is unconfirmed may still hold the last tenant's context or settings.
        """
        await self._exchange.reset()
        workspace = self._confinement.workspace if self._confinement is not None else None
        if workspace is not None and self.pid is not None:
            # What the last lease left running and wrote: the next tenant finds none of it. After the
            # /clear, so a tool an interrupt cut short, still starting a process then, is done by now.
            await workspace.clean(self.pid, self.timeouts.remove_dirs_timeout_s)
        elif self._process.cwd is not None:
            # Unsandboxed: no tool's files to chase, but a request's input files are its lease's alone.
            await empty_cwd(self._process.cwd, self.timeouts.remove_dirs_timeout_s)

    def process_ids(self) -> list[int]:
        """The worker's processes: the CLI alone, or with a sandbox its whole tree (walked each time,
        since a pid kept past its process's end could name someone else's)."""
        if self.pid is None:
            return []
        return process_tree(self.pid) if self._confinement is not None else [self.pid]

    @property
    def workspace_killed(self) -> int:
        """Processes the leases of this (sandboxed) worker left behind, killed at its resets."""
        workspace = self._confinement.workspace if self._confinement is not None else None
        return workspace.killed if workspace is not None else 0

    def measure_memory(self) -> int | None:
        """Refresh the PSS and RSS of the worker's process tree; return the PSS."""
        if self.pid is not None and self.is_alive():
            memory = tree_memory(self.pid)
            if memory is not None:
                self.pss_bytes, self.rss_bytes = memory.pss_bytes, memory.rss_bytes
        return self.pss_bytes
