"""Prices per model, and the cost of requests: estimated before sending, real from ``usage`` after.

The shipped table gives US dollars per million tokens (input, output) for common OpenAI models,
as published when this table was written. Prices change: override or extend it with a JSON
file of the same shape (``--price-table prices.json``):

    {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "my-finetune": {"input": 0.30, "output": 1.20}}

The Batch API charges its own prices, half the online ones for every model OpenAI lists. A model's
batch price is ``batch_input``/``batch_output`` when the file gives them, else half its online price.

A model is priced by its exact name, else by the longest table name it starts with (so
``gpt-4o-mini-2024-07-18`` uses ``gpt-4o-mini``). An unknown model has no price: its cost is
reported as unknown, never as zero.

Usage:
    >>> table = PriceTable.load(None)
    >>> table.cost("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0)
    0.15
    >>> table.cost("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0, batch=True)
    0.075
"""

# Standard library imports
import json
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# US dollars per million tokens: (input, output).
DEFAULT_PRICES: Dict[str, Tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "o1": (15.00, 60.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
}
# The Batch API's price as a share of the online one (OpenAI: 50% for every batchable model).
BATCH_PRICE_SHARE = 0.5


@dataclass
class PriceTable:
    """Prices per model, in US dollars per million tokens.

    Attributes:
        prices: model name to (input, output) price.
        batch_prices: model name to its (input, output) Batch API price, where it is not half the online one.
    """

    prices: Dict[str, Tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    batch_prices: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Optional[str]) -> "PriceTable":
        """The shipped table, overridden and extended by a JSON file when given.

        Raises:
            ValueError: naming the file, when it is not a table of prices.
        """
        table = cls()
        if not path:
            return table
        try:
            with open(path, encoding="utf-8") as handle:
                entries = json.load(handle)
            for model, price in entries.items():
                table.prices[model] = (float(price["input"]), float(price.get("output", 0.0)))
                table.batch_prices.pop(model, None)
                if "batch_input" in price or "batch_output" in price:
                    table.batch_prices[model] = (float(price.get("batch_input", price["input"] * BATCH_PRICE_SHARE)),
                                                 float(price.get("batch_output",
                                                                 price.get("output", 0.0) * BATCH_PRICE_SHARE)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{path}: not a price table ({error})") from error
        return table

    def price_of(self, model: Optional[str], batch: bool = False) -> Optional[Tuple[float, float]]:
        """The (input, output) price of a model (its Batch API price with ``batch``), or None when it is unknown."""
        name = self._table_name(model)
        if name is None:
            return None
        if not batch:
            return self.prices[name]
        if name in self.batch_prices:
            return self.batch_prices[name]
        online = self.prices[name]
        return (online[0] * BATCH_PRICE_SHARE, online[1] * BATCH_PRICE_SHARE)

    def cost(self, model: Optional[str], input_tokens: int, output_tokens: int, batch: bool = False) -> Optional[float]:
        """The cost in US dollars (at Batch API prices with ``batch``), or None when the model has no price."""
        price = self.price_of(model, batch)
        if price is None:
            return None
        return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000

    def _table_name(self, model: Optional[str]) -> Optional[str]:
        """The table entry a model is priced by: its exact name, else the longest name it starts with."""
        if not model:
            return None
        if model in self.prices:
            return model
        base = model.split(":")[1] if model.startswith("ft:") and ":" in model[3:] else model
        matches = [name for name in self.prices if base.startswith(name)]
        return max(matches, key=len) if matches else None


def format_usd(amount: float) -> str:
    """US dollars with the digits that matter: $0.002, $0.50, $1,234.50."""
    return f"${amount:,.2f}" if amount >= 1 or round(amount, 2) == amount else f"${amount:,.6g}"
