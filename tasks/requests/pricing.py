"""Prices per model, and the cost of requests: estimated before sending, real from ``usage`` after.

The shipped table gives US dollars per million tokens (input, output) for common OpenAI models,
as published when this table was written. Prices change: override or extend it with a JSON
file of the same shape (``--price-table prices.json``):

    {"gpt-4o-mini": {"input": 0.15, "output": 0.60}, "my-finetune": {"input": 0.30, "output": 1.20}}

A model is priced by its exact name, else by the longest table name it starts with (so
``gpt-4o-mini-2024-07-18`` uses ``gpt-4o-mini``). An unknown model has no price: its cost is
reported as unknown, never as zero.

Usage:
    >>> table = PriceTable.load(None)
    >>> table.cost("gpt-4o-mini", input_tokens=1_000_000, output_tokens=0)
    0.15
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


@dataclass
class PriceTable:
    """Prices per model, in US dollars per million tokens.

    Attributes:
        prices: model name to (input, output) price.
    """

    prices: Dict[str, Tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))

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
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{path}: not a price table ({error})") from error
        return table

    def price_of(self, model: Optional[str]) -> Optional[Tuple[float, float]]:
        """The (input, output) price of a model, or None when it is unknown."""
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        base = model.split(":")[1] if model.startswith("ft:") and ":" in model[3:] else model
        matches = [name for name in self.prices if base.startswith(name)]
        return self.prices[max(matches, key=len)] if matches else None

    def cost(self, model: Optional[str], input_tokens: int, output_tokens: int) -> Optional[float]:
        """The cost in US dollars, or None when the model has no price."""
        price = self.price_of(model)
        if price is None:
            return None
        return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000


def format_usd(amount: float) -> str:
    """US dollars with the digits that matter: $0.002, $0.50, $1,234.50."""
    return f"${amount:,.2f}" if amount >= 1 or round(amount, 2) == amount else f"${amount:,.6g}"
