"""A Messages API request (``POST /v1/messages``) read and turned into one claudepool prompt.

The documented rules (README, "Anthropic Messages API"):

* ``messages``: strings or text blocks (a message's blocks are joined with a blank line). The
  history is recognised as a conversation and continued, or started seeded with it
  (`claudepool.frontdoor.conversation`); opted out, it is flattened into one prompt with a role
  marker before each message. The last message must be the user's (no assistant prefill). Image,
  document, tool_use and tool_result blocks are refused (400).
* ``system`` (a string or text blocks, joined by blank lines) is the request's system prompt
  (`claudepool.protocol.wire.PromptRequest.system`): absent or empty, the tenant's persona, else the
  profile's own; another one needs ``tenants.NAME.allow_custom_system_prompt`` (else 403) and runs on
  a pool made on demand for it (README, "System prompts and pools made on demand").
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
from claudepool.frontdoor.history import Role


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


def check_unsupported(body: MessagesRequest) -> None:
    """Refuse what the CLI cannot honour (see the module's rules)."""
    if body.stop_sequences:
        raise BadRequest("stop_sequences are not supported: the CLI runs its own model calls")
    if body.tools or body.tool_choice is not None:
        raise BadRequest("client-defined tools are not supported: the profile decides the agent's tools")


def system_of(body: MessagesRequest) -> str | None:
    """The request's system prompt; None when it sends none (or an empty one): the tenant's default."""
    return (blocks_text(body.system, "system") or None) if body.system is not None else None


def turns_of(messages: list[Message]) -> list[tuple[Role, str]]:
    """The history as (role, text), oldest first."""
    return [(m.role, blocks_text(m.content, f"messages.{i}.content")) for i, m in enumerate(messages)]
