"""The stream-json exchange (pool/exchange.py) over an in-memory transport: no process, no CLI.

`MemoryTransport` records every line written and hands it to a scripted CLI, which answers by
queueing lines to read; the tests drive an `Exchange` through it (issue 11)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from claudepool.errors import ResetFailed, TurnStalled, WorkerBusy, WorkerDied, WorkerProtocolError
from claudepool.pool.exchange import Exchange, TurnResult, WorkerState
from claudepool.pool.timeouts import WorkerTimeouts
from claudepool.protocol.cli_events import CliEvent
from tests.helpers import collect, until

FAST = WorkerTimeouts(ready_timeout_s=2, turn_idle_timeout_s=2, interrupt_timeout_s=0.5, reset_timeout_s=1)


class MemoryTransport:
    """A `Transport` without a process."""

    def __init__(self, respond: Callable[[MemoryTransport, dict[str, Any]], None]) -> None:
        self.written: list[dict[str, Any]] = []
        self.stdin_open = True
        self.exit_code: int | None = 0
        self._respond = respond
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()

    def write(self, line: bytes) -> None:
        if not self.stdin_open:
            raise BrokenPipeError("stdin closed")
        assert line.endswith(b"\n")
        obj = orjson.loads(line)
        self.written.append(obj)
        self._respond(self, obj)

    async def drain(self) -> None:
        if not self.stdin_open:
            raise ConnectionResetError("stdin closed")

    async def read_lines(self) -> AsyncIterator[bytes]:
        while (line := await self._out.get()) is not None:
            yield line

    async def wait_exit(self, timeout_s: float) -> int | None:
        return self.exit_code

    def emit(self, obj: dict[str, Any]) -> None:
        self.emit_raw(orjson.dumps(obj))

    def emit_raw(self, line: bytes) -> None:
        self._out.put_nowait(line)

    def end(self) -> None:
        self._out.put_nowait(None)

    def lines_of(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.written if obj["type"] == kind]


class ScriptedCli:
    """Answers as the CLI does (DESIGN.md part 2), with a few knobs for faults."""

    def __init__(self) -> None:
        self.model = "model-a"
        self.effort = "low"
        self.effective: dict[str, Any] = {}
        self.total_cost_usd = 0.0
        self.turn_costs_usd = [0.01, 0.03, 0.005]
        self.session = 0
        self.unanswered: set[str] = set()  # control subtypes left without a response
        self.held: list[tuple[str, dict[str, Any]]] = []  # (request id, request) of those
        self.running = False

    def __call__(self, t: MemoryTransport, obj: dict[str, Any]) -> None:
        if obj["type"] == "control_request":
            request = obj["request"]
            if request["subtype"] in self.unanswered:
                self.held.append((obj["request_id"], request))
                return
            self.answer(t, obj["request_id"], request)
        elif obj["type"] == "user":
            content = obj["message"]["content"]
            if content == "/clear":
                self.session += 1
                self.total_cost_usd = 0.0
                t.emit({"type": "conversation_reset", "new_conversation_id": f"s-{self.session}"})
                t.emit(self.init())
                t.emit({"type": "result", "subtype": "success", "is_error": False, "result": "",
                        "session_id": f"s-{self.session}", "local_command": "clear",
                        "total_cost_usd": self.total_cost_usd})
                return
            t.emit(self.init())
            if content == "hang":
                self.running = True
                t.emit({"type": "assistant", "message": {"content": [{"type": "text", "text": "wor"}]}})
                return
            self.total_cost_usd += self.turn_costs_usd.pop(0)
            t.emit({"type": "assistant", "message": {"content": [{"type": "text", "text": f"re: {content}"}],
                                                     "usage": {"input_tokens": 7, "cache_read_input_tokens": 900,
                                                               "output_tokens": 3}}})
            t.emit({"type": "result", "subtype": "success", "is_error": False, "result": f"re: {content}",
                    "session_id": f"s-{self.session}", "total_cost_usd": self.total_cost_usd,
                    "usage": {"input_tokens": 7, "output_tokens": 3}})

    def answer(self, t: MemoryTransport, request_id: str, request: dict[str, Any]) -> None:
        body: dict[str, Any] = {}
        if request["subtype"] == "get_settings":
            body = {"applied": {"model": self.model, "effort": self.effort}, "effective": dict(self.effective)}
        elif request["subtype"] == "apply_flag_settings":
            # As the real CLI: a level set this way is named in ``effective``; null is the default.
            level = request["settings"]["effortLevel"]
            self.effort = level or "medium"
            self.effective = {"effortLevel": level} if level else {}
        elif request["subtype"] == "set_model":
            self.model = request["model"] or "model-a"
            body = {"model": self.model}
        elif request["subtype"] == "interrupt" and self.running:
            self.running = False
            t.emit({"type": "result", "subtype": "error_during_execution", "is_error": True,
                    "session_id": f"s-{self.session}", "total_cost_usd": self.total_cost_usd})
        t.emit({"type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": body}})

    def init(self) -> dict[str, Any]:
        return {"type": "system", "subtype": "init", "session_id": f"s-{self.session}", "model": self.model,
                "cwd": "/w", "tools": [], "permissionMode": "default"}


class Harness:
    def __init__(self) -> None:
        self.cli = ScriptedCli()
        self.transport = MemoryTransport(self.cli)
        self.failures: list[bool] = []
        self.kills = 0
        self.exchange = Exchange("mem-1", self.transport, FAST, kill=self.kill, on_failure=self.failures.append)

    async def kill(self) -> None:
        self.kills += 1
        self.transport.stdin_open = False
        self.transport.end()

    async def start(self) -> Exchange:
        self.exchange.start_reading()
        await self.exchange.handshake()
        return self.exchange


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    h.exchange.begin_close(WorkerDied("test over"))
    h.transport.end()
    await h.exchange.stop_reading(1.0)


async def turn(ex: Exchange, text: str) -> tuple[list[CliEvent], TurnResult]:
    return await collect(ex.run_turn(orjson.dumps({"type": "user", "message": {"role": "user", "content": text}})
                                     + b"\n", FAST.turn_idle_timeout_s), timeout_s=5)


async def drain(events: AsyncIterator[CliEvent | TurnResult]) -> None:
    async for _ in events:
        pass


async def test_handshake_turns_and_reset_meter_cost_as_deltas(harness: Harness) -> None:
    settled: list[TurnResult] = []
    ex = await harness.start()
    ex.on_result = settled.append
    assert ex.state is WorkerState.IDLE
    assert [o["request"]["subtype"] for o in harness.transport.lines_of("control_request")] == [
        "initialize", "get_settings"]
    assert ex.started_applied["model"] == "model-a"

    _, first = await turn(ex, "one")
    _, second = await turn(ex, "two")
    assert (first.text, second.text) == ("re: one", "re: two")
    # The CLI reports 0.01 then 0.04 (cumulative); each turn is billed its own part.
    assert first.cost_usd == pytest.approx(0.01)
    assert second.cost_usd == pytest.approx(0.03)
    assert (ex.turns, ex.dirty, ex.context_tokens, ex.model) == (2, True, 907, "model-a")

    await ex.reset()
    assert (ex.state, ex.dirty, ex.resets, ex.session_id, ex.context_tokens) == (WorkerState.IDLE, False, 1, "s-1", 0)
    _, third = await turn(ex, "three")
    assert third.cost_usd == pytest.approx(0.005)  # from the reset's zero, not from 0.04
    assert settled == [first, second, third]


async def test_control_responses_find_their_requests_by_id_in_any_order(harness: Harness) -> None:
    ex = await harness.start()
    harness.cli.unanswered.add("set_model")
    first = asyncio.ensure_future(ex.set_model("model-x"))
    second = asyncio.ensure_future(ex.set_model("model-y"))
    await until(lambda: len(harness.cli.held) == 2)
    assert harness.cli.held[0][0] != harness.cli.held[1][0]
    for request_id, request in reversed(harness.cli.held):
        harness.cli.answer(harness.transport, request_id, request)
    assert await asyncio.wait_for(first, 2) == "model-x"
    assert await asyncio.wait_for(second, 2) == "model-y"
    assert ex.pending_controls == 0


async def test_a_second_exchange_while_one_runs_is_refused_before_any_write(harness: Harness) -> None:
    ex = await harness.start()
    ex.run_turn(b'{"type":"user","message":{"role":"user","content":"hang"}}\n', 5)
    with pytest.raises(WorkerBusy):
        ex.run_turn(b'{"type":"user","message":{"role":"user","content":"two"}}\n', 5)
    with pytest.raises(WorkerBusy):
        await ex.reset()
    assert [o["message"]["content"] for o in harness.transport.lines_of("user")] == ["hang"]


async def test_eof_fails_every_waiter_with_the_same_error_at_once(harness: Harness) -> None:
    ex = await harness.start()
    harness.cli.unanswered.add("set_model")
    events = ex.run_turn(b'{"type":"user","message":{"role":"user","content":"hang"}}\n', 5)
    assert isinstance(await anext(events), CliEvent)  # system/init: the turn is under way
    control = asyncio.ensure_future(ex.set_model("model-x"))
    await until(lambda: ex.pending_controls == 1)
    harness.transport.exit_code = 3
    harness.transport.end()
    with pytest.raises(WorkerDied, match="exited with code 3") as in_turn:
        await asyncio.wait_for(drain(events), 2)
    with pytest.raises(WorkerDied) as in_control:
        await asyncio.wait_for(control, 2)
    assert in_turn.value is in_control.value is ex.failure
    assert harness.failures == [False]  # heard once, and logged


async def test_a_permission_request_from_the_cli_is_refused(harness: Harness) -> None:
    await harness.start()
    harness.transport.emit({"type": "control_request", "request_id": "cli-7",
                            "request": {"subtype": "can_use_tool", "tool_name": "Bash"}})
    await until(lambda: any(o["response"]["request_id"] == "cli-7"
                            for o in harness.transport.lines_of("control_response")))
    (answer,) = harness.transport.lines_of("control_response")
    assert answer["response"]["subtype"] == "error"


async def test_a_corrupt_line_poisons_with_a_protocol_error(harness: Harness) -> None:
    ex = await harness.start()
    events = ex.run_turn(b'{"type":"user","message":{"role":"user","content":"hang"}}\n', 5)
    await anext(events)
    harness.transport.emit_raw(b"{not json")
    with pytest.raises(WorkerProtocolError):
        await asyncio.wait_for(drain(events), 2)
    assert isinstance(ex.failure, WorkerProtocolError)


async def test_reset_restores_the_model_a_request_set(harness: Harness) -> None:
    ex = await harness.start()
    assert await ex.set_model("model-other") == "model-other"
    await ex.reset()
    set_models = [o["request"] for o in harness.transport.lines_of("control_request")
                  if o["request"]["subtype"] == "set_model"]
    assert set_models == [{"subtype": "set_model", "model": "model-other"}, {"subtype": "set_model", "model": None}]
    assert harness.cli.model == "model-a"
    assert ex.failure is None


async def test_reset_restores_the_effort_a_request_set(harness: Harness) -> None:
    harness.exchange._default_effort = "low"  # the profile's --effort, as the CLI started with it
    ex = await harness.start()
    assert await ex.set_effort("high") == "high"
    await ex.reset()
    applied = [o["request"] for o in harness.transport.lines_of("control_request")
               if o["request"]["subtype"] == "apply_flag_settings"]
    assert applied == [{"subtype": "apply_flag_settings", "settings": {"effortLevel": "high"}},
                       {"subtype": "apply_flag_settings", "settings": {"effortLevel": "low"}}]
    assert harness.cli.effort == "low"
    # the restored level is named in ``effective`` where the spawn's was not: still as at start
    assert harness.cli.effective == {"effortLevel": "low"} and ex.failure is None
    await ex.reset()  # nothing switched since: no restore, and the check still passes
    assert len([o for o in harness.transport.lines_of("control_request")
                if o["request"]["subtype"] == "apply_flag_settings"]) == 2 and ex.failure is None


async def test_an_effort_the_cli_did_not_take_is_an_error(harness: Harness) -> None:
    ex = await harness.start()
    harness.cli.unanswered = set()
    original = harness.cli.answer

    def ignoring(t: MemoryTransport, request_id: str, request: dict[str, Any]) -> None:
        if request["subtype"] == "apply_flag_settings":  # the CLI ignores a level it does not know
            request = {**request, "subtype": "ignored"}
        original(t, request_id, request)

    harness.cli.answer = ignoring  # type: ignore[method-assign]
    with pytest.raises(WorkerProtocolError, match="effort 'high' asked, 'low' in force"):
        await ex.set_effort("high")


async def test_reset_refuses_a_process_setting_changed_since_start(harness: Harness) -> None:
    ex = await harness.start()
    harness.cli.effort = "high"  # as a slash command in a prompt could have done
    with pytest.raises(ResetFailed, match="effort"):
        await ex.reset()
    assert isinstance(ex.failure, ResetFailed)
    with pytest.raises(ResetFailed):
        ex.run_turn(b'{"type":"user","message":{"role":"user","content":"two"}}\n', 5)  # sticky


async def test_watchdog_interrupts_a_stalled_turn_and_the_exchange_goes_on(harness: Harness) -> None:
    ex = await harness.start()
    with pytest.raises(TurnStalled, match="interrupted"):
        await collect(ex.run_turn(b'{"type":"user","message":{"role":"user","content":"hang"}}\n', 0.2), 5)
    assert harness.kills == 0
    assert ex.state is WorkerState.IDLE and ex.failure is None
    assert [o["request"]["subtype"] for o in harness.transport.lines_of("control_request")][-1] == "interrupt"


async def test_watchdog_kills_when_the_interrupt_is_not_answered(harness: Harness) -> None:
    ex = await harness.start()
    harness.cli.unanswered.add("interrupt")
    with pytest.raises(TurnStalled, match="killed"):
        await collect(ex.run_turn(b'{"type":"user","message":{"role":"user","content":"hang"}}\n', 0.2), 5)
    assert harness.kills == 1
    assert isinstance(ex.failure, TurnStalled)
    assert harness.failures == [True]  # the watchdog's kill is not logged as a crash


async def test_a_closed_stdin_is_the_sticky_failure(harness: Harness) -> None:
    ex = await harness.start()
    harness.transport.stdin_open = False
    with pytest.raises(WorkerDied, match="no open stdin"):
        ex.run_turn(b'{"type":"user","message":{"role":"user","content":"one"}}\n', 5)
    ex.begin_close(WorkerDied("closed"))
    with pytest.raises(WorkerDied, match=r"^closed$"):
        await ex.set_model(None)
