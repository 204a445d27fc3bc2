"""What ``--check`` warns about: a valid config that likely does not do
what was meant.

* A client key's ``models`` glob that matches no model of ``model_routes``
  or ``model_aliases`` (only when there are model routes: without them,
  any model may come).
* A key with a budget in dollars while a model it may use has no price
  (its requests for that model are refused), or while there are no prices
  at all.

Also :func:`find_price`, the price a model falls under, which the limits
use too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from llmproxy.config._model import Config
from llmproxy.config._policy import ClientKey, PriceConfig

__all__ = ["config_warnings", "find_price"]

#: Characters that make a ``prices`` entry a glob rather than a name.
_GLOB = frozenset("*?[")

#: Models named in one warning at most.
_MAX_NAMED = 5


def find_price(
    prices: Mapping[str, PriceConfig], model: str | None
) -> tuple[str, PriceConfig] | None:
    """The ``prices`` entry a model falls under.

    An entry that is the model's exact name wins; otherwise the first glob
    (in file order) that matches it, case-sensitively.

    Args:
        prices: The ``prices`` table.
        model: A model name, or None.

    Returns:
        ``(entry, price)``, or None when no entry matches (or no model).
    """
    if model is None:
        return None
    exact = prices.get(model)
    if exact is not None:
        return model, exact
    for entry, price in prices.items():
        if _GLOB.intersection(entry) and fnmatchcase(model, entry):
            return entry, price
    return None


def _where(key: ClientKey) -> str:
    """A key's place as a warning names it: a key path, or a keys file line."""
    if key.origin.startswith("auth"):
        return key.origin
    return f"auth.keys_file: {key.origin}" if key.origin else "auth.keys"


def _field(key: ClientKey, field: str) -> str:
    """A key's field as a warning names it."""
    where = _where(key)
    return f"{where}.{field}" if where.startswith("auth.keys[") else f"{where}: {field}"


def _named(names: list[str]) -> str:
    """Up to :data:`_MAX_NAMED` names, quoted, and how many more."""
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _allowed(key: ClientKey, models: Iterable[str]) -> list[str]:
    """The models a key may name, of those given."""
    if key.models is None:
        return list(models)
    return [m for m in models if any(fnmatchcase(m, glob) for glob in key.models)]


def config_warnings(config: Config) -> list[str]:
    """What a valid config probably gets wrong, one line each.

    Args:
        config: A validated configuration.

    Returns:
        The warnings, each starting with the key path (or keys file line)
        it is about; none names a secret.
    """
    keys = () if config.auth is None else (*config.auth.keys, *config.auth.file_keys)
    routed = list(config.model_routes)
    known = routed + [a for a in config.model_aliases if a not in config.model_routes]
    warnings = []
    for key in keys:
        if key.models is not None and routed:
            for glob in key.models:
                if not any(fnmatchcase(name, glob) for name in known):
                    warnings.append(
                        f"{_field(key, 'models')}: {glob!r} matches no model of "
                        "model_routes or model_aliases"
                    )
        if key.budget is None or key.budget.usd is None:
            continue
        if not config.prices:
            warnings.append(
                f"{_field(key, 'budget')}: a budget in usd, but 'prices' lists no model: "
                "every request naming a model is refused (no_price)"
            )
            continue
        unpriced = [m for m in _allowed(key, routed) if find_price(config.prices, m) is None]
        if unpriced:
            warnings.append(
                f"{_field(key, 'budget')}: a budget in usd, but no price for "
                f"{_named(unpriced)} in 'prices': those requests are refused (no_price)"
            )
    return warnings
