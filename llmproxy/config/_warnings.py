"""What ``--check`` warns about: a valid config that likely does not do
what was meant.

* A client key's ``models`` glob that matches no model of ``model_routes``
  or ``model_aliases`` (only when there are model routes: without them,
  any model may come).
* A key with a budget in dollars while a model it may use has no price
  (its requests for that model are refused), or while there are no prices
  at all.
* A route that would send ``/v1/v1/...``: a ``target_map`` key and its URL
  ending in the same version segment (``"/v1/": "https://api.openai.com/v1"``),
  or a ``model_routes`` URL ending in the version a ``target_map`` prefix
  starts with (the request path keeps its ``/v1/``, and the URL adds one).

Also :func:`find_price`, the price a model falls under, which the limits
use too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from llmproxy.config._model import Config
from llmproxy.config._policy import ClientKey, PriceConfig
from llmproxy.config._values import _join

__all__ = ["config_warnings", "find_price"]

#: Characters that make a ``prices`` entry a glob rather than a name.
_GLOB = frozenset("*?[")

#: Models named in one warning at most.
_MAX_NAMED = 5

#: A version segment: ``v1``, ``v4``, ``v1beta``.
_VERSION = re.compile(r"v\d+[a-z0-9]*\Z")


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


def _last_version(path: str) -> str | None:
    """The version segment a path ends in (``/api/paas/v4`` -> ``v4``), if any."""
    segments = [part for part in path.split("/") if part]
    if segments and _VERSION.match(segments[-1]):
        return segments[-1]
    return None


def _doubled_versions(config: Config) -> list[str]:
    """Routes whose URL repeats the version segment the request path has."""
    warnings = []
    prefixes: dict[str, str] = {}  # version -> a target_map key starting with it
    for key in config.target_map:
        first = next((part for part in key.split("/") if part), "")
        if _VERSION.match(first) and key.endswith("/"):
            prefixes.setdefault(first, key)
    for key, route in config.target_map.items():
        version = _last_version(key.rstrip("/"))
        for url in route.urls:
            if version is not None and _last_version(urlsplit(url).path) == version:
                warnings.append(
                    f"{_join('target_map', key)}: the path and the URL {url!r} both end "
                    f"in /{version}: requests under {key!r} go to {url}{key}..., with "
                    f"/{version} twice; leave /{version} out of the URL"
                )
                break
    for model, route in config.model_routes.items():
        for url in route.urls:
            version = _last_version(urlsplit(url).path)
            if version is not None and version in prefixes:
                prefix = prefixes[version]
                warnings.append(
                    f"{_join('model_routes', model)}: the URL {url!r} ends in /{version}, "
                    f"and requests under {prefix!r} keep theirs: they go to "
                    f"{url}{prefix}...; leave /{version} out of the URL"
                )
                break
    return warnings


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
    warnings = _doubled_versions(config)
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
