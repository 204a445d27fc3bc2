"""What the limits decide and hold: verdicts, asks, spends, reservations.

* :class:`Verdict` and its outcomes (:data:`OK` ... :data:`MODEL_NOT_ALLOWED`).
* :class:`Ask` (what a request may cost, known before it is sent) and
  :class:`Spend` (what it did cost, from the upstream's usage).
* :class:`Reservation`: the part of a key's budget held for one request in
  flight, until :meth:`~llmproxy.limits.Limits.settle`; :class:`Admission`
  pairs it with the verdict.
* :func:`budget_window`: the calendar window a budget counts in;
  :func:`ask_cost` and :func:`spend_cost`, what an ask or a spend costs in
  a budget's unit; :func:`budget_status`, a budget as ``/budgets`` shows it.

Amounts in stores are integers in the budget's unit: tokens, or
micro-dollars (:data:`MICRO`) for a budget in US dollars.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from llmproxy.config import BudgetConfig
from llmproxy.limits._keys import KeyInfo
from llmproxy.limits._prices import Prices

__all__ = [
    "ALLOWED",
    "MICRO",
    "MODEL_NOT_ALLOWED",
    "NO_PRICE",
    "OK",
    "OVER_BUDGET",
    "RATE_LIMITED",
    "STORE_DOWN",
    "Admission",
    "Ask",
    "Reservation",
    "Spend",
    "Verdict",
    "ask_cost",
    "budget_limit",
    "budget_slot",
    "budget_status",
    "budget_window",
    "spend_cost",
]

#: A :class:`Verdict`'s outcomes: let through, or refused for its rate
#: limit, its key's budget, a failing store (``on_store_error: deny``), a
#: model without a price under a budget in dollars, or a model the key may
#: not use.
OK = "ok"
RATE_LIMITED = "rate_limited"
OVER_BUDGET = "over_budget"
STORE_DOWN = "store_down"
NO_PRICE = "no_price"
MODEL_NOT_ALLOWED = "model_not_allowed"

#: Micro-dollars in a dollar: a budget in US dollars is kept in these.
MICRO = 1_000_000


@attrs.frozen
class Verdict:
    """Whether a request may go upstream.

    Attributes:
        outcome: One of :data:`OK`, :data:`RATE_LIMITED`,
            :data:`OVER_BUDGET`, :data:`STORE_DOWN`, :data:`NO_PRICE` and
            :data:`MODEL_NOT_ALLOWED`.
        wait: Seconds until a retry may succeed (``Retry-After``); 0 when
            waiting does not help.
    """

    outcome: str
    wait: float = 0.0


#: The verdict of a request the limits let through.
ALLOWED = Verdict(OK)


@attrs.frozen
class Ask:
    """What a request may cost, as known before it is sent.

    Attributes:
        model: The model it names, or None.
        input_tokens: Its prompt's tokens (an estimate).
        output_tokens: The most it may generate: its output cap, else the
            key's ``budget.reserve``.
    """

    model: str | None
    input_tokens: int
    output_tokens: int


@attrs.frozen
class Spend:
    """What a request did cost, as its upstream reported it.

    Attributes:
        model: The model that answered (or was asked for), or None.
        prompt_tokens: Prompt tokens, cached ones included.
        completion_tokens: Generated tokens.
        cached_tokens: Those of the prompt tokens read from the upstream's
            cache.
    """

    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@attrs.define(eq=False)
class Reservation:
    """The part of a key's budget held for one request until it is settled.

    Attributes:
        key: The key whose budget it is.
        name: The key's name, which names its budget in the store.
        budget: The key's budget.
        slot: The store's name for the budget's counter in its window
            (the window, after ``usd:`` for a budget in dollars).
        ends: When the window ends (unix time).
        amount: What is held, in the budget's unit (tokens or
            micro-dollars); 0 when the ask's cost was unknown.
        id: The reservation's id in the store, unique.
        model: The model the request asked for, priced again at settling
            when the spend names one without a price.
        held: Whether the store holds ``amount`` (False when nothing was
            held, or the store failed and ``on_store_error`` let the request
            through): settling then only charges.
        settled: Whether :meth:`~llmproxy.limits.Limits.settle` ran.
    """

    key: KeyInfo
    name: str
    budget: BudgetConfig
    slot: str
    ends: float
    amount: int
    id: str
    model: str | None = None
    held: bool = False
    settled: bool = False


@attrs.frozen
class Admission:
    """A verdict, and what it holds of the key's budget.

    Attributes:
        verdict: Whether the request may go upstream.
        reservation: What is held for it until it is settled: set when it
            was admitted and its key has a budget, else None.
    """

    verdict: Verdict
    reservation: Reservation | None = None


def budget_limit(budget: BudgetConfig) -> int:
    """A budget's size per window in its unit: tokens, or micro-dollars."""
    if budget.tokens is not None:
        return budget.tokens
    return round((budget.usd or 0.0) * MICRO)


