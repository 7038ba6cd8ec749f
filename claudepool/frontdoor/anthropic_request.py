"""A Messages API request (``POST /v1/messages``) read and turned into one claudepool prompt.

The documented rules (README, "Anthropic Messages API"):

* ``messages``: strings or text blocks. One user message is the prompt as it is. A longer history
  is, for now, flattened into one prompt with a role marker before each message (the conversation
  is not continued on a warm worker yet). The last message must be the user's (no assistant
  prefill). Image, document, tool_use and tool_result blocks are refused (400).
* ``system``: only absent or equal to the profile's own system prompt: the CLI fixes it at spawn,
  and per-request system prompts are not supported yet (400).
* ``max_tokens`` is required and checked (≥ 1) but does not bound the CLI's own model calls.
* ``stop_sequences`` is refused unless empty; client-defined ``tools`` (and ``tool_choice``) are
  refused; the sampling parameters ``temperature``, ``top_p`` and ``top_k``, ``metadata``,
  ``service_tier`` and a top-level ``cache_control`` (the CLI caches its own prompts) are ignored.
  Any other field (``thinking``, ``output_config``, ``container``, …) is refused, by name, rather
  than silently dropped.
* claudepool's own fields, sent with the SDK's ``extra_body``: ``kind`` (also the
  ``x-claudepool-kind`` header; README, "Routing") and ``max_budget_usd`` (README, "Budgets").
  ``model: "default"`` names no model: the route's, the tier's or the profile's serves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from claudepool.errors import BadRequest
from claudepool.frontdoor.history import flatten


class TextBlock(BaseModel):
    # cache_control and citations change nothing here: the CLI does its own prompt caching.
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    # claudepool's own, sent with the SDK's ``extra_body`` (README, "Routing" and "Budgets").
    kind: str | None = Field(default=None, min_length=1, max_length=64)
    max_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


def blocks_text(content: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or of text blocks; `BadRequest` for any other kind of block."""
    if isinstance(content, str):
        return content
    parts = []
    for index, block in enumerate(content):
        kind = block.get("type")
        if kind != "text":
            raise BadRequest(f"{where}.{index}: {kind!r} blocks are not supported (text only)")
        try:
            parts.append(TextBlock.model_validate(block).text)
        except ValidationError:
            raise BadRequest(f"{where}.{index}: a text block needs a string 'text'") from None
    return "\n\n".join(parts)


def check_unsupported(body: MessagesRequest, profile_system_prompt: str | None) -> None:
    """Refuse what the CLI cannot honour (see the module's rules)."""
    if body.stop_sequences:
        raise BadRequest("stop_sequences are not supported: the CLI runs its own model calls")
    if body.tools or body.tool_choice is not None:
        raise BadRequest("client-defined tools are not supported: the profile decides the agent's tools")
    if body.system is not None:
        system = blocks_text(body.system, "system")
        if system != (profile_system_prompt or ""):
            raise BadRequest("per-request system prompts are not supported yet: send none, or exactly the "
                             "profile's own")


def prompt_of(messages: list[Message]) -> str:
    """The one prompt the history becomes (`claudepool.frontdoor.history`)."""
    return flatten([(m.role, blocks_text(m.content, f"messages.{i}.content")) for i, m in enumerate(messages)])
