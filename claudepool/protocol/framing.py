"""Newline framing of byte streams with a hard bound on line size.

Pipes and sockets deliver chunks, not lines: a line may arrive in pieces and one chunk may carry
many lines. The framer keeps the unfinished tail and refuses to hold more than ``max_line_bytes`` of
it, so a peer that never sends a newline cannot grow our memory without bound.

>>> framer = LineFramer(max_line_bytes=64)
>>> framer.feed(b'{"a":1}\\n{"b"')
[b'{"a":1}']
>>> framer.feed(b':2}\\n')
[b'{"b":2}']
"""

from __future__ import annotations

from typing import Any

import orjson

from claudepool.errors import CorruptFrame, FrameTooLarge

DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


# How much of an oversize line is kept, to tell whose it was (the id a client writes first).
_HEAD_BYTES = 256


class LineFramer:
    """Splits a byte stream into lines (without the newline), bounded by ``max_line_bytes``."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._skipping = False

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held back until its newline arrives."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add a chunk; return every line it completes. Raises `FrameTooLarge` past the bound."""
        items = self._split(chunk)
        for item in items:
            if isinstance(item, FrameTooLarge):
                raise item
        return items  # type: ignore[return-value]

    def feed_lenient(self, chunk: bytes) -> list[bytes | FrameTooLarge]:
        """Like `feed`, but an oversize line becomes a `FrameTooLarge` item in place, and framing
        resumes after that line's newline: for peers whose connection should survive one bad frame."""
        return self._split(chunk)

    def finish(self) -> bytes:
        """At end of stream: return the unterminated tail (empty if the stream ended cleanly)."""
        tail = bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        return tail

    def _split(self, chunk: bytes) -> list[bytes | FrameTooLarge]:
        out: list[bytes | FrameTooLarge] = []
        start = 0
        if self._skipping:
            # Discarding the rest of an oversize line until its newline.
            nl = chunk.find(b"\n")
            if nl < 0:
                return out
            self._skipping = False
            start = nl + 1
        if self._buf:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                self._buf += chunk[start:]
                if len(self._buf) > self.max_line_bytes:
                    out.append(self._pending_overflow())
                return out
            size = len(self._buf) + nl - start
            if size > self.max_line_bytes:
                out.append(self._line_overflow(size, bytes(self._buf[:_HEAD_BYTES])))
            else:
                self._buf += chunk[start:nl]
                out.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if nl - start <= self.max_line_bytes:
                out.append(chunk[start:nl])
            else:
                out.append(self._line_overflow(nl - start, chunk[start:start + _HEAD_BYTES]))
            start = nl + 1
        if start < len(chunk):
            self._buf += chunk[start:]
            if len(self._buf) > self.max_line_bytes:
                out.append(self._pending_overflow())
        return out

    def _line_overflow(self, size: int, head: bytes) -> FrameTooLarge:
        return FrameTooLarge(f"line of {size} bytes exceeds the limit of {self.max_line_bytes} bytes", head=head)

    def _pending_overflow(self) -> FrameTooLarge:
        size, head = len(self._buf), bytes(self._buf[:_HEAD_BYTES])
        self._buf.clear()
        self._skipping = True
        return FrameTooLarge(
            f"unterminated line of over {size} bytes exceeds the limit of {self.max_line_bytes} bytes", head=head
        )


def decode_object(line: bytes) -> dict[str, Any]:
    """Parse one line as a JSON object, or raise `CorruptFrame` saying why (never echoing it)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CorruptFrame(f"line of {len(line)} bytes is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise CorruptFrame(f"line is a JSON {type(obj).__name__}, not an object")
    return obj
