"""What the fake upstream reads in a Messages API request and what it answers: the directives of
its last user text, its prompt blocks and their tokens, the cache simulation, the answer's text.

Pure functions over a request body (`claudepool.testing.fake_upstream` documents the directives), so
the fake's /v1/messages and its Message Batches API (`claudepool.testing.fake_batches`) answer a
request by the same code.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

DIRECTIVE = re.compile(r"\[\[(\w+)(?::([^\]]*))?\]\]")
# The API looks for earlier cache entries at most this many blocks back from a breakpoint.
CACHE_LOOKBACK_BLOCKS = 20
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def segments(body: dict[str, Any]) -> list[tuple[bytes, bool]]:
    """The request's prompt blocks in cache order (tools, system, messages), each with its flag.
    A block's bytes leave out its cache_control: moving a breakpoint does not change the prefix."""
    out: list[tuple[bytes, bool]] = []

    def block(b: Any) -> tuple[bytes, bool]:
        if not isinstance(b, dict):
            return orjson.dumps(b), False
        return orjson.dumps({k: v for k, v in b.items() if k != "cache_control"}), "cache_control" in b

    for tool in body.get("tools") or []:
        out.append(block(tool))
    # A string is one text block: the API caches "content": "hi" and [{"type": "text", "text": "hi"}]
    # alike (a resumed CLI sends some old turns as strings that it first sent as blocks).
    system = body.get("system")
    if isinstance(system, str):
        out.append(block({"type": "text", "text": system}))
    elif isinstance(system, list):
        out.extend(block(b) for b in system)
    for msg in body.get("messages") or []:
        content = msg.get("content")
        if isinstance(content, str):
            out.append(block({"type": "text", "text": content}))
        else:
            out.extend(block(b) for b in content or [])
    return out


def tokens(raw: bytes) -> int:
    return math.ceil(len(raw) / 4)


def user_texts(msg: dict[str, Any]) -> list[str]:
    content = msg.get("content")
    if isinstance(content, str):
        return [content]
    return [b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]


def last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    return "\n".join(user_texts(users[-1])) if users else ""


def tool_result_text(body: dict[str, Any]) -> str | None:
    """The text of the ``tool_result`` in the request's last user message (None: it has none)."""
    messages = body.get("messages") or []
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), list):
        return None
    for b in messages[-1]["content"]:
        if isinstance(b, dict) and b.get("type") == "tool_result":
            content = b.get("content")
            if isinstance(content, str):
                return content
            texts = [c.get("text", "") for c in content or [] if isinstance(c, dict) and c.get("type") == "text"]
            return "\n".join(texts)
    return None


def loop_step(body: dict[str, Any]) -> tuple[int, int]:
    """Under ``[[loop:N]]`` in the turn's prompt (its last user message with text): the number of the
    tool call to answer next, or 0 once N tool results came back (or without the directive); and
    the bytes each tool call prints besides."""
    messages = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    for back, message in enumerate(reversed(messages)):
        found = re.search(r"\[\[loop:(\d+)(?::(\d+))?\]\]", "\n".join(user_texts(message)))
        if found:
            return (back + 1 if back < int(found.group(1)) else 0), int(found.group(2) or 0)
    return 0, 0


def tool_use_block(directive: str, number: int) -> dict[str, Any]:
    name, _, argument = directive.partition(":")
    tool_input = orjson.loads(argument) if name != "Bash" and argument.startswith("{") else {"command": argument}
    return {"type": "tool_use", "id": f"toolu_fake_{number:06d}", "name": name, "input": tool_input}


def directives(text: str) -> dict[str, str]:
    plan = {m.group(1): m.group(2) or "" for m in DIRECTIVE.finditer(text)}
    # The user's own words are the last block: after a /clear the CLI puts caveat blocks first.
    plan["_prompt"] = DIRECTIVE.sub("", text.rsplit("\n<local-command-stdout></local-command-stdout>\n", 1)[-1])
    return plan


def answer_text(plan: dict[str, str], body: dict[str, Any]) -> str:
    if "reply" in plan:
        return plan["reply"]
    if "tokens" in plan:
        return ("word " * int(plan["tokens"]))[:4 * int(plan["tokens"])]
    if "echo" in plan:
        texts = [t for m in body.get("messages") or [] if m.get("role") == "user" for t in user_texts(m)]
        return "\n".join(texts)
    prompt = plan.get("_prompt", "")
    # The CLI wraps prompts in <system-reminder> blocks; answer about the user's own words.
    visible = re.sub(r"<system-reminder>.*?</system-reminder>", "", prompt, flags=re.S).strip()
    return f"ok: {visible.strip()[:40]}"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def cache_usage(body: dict[str, Any], seen_prefixes: set[bytes]) -> dict[str, int]:
    """A request's input usage with prompt caching simulated the way the API documents it: each
    cache_control breakpoint writes its prefix (into ``seen_prefixes``); a read is the longest prefix
    written before that ends at a block boundary at most ``CACHE_LOOKBACK_BLOCKS`` blocks before a
    breakpoint. So turn k of a conversation reads what turn k-1 wrote, though the breakpoint has
    moved to the new message."""
    blocks = segments(body)
    total = sum(tokens(s) for s, _ in blocks)
    digest = hashlib.sha256()
    boundaries: list[tuple[bytes, int]] = []  # (hash of the prefix through block i, its tokens)
    running = 0
    for seg, _ in blocks:
        digest.update(seg)
        running += tokens(seg)
        boundaries.append((digest.copy().digest(), running))
    breakpoints = [i for i, (_, cached) in enumerate(blocks) if cached]
    read = 0
    for i in breakpoints:
        for j in range(i, max(-1, i - CACHE_LOOKBACK_BLOCKS), -1):
            if boundaries[j][0] in seen_prefixes:
                read = max(read, boundaries[j][1])
                break
    cached_total = boundaries[breakpoints[-1]][1] if breakpoints else 0
    seen_prefixes.update(boundaries[i][0] for i in breakpoints)
    return {
        "input_tokens": total - cached_total,
        "cache_creation_input_tokens": cached_total - read,
        "cache_read_input_tokens": read,
        "output_tokens": 0,
    }
