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


class LineFramer:
    """Splits a byte stream into lines (without the newline), bounded by ``max_line_bytes``."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be positive")
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unfinished line held back until its newline arrives."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add a chunk; return every line it completes. Raises `FrameTooLarge` past the bound."""
        lines: list[bytes] = []
        start = 0
        # Only the new chunk can hold newlines we have not seen yet.
        search_from = 0
        if self._buf:
            nl = chunk.find(b"\n")
            if nl < 0:
                self._buf += chunk
                self._check_pending()
                return lines
            self._buf += chunk[:nl]
            self._check_line(len(self._buf))
            lines.append(bytes(self._buf))
            self._buf.clear()
            start = search_from = nl + 1
        while True:
            nl = chunk.find(b"\n", search_from)
            if nl < 0:
                break
            self._check_line(nl - start)
            lines.append(chunk[start:nl])
            start = search_from = nl + 1
        if start < len(chunk):
            self._buf += chunk[start:]
            self._check_pending()
        return lines

    def finish(self) -> bytes:
        """At end of stream: return the unterminated tail (empty if the stream ended cleanly)."""
        tail = bytes(self._buf)
        self._buf.clear()
        return tail

    def _check_line(self, size: int) -> None:
        if size > self.max_line_bytes:
            self._buf.clear()
            raise FrameTooLarge(f"line of {size} bytes exceeds the limit of {self.max_line_bytes} bytes")

    def _check_pending(self) -> None:
        if len(self._buf) > self.max_line_bytes:
            size = len(self._buf)
            self._buf.clear()
            raise FrameTooLarge(
                f"unterminated line of over {size} bytes exceeds the limit of {self.max_line_bytes} bytes"
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
