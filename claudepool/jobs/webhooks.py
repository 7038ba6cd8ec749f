"""Webhooks: a job's end POSTed to its tenant's URL, signed, retried, and only to allow-listed hosts.

A tenant's webhook URL is a request the daemon makes on the tenant's behalf, from inside the
operator's network: an SSRF vector. So a URL is called only when its host is exactly one of
``[webhooks] allowed_hosts`` (checked when configured and again when sent), redirects are never
followed (one could lead anywhere), no proxy is taken from the environment, and at most
``max_response_bytes`` of an answer is read. The allow-list names hosts, not ports; a name listed is
trusted to resolve where the operator meant it to.

Each delivery is signed (`sign`) with the tenant's ``webhook_secret`` over a fresh timestamp and the
exact body, so a receiver can check that it comes from us, unchanged and recently (`verify`). It is
at-least-once: a receiver may see an event twice (an answer lost after it was handled) and
de-duplicates by the ``Claudepool-Event-Id`` header.

    Content-Type: application/json
    Claudepool-Signature: t=1764763200,v1=6c5f229a47ea2f266753ea1bacc216f20ddcb5ca70b3ff490c8a9130924ca1c9
    Claudepool-Event-Id: job_01HZX…

>>> header = sign(b"whsec", b'{"id": "job_1"}', timestamp=1764763200)
>>> verify(b"whsec", header, b'{"id": "job_1"}', now=1764763260)
True
>>> verify(b"whsec", header, b'{"id": "job_2"}', now=1764763260)
False
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from claudepool.errors import BadRequest, Draining
from claudepool.gateway.forward import close_session
from claudepool.jobs.model import WebhookDelivery
from claudepool.jobs.settings import WebhookSettings, normal_host

# Where one event's delivery stands: persisted on its job after every attempt.
DeliveryState = WebhookDelivery

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Claudepool-Signature"
EVENT_ID_HEADER = "Claudepool-Event-Id"
# Answers worth another attempt besides 5xx: the receiver timed out, or asked us to slow down.
_RETRIED_STATUSES = frozenset({408, 429})
# How much of a refusing answer's body its DeliveryState keeps (for the tenant to debug its receiver).
_ERROR_EXCERPT_CHARS = 200


def _checked(url: str, allowed_hosts: list[str]) -> URL:
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"webhook URL is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise BadRequest(f"webhook URL must be http or https, not {parsed.scheme or 'relative'!r}")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise BadRequest("webhook URL may not carry a user or password")
    if not parsed.raw_host:
        raise BadRequest("webhook URL has no host")
    try:
        host = normal_host(parsed.raw_host)
    except ValueError as exc:
        raise BadRequest(f"webhook URL is not a valid URL: {exc}") from None
    allowed = {normal_host(h) for h in allowed_hosts}
    if host not in allowed:
        raise BadRequest(f"webhook host {host!r} is not in webhooks.allowed_hosts"
                         if allowed else "webhooks are disabled (webhooks.allowed_hosts is empty)")
    return parsed


def check_url(url: str, allowed_hosts: list[str]) -> str:
    """``url`` as it will be called, or `BadRequest`: not http(s), with a user or password, without a
    host, or with a host that is not exactly one of ``allowed_hosts`` (after `normal_host`).

    >>> check_url("https://Hooks.Example.com/cp?x=1", ["hooks.example.com"])
    'https://hooks.example.com/cp?x=1'
    """
    return str(_checked(url, allowed_hosts))


def sign(secret: bytes, body: bytes, *, timestamp: int) -> str:
    """The ``Claudepool-Signature`` header of ``body`` sent at ``timestamp`` (Unix seconds)."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True when ``header`` (``Claudepool-Signature``) signs exactly ``body`` with ``secret``, at a time
    within ``tolerance_s`` of ``now`` (default: the clock). Pass the raw body bytes, before any parse."""
    found = re.fullmatch(r"t=([0-9]{1,15}),v1=([0-9a-f]{64})", header)
    if found is None:
        return False
    timestamp = int(found[1])
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False  # a replay of an old delivery, or a clock far off
    expected = hmac.new(secret, found[1].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, found[2])


def retry_delay_s(attempt: int, settings: WebhookSettings, *, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """The wait after failed attempt ``attempt`` (1-based): the receiver's Retry-After when it sent
    one, else full jitter over the exponential back-off; never over ``max_retry_s``."""
    if retry_after_s is not None:
        return min(retry_after_s, settings.max_retry_s)
    ceiling_s = min(settings.max_retry_s, settings.first_retry_s * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0, ceiling_s)


def _retry_after_s(value: str | None) -> float | None:
    # Only the numeric form: an HTTP date would need the receiver's clock to agree with ours.
    if value is None or not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,6})?", value.strip()):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int | None = None
    error: str | None = None  # for the DeliveryState: with an excerpt of the receiver's answer
    reason: str = ""  # for the log: no foreign text
    retry_after_s: float | None = None

    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def retryable(self) -> bool:
        # No status: a connection error or a timeout. 3xx is final: it is never followed.
        return self.status is None or self.status >= 500 or self.status in _RETRIED_STATUSES


OnState = Callable[[DeliveryState], Awaitable[None]]


class WebhookSender:
    """One client session for every webhook, and the retried delivery of each event through it.

    >>> async def announce(sender, tenant, job_id, body):                     # doctest: +SKIP
    ...     return await sender.deliver(tenant.webhook_url, tenant.webhook_secret.get_secret_value().encode(),
    ...                                 job_id, body, on_state=save_delivery_state)
    """

    def __init__(self, settings: WebhookSettings, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # No proxy from the environment (it would carry the request elsewhere), no cookies (a
            # receiver could set one that the next tenant's delivery sends), nothing decompressed.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s), trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)

    async def close(self, timeout_s: float) -> None:
        session, self._session = self._session, None
        await close_session(session, timeout_s)

    async def deliver(self, url: str, secret: bytes, event_id: str, payload: bytes,
                      on_state: OnState | None = None) -> DeliveryState:
        """POST ``payload`` (JSON bytes) to ``url`` until a 2xx, a final refusal, or ``max_attempts``.

        ``on_state`` sees the state after every attempt (pending with its next attempt's time, then
        delivered or failed). A URL the allow-list refuses is failed at once, without a request.
        Raises `Draining` when the sender is closed; cancellation passes through untouched (the
        job's last persisted state is pending: deliver again after a restart)."""
        try:
            target = _checked(url, self.settings.allowed_hosts)
        except BadRequest as exc:
            return await self._report(DeliveryState(state="failed", attempts=0, last_error=str(exc)), on_state)
        host = target.raw_host  # logged instead of the URL, whose path or query may hold a token
        for attempt in range(1, self.settings.max_attempts + 1):
            async with self._slots:
                outcome = await self._attempt(target, secret, event_id, payload)
            now = self._clock()
            if outcome.delivered():
                state = DeliveryState(state="delivered", attempts=attempt, last_status=outcome.status,
                                      delivered_at=now)
                log.info("webhook %s delivered to %s after %d attempt(s)", event_id, host, attempt)
                return await self._report(state, on_state)
            if not outcome.retryable() or attempt == self.settings.max_attempts:
                state = DeliveryState(state="failed", attempts=attempt, last_status=outcome.status,
                                      last_error=outcome.error)
                log.warning("webhook %s to %s failed after %d attempt(s): %s", event_id, host, attempt,
                            outcome.reason)
                return await self._report(state, on_state)
            delay_s = retry_delay_s(attempt, self.settings, retry_after_s=outcome.retry_after_s, rng=self._rng)
            await self._report(DeliveryState(state="pending", attempts=attempt, last_status=outcome.status,
                                             last_error=outcome.error, next_attempt_at=now + delay_s), on_state)
            log.info("webhook %s to %s: attempt %d failed (%s), retrying in %.1f s", event_id, host, attempt,
                     outcome.reason, delay_s)
            await asyncio.sleep(delay_s)  # a shutdown cancels it; the CancelledError is not caught
        raise AssertionError("unreachable: the last attempt returns")

    async def _attempt(self, target: URL, secret: bytes, event_id: str, payload: bytes) -> _Outcome:
        if self._session is None:
            raise Draining("the webhook sender is closed")
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event_id,
                   SIGNATURE_HEADER: sign(secret, payload, timestamp=int(self._clock()))}
        try:
            async with asyncio.timeout(self.settings.timeout_s), self._session.post(
                    target, data=payload, headers=headers, allow_redirects=False) as answer:
                head = await _read_at_most(answer, self.settings.max_response_bytes)
                if not answer.content.at_eof():
                    answer.close()  # the rest is not read, so the connection cannot be reused
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else "could not be reached"
            error = f"{kind} ({type(exc).__name__})"
            return _Outcome(error=error, reason=error)
        reason = f"HTTP {answer.status}"
        if 200 <= answer.status < 300:
            return _Outcome(status=answer.status, reason=reason)
        if 300 <= answer.status < 400:
            error = f"{reason}: a redirect, never followed"
        else:
            excerpt = head[:_ERROR_EXCERPT_CHARS].decode("utf-8", "replace").strip()
            error = f"{reason}: {excerpt}" if excerpt else reason
        return _Outcome(status=answer.status, error=error, reason=reason,
                        retry_after_s=_retry_after_s(answer.headers.get("Retry-After")))

    @staticmethod
    async def _report(state: DeliveryState, on_state: OnState | None) -> DeliveryState:
        if on_state is not None:
            await on_state(state)
        return state


async def _read_at_most(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    while len(data) < limit and (chunk := await answer.content.read(limit - len(data))):
        data += chunk
    return bytes(data)
