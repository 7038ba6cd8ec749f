"""The comparison: both sides summed per UTC day and model, and their differences. Pure functions.

The ledger's side is its ``kind="call"`` records (each model call as the gateway measured it) by the
day the call began; the provider's, its usage report's tokens and its cost report's amounts by the
day of their bucket. A difference is the provider's figure less the ledger's: positive when the
provider counted more than claudepool billed (traffic that did not pass the gateway, a call billed
short), negative when less.

Requests of a Message Batch, which the provider bills at half price, count in a row of their own,
``MODEL (batch)``: a ledger record with ``service_tier="batch"`` on one side, the usage and cost
reports' rows of service tier ``batch`` on the other. So a batch priced at the wrong multiplier is a
difference in dollars on that row, not one hidden in the model's interactive calls.

>>> from datetime import date
>>> day = date(2026, 12, 2)
>>> ledger = {(day, "m"): Totals(uncached_input_tokens=10, output_tokens=5, cost_usd=0.0001)}
>>> provider = {(day, "m"): Totals(uncached_input_tokens=10, output_tokens=7, cost_usd=0.00013)}
>>> (row,) = compare(ledger, provider)
>>> row.difference().output_tokens, row.within(Tolerance(usd=0.01, tokens=0)), row.within(Tolerance(tokens=2))
(2, False, True)
>>> row_label("m", "batch"), row_label("m", "standard"), row_label("m", None)
('m (batch)', 'm', 'm')
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import Any

from claudepool.reconcile.ledger import LedgerRecord
from claudepool.reconcile.provider import CostBucket, UsageBucket

# The provider's costs that are not a model's tokens (web search, code execution): no model, and
# nothing in the ledger to match them.
NON_TOKEN = "(non-token costs)"
NO_MODEL = "(no model)"
BATCH_TIER = "batch"
# Float sums of prices differ from the provider's decimal cents far below a cent; this is not a difference.
_USD_EPSILON = 1e-9

Key = tuple[date, str]  # a UTC day, and a row's label (`row_label`)


def row_label(model: str, service_tier: str | None) -> str:
    """The row a model's usage of a service tier counts in: ``MODEL (batch)`` for the Message Batches
    API's, the model's own for any other tier (an account's standard or priority calls are one row,
    as the ledger does not tell them apart)."""
    return f"{model} ({BATCH_TIER})" if service_tier == BATCH_TIER else model


@dataclass
class Totals:
    """One side's tokens by kind and dollars, for one day and model."""

    uncached_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_5m_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0  # the ledger's call records counted in it

    def tokens(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_tokens")}

    def minus(self, other: Totals) -> Totals:
        return Totals(**{name: count - getattr(other, name) for name, count in self.tokens().items()},
                      cost_usd=self.cost_usd - other.cost_usd, calls=self.calls - other.calls)


@dataclass(frozen=True)
class Tolerance:
    """How far the sides may differ in one row and still agree: in dollars, and in tokens of each kind."""

    usd: float = 0.01
    tokens: int = 0


@dataclass(frozen=True)
class Row:
    day: date
    model: str
    ledger: Totals
    provider: Totals

    def difference(self) -> Totals:
        """The provider's figures less the ledger's."""
        return self.provider.minus(self.ledger)

    def within(self, tolerance: Tolerance) -> bool:
        diff = self.difference()
        return (all(abs(n) <= tolerance.tokens for n in diff.tokens().values())
                and abs(diff.cost_usd) <= tolerance.usd + _USD_EPSILON)


def ledger_totals(records: Iterable[LedgerRecord], first_day: date, last_day: date) -> dict[Key, Totals]:
    """The ledger's model calls that began from ``first_day`` through ``last_day`` (UTC), per day and
    row (`row_label`: a model, and its batch calls apart). Turn records (a turn the gateway saw no
    call of: the CLI's own figure) are not calls the provider reports, and are left out."""
    out: dict[Key, Totals] = {}
    for r in records:
        day = datetime.fromtimestamp(r.started_at, UTC).date()
        if r.kind != "call" or not first_day <= day <= last_day:
            continue
        t = out.setdefault((day, row_label(r.model, r.service_tier)), Totals())
        t.uncached_input_tokens += r.input_tokens
        t.cache_read_input_tokens += r.cache_read_input_tokens
        t.cache_write_5m_input_tokens += r.cache_creation_input_tokens - r.cache_write_1h_input_tokens
        t.cache_write_1h_input_tokens += r.cache_write_1h_input_tokens
        t.output_tokens += r.output_tokens
        t.cost_usd += r.cost_usd
        t.calls += 1
    return out


def provider_totals(usage: Iterable[UsageBucket], cost: Iterable[CostBucket]) -> dict[Key, Totals]:
    """The provider's tokens (usage report, grouped by model and service tier) and dollars (cost
    report, grouped by description), per day of their bucket and row (`row_label`)."""
    out: dict[Key, Totals] = {}
    for bucket in usage:
        day = bucket.starting_at.astimezone(UTC).date()
        for u in bucket.results:
            t = out.setdefault((day, row_label(u.model or NO_MODEL, u.service_tier)), Totals())
            t.uncached_input_tokens += u.uncached_input_tokens
            t.cache_read_input_tokens += u.cache_read_input_tokens
            t.cache_write_5m_input_tokens += u.cache_creation.ephemeral_5m_input_tokens
            t.cache_write_1h_input_tokens += u.cache_creation.ephemeral_1h_input_tokens
            t.output_tokens += u.output_tokens
    for cost_bucket in cost:
        day = cost_bucket.starting_at.astimezone(UTC).date()
        for c in cost_bucket.results:
            model = row_label(c.model, c.service_tier) if c.model else (
                NON_TOKEN if c.cost_type not in (None, "tokens") else NO_MODEL)
            out.setdefault((day, model), Totals()).cost_usd += float(c.usd)
    return out


def compare(ledger: dict[Key, Totals], provider: dict[Key, Totals]) -> list[Row]:
    """One row per day and model that either side has, in order."""
    return [Row(day, model, ledger.get((day, model), Totals()), provider.get((day, model), Totals()))
            for day, model in sorted(set(ledger) | set(provider))]


@dataclass
class Reconciliation:
    """A comparison made, and what it was made of."""

    first_day: date
    last_day: date
    rows: list[Row]
    tolerance: Tolerance
    ledger_source: str
    provider_url: str
    turn_records: int = 0  # ledger records of kind "turn" in the range: not compared

    @property
    def beyond(self) -> list[Row]:
        return [row for row in self.rows if not row.within(self.tolerance)]

    @property
    def within_tolerance(self) -> bool:
        return not self.beyond

    def as_json(self) -> dict[str, Any]:
        def side(t: Totals, *, calls: bool = False) -> dict[str, Any]:
            out = {**t.tokens(), "cost_usd": round(t.cost_usd, 9)}
            return {**out, "calls": t.calls} if calls else out

        return {
            "since": self.first_day.isoformat(), "until": self.last_day.isoformat(),
            "tolerance": {"usd": self.tolerance.usd, "tokens": self.tolerance.tokens},
            "within_tolerance": self.within_tolerance,
            "ledger": {"source": self.ledger_source, "calls": sum(r.ledger.calls for r in self.rows),
                       "turn_records_not_compared": self.turn_records},
            "provider": {"base_url": self.provider_url},
            "rows": [{"day": r.day.isoformat(), "model": r.model, "within_tolerance": r.within(self.tolerance),
                      "ledger": side(r.ledger, calls=True), "provider": side(r.provider),
                      "difference": side(r.difference())}
                     for r in self.rows],
        }

    def as_text(self) -> str:
        calls = sum(r.ledger.calls for r in self.rows)
        lines = [
            f"reconcile {self.first_day} .. {self.last_day} (UTC days): the provider's figures less the ledger's",
            f"ledger: {calls} calls from {self.ledger_source}"
            + (f" ({self.turn_records} turn records not compared)" if self.turn_records else ""),
            f"provider: usage and cost reports of {self.provider_url}",
            f"{'DAY':<10}  {'MODEL':<28} {'CALLS':>6} {'INPUT':>9} {'CACHE_RD':>9} {'CACHE_5M':>9} {'CACHE_1H':>9} "
            f"{'OUTPUT':>9} {'LEDGER_USD':>12} {'PROVIDER_USD':>12} {'DIFF_USD':>11}",
        ]
        for r in self.rows:
            d = r.difference()
            tokens = " ".join(f"{n:>+9d}" for n in d.tokens().values())
            mark = "ok" if r.within(self.tolerance) else "DIFF"
            lines.append(f"{r.day!s:<10}  {r.model[:28]:<28} {r.ledger.calls:>6} {tokens} {r.ledger.cost_usd:>12.6f} "
                         f"{r.provider.cost_usd:>12.6f} {d.cost_usd:>+11.6f}  {mark}")
        if not self.rows:
            lines.append("(neither side has a call in these days)")
        beyond = len(self.beyond)
        lines.append(f"{beyond} of {len(self.rows)} rows beyond the tolerance (${self.tolerance.usd} and "
                     f"{self.tolerance.tokens} tokens of each kind per day and model)")
        return "\n".join(lines)
