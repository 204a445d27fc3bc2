"""What a request costs in US dollars, from the config's ``prices``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from llmproxy.config import PriceConfig, find_price

__all__ = ["Prices"]

#: Models whose price entry is remembered; past it the memory starts over
#: (clients name what models they like).
_REMEMBERED = 4096

#: Float noise forgiven when rounding micro-dollars up.
_EPSILON = 1e-6


class Prices:
    """The ``prices`` table: model name or glob -> US dollars per million tokens.

    An entry that is a model's exact name wins; otherwise the first glob
    (in config order) that matches it. No entry: no price.
    """

    def __init__(self, table: Mapping[str, PriceConfig]) -> None:
        """Keep the table.

        Args:
            table: Model name or glob -> price, in config order.
        """
        self._table = MappingProxyType(dict(table))
        self._found: dict[str, tuple[str, PriceConfig] | None] = {}

    @classmethod
    def from_config(cls, prices: Mapping[str, PriceConfig]) -> Prices:
        """The prices of a config's ``prices`` section.

        Args:
            prices: ``Config.prices``.

        Returns:
            The prices.
        """
        return cls(prices)

    def __len__(self) -> int:
        """Return how many entries the table has."""
        return len(self._table)

    def _entry(self, model: str | None) -> tuple[str, PriceConfig] | None:
        """The table entry ``model`` falls under, remembered."""
        if model is None:
            return None
        if model in self._found:
            return self._found[model]
        if len(self._found) >= _REMEMBERED:
            self._found.clear()
        found = self._found[model] = find_price(self._table, model)
        return found

    def price(self, model: str | None) -> PriceConfig | None:
        """The price of ``model``, or None when it has none."""
        found = self._entry(model)
        return found[1] if found is not None else None

    def label(self, model: str | None) -> str:
        """The table entry ``model`` falls under (a name or glob), else ``other``.

        A bounded set of values, for metric labels.
        """
        found = self._entry(model)
        return found[0] if found is not None else "other"

    def cost(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> float | None:
        """What the tokens of ``model`` cost, in US dollars.

        Args:
            model: The model.
            prompt_tokens: Prompt tokens, cached ones included.
            completion_tokens: Generated tokens.
            cached_tokens: Those of the prompt tokens read from cache,
                priced at ``cached_input`` when the price has one, else at
                ``input``.

        Returns:
            The cost, or None when the model has no price.
        """
        micros = self._micros(model, prompt_tokens, completion_tokens, cached_tokens)
        return None if micros is None else micros / 1_000_000

    def micro_dollars(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> int | None:
        """:meth:`cost` in whole micro-dollars, rounded up (what budgets count).

        Returns:
            The cost, or None when the model has no price.
        """
        micros = self._micros(model, prompt_tokens, completion_tokens, cached_tokens)
        return None if micros is None else max(0, math.ceil(micros - _EPSILON))

    def _micros(
        self, model: str | None, prompt: int, completion: int, cached: int
    ) -> float | None:
        """The cost in micro-dollars, unrounded: a price per million tokens
        times tokens is micro-dollars."""
        price = self.price(model)
        if price is None:
            return None
        prompt, completion = max(0, prompt), max(0, completion)
        cached = min(max(0, cached), prompt)
        cached_rate = price.input if price.cached_input is None else price.cached_input
        return (prompt - cached) * price.input + cached * cached_rate + completion * price.output
