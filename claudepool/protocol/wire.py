"""Our client protocol: the HTTP bodies and the Unix-socket NDJSON frames, as typed models.

HTTP ``POST /v1/prompt`` takes a `PromptRequest` and answers a `PromptResult` (or, with
``"stream": true``, server-sent ``delta``, ``tool_use`` and ``tool_result`` events as the turn runs,
then exactly one ``result`` or ``error`` event).

The Unix socket carries one JSON object per line in each direction, many requests multiplexed on one
connection by a client-chosen ``id``:

    → {"id": "r1", "op": "prompt", "key": "…", "prompt": "Hi", "stream": true}
    ← {"id": "r1", "event": "delta", "text": "Hel"}
    ← {"id": "r1", "event": "tool_use", "tool_use_id": "toolu_1", "name": "Bash", "input": {…}, …}
    ← {"id": "r1", "event": "tool_result", "tool_use_id": "toolu_1", "is_error": false, "preview": "…", …}
    ← {"id": "r1", "event": "result", "request_id": "…", "text": "Hello", …}
    → {"id": "c1", "op": "cancel", "target": "r1"}
    → {"id": "s1", "op": "status", "key": "…"}

Every accepted request ends in exactly one terminal frame: ``result`` or ``error`` (what answers
each socket frame, precisely: `claudepool.daemon.unix_api`).

Every model here is strict (pydantic strict mode): a field of the wrong JSON type is refused, never
coerced (``"stream": "yes"`` or ``1`` is not ``true``, ``"timeout_s": "30"`` is not a number; a
JSON integer is a valid float). HTTP query parameters are strings by nature, so their models are
validated with `parse_query`: each value is parsed as its field's type (``limit=10``), never more
loosely. Errors name the field and never echo its value (`describe_validation_error`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, model_serializer

from claudepool.errors import BadRequest, ClaudepoolError
from claudepool.protocol.cli_events import (
    AssistantEvent,
    CliEvent,
    StreamEvent,
    SystemModelFallback,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
    UserEvent,
)

_ID = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
# A system prompt of the request's own: bounded here in characters (cheaply; never more bytes than
# one CLI argument may hold), and by the daemon in bytes (``server.max_system_prompt_bytes``).
_SYSTEM = Field(default=None, max_length=128 * 1024)
_VALID_ID = re.compile(r"[\x21-\x7e]{1,128}")
# What clients send: unknown fields and wrong types are refused. What we answer: strict types, and
# unknown fields tolerated (a newer daemon may add some).
_REQUEST = ConfigDict(extra="forbid", strict=True)
_ANSWER = ConfigDict(strict=True)


class InputFileIn(BaseModel):
    """A file the request puts into the workspace before its prompt runs: a relative path in it, and
    the bytes as standard base64."""

    model_config = _REQUEST

    path: str = Field(min_length=1, max_length=1024)
    content_base64: str


class PromptRequest(BaseModel):
    """One prompt. ``session`` continues that conversation; without one the request is stateless.

    ``files`` are written into the workspace (the lease's fresh one, or the session's) before the
    prompt runs; ``return_files`` (paths or globs) are read from it after the turn and come back in
    the answer's ``files`` (see `claudepool.pool.workspace_files`)."""

    model_config = _REQUEST

    prompt: str = Field(min_length=1)
    session: str | None = None
    profile: str | None = None
    # The system prompt, instead of the tenant's default (its persona, else the profile's): see
    # `claudepool.tenancy.tenants.Tenant.system_prompt_for`. Not on a session's turn (its own is
    # set when it is created).
    system: str | None = _SYSTEM
    # A model other than the profile's (a full id or an alias), within the tenant's ``models``.
    model: str | None = Field(default=None, min_length=1, max_length=256)
    # The kind of task: ``[routes.KIND]`` (and the tenant's tier's routes) choose its profile, model
    # and effort where the request names none (README, "Routing").
    kind: str | None = Field(default=None, min_length=1, max_length=64)
    # The most this request may spend, all its model calls together (held at the gateway), within
    # the tenant's ``max_request_budget_usd``. None: that cap, if any.
    max_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    stream: bool = False
    timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # batch requests run only on capacity no interactive request is waiting for.
    priority: Literal["interactive", "batch"] = "interactive"
    files: list[InputFileIn] = Field(default_factory=list)
    return_files: list[str] = Field(default_factory=list)


