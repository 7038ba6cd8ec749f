#!/usr/bin/env python3
"""A protocol-faithful fake of `claude -p --input-format stream-json --output-format stream-json`.

It reproduces the behaviours of the real CLI (2.1.328) that claudepool relies on, as measured in
DESIGN.md part 2, without a model or network, and adds fault modes. Standard library only, so it
starts in ~30 ms.

Faithful behaviours
  * nothing is printed until the first message; ``system/init`` precedes every turn
  * ``control_request``/``initialize`` gets a ``control_response`` (the ready signal)
  * user lines written while a turn runs are queued and merged into one next turn
  * ``/clear`` (also ``/reset``, ``/new``) emits ``conversation_reset`` with a new session id, then a
    ``result`` with ``local_command: "clear"``; history and cumulative cost are forgotten
  * a line whose text (a string, or the last text block) starts with ``/NAME`` runs command NAME,
    unless the line carries ``text_not_typed: true``; ``/model X``, ``/effort X`` and
    ``/output-style X`` change process settings that survive ``/clear``; ``/heapdump`` writes a 2 MiB
    file into HOME; other listed commands just answer; an unknown NAME is a prompt. A command's ``result`` names it in
    ``local_command`` and costs nothing
  * ``set_model`` (a control request; ``model`` null = the default) answers the model in force;
    ``get_settings`` answers the settings in force (``applied``: model, effort); ``apply_flag_settings``
    with ``effortLevel`` changes the effort as the real CLI does (see `apply_effort`)
  * ``interrupt`` stops a running turn: ``result`` with ``is_error`` and ``error_during_execution``
  * an upstream failure ends as ``subtype: "success", is_error: true, terminal_reason: "api_error"``
    and the failed prompt stays in the history
  * ``total_cost_usd`` is cumulative since the last reset; ``usage`` is this turn's
  * a line that is not JSON, a user line without ``message.role``, or a ``control_request`` without
    ``request`` kills the process (exit 1, no result); unknown control subtypes answer an error
  * stdin EOF when idle exits 0 (1 if the last result was an error); EOF mid-turn finishes the turn
  * SIGTERM exits 143 without a result; SIGINT mid-turn acts like an interrupt

Per-turn directives, in the prompt text
  [[reply:TEXT]]   answer TEXT             [[echo]]          answer with the whole conversation
  [[api_error:529]] fail like the upstream [[sleep:S]]       take S seconds, streaming as it goes
  [[api_retry:529,none]] report an upstream retry per status (``none``: no status), then go on
  [[hang]]         stream a little, then never finish (until interrupted)
  [[crash]]        stream a little, then exit 3 mid-turn
  [[huge:N]]       print one line of N bytes                 [[garbage]]  print a non-JSON line
  [[grow:MB]]      allocate and keep MB of memory            [[child]]    spawn a sleeping grandchild
  [[env]]          answer with the environment as JSON       [[cwd]]      answer with the cwd
  [[system]]       answer with the ``--system-prompt`` it was started with (``<none>`` without one)
  [[settings]]     answer with the model and effort in force, as JSON
  [[tool:Bash:CMD]] call a tool first, as the real CLI does when the model asks for one: a
                   ``tool_use`` assistant message (after its ``stream_event``s), then the tool's
                   ``tool_result`` user message. Bash runs CMD (``bash -c`` in a process group of
                   its own, killed with what it left behind when it ends or the turn is
                   interrupted): stdout then stderr, bytes that are not UTF-8 replaced by U+FFFD,
                   the last newline dropped, ``"Exit code N\n…"`` and ``is_error`` on failure.
                   Another NAME's argument is its input as a JSON object, and its result the real
                   CLI's refusal of a tool it does not have. Repeat the directive for several calls,
                   in order. The answer is then the last tool's output (unless ``[[reply:…]]``). An
                   interrupt while a tool runs gives what the real CLI gives: an ``is_error``
                   tool_result, then ``[Request interrupted by user for tool use]``, then the result

Process-wide faults, in FAKE_CLAUDE_FAULTS (comma-separated)
  slow_start=S     answer ``initialize`` only S seconds after start
  never_ready      never answer ``initialize``
  exit_at_start    exit 1 at once
  exit_at_start_if=PATH  exit 1 at once while PATH exists (a fault that can be healed)
  ignore_sigterm   ignore SIGTERM (only SIGKILL stops it)
  ignore_interrupt acknowledge nothing: ``interrupt`` requests get no answer and change nothing
  clear_hangs      accept ``/clear`` but never confirm it
  clear_no_reset   answer ``/clear`` with a result but no ``conversation_reset``
  ignore_text_not_typed  run commands even from lines marked ``text_not_typed``
  silent_commands  leave ``local_command`` out of the results of commands other than ``/clear``
  set_model_noop   answer ``set_model`` as done but change nothing
  apply_effort_noop  answer ``apply_flag_settings`` as done but change no effort

FAKE_CLAUDE_LOG=PATH appends every stdin line received, as JSON lines, for tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

DIRECTIVE = re.compile(r"\[\[(\w+)(?::([^\]]*))?\]\]")
# The real CLI's rule: "/" then a command name, at the very start of the text.
COMMAND = re.compile(r"/([a-zA-Z0-9_][a-zA-Z0-9:_-]*)(?:\s+(.*))?$", re.S)
COMMANDS = ("clear", "reset", "new", "compact", "model", "effort", "output-style", "heapdump", "config", "cost")
FAULTS: dict[str, str] = {}
for item in filter(None, os.environ.get("FAKE_CLAUDE_FAULTS", "").split(",")):
    key, _, value = item.partition("=")
    FAULTS[key.strip()] = value.strip()

PRICE_IN_USD = 3e-6
PRICE_OUT_USD = 15e-6
HOLD: list[bytearray] = []


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def log_input(line: bytes) -> None:
    path = os.environ.get("FAKE_CLAUDE_LOG")
    if path:
        with open(path, "ab") as f:
            f.write(line.rstrip(b"\n") + b"\n")


def die(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


class FakeClaude:
    def __init__(self, argv: list[str]) -> None:
        self.partial = "--include-partial-messages" in argv
        self.default_model = argv[argv.index("--model") + 1] if "--model" in argv else "claude-fake-1"
        self.system_prompt = argv[argv.index("--system-prompt") + 1] if "--system-prompt" in argv else None
        self.model = self.default_model
        self.output_style = "default"
        # As the real CLI: ``--effort`` at spawn, else its default; ``apply_flag_settings`` changes
        # it for the next turns (and, for a level it persists, names it in ``effective``).
        self.effort = argv[argv.index("--effort") + 1] if "--effort" in argv else "medium"
        self.effective: dict[str, Any] = {}
        self.started_at = time.monotonic()
        self.session_id = str(uuid.uuid4())
        self.history: list[dict[str, str]] = []
        self.cost_usd = 0.0
        self.last_error = False
        # (text, runs as a command if it is one)
        self.pending: list[tuple[str, bool]] = []
        self.turn: asyncio.Task[None] | None = None
        # The tool call running now (its id), and the process group of the command it runs.
        self.running_tool: str | None = None
        self.tool_pgid: int | None = None
        self.wakeup = asyncio.Event()
        self.eof = False
        self.initialized = False
        # Like the real CLI: transcripts under $HOME/.claude/projects/<cwd slug>/<session>.jsonl
        # unless --no-session-persistence; --resume <id> continues one.
        self.persist = "--no-session-persistence" not in argv
        if "--resume" in argv:
            self.session_id = argv[argv.index("--resume") + 1]
            path = self.transcript()
            if not path.exists():
                die(f"No conversation found with session ID: {self.session_id}")
            self.history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def transcript(self) -> Path:
        slug = re.sub(r"[^a-zA-Z0-9]", "-", os.getcwd())
        return Path(os.environ["HOME"]) / ".claude" / "projects" / slug / f"{self.session_id}.jsonl"

    def remember(self, role: str, text: str) -> None:
        entry = {"role": role, "text": text}
        self.history.append(entry)
        if self.persist:
            path = self.transcript()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    # -- input ---------------------------------------------------------------------------------

    async def read_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 30)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            log_input(line)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                die(f"Error parsing streaming input line (type=unknown, {len(line.strip())} chars): SyntaxError")
            if not isinstance(msg, dict):
                die("Error parsing streaming input line: not an object")
            await self.handle(msg)
        self.eof = True
        self.wakeup.set()

    async def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "control_request":
            request = msg.get("request")
            if not isinstance(request, dict):
                die("Error: control_request without request")
            await self.control(str(msg.get("request_id")), request)
        elif kind == "user":
            message = msg.get("message") or {}
            if message.get("role") != "user":
                die(f"Error: Expected message role 'user', got '{message.get('role', 'undefined')}'")
            content = message.get("content")
            text = content if isinstance(content, str) else "".join(
                b.get("text", "") for b in content or [] if isinstance(b, dict))
            if isinstance(content, str):
                last = content
            else:
                blocks = [b for b in content or [] if isinstance(b, dict)]
                last = blocks[-1].get("text", "") if blocks and blocks[-1].get("type") == "text" else ""
            marked = msg.get("text_not_typed") is True and "ignore_text_not_typed" not in FAULTS
            self.pending.append((text, not marked and bool(COMMAND.match(last))))
            self.wakeup.set()
        # Other types are ignored, as the real CLI does.

    async def control(self, request_id: str, request: dict[str, Any]) -> None:
        subtype = request.get("subtype")
        if subtype == "initialize":
            asyncio.get_running_loop().create_task(self.answer_initialize(request_id))
        elif subtype == "interrupt":
            if "ignore_interrupt" in FAULTS:
                return
            if self.turn is not None and not self.turn.done():
                self.turn.cancel()
            emit({"type": "control_response",
                  "response": {"subtype": "success", "request_id": request_id, "response": {"still_queued": []}}})
        elif subtype == "set_model":
            if "set_model_noop" not in FAULTS:
                model = request.get("model")
                self.model = self.default_model if model in (None, "default") else str(model)
            emit({"type": "control_response",
                  "response": {"subtype": "success", "request_id": request_id, "response": {"model": self.model}}})
        elif subtype == "get_settings":
            emit({"type": "control_response", "response": {"subtype": "success", "request_id": request_id, "response": {
                "effective": dict(self.effective), "sources": [],
                "applied": {"model": self.model, "effort": self.effort}}}})
        elif subtype == "apply_flag_settings":
            settings = request.get("settings") or {}
            if "effortLevel" in settings and "apply_effort_noop" not in FAULTS:
                self.apply_effort(settings["effortLevel"])
            emit({"type": "control_response",
                  "response": {"subtype": "success", "request_id": request_id, "response": None}})
        else:
            emit({"type": "control_response", "response": {
                "subtype": "error", "request_id": request_id,
                "error": f"Unsupported control request subtype: {subtype}", "error_code": "unsupported_request"}})

    def apply_effort(self, level: object) -> None:
        # Measured on the real CLI (2.1.328): low..xhigh are set and named in ``effective``; null
        # drops the flag (the default, not the spawn's ``--effort``); anything else, "max" included,
        # is ignored, silently.
        if level in ("low", "medium", "high", "xhigh"):
            self.effort = str(level)
            self.effective["effortLevel"] = level
        elif level is None:
            self.effort = "medium"
            self.effective.pop("effortLevel", None)

    async def answer_initialize(self, request_id: str) -> None:
        if "never_ready" in FAULTS:
            return
        delay = float(FAULTS.get("slow_start", "0")) - (time.monotonic() - self.started_at)
        if delay > 0:
            await asyncio.sleep(delay)
        self.initialized = True
        emit({"type": "control_response", "response": {
            "subtype": "success", "request_id": request_id,
            "response": {"commands": [{"name": name} for name in COMMANDS], "models": [], "account": {}}}})

    # -- turns ---------------------------------------------------------------------------------

    async def run(self) -> int:
        asyncio.get_running_loop().create_task(self.read_stdin())
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            if self.pending:
                # Everything queued while the last turn ran becomes one turn.
                prompt = "\n".join(text for text, _ in self.pending)
                command = len(self.pending) == 1 and self.pending[0][1]
                self.pending.clear()
                self.turn = asyncio.get_running_loop().create_task(
                    self.command(prompt) if command else self.one_turn(prompt))
                try:
                    await self.turn
                except asyncio.CancelledError:
                    self.finish_interrupted(prompt)
                self.turn = None
                if self.pending:
                    self.wakeup.set()
                continue
            if self.eof:
                return 1 if self.last_error else 0

    def init_event(self) -> None:
        emit({"type": "system", "subtype": "init", "cwd": os.getcwd(), "session_id": self.session_id,
              "tools": [], "mcp_servers": [], "model": self.model, "permissionMode": "default",
              "slash_commands": list(COMMANDS), "apiKeySource": "ANTHROPIC_API_KEY",
              "output_style": self.output_style, "fast_mode_state": "off", "uuid": str(uuid.uuid4())})

    async def command(self, text: str) -> None:
        found = COMMAND.match(text)
        assert found is not None
        name, arg = found.group(1), (found.group(2) or "").strip()
        if name not in COMMANDS:
            await self.one_turn(text)  # an unknown command is a prompt, as in the real CLI
            return
        if name in ("clear", "reset", "new"):
            await self.clear()
            return
        self.init_event()
        answer = f"ran /{name}"
        if name == "model" and arg:
            self.model, answer = arg, f"Set model to {arg}"
        elif name == "output-style" and arg:
            self.output_style = arg
        elif name == "effort" and arg:
            self.effort = arg
        elif name == "heapdump":
            dump = Path(os.environ["HOME"]) / f"fake-{uuid.uuid4().hex[:8]}.heapsnapshot"
            dump.write_bytes(b"\0" * (2 << 20))
        self.last_error = False
        emit({"type": "result", "subtype": "success", "is_error": False, "result": answer,
              "session_id": self.session_id, "total_cost_usd": self.cost_usd, "usage": {}, "num_turns": 0,
              "duration_ms": 1, "uuid": str(uuid.uuid4()),
              **({} if "silent_commands" in FAULTS else {"local_command": name})})

    async def one_turn(self, prompt: str) -> None:
        self.init_event()
        emit({"type": "system", "subtype": "status", "status": "requesting", "session_id": self.session_id})
        plan = {m.group(1): m.group(2) or "" for m in DIRECTIVE.finditer(prompt)}
        self.remember("user", prompt)
        for attempt, status in enumerate(filter(None, plan.get("api_retry", "").split(",")), 1):
            emit({"type": "system", "subtype": "api_retry", "attempt": attempt, "max_retries": 2,
                  "retry_delay_ms": 0, "error_status": None if status == "none" else int(status),
                  "error": "injected by the fake", "session_id": self.session_id})
        if "api_error" in plan:
            status = int(plan["api_error"] or 529)
            self.result(f"API Error: {status} injected by the fake", is_error=True, subtype="success",
                        terminal_reason="api_error", api_error_status=status, usage=(0, 0))
            return
        if "garbage" in plan:
            sys.stdout.write("this is not json {\n")
            sys.stdout.flush()
        if "huge" in plan:
            n = int(plan["huge"])
            emit({"type": "system", "subtype": "padding", "data": "x" * n})
        if "grow" in plan:
            block = bytearray(int(float(plan["grow"]) * 1024 * 1024))
            for i in range(0, len(block), 4096):
                block[i] = 1
            HOLD.append(block)
        if "child" in plan:
            child = subprocess.Popen(["sleep", "300"])
            plan["reply"] = f"child {child.pid}"
        tool_output: str | None = None
        calls = [m.group(2) or "" for m in DIRECTIVE.finditer(prompt) if m.group(1) == "tool"]
        for spec in calls:
            tool_output = await self.tool_call(spec)
        answer = tool_output if tool_output is not None and "reply" not in plan else self.answer(plan, prompt)
        pieces = [answer[i:i + 8] for i in range(0, len(answer), 8)] or [""]
        msg_id = f"msg_{uuid.uuid4().hex[:12]}"
        if self.partial:
            self.stream({"type": "message_start", "message": {"id": msg_id, "role": "assistant"}})
        sleep_s = float(plan.get("sleep", "0"))
        for i, piece in enumerate(pieces):
            if self.partial:
                self.stream({"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": piece}})
            if "crash" in plan and i == 0:
                die("fake crash mid-turn", 3)
            if "hang" in plan and i == 0:
                await asyncio.Event().wait()
            if sleep_s:
                await asyncio.sleep(sleep_s / len(pieces))
        in_tokens = self.context_tokens()
        out_tokens = max(1, math.ceil(len(answer) / 4))
        emit({"type": "assistant", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "text", "text": answer}],
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens,
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}},
            "parent_tool_use_id": None, "session_id": self.session_id})
        self.remember("assistant", answer)
        self.result(answer, is_error=False, subtype="success", terminal_reason="completed",
                    api_error_status=None, usage=(in_tokens, out_tokens), num_turns=1 + len(calls))

    async def tool_call(self, spec: str) -> str:
        """One tool call as the real CLI 2.1.328 reports it; returns the tool's output."""
        name, _, argument = spec.partition(":")
        tool_input = json.loads(argument) if name != "Bash" and argument.startswith("{") else {"command": argument}
        tool_id = f"toolu_fake_{uuid.uuid4().hex[:12]}"
        msg_id = f"msg_{uuid.uuid4().hex[:12]}"
        if self.partial:
            self.stream({"type": "message_start", "message": {"id": msg_id, "role": "assistant"}})
            self.stream({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}})
            self.stream({"type": "content_block_delta", "index": 0,
                         "delta": {"type": "input_json_delta", "partial_json": json.dumps(tool_input)}})
        emit({"type": "assistant", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}],
            "stop_reason": None, "usage": {"input_tokens": self.context_tokens(), "output_tokens": 1,
                                           "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}},
            "parent_tool_use_id": None, "session_id": self.session_id})
        if self.partial:
            self.stream({"type": "content_block_stop", "index": 0})
            self.stream({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}})
            self.stream({"type": "message_stop"})
        self.running_tool = tool_id
        if name == "Bash":
            output, is_error = await self.run_bash(str(tool_input["command"]))
        else:
            output, is_error = (f"<tool_use_error>Error: No such tool available: {name}. {name} is disabled for "
                                "this session, in subagents as well as here.</tool_use_error>"), True
        self.running_tool = None
        emit({"type": "user", "message": {"role": "user", "content": [
            {"tool_use_id": tool_id, "type": "tool_result", "content": output, "is_error": is_error}]},
            "parent_tool_use_id": None, "session_id": self.session_id, "uuid": str(uuid.uuid4()),
            "tool_use_result": {"stdout": output, "stderr": "", "interrupted": False}})
        return output

    async def run_bash(self, command: str) -> tuple[str, bool]:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            process_group=0)
        self.tool_pgid = proc.pid
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            kill_group(proc.pid)
            await proc.wait()
            raise
        finally:
            self.tool_pgid = None
        kill_group(proc.pid)  # what it left running in the background dies with the call
        text = "\n".join(part.decode("utf-8", "replace").removesuffix("\n") for part in (out, err) if part)
        if proc.returncode:
            return f"Exit code {proc.returncode}\n{text}", True
        return text, False

    def answer(self, plan: dict[str, str], prompt: str) -> str:
        if "reply" in plan:
            return plan["reply"]
        if "echo" in plan:
            return "\n".join(m["text"] for m in self.history if m["role"] == "user")
        if "env" in plan:
            return json.dumps(dict(os.environ))
        if "cwd" in plan:
            return os.getcwd()
        if "system" in plan:
            return "<none>" if self.system_prompt is None else self.system_prompt
        if "settings" in plan:
            return json.dumps({"model": self.model, "effort": self.effort})
        return f"ok: {DIRECTIVE.sub('', prompt).strip()[:40]}"

    def context_tokens(self) -> int:
        return max(1, math.ceil(sum(len(m["text"]) for m in self.history) / 4))

    def stream(self, event: dict[str, Any]) -> None:
        emit({"type": "stream_event", "event": event, "session_id": self.session_id, "parent_tool_use_id": None})

    def result(self, text: str | None, *, is_error: bool, subtype: str, terminal_reason: str,
               api_error_status: int | None, usage: tuple[int, int], num_turns: int = 1) -> None:
        self.cost_usd += usage[0] * PRICE_IN_USD + usage[1] * PRICE_OUT_USD
        self.last_error = is_error
        emit({"type": "result", "subtype": subtype, "is_error": is_error, "result": text,
              "session_id": self.session_id, "total_cost_usd": self.cost_usd,
              "usage": {"input_tokens": usage[0], "output_tokens": usage[1],
                        "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
              "terminal_reason": terminal_reason, "api_error_status": api_error_status,
              "stop_reason": "end_turn" if not is_error else None, "num_turns": num_turns,
              "duration_ms": 1, "uuid": str(uuid.uuid4())})

    def finish_interrupted(self, prompt: str) -> None:
        # The interrupted turn was billed for what the upstream already sent.
        self.cost_usd += self.context_tokens() * PRICE_IN_USD
        self.last_error = True
        marker = "[Request interrupted by user]"
        if self.running_tool is not None:
            emit({"type": "user", "message": {"role": "user", "content": [
                {"type": "tool_result", "content": "The user doesn't want to proceed with this tool use. This call "
                 "was stopped while running, not refused before it ran.", "is_error": True,
                 "tool_use_id": self.running_tool}]}, "parent_tool_use_id": None, "session_id": self.session_id})
            self.running_tool = None
            marker = "[Request interrupted by user for tool use]"
        emit({"type": "user", "message": {"role": "user", "content": [
            {"type": "text", "text": marker}]}, "session_id": self.session_id})
        emit({"type": "result", "subtype": "error_during_execution", "is_error": True, "result": None,
              "session_id": self.session_id, "total_cost_usd": self.cost_usd,
              "usage": {"input_tokens": 0, "output_tokens": 0}, "terminal_reason": "aborted_streaming",
              "stop_reason": None, "num_turns": 1, "duration_ms": 1, "uuid": str(uuid.uuid4())})

    async def clear(self) -> None:
        if "clear_hangs" in FAULTS:
            await asyncio.Event().wait()
        old = self.session_id
        self.session_id = str(uuid.uuid4())
        self.history.clear()
        self.cost_usd = 0.0
        if "clear_no_reset" not in FAULTS:
            emit({"type": "conversation_reset", "new_conversation_id": self.session_id,
                  "trigger": "clear", "session_id": old})
        emit({"type": "system", "subtype": "background_tasks_changed", "tasks": [], "session_id": old})
        self.init_event()
        self.last_error = False
        emit({"type": "result", "subtype": "success", "is_error": False, "result": "",
              "session_id": self.session_id, "total_cost_usd": 0, "usage": {}, "local_command": "clear",
              "num_turns": 0, "duration_ms": 1, "uuid": str(uuid.uuid4())})


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def main() -> None:
    if "exit_at_start" in FAULTS:
        die("fake: exit_at_start", 1)
    if "exit_at_start_if" in FAULTS and os.path.exists(FAULTS["exit_at_start_if"]):
        die("fake: exit_at_start_if", 1)
    fake = FakeClaude(sys.argv[1:])
    if "ignore_sigterm" in FAULTS:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_sigterm(*_: object) -> None:
            if fake.tool_pgid is not None:
                kill_group(fake.tool_pgid)  # a tool's own process group would outlive us
            os._exit(143)

        signal.signal(signal.SIGTERM, on_sigterm)

    async def runner() -> int:
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            if fake.turn is not None and not fake.turn.done():
                fake.turn.cancel()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        return await fake.run()

    code = asyncio.run(runner())
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