def budget_slot(budget: BudgetConfig, window: str) -> str:
    """The store's name for a budget's counter in ``window``.

    A budget in dollars counts in a counter of its own (``usd:`` and the
    window), so that a reload changing the unit does not read tokens as
    micro-dollars.
    """
    return window if budget.usd is None else f"usd:{window}"


def budget_window(per: str, now: float) -> tuple[str, float]:
    """The calendar window (UTC) that ``now`` falls in.

    Args:
        per: ``minute``, ``hour``, ``day`` or ``month``.
        now: Unix time.

    Returns:
        ``(window id, its end as unix time)``, e.g. ``("day:2026-12-03",
        1764806400.0)``.

    Raises:
        ValueError: An unknown period.
    """
    t = datetime.fromtimestamp(now, timezone.utc)
    if per == "minute":
        start = t.replace(second=0, microsecond=0)
        end, label = start + timedelta(minutes=1), start.strftime("%Y-%m-%dT%H:%M")
    elif per == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end, label = start + timedelta(hours=1), start.strftime("%Y-%m-%dT%H")
    elif per == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end, label = start + timedelta(days=1), start.strftime("%Y-%m-%d")
    elif per == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end, label = (start + timedelta(days=32)).replace(day=1), start.strftime("%Y-%m")
    else:
        raise ValueError(f"unknown budget period {per!r}")
    return f"{per}:{label}", end.timestamp()


def ask_cost(budget: BudgetConfig, ask: Ask | None, prices: Prices) -> int | None:
    """What an ask may cost in a budget's unit, at most the whole budget.

    Args:
        budget: The key's budget.
        ask: What the request may cost, or None when unknown.
        prices: What models cost.

    Returns:
        Tokens (input + output) or micro-dollars (their price, rounded up);
        0 for no ask; None for a budget in dollars and a model without a
        price.
    """
    if ask is None:
        return 0
    if budget.usd is None:
        amount: int | None = max(0, ask.input_tokens) + max(0, ask.output_tokens)
    else:
        amount = prices.micro_dollars(ask.model, ask.input_tokens, ask.output_tokens)
    return None if amount is None else min(amount, budget_limit(budget))


def spend_cost(
    budget: BudgetConfig, spend: Spend, prices: Prices, asked: str | None
) -> int | None:
    """What a spend costs in a budget's unit.

    Args:
        budget: The key's budget.
        spend: What the upstream reported.
        prices: What models cost.
        asked: The model the request asked for: its price counts when the
            spend's model has none.

    Returns:
        Tokens (prompt + completion) or micro-dollars (rounded up); None for
        a budget in dollars when neither model has a price.
    """
    if budget.usd is None:
        return max(0, spend.prompt_tokens) + max(0, spend.completion_tokens)
    usage = (spend.prompt_tokens, spend.completion_tokens, spend.cached_tokens)
    micros = prices.micro_dollars(spend.model, *usage)
    if micros is None:
        micros = prices.micro_dollars(asked, *usage)
    return micros


def budget_status(
    budget: BudgetConfig, window: str, ends: float, used: int, held: int
) -> dict[str, Any]:
    """A budget as ``GET /budgets`` shows it.

    Args:
        budget: The budget.
        window: The window's id.
        ends: When it ends (unix time).
        used: What is charged in it, in the store's unit.
        held: What is reserved for requests in flight, in the store's unit.

    Returns:
        ``{"unit", "limit", "used", "reserved", "remaining", "window",
        "resets_at"}``, amounts in tokens or in US dollars.
    """
    remaining = max(0, budget_limit(budget) - used - held)
    if budget.usd is None:
        limit: float = budget.tokens or 0
        amounts: tuple[float, float, float] = (used, held, remaining)
    else:
        limit = budget.usd
        amounts = (used / MICRO, held / MICRO, remaining / MICRO)
    return {
        "unit": budget.unit,
        "limit": limit,
        "used": amounts[0],
        "reserved": amounts[1],
        "remaining": amounts[2],
        "window": window,
        "resets_at": ends,
    }
