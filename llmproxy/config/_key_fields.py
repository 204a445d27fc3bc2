"""The fields of a client key's policy: name, budget, models, rate limit.

Each field is read in two forms: a YAML value under ``auth.keys`` (the
converter raises :class:`~llmproxy.config.ConfigError` naming the key
path) and the text after ``field=`` on a keys file line (the parser
returns the value or a problem worded without any of the line's text,
since a key split by a space would show).
"""

from __future__ import annotations

import re
from typing import Any

from llmproxy.config._model import ConfigError
from llmproxy.config._policy import (
    BUDGET_PERIODS,
    DEFAULT_RESERVE,
    BudgetConfig,
    KeyRateConfig,
)
from llmproxy.config._values import (
    _describe,
    _join,
    _Mapping,
    _number,
    _positive_int,
    _string,
)

__all__ = [
    "BUDGET_FORM",
    "MAX_TOKENS",
    "MAX_USD",
    "budget",
    "budget_text",
    "key_name",
    "key_rate",
    "line_budget",
    "model_pattern",
    "models",
    "models_text",
    "name_problem",
    "rate_text",
    "reserve_text",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_NAME_RULE = (
    "a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)

#: A model name or glob: 1-200 characters, none a space, a control
#: character or a comma (which separates them on a keys file line).
_MODEL = re.compile(r"[^\s,\x00-\x1f\x7f]{1,200}\Z")
_MODEL_RULE = "a model name or glob is 1-200 characters without spaces or commas"

_DIGITS = re.compile(r"[0-9]+\Z")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")

#: The largest budgets: amounts stay exact as the integers (tokens, or
#: micro-dollars) that stores and their Lua scripts keep.
MAX_TOKENS = 10**15
MAX_USD = 10**9

BUDGET_FORM = "expected TOKENS/PER such as 2000000/day, or $USD/PER such as $25/month"
_PERIODS = f"expected one of {', '.join(BUDGET_PERIODS)}"
_RATE_FORM = "expected RATE or RATE/BURST such as 5 or 0.5/10"


def key_name(value: Any, path: str) -> str:
    """A client key's name: 1-64 letters, digits, ``.``, ``_``, ``-``.

    Names appear in logs, metric labels and store keys, so nothing else is
    allowed (no spaces, quotes or control characters).

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The name.

    Raises:
        ConfigError: Not such a name.
    """
    name = _string(value, path)
    if not _NAME.match(name):
        raise ConfigError(path, f"{_NAME_RULE}; got {name[:70]!r}")
    return name


def name_problem(text: str) -> str | None:
    """What is wrong with a keys file line's ``name=``, if anything."""
    return None if _NAME.match(text) else f"name: {_NAME_RULE}"


def budget_text(text: str) -> tuple[int | None, float | None, str] | None:
    """``TOKENS/PER`` or ``$USD/PER`` split into its parts.

    Args:
        text: The budget as written.

    Returns:
        ``(tokens, usd, per)`` with one of ``tokens`` and ``usd`` set, or
        None when the text is of neither form.
    """
    amount, slash, per = text.partition("/")
    amount, per = amount.strip(), per.strip()
    if not slash:
        return None
    if amount.startswith("$") and _DECIMAL.match(amount[1:]):
        return None, float(amount[1:]), per
    if _DIGITS.match(amount):
        return int(amount), None, per
    return None


def budget(value: Any, path: str) -> BudgetConfig:
    """``{tokens|usd, per, reserve}``, or the text ``TOKENS/PER`` or ``$USD/PER``.

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The budget.

    Raises:
        ConfigError: Naming the part that is wrong.
    """
    if isinstance(value, str):
        parsed = budget_text(value)
        if parsed is None:
            raise ConfigError(path, f"{BUDGET_FORM}, got {value!r}")
        tokens, usd, per = parsed
        value = {"tokens": tokens, "per": per} if usd is None else {"usd": usd, "per": per}
    table = _Mapping(value, path)
    table.check_keys(("tokens", "usd", "per", "reserve"))
    tokens = table.get("tokens", _positive_int)
    usd = table.get("usd", _number)
    if tokens is None and usd is None:
        raise ConfigError(path, "required: tokens or usd per window")
    if tokens is not None and usd is not None:
        raise ConfigError(_join(path, "usd"), "give tokens or usd, not both")
    if tokens is not None and tokens > MAX_TOKENS:
        raise ConfigError(_join(path, "tokens"), f"at most {MAX_TOKENS:,}")
    if usd is not None and usd > MAX_USD:
        raise ConfigError(_join(path, "usd"), f"at most {MAX_USD:,}")
    per = table.get("per", _string)
    if per not in BUDGET_PERIODS:
        raise ConfigError(_join(path, "per"), f"{_PERIODS}, got {per!r}")
    reserve = table.get("reserve", _positive_int) or DEFAULT_RESERVE
    return BudgetConfig(per=per, tokens=tokens, usd=usd, reserve=reserve)


def line_budget(text: str, reserve: int | None) -> BudgetConfig | str:
    """A keys file line's ``budget=`` (and ``reserve=``).

    Args:
        text: What follows ``budget=``.
        reserve: The line's ``reserve=``, if any.

    Returns:
        The budget, or what is wrong with it (worded without the text).
    """
    parsed = budget_text(text)
    if parsed is None:
        return f"budget: {BUDGET_FORM}"
    tokens, usd, per = parsed
    if tokens is not None and not 1 <= tokens <= MAX_TOKENS:
        return f"budget.tokens: must be at least 1 and at most {MAX_TOKENS:,}"
    if usd is not None and not 0 < usd <= MAX_USD:
        return f"budget.usd: must be more than 0 and at most {MAX_USD:,}"
    if per not in BUDGET_PERIODS:
        return f"budget.per: {_PERIODS}"
    return BudgetConfig(per=per, tokens=tokens, usd=usd, reserve=reserve or DEFAULT_RESERVE)


def reserve_text(text: str) -> int | None:
    """A keys file line's ``reserve=``: a whole number of at least 1, or None."""
    if not _DIGITS.match(text) or int(text) < 1:
        return None
    return int(text)


def models(value: Any, path: str) -> tuple[str, ...]:
    """``models``: a list of model names or globs (or one, or comma-separated).

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The names and globs, in order, each once.

    Raises:
        ConfigError: Not a list of names, or an empty one.
    """
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list):
        items = [_string(item, f"{path}[{i}]").strip() for i, item in enumerate(value)]
    else:
        raise ConfigError(path, f"expected a list of model names, got {_describe(value, path)}")
    if not items or items == [""]:
        raise ConfigError(path, "list at least one model name or glob (or remove 'models')")
    for i, item in enumerate(items):
        model_pattern(item, f"{path}[{i}]")
    return tuple(dict.fromkeys(items))


def model_pattern(name: str, path: str) -> str:
    """One model name or glob, as ``models`` and ``prices`` take them.

    Args:
        name: The name or glob.
        path: Its key path.

    Returns:
        The name.

    Raises:
        ConfigError: Empty, over 200 characters, or holding a space, a
            control character or a comma.
    """
    if not _MODEL.match(name):
        raise ConfigError(path, f"{_MODEL_RULE}; got {name[:70]!r}")
    return name


def models_text(text: str) -> tuple[str, ...] | None:
    """A keys file line's ``models=a,b*``, or None when malformed."""
    items = text.split(",")
    if not all(_MODEL.match(item) for item in items):
        return None
    return tuple(dict.fromkeys(items))


def key_rate(value: Any, path: str) -> KeyRateConfig:
    """A key's ``rate_limit``: ``{rate, burst}``.

    Args:
        value: The YAML value.
        path: Its key path.

    Returns:
        The rate limit; ``burst`` defaults to ``rate`` rounded down, at
        least 1.

    Raises:
        ConfigError: Naming the part that is wrong.
    """
    table = _Mapping(value, path)
    table.check_keys(("rate", "burst"))
    rate = table.get("rate", _number)
    if rate is None:
        raise ConfigError(_join(path, "rate"), "required: requests per second")
    burst = table.get("burst", _positive_int) or max(1, int(rate))
    return KeyRateConfig(rate=rate, burst=burst)


def rate_text(text: str) -> KeyRateConfig | str:
    """A keys file line's ``rate=RATE`` or ``rate=RATE/BURST``.

    Returns:
        The rate limit, or what is wrong with it (worded without the text).
    """
    rate, slash, burst = text.partition("/")
    if not _DECIMAL.match(rate) or float(rate) <= 0 or (slash and not _DIGITS.match(burst)):
        return f"rate: {_RATE_FORM}"
    if slash and int(burst) < 1:
        return "rate: the burst must be at least 1"
    value = float(rate)
    return KeyRateConfig(rate=value, burst=int(burst) if slash else max(1, int(value)))
