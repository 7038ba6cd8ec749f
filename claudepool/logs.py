"""Logging: JSON lines on stderr (a human format on a terminal), one canonical line per request.

A record's structured data travels in ``extra={"fields": {...}}`` and becomes top-level keys of the
JSON line. Nothing logs prompt text, answers or keys; the one place foreign text enters the logs,
a worker's stderr, is truncated, stripped of anything shaped like an API key, and rate-limited.

    {"ts": "2026-11-24T07:30:00.123Z", "level": "info", "logger": "claudepool.request", "msg": "request",
     "request_id": "…", "tenant": "acme", "outcome": "ok", "queue_ms": 0.3, "duration_ms": 41.2, …}
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

_KEY_SHAPED = re.compile(r"(sk-ant-[A-Za-z0-9_-]{4})[A-Za-z0-9_-]+|((?:api[_-]?key|token|secret)\W{0,3})\S+", re.I)


def scrub(text: str, limit: int = 300) -> str:
    """Truncate foreign text and mask anything that looks like a credential."""
    # Mask first (a cut could leave part of a key unmatched), but only over what can be kept, plus a
    # margin for a key that starts before the cut: a huge line costs no more than a short one.
    head = text[: limit + 200]
    head = _KEY_SHAPED.sub(lambda m: (m.group(1) or m.group(2)) + "…", head)
    return head if len(text) <= limit and len(head) <= limit else head[:limit] + "…"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """JSON unless stderr is a terminal (``json`` forces either way)."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = json if json is not None else not sys.stderr.isatty()
    handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would repeat every request without our fields; the canonical line replaces it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RateLimitedLog:
    """At most ``burst`` lines per ``period_s``; the rest are counted and reported once per period."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, period_s: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period_s = period_s
        self._window_started = time.monotonic()
        self._sent = 0
        self.suppressed = 0

    def info(self, msg: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._window_started >= self.period_s:
            if self.suppressed:
                self.logger.info("worker stderr lines suppressed", extra={"fields": {**fields,
                                                                                     "suppressed": self.suppressed}})
            self._window_started, self._sent, self.suppressed = now, 0, 0
        if self._sent < self.burst:
            self._sent += 1
            self.logger.info(msg, extra={"fields": fields})
        else:
            self.suppressed += 1
