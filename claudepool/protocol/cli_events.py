"""Typed models of the `claude` CLI's stream-json protocol, and encoders for what we write to it.

Reading: `parse_event` turns one decoded line into a model chosen by ``type`` (and ``subtype`` for
``system``). Every model accepts extra fields, and a ``type`` we do not know becomes `UnknownEvent`, so
a newer CLI that adds events or fields never breaks a worker. A *known* event whose fields have the
wrong shape raises `CorruptFrame`: metering and turn boundaries depend on them.

Writing: `encode_user_message` and `encode_control_request` build lines with orjson. A line that is
not JSON, or a user line without ``message.role``, makes the CLI exit, so lines are never built by
string concatenation.

Slash commands: the CLI runs a user line whose text (a string, or the *last* text block of a list)
starts with ``/`` and a command name (``^/[a-zA-Z0-9_][a-zA-Z0-9:_-]*``) as one of its commands, on
the process other tenants share: ``/model`` survives ``/clear``, ``/heapdump`` writes earlier prompts
to disk. Measured on CLI 2.1.328: content blocks do not help; leading whitespace, ``//`` or an unknown
name reach the model as text. The line field ``text_not_typed: true`` makes the CLI skip command
parsing for that line and send the text to the model exactly (it is how the CLI marks text that a
person did not type; the transcript records it as ``textNotTyped``). Every prompt is written with it;
only our own `encode_command` (``/clear``) is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from claudepool.errors import CorruptFrame


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Usage(BaseModel):
    """Token counts of one model call or one turn (the CLI's ``usage`` object)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    @property
    def context_tokens(self) -> int:
        """Prompt size the model saw: fresh, cached and cache-written input together."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens + other.cache_creation_input_tokens,
        )


# The process settings ``system/init`` reports that a tenant must never be able to change: a worker
# whose settings after a reset differ from those it started with is retired.
SETTINGS_FIELDS = ("model", "permissionMode", "tools", "mcp_servers", "output_style", "fast_mode_state",
                   "additional_directories", "cwd", "apiKeySource", "agents", "plugins")


class SystemInit(_Event):
    """``system/init``: sent once a message arrives, then again each turn."""

    type: Literal["system"] = "system"
    subtype: Literal["init"] = "init"
    session_id: str = ""
    model: str = ""
    cwd: str = ""
    tools: list[str] = Field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """The process settings this event reports (`SETTINGS_FIELDS`; absent ones are None)."""
        values = {**(self.model_extra or {}), "model": self.model, "cwd": self.cwd, "tools": self.tools}
        return {name: values.get(name) for name in SETTINGS_FIELDS}


class SystemApiRetry(_Event):
    """``system/api_retry``: the CLI is retrying a failed upstream call."""

    type: Literal["system"] = "system"
    subtype: Literal["api_retry"] = "api_retry"
    attempt: int = 0
    max_retries: int = 0
    retry_delay_ms: float = 0
    error_status: int | None = None
    error: str | None = None


class SystemModelFallback(_Event):
    """``system/model_fallback``: the profile's model was busy or unavailable (``trigger``), and the CLI
    goes on with the next of its ``--fallback-model`` list for the rest of the turn."""

    type: Literal["system"] = "system"
    subtype: Literal["model_fallback"] = "model_fallback"
    trigger: str = ""
    original_model: str = ""
    fallback_model: str = ""


class SystemEvent(_Event):
    """Any other ``system`` subtype (``status``, ``background_tasks_changed``, ...): informational."""

    type: Literal["system"] = "system"
    subtype: str = ""


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = ""
    model: str = ""
    content: list[dict[str, Any]] = Field(default_factory=list)
    usage: Usage | None = None


class AssistantEvent(_Event):
    """``assistant``: one content block of a model reply; its usage is not final."""

    type: Literal["assistant"] = "assistant"
    message: AssistantMessage
    session_id: str = ""
    parent_tool_use_id: str | None = None

    def text(self) -> str:
        return "".join(
            text for b in self.message.content if b.get("type") == "text" and isinstance(text := b.get("text"), str)
        )

    def tool_uses(self) -> list[ToolUseBlock]:
        """The ``tool_use`` blocks of this message: the tools the model asked to run.

        A block without a string ``id`` and ``name`` is left out (nothing could be shown of it)."""
        return [
            ToolUseBlock(id=b["id"], name=b["name"], input=b.get("input"))
            for b in self.message.content
            if b.get("type") == "tool_use" and isinstance(b.get("id"), str) and isinstance(b.get("name"), str)
        ]


@dataclass(frozen=True)
class ToolUseBlock:
    """One tool call the model made: ``input`` is the tool's arguments as the CLI reported them."""

    id: str
    name: str
    input: Any


@dataclass(frozen=True)
class ToolResultBlock:
    """What one tool call gave back: ``text`` is its content flattened to text (see `UserEvent.tool_results`)."""

    tool_use_id: str
    is_error: bool
    text: str


class UserEvent(_Event):
    """``user``: tool results and interruption markers echoed by the CLI."""

    type: Literal["user"] = "user"
    message: dict[str, Any] = Field(default_factory=dict)
    session_id: str = ""
    parent_tool_use_id: str | None = None

    def tool_results(self) -> list[ToolResultBlock]:
        """The ``tool_result`` blocks of this message, one per tool call the CLI ran (or refused).

        Measured on CLI 2.1.328: ``content`` is the tool's output as a string (Bash: what the
        command printed, ``"Exit code N\n…"`` first and ``is_error`` on failure; bytes that are not
        UTF-8 already replaced by U+FFFD); other tools may give a list of blocks, whose text blocks
        are joined with newlines and any other block (an image) shown as ``[image]``. A block
        without a string ``tool_use_id`` is left out."""
        content = self.message.get("content")
        if not isinstance(content, list):
            return []
        return [
            ToolResultBlock(tool_use_id=b["tool_use_id"], is_error=b.get("is_error") is True,
                            text=_result_text(b.get("content")))
            for b in content
            if isinstance(b, dict) and b.get("type") == "tool_result" and isinstance(b.get("tool_use_id"), str)
        ]


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif isinstance(block, dict):
            parts.append(f"[{block.get('type') if isinstance(block.get('type'), str) else 'block'}]")
    return "\n".join(parts)


class StreamEvent(_Event):
    """``stream_event``: a raw Messages API streaming event (with ``--include-partial-messages``)."""

    type: Literal["stream_event"] = "stream_event"
    event: dict[str, Any] = Field(default_factory=dict)
    session_id: str = ""
    parent_tool_use_id: str | None = None

    def text_delta(self) -> str | None:
        """The text of a top-level ``text_delta``, else None."""
        if self.parent_tool_use_id is not None or self.event.get("type") != "content_block_delta":
            return None
        delta = self.event.get("delta")
        if not isinstance(delta, dict) or delta.get("type") != "text_delta":
            return None
        text = delta.get("text")
        return text if isinstance(text, str) else None


class ResultEvent(_Event):
    """``result``: the end of one turn. ``is_error`` is the truth, not ``subtype``."""

    type: Literal["result"] = "result"
    subtype: str = ""
    is_error: bool = False
    result: str | None = None
    session_id: str = ""
    usage: Usage = Field(default_factory=Usage)
    # Cumulative for the conversation since the last reset: meter the delta.
    total_cost_usd: float = 0.0
    terminal_reason: str | None = None
    api_error_status: int | None = None
    stop_reason: str | None = None
    num_turns: int = 0
    duration_ms: float = 0
    local_command: str | None = None
    # With --json-schema: the answer as the schema's JSON value, validated by the CLI.
    structured_output: Any = None


class ControlRequestEvent(_Event):
    """``control_request`` sent *by* the CLI (permission prompts, hook callbacks)."""

    type: Literal["control_request"] = "control_request"
    request_id: str
    request: dict[str, Any] = Field(default_factory=dict)


class ControlResponseBody(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    subtype: str
    request_id: str
    response: dict[str, Any] | None = None
    error: str | None = None


class ControlResponseEvent(_Event):
    """``control_response``: the CLI's answer to one of our control requests."""

    type: Literal["control_response"] = "control_response"
    response: ControlResponseBody


class ConversationReset(_Event):
    """``conversation_reset``: ``/clear`` took effect; the conversation has a new id."""

    type: Literal["conversation_reset"] = "conversation_reset"
    new_conversation_id: str = ""
    trigger: str | None = None


class RateLimitEvent(_Event):
    """``rate_limit_event``: the CLI's view of upstream rate limits."""

    type: Literal["rate_limit_event"] = "rate_limit_event"
    rate_limit_info: dict[str, Any] | None = None


class UnknownEvent(_Event):
    """A line of a ``type`` this version does not model; passed through, never fatal."""

    type: str = ""


CliEvent = (
    SystemInit
    | SystemApiRetry
    | SystemModelFallback
    | SystemEvent
    | AssistantEvent
    | UserEvent
    | StreamEvent
    | ResultEvent
    | ControlRequestEvent
    | ControlResponseEvent
    | ConversationReset
    | RateLimitEvent
    | UnknownEvent
)

_BY_TYPE: dict[str, type[_Event]] = {
    "assistant": AssistantEvent,
    "user": UserEvent,
    "stream_event": StreamEvent,
    "result": ResultEvent,
    "control_request": ControlRequestEvent,
    "control_response": ControlResponseEvent,
    "conversation_reset": ConversationReset,
    "rate_limit_event": RateLimitEvent,
}
_SYSTEM_BY_SUBTYPE: dict[str, type[_Event]] = {"init": SystemInit, "api_retry": SystemApiRetry,
                                                "model_fallback": SystemModelFallback}


def parse_event(obj: dict[str, Any]) -> CliEvent:
    """Build the typed event for one decoded stream-json object."""
    kind = obj.get("type")
    model: type[_Event]
    if kind == "system":
        model = _SYSTEM_BY_SUBTYPE.get(str(obj.get("subtype")), SystemEvent)
    elif isinstance(kind, str) and kind in _BY_TYPE:
        model = _BY_TYPE[kind]
    else:
        model = UnknownEvent
        if not isinstance(kind, str):
            obj = {**obj, "type": ""}
    try:
        event: CliEvent = model.model_validate(obj)  # type: ignore[assignment]
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:5])
        raise CorruptFrame(f"malformed {kind!r} event (bad fields: {fields})") from None
    return event