class UsageOut(BaseModel):
    model_config = _ANSWER

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    @classmethod
    def of(cls, usage: Usage) -> UsageOut:
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_input_tokens=usage.cache_read_input_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens,
        )


class FileOut(BaseModel):
    """A file of the workspace, returned with the answer."""

    model_config = _ANSWER

    path: str
    size_bytes: int
    content_base64: str

    def content(self) -> bytes:
        return base64.b64decode(self.content_base64)


class OmittedFile(BaseModel):
    """A path ``return_files`` matched and the answer does not carry: ``symlink``, ``not_regular``
    (a FIFO, socket, device or hard-linked file), ``too_large``, ``over_total`` or ``too_many``."""

    model_config = _ANSWER

    path: str
    reason: str


class PromptResult(BaseModel):
    """The answer to one prompt: the non-streaming body, and the ``result`` event's data. ``files``
    and ``files_omitted`` are there only when the request asked for ``return_files``."""

    model_config = _ANSWER

    id: str
    tenant: str
    session: str | None
    text: str
    is_error: bool
    stop_reason: str | None
    usage: UsageOut
    cost_usd: float
    duration_ms: float
    queue_ms: float
    # The model that served the turn, as the CLI reported it ("" if it did not say).
    model: str = ""
    files: list[FileOut] | None = None
    files_omitted: list[OmittedFile] | None = None
    # A profile with a json_schema: the answer as that schema's JSON value (the CLI validated it).
    structured_output: Any = None

    @model_serializer(mode="wrap")
    def _without_absent_files(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        for name in ("files", "files_omitted", "structured_output"):
            if body.get(name) is None:
                body.pop(name, None)
        return body


# -- what a turn streams: text, and the tools it ran ------------------------------------------------


class TextDelta(BaseModel):
    """``delta``: the answer's text as it arrives."""

    model_config = _ANSWER
    event: ClassVar[str] = "delta"

    text: str


class ToolUse(BaseModel):
    """``tool_use``: the agent called a tool. ``id`` is the call's (``tool_use_id`` on the socket,
    where ``id`` is the frame's); ``input`` its arguments, or, when their JSON is longer than the
    preview bound, that JSON cut at the bound (a string, and ``truncated``)."""

    model_config = _ANSWER
    event: ClassVar[str] = "tool_use"

    id: str
    name: str
    input: dict[str, Any] | str
    truncated: bool = False

    @classmethod
    def of(cls, block: ToolUseBlock, max_bytes: int) -> ToolUse:
        if isinstance(block.input, dict):
            encoded = orjson.dumps(block.input)
            if len(encoded) <= max_bytes:
                return cls(id=block.id, name=block.name, input=block.input)
            text = encoded.decode()
        else:  # never seen (the API's tool inputs are objects): shown as its JSON text
            text = orjson.dumps(block.input).decode()
        cut, truncated = cut_utf8(text, max_bytes)
        return cls(id=block.id, name=block.name, input=cut, truncated=truncated)


class ToolResult(BaseModel):
    """``tool_result``: what a tool call gave back, as a preview: its text cut at the bound."""

    model_config = _ANSWER
    event: ClassVar[str] = "tool_result"

    tool_use_id: str
    is_error: bool
    preview: str
    truncated: bool

    @classmethod
    def of(cls, block: ToolResultBlock, max_bytes: int) -> ToolResult:
        preview, truncated = cut_utf8(block.text, max_bytes)
        return cls(tool_use_id=block.tool_use_id, is_error=block.is_error, preview=preview, truncated=truncated)


class ModelFallback(BaseModel):
    """``model_fallback``: the turn goes on with another model than the profile's (it was busy)."""

    model_config = _ANSWER
    event: ClassVar[str] = "model_fallback"

    original_model: str
    fallback_model: str
    trigger: str


StreamItem = TextDelta | ToolUse | ToolResult | ModelFallback
STREAM_ITEMS: dict[str, type[StreamItem]] = {m.event: m for m in (TextDelta, ToolUse, ToolResult, ModelFallback)}


def stream_items(event: CliEvent, preview_bytes: int) -> list[StreamItem]:
    """What of one CLI event a streaming client sees: a text delta, or the tool calls and results of
    the agent itself (a subagent's, under a ``parent_tool_use_id``, are not shown, like its text)."""
    if isinstance(event, StreamEvent):
        text = event.text_delta()
        return [TextDelta(text=text)] if text else []
    if isinstance(event, AssistantEvent) and event.parent_tool_use_id is None:
        return [ToolUse.of(block, preview_bytes) for block in event.tool_uses()]
    if isinstance(event, UserEvent) and event.parent_tool_use_id is None:
        return [ToolResult.of(block, preview_bytes) for block in event.tool_results()]
    if isinstance(event, SystemModelFallback):
        return [ModelFallback(original_model=event.original_model, fallback_model=event.fallback_model,
                              trigger=event.trigger)]
    return []


def cut_utf8(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character; and whether it was cut.

    >>> cut_utf8("héllo", 2)
    ('h', True)
    >>> cut_utf8("hé", 3)
    ('hé', False)
    """
    data = text.encode("utf-8", "replace")  # a lone surrogate (never from orjson) would become "?"
    if len(data) <= max_bytes:
        return data.decode("utf-8"), False
    # The bytes before the cut are whole characters but perhaps the last one: drop what is left of it.
    return data[:max_bytes].decode("utf-8", "ignore"), True


class SessionCreateRequest(BaseModel):
    """The body of ``POST /v1/sessions`` (or none at all)."""

    model_config = _REQUEST

    profile: str | None = None
    # The conversation's system prompt, for all its turns (as `PromptRequest.system`).
    system: str | None = _SYSTEM


class TenantQuery(BaseModel):
    """``?tenant=``: whose data the admin key asks for (a tenant key may name only itself)."""

    model_config = _REQUEST

    tenant: str | None = None


class UsageQuery(TenantQuery):
    """``GET /v1/usage`` parameters."""

    window: Literal["day", "month"] = "day"
    date: str | None = None  # YYYY-MM-DD for a day, YYYY-MM for a month; default: the current one


class LedgerQuery(TenantQuery):
    """``GET /v1/ledger`` parameters. ``limit`` above the daemon's page bound is lowered to it."""

    since: float | None = Field(default=None, allow_inf_nan=False)
    limit: int = Field(default=1000, ge=0)


_Query = TypeVar("_Query", bound=BaseModel)


def parse_query(model: type[_Query], items: Iterable[tuple[str, str]]) -> _Query:
    """Validate query parameters (strings) against ``model``. An empty value is the same as none; a
    parameter given twice is refused. Raises `BadRequest` naming the parameter, never its value."""
    values: dict[str, str] = {}
    for name, value in items:
        if name in values:
            raise BadRequest(f"invalid request: {name}: given more than once")
        values[name] = value
    try:
        return model.model_validate_strings({k: v for k, v in values.items() if v != ""})
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """Name the bad fields without echoing their values (a prompt may be secret)."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]]
    return "invalid request: " + "; ".join(parts)


def error_body(exc: ClaudepoolError) -> dict[str, Any]:
    return {"code": exc.code, "message": str(exc)}


# -- Unix socket frames ----------------------------------------------------------------------------


class PromptFrame(PromptRequest):
    id: str = _ID
    op: Literal["prompt"]
    key: str


class _Frame(BaseModel):
    model_config = _REQUEST

    id: str = _ID


class _KeyedFrame(_Frame):
    key: str


class CancelFrame(_Frame):
    """Cancel the request ``target`` sent earlier on the same connection."""

    op: Literal["cancel"]
    target: str = _ID


class StatusFrame(_KeyedFrame):
    op: Literal["status"]


class UsageFrame(_KeyedFrame):
    """Usage for one window, as ``GET /v1/usage`` answers it."""

    op: Literal["usage"]
    tenant: str | None = None
    window: Literal["day", "month"] = "day"
    date: str | None = None


class SessionCreateFrame(_KeyedFrame):
    """Start a conversation; answered by a ``session`` frame carrying its ``session`` id."""

    op: Literal["session.create"]
    profile: str | None = None
    system: str | None = _SYSTEM


class SessionDeleteFrame(_KeyedFrame):
    op: Literal["session.delete"]
    session: str


class JobFrame(_KeyedFrame):
    """A jobs operation (`claudepool.jobs.door`): ``job.submit`` (``job``, ``idempotency_key``),
    ``job.bulk`` (``jobs``), ``job.get`` and ``job.cancel`` (``job_id``), ``job.list`` (``status``,
    ``since``, ``limit``); ``tenant`` for the admin key. Answered by one ``job`` or ``jobs`` frame."""

    op: Literal["job.submit", "job.bulk", "job.get", "job.list", "job.cancel"]
    job: dict[str, Any] | None = None
    jobs: list[dict[str, Any]] | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    job_id: str | None = Field(default=None, min_length=1, max_length=128)
    tenant: str | None = None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled", "dead"] | None = None
    since: float | None = Field(default=None, allow_inf_nan=False)
    limit: int = Field(default=100, ge=1, le=1000)


Frame = PromptFrame | CancelFrame | StatusFrame | UsageFrame | SessionCreateFrame | SessionDeleteFrame | JobFrame
FRAME_MODELS: dict[str, type[Frame]] = {
    "prompt": PromptFrame, "cancel": CancelFrame, "status": StatusFrame, "usage": UsageFrame,
    "session.create": SessionCreateFrame, "session.delete": SessionDeleteFrame,
    **{op: JobFrame for op in ("job.submit", "job.bulk", "job.get", "job.list", "job.cancel")},
}


def frame_id_of(obj: dict[str, Any]) -> str | None:
    """The frame's ``id`` if it is a valid one (what an answer may be addressed to), else None."""
    raw = obj.get("id")
    return raw if isinstance(raw, str) and _VALID_ID.fullmatch(raw) else None


def parse_frame(obj: dict[str, Any]) -> Frame:
    """The socket frame ``obj`` as its op's model, or `BadRequest` naming the bad fields.

    The op picks the model itself (rather than a discriminated union), so that an unknown op is
    refused without pydantic echoing it, and field errors are named as the client wrote them."""
    op = obj.get("op")
    model = FRAME_MODELS.get(op) if isinstance(op, str) else None
    if model is None:
        why = "Field required" if op is None else "must be one of " + ", ".join(map(repr, FRAME_MODELS))
        raise BadRequest(f"invalid request: op: {why}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([\x21\x23-\x5b\x5d-\x7e]{1,128})"')


def leading_frame_id(head: bytes) -> str | None:
    """The id of a frame that was too large to parse, when it is the frame's first key (as our
    client writes it): so its error answers the request that waits for it."""
    found = _LEADING_ID.match(head)
    return found.group(1).decode() if found else None


def stream_frame(frame_id: str, item: StreamItem) -> bytes:
    """A ``delta``, ``tool_use`` or ``tool_result`` frame (a tool call's own id as ``tool_use_id``)."""
    body = item.model_dump()
    if isinstance(item, ToolUse):
        body["tool_use_id"] = body.pop("id")
    return orjson.dumps({"id": frame_id, "event": item.event, **body}) + b"\n"


def stream_item_of_frame(frame: dict[str, Any]) -> StreamItem | None:
    """The `StreamItem` a socket frame carries (what `stream_frame` wrote), or None for another frame."""
    event = frame.get("event")
    model = STREAM_ITEMS.get(event) if isinstance(event, str) else None
    if model is None:
        return None
    body = {k: v for k, v in frame.items() if k not in ("id", "event")}
    if model is ToolUse:
        body["id"] = body.pop("tool_use_id", None)
    return model.model_validate(body)


def result_frame(frame_id: str, result: PromptResult) -> bytes:
    body = result.model_dump()
    body["request_id"] = body.pop("id")
    return orjson.dumps({"id": frame_id, "event": "result", **body}) + b"\n"


def error_frame(frame_id: str | None, exc: ClaudepoolError, *, about: str | None = None) -> bytes:
    """An ``error`` frame. With ``about``: the answer (id null) to a frame refused because its id
    ``about`` belongs to a request still in flight, whose own answer is still to come."""
    body = error_body(exc)
    if about is not None:
        body["message"] = f"refused a frame with id {about!r}, which a request in flight holds: {body['message']}"
    return orjson.dumps({"id": frame_id, "event": "error", **body}) + b"\n"


def event_frame(frame_id: str, event: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": frame_id, "event": event, **body}) + b"\n"
