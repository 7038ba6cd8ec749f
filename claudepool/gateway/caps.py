"""The provider account's caps, enforced where every tenant's calls pass: before forwarding.

Tenants' own limits do not add up to the account's: ten tenants at 100 requests a minute each can
send 1,000 to an account allowed 500. ``[upstream] requests_per_minute`` and
``input_tokens_per_minute`` (and per ``[upstream.profiles.NAME]``, an account of its own) cap every
call of the account, all tenants together, at ``headroom_fraction`` of those limits, counted in the
sliding windows the tenants' limits use (`claudepool.tenancy.limits.LocalWindows`: in any real
minute, never more than the cap).

**Input tokens** of a call are bounded by its body's bytes: a token is at least one byte, so the
bound can only overcount (about 4x for English text in JSON) and the cap can never be crossed by an
estimate that came out low. The bound is counted when the call is admitted and not settled down to
the real usage afterwards, so a full token window means at most the cap, usually much less.

**Interactive before batch**: a batch lease's calls may fill only ``batch_fraction`` of each cap;
interactive calls may fill all of it. As the window fills, batch calls are refused first, and
interactive ones still find the rest.

A refused call is answered as the provider answers its own rate limit (429 ``rate_limit_error``,
``retry-after``, ``x-should-retry: true``): the CLI waits and retries, as it would have done on the
provider's 429, which the cap exists to avoid. A call that could never fit (its bound alone over its
share of the cap) is refused for good (413). Windows are per daemon: daemons sharing an account
should divide its limits between them.

>>> from claudepool.gateway.settings import Caps, Upstream
>>> caps = AccountCaps()
>>> acct = Upstream("upstream", "https://api.anthropic.com", caps=Caps(requests_per_minute=4, batch_fraction=0.5))
>>> for _ in range(2):
...     caps.admit(acct, Priority.BATCH, input_bound_tokens=100)
>>> caps.admit(acct, Priority.BATCH, input_bound_tokens=100)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
claudepool.errors.AccountCapped: account default: batch calls are at their 2 requests per minute (...)
>>> caps.admit(acct, Priority.INTERACTIVE, input_bound_tokens=100)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from claudepool.errors import AccountCapped, CallOverAccountCap
from claudepool.gateway.settings import Upstream
from claudepool.pool.shares import Priority
from claudepool.tenancy.limits import LocalWindows

REQUESTS = "requests"
INPUT_TOKENS = "input_tokens"
_UNITS = {REQUESTS: "requests per minute", INPUT_TOKENS: "input tokens per minute"}


class AccountCaps:
    """Every account's windows in this daemon. ``window_s`` is 60 s in production, shorter in tests."""

    def __init__(self, *, window_s: float = 60.0, buckets: int = 60,
                 clock_us: Callable[[], int] = lambda: time.monotonic_ns() // 1000) -> None:
        self._windows = LocalWindows(window_s=window_s, buckets=buckets, clock_us=clock_us)

    def admit(self, upstream: Upstream, priority: Priority, *, input_bound_tokens: int) -> None:
        """Count the call against its account's caps, or raise `AccountCapped` (retry later) or
        `CallOverAccountCap` (never fits); a refused call is not counted."""
        caps = upstream.caps
        if not caps:
            return
        share = caps.batch_fraction if priority is Priority.BATCH else 1.0
        limits = {REQUESTS: _part(caps.requests_per_minute, share),
                  INPUT_TOKENS: _part(caps.input_tokens_per_minute, share)}
        costs = {REQUESTS: 1, INPUT_TOKENS: input_bound_tokens}
        verdict = self._windows.take(upstream.account, {kind: (costs[kind], limits[kind]) for kind in limits})
        if verdict.refused is None:
            return
        kind = verdict.refused
        who = f"account {upstream.account}: {priority.value} calls"
        if costs[kind] > limits[kind]:
            raise CallOverAccountCap(f"{who} may use {limits[kind]} {_UNITS[kind]}, and this call alone "
                                     f"may use {costs[kind]} (its body's bytes)")
        raise AccountCapped(f"{who} are at their {limits[kind]} {_UNITS[kind]} ({verdict.used} used)",
                            retry_after_s=max(1.0, math.ceil(verdict.retry_after_s)))


def _part(cap: int, share: float) -> int:
    """``share`` of a cap that is set, at least 1 (0: no cap)."""
    return max(1, math.floor(cap * share)) if cap > 0 else 0