# -- lines we write ------------------------------------------------------------------------------

UserContent = str | list[dict[str, Any]]


def encode_user_message(content: UserContent) -> bytes:
    """One ``user`` line whose text the model receives exactly: never run as a slash command.

    ``content`` is text or a list of content blocks."""
    if not isinstance(content, str | list):
        raise TypeError("content must be a string or a list of content blocks")
    line = {"type": "user", "message": {"role": "user", "content": content}, "text_not_typed": True}
    return orjson.dumps(line) + b"\n"


def encode_command(command: str) -> bytes:
    """One ``user`` line the CLI runs as a slash command (ours only: ``/clear``)."""
    if not command.startswith("/"):
        raise ValueError("a command starts with /")
    return orjson.dumps({"type": "user", "message": {"role": "user", "content": command}}) + b"\n"


def encode_control_request(request_id: str, subtype: str, **fields: Any) -> bytes:
    """One ``control_request`` line, e.g. ``encode_control_request("r1", "interrupt")``."""
    request = {"subtype": subtype, **fields}
    return orjson.dumps({"type": "control_request", "request_id": request_id, "request": request}) + b"\n"


def encode_control_error(request_id: str, message: str) -> bytes:
    """Our refusal of a ``control_request`` the CLI sent us (we grant no permissions, run no hooks)."""
    body = {"subtype": "error", "request_id": request_id, "error": message}
    return orjson.dumps({"type": "control_response", "response": body}) + b"\n"
