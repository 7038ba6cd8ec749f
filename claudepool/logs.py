"""Logging: JSON lines on stderr (a human format on a terminal), one canonical line per request.

A record's structured data travels in ``extra={"fields": {...}}`` and becomes top-level keys of the
JSON line. Nothing logs prompt text, answers or keys; the one place foreign text enters the logs,
a worker's stderr, is truncated, stripped of anything shaped like an API key, and rate-limited.

Libraries log what peers sent, though (aiohttp's parser errors quote the raw request: an oversize
``Authorization`` header's first 100 bytes). So every record that reaches the handler, from any
logger, has its message, exception text, stack and fields masked by `SecretMask`, and uncaught
exceptions and warnings are routed through logging too. What masking promises (`mask_secrets`):

- ``sk-ant-…`` keys anywhere keep only their kind (``sk-ant-api0…``); a URL's password is masked;
- the credentials after ``Bearer``/``Basic``, the value of an ``Authorization``, ``Proxy-Authorization``,
  ``X-Api-Key`` or ``Api-Key`` header (to the end of its line), and the value of ``key=``, ``token:``,
  ``secret``, ``password``… assignments (JSON or not) are masked;
- a key the daemon holds (tenant, admin, metrics keys and secret-named worker variables: it knows
  their SHA-256, not always their text) is masked wherever it stands as a whole word of at least 8
  token characters (``A-Z a-z 0-9 . _ ~ + / = -``: what ``secrets.token_urlsafe`` makes);
- an HTTP parser error (aiohttp's ``HttpProcessingError``) is logged by its type and status only,
  never with the bytes it quotes: a bare key run together with padding cannot be found otherwise.

    {"ts": "2026-11-24T07:30:00.123Z", "level": "info", "logger": "claudepool.request", "msg": "request",
     "request_id": "…", "tenant": "acme", "outcome": "ok", "queue_ms": 0.3, "duration_ms": 41.2, …}
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

# Each alternative keeps group "keep" (a kind, a scheme, a header name) and masks what follows it.
_CREDENTIALS = re.compile(
    r"(?P<sk>sk-ant-[A-Za-z0-9_-]{4})[A-Za-z0-9_-]+"
    r"|(?P<header>\b(?:proxy-)?authorization|\bx-api-key|\bapi-key)(?P<sep>[\"']?[ \t]*[:=][ \t]*)[^\r\n]+"
    r"|(?P<scheme>\b(?:bearer|basic)[ \t]+)[^\s\"']+"
    r"|(?P<userinfo>://[^/\s:@]*:)[^@\s/]+(?=@)"
    r"|(?P<assign>\b(?:api[_-]?key|access[_-]?token|token|secret|password|passwd|key)[\"']?[ \t]*[:=][ \t]*[\"']?)"
    r"[^\s\"',;&}]+",
    re.IGNORECASE,
)
# Whole words that could be a key: hashed and compared with the digests of the keys we hold.
_WORD = re.compile(r"[A-Za-z0-9._~+/=-]{8,}")
_MASK = "…"
_key_digests: set[str] = set()


def add_key_digests(digests: Iterable[str]) -> None:
    """Mask these keys (hex SHA-256 of each) wherever they appear as a whole word in a log line."""
    _key_digests.update(d.lower() for d in digests if d)


def _masked(match: re.Match[str]) -> str:
    kept = match.group("sk") or match.group("scheme") or match.group("userinfo") or match.group("assign")
    if kept is None:
        kept = match.group("header") + match.group("sep")
    return kept + _MASK


def _known_key(match: re.Match[str]) -> str:
    word = match.group(0)
    bare = word.strip(".")  # a key that ends a sentence, or stands between dots
    for candidate in (word, bare) if bare != word else (word,):
        if hashlib.sha256(candidate.encode()).hexdigest() in _key_digests:
            return word.replace(candidate, _MASK)
    return word


def mask_secrets(text: str) -> str:
    """``text`` with every credential it shows masked (see the module docstring for what is found)."""
    text = _CREDENTIALS.sub(_masked, text)
    return _WORD.sub(_known_key, text) if _key_digests else text


def scrub(text: str, limit: int = 300) -> str:
    """Truncate foreign text and mask anything that looks like a credential."""
    # Mask first (a cut could leave part of a key unmatched), but only over what can be kept, plus a
    # margin for a key that starts before the cut: a huge line costs no more than a short one.
    head = mask_secrets(text[: limit + 200])
    return head if len(text) <= limit and len(head) <= limit else head[:limit] + "…"


class SecretMask(logging.Filter):
    """On the handler: masks every record's message, exception, stack and fields, whoever logged it."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format call must still be logged, and masked
            message = f"{record.msg!s} (with arguments that do not format)"
        record.msg, record.args = mask_secrets(message), None
        if record.exc_info:
            exc = record.exc_info[1]
            if isinstance(exc, HttpProcessingError):
                record.exc_text = f"{type(exc).__name__}: HTTP {exc.code} (the request's bytes are not logged)"
            else:
                record.exc_text = mask_secrets(self._formatter.formatException(record.exc_info))
            record.exc_info = None  # so no formatter renders the unmasked traceback again
        elif record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_secrets(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: mask_secrets(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


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
        elif record.exc_text:
            line["exception"] = record.exc_text  # rendered (and masked) by SecretMask
        if record.stack_info:
            line["stack"] = record.stack_info
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
    """JSON unless stderr is a terminal (``json`` forces either way); every record masked (`SecretMask`)."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = json if json is not None else not sys.stderr.isatty()
    handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
    handler.addFilter(SecretMask())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would repeat every request without our fields; the canonical line replaces it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # What Python itself would print to stderr goes through the handler too, so it is masked.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("claudepool").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    logging.getLogger("claudepool").error("uncaught exception in thread %s", args.thread.name if args.thread else "?",
                                          exc_info=args.exc_value or True)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    exc = unraisable.exc_value
    logging.getLogger("claudepool").error("exception ignored (%s)", unraisable.err_msg or "unraisable",
                                          exc_info=(type(exc), exc, unraisable.exc_traceback) if exc else None)


class RateLimitedLog:
    """At most ``burst`` lines per ``period_s``; the rest are counted and reported once per period."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, period_s: float = 10.0,
                 what: str = "worker stderr lines") -> None:
        self.logger = logger
        self.what = what  # what the lines are, in the line that counts those suppressed
        self.burst = burst
        self.period_s = period_s
        self._window_started = time.monotonic()
        self._sent = 0
        self.suppressed = 0

    def info(self, msg: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._window_started >= self.period_s:
            if self.suppressed:
                self.logger.info(f"{self.what} suppressed", extra={"fields": {**fields,
                                                                                     "suppressed": self.suppressed}})
            self._window_started, self._sent, self.suppressed = now, 0, 0
        if self._sent < self.burst:
            self._sent += 1
            self.logger.info(msg, extra={"fields": fields})
        else:
            self.suppressed += 1
