"""``prices`` (what a model's tokens cost) and ``stream_usage``.

``prices`` maps a model name or glob to ``{input, output, cached_input}``,
US dollars per million tokens; it prices budgets in dollars. There is no
bundled price list: what is not listed has no price.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from llmproxy.config._key_fields import model_pattern
from llmproxy.config._model import ConfigError
from llmproxy.config._policy import STREAM_USAGE, PriceConfig
from llmproxy.config._values import _describe, _join, _Mapping, _string

__all__ = ["prices_section", "stream_usage"]

_PRICE_FIELDS = ("input", "output", "cached_input")


def _dollars(value: Any, path: str) -> float:
    """US dollars per million tokens: a finite number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected US dollars per million tokens, got "
                                f"{_describe(value, path)}")
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(path, f"must be 0 or more, got {value!r}")
    return float(value)


def _price(value: Any, path: str) -> PriceConfig:
    """One model's price: ``{input, output, cached_input}``."""
    table = _Mapping(value, path)
    table.check_keys(_PRICE_FIELDS)
    given = {field: table.get(field, _dollars) for field in _PRICE_FIELDS}
    for field in ("input", "output"):
        if given[field] is None:
            raise ConfigError(_join(path, field), "required: US dollars per million tokens")
    return PriceConfig(
        input=given["input"] or 0.0,
        output=given["output"] or 0.0,
        cached_input=given["cached_input"],
    )


def prices_section(value: Any, path: str) -> Mapping[str, PriceConfig]:
    """``prices``: model name or glob -> price, in file order.

    Args:
        value: The YAML value.
        path: Its key path (``prices``).

    Returns:
        The prices, read-only.

    Raises:
        ConfigError: A name that is no model name or glob, or a price that
            is not one.
    """
    table = _Mapping(value, path)
    prices = {}
    for name, price in table.value.items():
        where = _join(path, name)
        prices[model_pattern(name, where)] = _price(price, where)
    return MappingProxyType(prices)


def stream_usage(value: Any, path: str) -> str:
    """``stream_usage``: ``budget``, ``always`` or ``never``.

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The value.

    Raises:
        ConfigError: Another value.
    """
    text = _string(value, path)
    if text not in STREAM_USAGE:
        raise ConfigError(path, f"expected one of {', '.join(STREAM_USAGE)}, got {text!r}")
    return text
