"""The data model of client keys as policies, and of prices.

A client key carries what it may do: the models it may name, its own rate
limit, and a budget in tokens or in US dollars. Prices say what a model's
tokens cost, for budgets in dollars. Everything here is re-exported by
:mod:`llmproxy.config`; import it from there.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = [
    "BUDGET_PERIODS",
    "BUDGET_UNITS",
    "DEFAULT_RESERVE",
    "STREAM_USAGE",
    "AuthConfig",
    "BudgetConfig",
    "ClientKey",
    "KeyRateConfig",
    "PriceConfig",
]

#: Budget windows (calendar, UTC).
BUDGET_PERIODS = ("minute", "hour", "day", "month")

#: What a budget counts: tokens, or US dollars.
BUDGET_UNITS = ("tokens", "usd")

#: Output tokens reserved for a request that names no output cap.
DEFAULT_RESERVE = 4096

#: When the proxy asks a streaming upstream for a usage event: for keys
#: with a budget, always, or never.
STREAM_USAGE = ("budget", "always", "never")


@attrs.frozen(kw_only=True)
class BudgetConfig:
    """A client key's budget per calendar window: tokens or dollars.

    Exactly one of ``tokens`` and ``usd`` is set.

    Attributes:
        per: The calendar window in UTC: ``minute``, ``hour``, ``day`` or
            ``month``.
        tokens: Tokens (prompt + completion, as upstreams report them) per
            window, or None for a budget in dollars.
        usd: US dollars per window (priced by ``prices``), or None for a
            budget in tokens.
        reserve: Output tokens held for a request that names no output cap
            while it runs.
    """

    per: str
    tokens: int | None = None
    usd: float | None = None
    reserve: int = DEFAULT_RESERVE

    def __attrs_post_init__(self) -> None:
        """Check that exactly one unit is given.

        Raises:
            ValueError: Neither or both of ``tokens`` and ``usd``.
        """
        if (self.tokens is None) == (self.usd is None):
            raise ValueError("a budget has exactly one of tokens and usd")

    @property
    def unit(self) -> str:
        """``tokens`` or ``usd``."""
        return "tokens" if self.tokens is not None else "usd"

    def as_written(self) -> dict[str, Any]:
        """The budget as a config writes it: ``{tokens|usd, per, reserve}``
        (for ``--check`` and ``/budgets``)."""
        amount = self.tokens if self.usd is None else self.usd
        return {self.unit: amount, "per": self.per, "reserve": self.reserve}


@attrs.frozen
class KeyRateConfig:
    """A client key's own rate limit, in place of ``rate_limit``'s.

    Attributes:
        rate: Requests per second (may be fractional).
        burst: Requests at once.
    """

    rate: float
    burst: int


def _count_keys(keys: tuple[ClientKey, ...]) -> str:
    """How many keys there are: the keys' repr, which never shows them."""
    return f"<{len(keys)} keys>"


@attrs.frozen
class ClientKey:
    """One accepted client key and its policy.

    Attributes:
        key: The key, or ``sha256:`` and its digest (a secret; never shown).
        name: A name for logs, metrics and ``/budgets`` (letters, digits,
            ``.``, ``_``, ``-``), or None.
        budget: The key's budget, or None for no budget.
        models: Model names or globs (``fnmatch``, case-sensitive) the key
            may name, or None for every model.
        rate_limit: The key's own rate limit, or None for ``rate_limit``'s.
        origin: Where the key is written (``auth.keys[2]``, or ``keys file
            '/etc/llmproxy/keys', line 3``), for messages; not compared.
    """

    key: str = attrs.field(repr=lambda _: "***")
    name: str | None = None
    budget: BudgetConfig | None = None
    models: tuple[str, ...] | None = None
    rate_limit: KeyRateConfig | None = None
    origin: str = attrs.field(default="", eq=False, repr=False)


@attrs.frozen
class AuthConfig:
    """Client keys.

    Attributes:
        keys: Accepted keys, with their policies (secrets; never shown).
        keys_file: A file of keys, one a line (``sha256:<hex>`` for a
            hash), each optionally followed by its policy's fields.
        file_keys: The keys file's entries, read when the config was
            loaded, in file order (secrets; never shown).
    """

    keys: tuple[ClientKey, ...] = attrs.field(default=(), repr=_count_keys)
    keys_file: str | None = None
    file_keys: tuple[ClientKey, ...] = attrs.field(default=(), repr=_count_keys)


@attrs.frozen
class PriceConfig:
    """What a model's tokens cost, in US dollars per million tokens.

    Attributes:
        input: Per million prompt tokens.
        output: Per million completion tokens.
        cached_input: Per million prompt tokens read from the upstream's
            cache, or None to price them as ``input``.
    """

    input: float
    output: float
    cached_input: float | None = None
