"""A Chat Completions request (``POST /v1/chat/completions``) read and turned into one prompt.

The documented rules (README, "OpenAI Chat Completions API"):

* ``messages``: ``system``/``developer``, ``user`` and ``assistant`` messages with string content
  or text parts. The history is recognised as a conversation and continued, or started seeded
  with it (`claudepool.frontdoor.conversation`); opted out, it becomes one prompt
  (`claudepool.frontdoor.history`). Image, audio and file parts, ``tool`` messages and assistant
  ``tool_calls`` are refused (400).
* ``system`` and ``developer`` messages, wherever they stand, are joined by blank lines into the
  request's system prompt (`claudepool.protocol.wire.PromptRequest.system`), by the rule of the
  Messages API's ``system`` (README, "System prompts and pools made on demand").
* ``n`` must be 1; ``stop``, ``tools``, ``tool_choice``, ``functions``, ``function_call``,
  ``response_format`` other than text, ``logprobs`` and ``audio`` are refused; ``max_tokens`` and
  ``max_completion_tokens`` are checked (≥ 1) but do not bound the CLI's own calls; the sampling
  and bookkeeping fields (``temperature``, ``top_p``, ``presence_penalty``, ``frequency_penalty``,
  ``seed``, ``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``) are
  ignored. Any other field is refused by name.
* claudepool's own fields, as for the Messages API (`claudepool.frontdoor.anthropic_request`):
  ``kind`` (or the ``x-claudepool-kind`` header) and ``max_budget_usd`` with ``extra_body``;
  ``model: "default"`` names no model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from claudepool.errors import BadRequest
from claudepool.frontdoor.history import Role


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, refusal, …: refused below if they matter

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # claudepool's own, sent with the SDK's ``extra_body`` (README, "Routing" and "Budgets").
    kind: str | None = Field(default=None, min_length=1, max_length=64)
    max_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


def parts_text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}.{index}: {part.get('type')!r} parts are not supported (text only)")
        texts.append(part["text"])
    return "\n\n".join(texts)


def turns_of(body: ChatRequest) -> tuple[str | None, list[tuple[Role, str]]]:
    """Refuse what the CLI cannot honour (see the module's rules); the system prompt the request sent
    (None when no system or developer message has text) and the history as (role, text), oldest first."""
    if body.n != 1:
        raise BadRequest("n must be 1: one worker gives one answer")
    refused = {"stop": body.stop, "tools": body.tools, "tool_choice": body.tool_choice, "functions": body.functions,
               "function_call": body.function_call, "logprobs": body.logprobs, "audio": body.audio}
    named = sorted(name for name, value in refused.items() if value)
    if named:
        raise BadRequest(f"{', '.join(named)}: not supported (the profile decides the agent's tools and the "
                         "CLI runs its own model calls)")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise BadRequest("response_format: only text (a profile's json_schema gives structured output)")
    turns: list[tuple[Role, str]] = []
    system: list[str] = []
    for index, message in enumerate(body.messages):
        where = f"messages.{index}"
        if message.role in ("tool", "function") or message.tool_calls:
            raise BadRequest(f"{where}: tool messages and tool calls are not supported")
        text = parts_text(message.content, f"{where}.content")
        if message.role in ("system", "developer"):
            if text:
                system.append(text)
            continue
        turns.append(("user" if message.role == "user" else "assistant", text))
    return "\n\n".join(system) or None, turns
