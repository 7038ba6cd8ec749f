"""Prices: what each model call costs, by the tokens the gateway measured.

The gateway prices every call with this table (that is what is billed), bounds a call's cost before
it goes out (`claudepool.gateway.budget`), and cross-checks the CLI's own figure for a turn the
gateway saw no call of (a disagreement is counted and logged).

>>> table = PricingTable({"default": Price(3.0, 15.0, 0.3, 3.75)})
>>> round(table.cost("any-model", input_tokens=1000, output_tokens=1000), 6)
0.018
>>> round(table.cost("any-model", cache_creation_input_tokens=1000, cache_write_1h_input_tokens=1000), 6)
0.00975
>>> round(table.cost("any-model", input_tokens=1000, output_tokens=1000, batch=True), 6)
0.009
"""

from __future__ import annotations

from dataclasses import dataclass

from claudepool.tenancy.settings import PriceSettings


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float
    cache_write_per_mtok: float
    cache_write_1h_per_mtok: float | None = None
    # A Message Batches call's share of these prices (the provider's is 50%).
    batch_multiplier: float = 0.5

    @property
    def cache_write_1h(self) -> float:
        return 2 * self.input_per_mtok if self.cache_write_1h_per_mtok is None else self.cache_write_1h_per_mtok

    @classmethod
    def of(cls, settings: PriceSettings) -> Price:
        return cls(settings.input_per_mtok, settings.output_per_mtok, settings.cache_read_per_mtok,
                   settings.cache_write_per_mtok, settings.cache_write_1h_per_mtok, settings.batch_multiplier)


class PricingTable:
    def __init__(self, prices: dict[str, Price]) -> None:
        if "default" not in prices:
            raise ValueError("a pricing table needs a 'default' entry")
        self.prices = prices

    @classmethod
    def of(cls, settings: dict[str, PriceSettings]) -> PricingTable:
        return cls({model: Price.of(p) for model, p in settings.items()})

    def price(self, model: str) -> Price:
        return self.prices.get(model) or self.prices["default"]

    def cost(self, model: str, *, input_tokens: int = 0, output_tokens: int = 0, cache_read_input_tokens: int = 0,
             cache_creation_input_tokens: int = 0, cache_write_1h_input_tokens: int = 0,
             batch: bool = False) -> float:
        """USD for these tokens; ``cache_creation_input_tokens`` are 5-minute writes, the 1-hour ones apart.
        ``batch``: a call of the Message Batches API, at the price's ``batch_multiplier``."""
        p = self.price(model)
        usd = (input_tokens * p.input_per_mtok + output_tokens * p.output_per_mtok
               + cache_read_input_tokens * p.cache_read_per_mtok
               + cache_creation_input_tokens * p.cache_write_per_mtok
               + cache_write_1h_input_tokens * p.cache_write_1h) / 1_000_000
        return usd * p.batch_multiplier if batch else usd
