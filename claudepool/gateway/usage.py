"""What one model call used, read from the provider's response as it passes through the gateway.

A streamed response (server-sent events) reports usage twice: ``message_start`` carries the input
side (input, cache-read and cache-write tokens, the 5-minute / 1-hour cache-write split) and a first
output count; each ``message_delta`` carries counts that are *cumulative* for the message
(``output_tokens`` always; the input fields when the API sends them, and then they replace the
earlier ones). A JSON response carries one ``usage`` object. `StreamUsage` is fed the response's
bytes exactly as they are forwarded, split anywhere, and holds what the stream has reported so far:
a call cut mid-stream (the client left, an interrupt, a killed worker) is billed with that.

Only the events that carry usage are decoded; text and tool-input deltas are recognised by their
``event:`` line and skipped, so the cost per chunk is a scan for the event boundary.

>>> stream = StreamUsage()
>>> stream.feed(b'event: message_start\\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m",'
...             b'"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}\\n\\nevent: mess',
...             now=1.0)
>>> stream.feed(b'age_delta\\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
...             b'"usage":{"output_tokens":7}}\\n\\n', now=2.0)
>>> u = stream.usage
>>> (u.message_id, u.input_tokens, u.cache_read_tokens, u.output_tokens, u.stop_reason, u.complete)
('msg_1', 10, 5, 7, 'end_turn', False)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

# An event bigger than this is not decoded (a usage event is a few hundred bytes; a big one is a
# content delta, which carries no usage): the buffer of an unfinished event stays bounded.
MAX_EVENT_BYTES = 1024 * 1024
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_EVENTS = frozenset({b"message_start", b"message_delta", b"message_stop", b"error"})
_CONTENT_EVENTS = frozenset({b"content_block_start", b"content_block_delta"})


class _CacheCreation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class _Usage(BaseModel):
    """The API's usage object, as `message_start`, `message_delta` and a JSON body carry it. The
    provider adds fields over time: unknown ones are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None


@dataclass
class CallUsage:
    """One model call's usage as far as the response has reported it."""

    message_id: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    # The response ended as the API ends a message (message_stop, or a whole JSON body).
    complete: bool = False
    # The type of an error the provider reported in the stream (e.g. overloaded_error), if any.
    error_type: str | None = None
    # When the first content block began (the caller's clock): time to first token.
    first_content_at: float | None = None
    # Events not decoded because they were over MAX_EVENT_BYTES or not valid JSON of the expected shape.
    skipped_events: int = 0

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    def merge(self, usage: _Usage) -> None:
        """Take the counts ``usage`` reports: each is cumulative, so a reported field replaces ours."""
        if usage.input_tokens is not None:
            self.input_tokens = usage.input_tokens
        if usage.output_tokens is not None:
            self.output_tokens = usage.output_tokens
        if usage.cache_read_input_tokens is not None:
            self.cache_read_tokens = usage.cache_read_input_tokens
        if usage.cache_creation is not None:
            self.cache_write_1h_tokens = usage.cache_creation.ephemeral_1h_input_tokens
            self.cache_write_5m_tokens = usage.cache_creation.ephemeral_5m_input_tokens
        if usage.cache_creation_input_tokens is not None:
            # The total is authoritative; without a breakdown the writes are 5-minute ones (the default TTL).
            self.cache_write_5m_tokens = max(0, usage.cache_creation_input_tokens - self.cache_write_1h_tokens)


class _MessageStart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class _Message(BaseModel):
        model_config = ConfigDict(extra="ignore")

        id: str | None = None
        model: str | None = None
        usage: _Usage | None = None

    message: _Message


class _MessageDelta(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class _Delta(BaseModel):
        model_config = ConfigDict(extra="ignore")

        stop_reason: str | None = None

    delta: _Delta | None = None
    usage: _Usage | None = None


class _ErrorEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class _Error(BaseModel):
        model_config = ConfigDict(extra="ignore")

        type: str = "error"

    error: _Error


class _Message(BaseModel):
    """A whole (non-streamed) response body."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None


class StreamUsage:
    """Reads usage from an SSE response fed in arbitrary chunks."""

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.usage = CallUsage()
        self._max_event_bytes = max_event_bytes
        self._buffer = bytearray()
        # Inside an oversize event: drop bytes until its boundary.
        self._skipping = False

    def feed(self, chunk: bytes, *, now: float) -> None:
        buffer = self._buffer
        buffer += chunk
        start = 0
        while True:
            match = _BOUNDARY.search(buffer, start)
            if match is None:
                break
            if self._skipping:
                self._skipping = False
            else:
                self._event(bytes(buffer[start:match.start()]), now)
            start = match.end()
        del buffer[:start]
        if len(buffer) > self._max_event_bytes:
            # Keep the tail: a boundary may straddle this chunk and the next.
            if not self._skipping:
                self._skipping = True
                self.usage.skipped_events += 1
            del buffer[:-4]

    def _event(self, raw: bytes, now: float) -> None:
        name = b""
        data: list[bytes] = []
        for line in raw.splitlines():
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"event":
                name = value
            elif field == b"data":
                data.append(value)
        if name in _CONTENT_EVENTS:
            if self.usage.first_content_at is None:
                self.usage.first_content_at = now
            return
        if name not in _USAGE_EVENTS:
            return  # ping, content_block_stop, and whatever the API adds later
        if name == b"message_stop":
            self.usage.complete = True
            return
        try:
            payload = orjson.loads(b"\n".join(data))
            if name == b"message_start":
                start = _MessageStart.model_validate(payload).message
                self.usage.message_id, self.usage.model = start.id, start.model
                if start.usage is not None:
                    self.usage.merge(start.usage)
            elif name == b"message_delta":
                delta = _MessageDelta.model_validate(payload)
                if delta.delta is not None and delta.delta.stop_reason is not None:
                    self.usage.stop_reason = delta.delta.stop_reason
                if delta.usage is not None:
                    self.usage.merge(delta.usage)
            else:
                self.usage.error_type = _ErrorEvent.model_validate(payload).error.type
        except (orjson.JSONDecodeError, ValidationError):
            self.usage.skipped_events += 1


def usage_of_body(body: bytes) -> CallUsage:
    """The usage of a whole JSON response (a non-streamed call). A body that is not a message
    (an error, or not JSON) reports nothing and is not complete."""
    try:
        return usage_of_message(orjson.loads(body))
    except orjson.JSONDecodeError:
        return CallUsage()


def usage_of_message(decoded: object) -> CallUsage:
    """The usage of a decoded message object (a JSON answer, a batch's succeeded result); one that is
    not a message reports nothing and is not complete."""
    usage = CallUsage()
    try:
        message = _Message.model_validate(decoded)
    except ValidationError:
        return usage
    usage.message_id, usage.model, usage.stop_reason = message.id, message.model, message.stop_reason
    if message.usage is not None:
        usage.merge(message.usage)
        usage.complete = True
    return usage
