"""The frame of the store conformance suite (`claudepool.testing.store_conformance`): a `Check`, the
registry the checks join, how they run, and the records and helpers they share."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from claudepool.store.base import Store, UsageRecord

# make_store(**options) -> a new, empty store.
StoreFactory = Callable[..., Store]


@dataclass(frozen=True)
class Check:
    """One behaviour every store must have, and the store options it needs."""

    name: str
    body: Callable[[Store], Awaitable[None]]
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


CHECKS: list[Check] = []


def check(**options: Any) -> Callable[[Callable[[Store], Awaitable[None]]], Callable[[Store], Awaitable[None]]]:
    """Add the decorated coroutine function to `CHECKS`, run on a store made with ``options``."""
    def register(body: Callable[[Store], Awaitable[None]]) -> Callable[[Store], Awaitable[None]]:
        CHECKS.append(Check(body.__name__, body, options))
        return body
    return register


async def run(one: Check, make_store: StoreFactory) -> None:
    """Run one check on a fresh store, and close the store."""
    store = make_store(**one.options)
    try:
        await one.body(store)
    finally:
        await store.close()


async def run_all(make_store: StoreFactory) -> None:
    """Every check in turn; the first that fails raises `AssertionError` (or what the store raised)."""
    for one in CHECKS:
        await run(one, make_store)


@contextlib.contextmanager
def raises(kind: type[BaseException], match: str | None = None) -> Iterator[list[BaseException]]:
    """Like ``pytest.raises``, without pytest: the block must raise ``kind`` (its message matching
    ``match``, searched); the list holds the exception afterwards."""
    caught: list[BaseException] = []
    try:
        yield caught
    except kind as exc:
        if match is not None and not re.search(match, str(exc)):
            raise AssertionError(f"{type(exc).__name__}({str(exc)!r}) does not match {match!r}") from exc
        caught.append(exc)
        return
    raise AssertionError(f"{kind.__name__} was not raised")


DAY = 86400.0
MODEL = "claude-sonnet-4-5:20250929"  # ':' and '-' in a model name must survive the key layout
OTHER_MODEL = "claude-haiku-4-5"


SEQ = [0]  # distinct record and session ids across checks


def record(tenant: str = "acme", *, cost: float = 0.0, at: float | None = None, model: str = MODEL,
           reservation_id: str | None = None, record_id: str | None = None, **fields: Any) -> UsageRecord:
    SEQ[0] += 1
    return UsageRecord(
        record_id=record_id or f"rec-{SEQ[0]}", request_id=f"req-{SEQ[0]}", tenant=tenant, profile="default",
        model=model, outcome="ok", at=time.time() if at is None else at, cost_usd=cost,
        reservation_id=reservation_id, session=None, **fields,
    )


async def reserve(store: Store, rid: str, amount: float, *, daily: float = 0.0, monthly: float = 0.0,
                  tenant: str = "acme", ttl_s: float = 60.0, least: float | None = None) -> float:
    return await store.reserve(tenant, rid, amount, daily_limit_usd=daily, monthly_limit_usd=monthly, ttl_s=ttl_s,
                               min_usd=least)


def another_day_this_month(now: float) -> float:
    """A time on another UTC day of the current month."""
    day = datetime.fromtimestamp(now, UTC).day
    return now - DAY if day > 1 else now + DAY
