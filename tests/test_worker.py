"""Worker on the fake CLI: lifecycle, turns, reset, interrupt, watchdog, faults and cancellation."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import psutil
import pytest

from claudepool.errors import (
    CorruptFrame,
    FrameTooLarge,
    ResetFailed,
    TurnStalled,
    WorkerBusy,
    WorkerDied,
    WorkerProtocolError,
    WorkerStartError,
)
from claudepool.pool.profile import Profile
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.pool.worker import TurnResult, Worker, WorkerState
from claudepool.protocol.cli_events import CliEvent, StreamEvent, SystemInit
from tests.helpers import collect, pid_gone, until

FAST = WorkerTimeouts(
    ready_timeout_s=5.0,
    turn_idle_timeout_s=5.0,
    interrupt_timeout_s=2.0,
    reset_timeout_s=2.0,
    close_eof_timeout_s=1.0,
    close_term_timeout_s=1.0,
    close_kill_timeout_s=2.0,
)


async def run(worker: Worker, prompt: str, **kw: float) -> tuple[list[CliEvent], TurnResult]:
    return await collect(worker.run_turn(prompt, **kw), timeout_s=10)


@pytest.fixture
async def make_worker(tmp_path: Path) -> AsyncIterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def make(profile: Profile, **kw: object) -> Worker:
        kw.setdefault("timeouts", FAST)
        w = Worker(profile, workdir_root=tmp_path / "workers", **kw)  # type: ignore[arg-type]
        workers.append(w)
        return w

    yield make
    for w in workers:
        await w.close(graceful=False)


def user_lines(log: Path) -> list[str]:
    if not log.exists():
        return []
    out = []
    for line in log.read_bytes().splitlines():
        obj = orjson.loads(line)
        if obj.get("type") == "user":
            out.append(obj["message"]["content"])
    return out


def state(w: Worker) -> WorkerState:
    """Read the state afresh (keeps mypy from narrowing across awaits)."""
    return w.state


async def test_start_turn_close_lifecycle(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    assert w.state is WorkerState.IDLE
    assert w.pid is not None
    assert psutil.Process(w.pid).is_running()
    home = Path(w.profile.environ(home=Path("/x"), tmpdir=Path("/y"))["HOME"])
    assert home == Path("/x")
    events, result = await run(w, "hello [[reply:HELLO WORLD]]")
    assert result.text == "HELLO WORLD"
    assert not result.is_error
    assert result.usage.output_tokens > 0
    assert any(isinstance(e, SystemInit) for e in events)
    deltas = "".join(t for e in events if isinstance(e, StreamEvent) and (t := e.text_delta()))
    assert deltas == "HELLO WORLD"
    assert w.turns == 1
    assert w.dirty
    assert "pid=" in repr(w)
    assert "idle" in repr(w)
    assert w.home is not None
    workdir = w.home.parent
    pid = w.pid
    await w.close()
    assert state(w) is WorkerState.CLOSED
    assert pid_gone(pid)
    assert not workdir.exists()
    assert w.returncode == 0  # EOF while idle: a clean exit, no signal needed


async def test_private_dirs_and_scrubbed_env(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-daemon-secret")
    monkeypatch.setenv("CLAUDEPOOL_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    w = make_worker(make_fake_profile(env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:1"}))
    await w.start()
    _, result = await run(w, "[[env]]")
    env = orjson.loads(result.text)
    assert "sk-daemon-secret" not in result.text
    assert "admin-secret" not in result.text
    assert "NOTIFY_SOCKET" not in env
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1"
    assert env["CLAUDE_CODE_DISABLE_AUTO_MEMORY"] == "1"
    assert env["CLAUDE_CODE_DISABLE_CLAUDE_MDS"] == "1"
    assert env["DISABLE_AUTOUPDATER"] == "1"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "2"
    home, tmp = Path(env["HOME"]), Path(env["TMPDIR"])
    assert home.is_dir()
    assert tmp.is_dir()
    assert home.parent == tmp.parent
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    _, cwd_result = await run(w, "[[cwd]]")
    assert Path(cwd_result.text).parent == home.parent
    await w.close()
    assert not home.parent.exists()


class Issued:
    """A `WorkerCredentials` that records what it was asked (the gateway's registry is tested in
    tests/test_gateway.py)."""

    def __init__(self) -> None:
        self.issued: list[Worker] = []
        self.revoked: list[tuple[Worker, WorkerState]] = []

    def issue(self, worker: Worker) -> dict[str, str]:
        self.issued.append(worker)
        return {"ANTHROPIC_BASE_URL": "http://127.0.0.1:2", "ANTHROPIC_API_KEY": f"cpw-for-{worker.id}"}

    def revoke(self, worker: Worker) -> None:
        self.revoked.append((worker, worker.state))


async def test_with_credentials_the_worker_holds_its_own_and_no_upstream_variable_of_the_profile(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    credentials = Issued()
    profile = make_fake_profile(env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:1", "ANTHROPIC_API_KEY": "sk-ant-real",
                                     "ANTHROPIC_AUTH_TOKEN": "tok", "CLAUDE_CODE_USE_BEDROCK": "1",
                                     "ANTHROPIC_MODEL": "kept"})
    w = make_worker(profile, credentials=credentials)
    await w.start()
    _, result = await run(w, "[[env]]")
    env = orjson.loads(result.text)
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:2"
    assert env["ANTHROPIC_API_KEY"] == f"cpw-for-{w.id}"
    assert "sk-ant-real" not in result.text
    assert "ANTHROPIC_AUTH_TOKEN" not in env and "CLAUDE_CODE_USE_BEDROCK" not in env
    assert env["ANTHROPIC_MODEL"] == "kept"  # not an upstream variable
    assert credentials.issued == [w] and credentials.revoked == []
    await w.close()
    # Revoked first, as the close begins: nothing left in the process tree can use it.
    assert credentials.revoked == [(w, WorkerState.IDLE)]
    # Without credentials the profile's variables are used as they are (a pool used on its own).
    direct = make_worker(profile)
    await direct.start()
    _, result = await run(direct, "[[env]]")
    assert orjson.loads(result.text)["ANTHROPIC_API_KEY"] == "sk-ant-real"
    await direct.close()


async def test_a_worker_that_fails_to_start_gives_its_credential_back(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    credentials = Issued()
    w = make_worker(make_fake_profile("exit_at_start"), credentials=credentials)
    with pytest.raises(WorkerStartError):
        await w.start()
    assert credentials.issued == [w]
    assert [worker for worker, _ in credentials.revoked] == [w]


async def test_cost_is_metered_as_delta_since_reset(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    _, r1 = await run(w, "first question " * 20)
    _, r2 = await run(w, "second")
    # The CLI reports cumulative totals; each TurnResult holds only its own turn's cost.
    assert r1.cost_usd > 0
    assert r2.cost_usd > 0
    assert r2.cost_usd != pytest.approx(r1.cost_usd + r2.cost_usd)
    # The second turn's input includes the first turn's history, so it costs more input tokens.
    assert r2.usage.input_tokens > r1.usage.input_tokens
    assert r2.context_tokens > r1.context_tokens
    await w.reset()
    _, r3 = await run(w, "second")
    assert r3.usage.input_tokens < r2.usage.input_tokens
    assert r3.cost_usd < r2.cost_usd


async def test_reset_forgets_the_conversation(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    await run(w, "remember SECRET-ALPHA-42")
    _, without_reset = await run(w, "[[echo]]")
    # Control: without a reset the secret is in the model's view; the check below can fail.
    assert "SECRET-ALPHA-42" in without_reset.text
    old_session = w.session_id
    await w.reset()
    assert not w.dirty
    assert w.session_id != old_session
    assert w.context_tokens == 0
    assert w.resets == 1
    _, after = await run(w, "[[echo]]")
    assert "SECRET-ALPHA-42" not in after.text


async def test_api_error_is_an_error_despite_success_subtype(
    make_worker: Callable[..., Worker], fake_profile: Profile
) -> None:
    w = make_worker(fake_profile)
    await w.start()
    _, r = await run(w, "boom [[api_error:529]]")
    assert r.subtype == "success"
    assert r.is_error
    assert r.terminal_reason == "api_error"
    assert r.api_error_status == 529


async def test_never_writes_a_second_user_line_while_a_turn_runs(
    make_worker: Callable[..., Worker], fake_profile: Profile, fake_log: Path
) -> None:
    w = make_worker(fake_profile)
    await w.start()
    turn = w.run_turn("slow [[sleep:0.5]]")
    with pytest.raises(WorkerBusy):
        w.run_turn("second prompt")
    with pytest.raises(WorkerBusy):
        await w.reset()
    results = [item async for item in turn if isinstance(item, TurnResult)]
    assert len(results) == 1
    assert "second prompt" not in results[0].text
    assert user_lines(fake_log) == ["slow [[sleep:0.5]]"]


async def test_fake_merges_lines_queued_during_a_turn(fake_profile: Profile, tmp_path: Path) -> None:
    """Fidelity of the fake: why the worker must never write during a turn."""
    proc = await asyncio.create_subprocess_exec(
        *fake_profile.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env=fake_profile.environ(home=tmp_path, tmpdir=tmp_path),
    )
    assert proc.stdin is not None
    assert proc.stdout is not None

    def line(text: str) -> bytes:
        return orjson.dumps({"type": "user", "message": {"role": "user", "content": text}}) + b"\n"

    proc.stdin.write(line("one [[sleep:0.5]]"))
    async with asyncio.timeout(10):
        while orjson.loads(await proc.stdout.readline())["type"] != "system":
            pass
    # The first turn is running: these two are queued and become one turn.
    proc.stdin.write(line("two") + line("three"))
    await proc.stdin.drain()
    results: list[str] = []
    async with asyncio.timeout(10):
        while len(results) < 2:
            obj = orjson.loads(await proc.stdout.readline())
            if obj["type"] == "result":
                results.append(obj["result"])
    proc.stdin.close()
    await proc.wait()
    assert results[0].startswith("ok: one")
    assert "two" in results[1]
    assert "three" in results[1]


async def test_interrupt_ends_the_turn_with_an_error_result(
    make_worker: Callable[..., Worker], fake_profile: Profile
) -> None:
    w = make_worker(fake_profile)
    await w.start()
    items: list[CliEvent | TurnResult] = []

    async def consume() -> None:
        async for item in w.run_turn("[[hang]]"):
            items.append(item)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        while not any(isinstance(i, StreamEvent) and i.text_delta() for i in items):
            await asyncio.sleep(0.01)
        await w.interrupt()
        await task
    result = items[-1]
    assert isinstance(result, TurnResult)
    assert result.is_error
    assert result.subtype == "error_during_execution"
    assert w.state is WorkerState.IDLE
    await w.reset()
    _, after = await run(w, "fine now [[reply:OK]]")
    assert after.text == "OK"


async def test_watchdog_interrupts_a_stalled_turn(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    settled: list[TurnResult] = []
    w.on_result = settled.append
    with pytest.raises(TurnStalled, match="interrupted"):
        await run(w, "[[hang]]", idle_timeout_s=0.3)
    # The CLI honoured the interrupt: the worker survives, with a dirty context to reset.
    assert w.state is WorkerState.IDLE
    assert w.failure is None
    assert len(settled) == 1
    assert settled[0].interrupted
    await w.reset()


async def test_watchdog_kills_a_worker_that_ignores_the_interrupt(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("ignore_interrupt"))
    await w.start()
    pid = w.pid
    assert pid is not None
    with pytest.raises(TurnStalled, match="killed"):
        await run(w, "[[hang]]", idle_timeout_s=0.3)
    assert w.state is WorkerState.CLOSED
    assert pid_gone(pid)


async def test_crash_mid_turn_fails_the_turn_and_notifies(
    make_worker: Callable[..., Worker], fake_profile: Profile
) -> None:
    failed: list[Worker] = []
    w = make_worker(fake_profile, on_failure=failed.append)
    await w.start()
    with pytest.raises(WorkerDied, match="exited with code 3"):
        await run(w, "[[crash]]")
    assert failed == [w]
    assert not w.is_alive()
    with pytest.raises(WorkerDied):
        w.run_turn("again")


async def test_oversize_line_poisons_the_worker(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile, max_line_bytes=4096)
    await w.start()
    with pytest.raises(WorkerProtocolError, match="exceeds the limit"):
        await run(w, "[[huge:20000]]")
    assert isinstance(w.failure, WorkerProtocolError)
    assert isinstance(w.failure.__cause__, FrameTooLarge)


async def test_line_just_under_the_limit_is_accepted(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile, max_line_bytes=64 * 1024)
    await w.start()
    _, r = await run(w, "[[huge:50000]] [[reply:fine]]")
    assert r.text == "fine"


async def test_garbage_line_poisons_the_worker(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    with pytest.raises(WorkerProtocolError, match="not valid JSON"):
        await run(w, "[[garbage]]")
    assert isinstance(w.failure, WorkerProtocolError)
    assert isinstance(w.failure.__cause__, CorruptFrame)


async def test_slow_start_within_deadline(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("slow_start=0.5"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await w.start()
    assert loop.time() - t0 >= 0.5
    assert w.is_idle()


async def test_never_ready_fails_start_and_leaves_nothing(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile], tmp_path: Path
) -> None:
    timeouts = WorkerTimeouts(ready_timeout_s=0.5, close_eof_timeout_s=0.5, close_term_timeout_s=0.5)
    w = make_worker(make_fake_profile("never_ready"), timeouts=timeouts)
    with pytest.raises(WorkerStartError, match="readiness"):
        await w.start()
    assert w.pid is not None
    assert pid_gone(w.pid)
    assert list((tmp_path / "workers").iterdir()) == []


async def test_exit_at_start_reports_stderr(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("exit_at_start"))
    with pytest.raises(WorkerStartError, match="exit_at_start"):
        await w.start()


async def test_missing_binary_is_a_start_error(make_worker: Callable[..., Worker], tmp_path: Path) -> None:
    w = make_worker(Profile(claude_bin=str(tmp_path / "no-such-claude")))
    with pytest.raises(WorkerStartError, match="cannot execute"):
        await w.start()


async def test_close_escalates_to_sigkill_when_sigterm_is_ignored(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    timeouts = WorkerTimeouts(close_eof_timeout_s=0.3, close_term_timeout_s=0.3, close_kill_timeout_s=2.0)
    w = make_worker(make_fake_profile("ignore_sigterm"), timeouts=timeouts)
    await w.start()
    w.run_turn("[[hang]]")  # EOF alone will not stop a process mid-turn
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await w.close()
    assert w.returncode == -signal.SIGKILL
    assert loop.time() - t0 < 3.0


async def test_close_kills_tool_subprocesses(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    _, r = await run(w, "[[child]]")
    child_pid = int(r.text.split()[1])
    assert psutil.pid_exists(child_pid)
    await w.close()
    async with asyncio.timeout(3):
        while not pid_gone(child_pid):
            await asyncio.sleep(0.02)


async def test_reset_that_hangs_poisons_the_worker(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("clear_hangs"))
    await w.start()
    await run(w, "hi")
    with pytest.raises(ResetFailed, match="in time"):
        await w.reset()
    assert isinstance(w.failure, ResetFailed)
    with pytest.raises(ResetFailed):
        w.run_turn("must not run on an unreset worker")


async def test_reset_without_conversation_reset_is_refused(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("clear_no_reset"))
    await w.start()
    with pytest.raises(ResetFailed, match="conversation_reset"):
        await w.reset()
    assert not w.is_alive()


async def test_memory_growth_is_measured(make_worker: Callable[..., Worker], fake_profile: Profile) -> None:
    w = make_worker(fake_profile)
    await w.start()
    before = w.measure_memory()
    assert before is not None
    await run(w, "[[grow:64]]")
    after = w.measure_memory()
    assert after is not None
    assert after - before > 50 * 2**20


# -- cancellation at every await -------------------------------------------------------------


async def test_cancel_during_start_kills_the_process(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile], tmp_path: Path
) -> None:
    w = make_worker(make_fake_profile("slow_start=5"))
    task = asyncio.create_task(w.start())
    async with asyncio.timeout(3):
        while w.pid is None:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pid_gone(w.pid)
    assert w.state is WorkerState.CLOSED
    assert list((tmp_path / "workers").iterdir()) == []


async def test_cancelled_consumer_leaves_a_turn_that_can_be_settled(
    make_worker: Callable[..., Worker], fake_profile: Profile
) -> None:
    w = make_worker(fake_profile)
    await w.start()
    settled: list[TurnResult] = []
    w.on_result = settled.append

    async def consume() -> None:
        async for _ in w.run_turn("[[hang]]"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert w.in_turn()
    result = await w.finish_abandoned_turn()
    assert result is not None
    assert result.interrupted
    assert settled == [result]
    await w.reset()
    assert w.is_idle()


async def test_abandoned_iterator_leaves_the_turn_running(
    make_worker: Callable[..., Worker], fake_profile: Profile
) -> None:
    w = make_worker(fake_profile)
    await w.start()
    turn = w.run_turn("[[sleep:0.3]] long answer")
    async for _item in turn:
        break  # the client went away after the first event
    await turn.aclose()  # type: ignore[attr-defined]
    assert w.in_turn()
    result = await w.finish_abandoned_turn()
    assert result is not None
    await w.reset()


async def test_cancel_during_reset_poisons_the_worker(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("clear_hangs"))
    await w.start()
    task = asyncio.create_task(w.reset())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(w.failure, ResetFailed)


async def test_cancel_during_interrupt_keeps_state_consistent(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    w = make_worker(make_fake_profile("ignore_interrupt"))
    await w.start()
    w.run_turn("[[hang]]")
    task = asyncio.create_task(w.interrupt())
    await until(lambda: w.pending_controls == 1)  # cancelled while its control request is unanswered
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert w.in_turn()
    assert w.pending_controls == 0


async def test_cancel_during_close_still_closes(
    make_worker: Callable[..., Worker], make_fake_profile: Callable[..., Profile]
) -> None:
    timeouts = WorkerTimeouts(close_eof_timeout_s=0.3, close_term_timeout_s=0.3)
    w = make_worker(make_fake_profile("ignore_sigterm"), timeouts=timeouts)
    await w.start()
    w.run_turn("[[hang]]")
    pid = w.pid
    assert pid is not None
    task = asyncio.create_task(w.close())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert w.state is WorkerState.CLOSING
    await w.close()  # joins the close that kept running
    assert state(w) is WorkerState.CLOSED
    assert pid_gone(pid)
