"""Settling what requests held and cost, and reading budgets back.

:class:`Ledger` is the accounting half of :class:`~llmproxy.limits.Limits`:
when a request ends it lets go of its reservation and charges its spend, in
one store operation (one Lua script for Redis), and it reads a key's budget
for ``GET /budgets``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.limits._budget import (
    MICRO,
    Reservation,
    Spend,
    budget_slot,
    budget_status,
    budget_window,
    spend_cost,
)
from llmproxy.limits._failures import ADD_USAGE, STATUS, StoreFailures
from llmproxy.limits._keys import KeyInfo
from llmproxy.limits._prices import Prices

__all__ = ["KEEP_AFTER_WINDOW", "Ledger"]

log = Logger(namespace="llmproxy.limits")

#: Seconds a budget's counter is kept after its window ends, so that
#: ``/budgets`` can still show it around the turn of the window.
KEEP_AFTER_WINDOW = 86400.0


class Ledger:
    """Settles reservations and reads budgets, over one store."""

    def __init__(
        self, store: Any, prices: Prices, wall_clock: Any, metrics: Any,
        failures: StoreFailures,
    ) -> None:
        """Set up.

        Args:
            store: Where the numbers are kept (memory or Redis).
            prices: What models cost, for budgets in US dollars.
            wall_clock: ``seconds()`` giving unix time, for budget windows.
            metrics: Where charges are counted, if anywhere.
            failures: Counts and logs store failures.
        """
        self._store = store
        self._prices = prices
        self._wall = wall_clock
        self._metrics = metrics
        self._failed = failures

    def settle(self, reservation: Reservation | None, spend: Spend | None) -> None:
        """A request is over: let go of its hold and charge what it cost.

        Only the first call for a reservation does anything. Never raises
        and never waits: a shared store's failure is counted and logged.

        Args:
            reservation: The admission's reservation (None: nothing to do).
            spend: What the upstream said it cost; None charges nothing.
        """
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        try:
            charge = self._charge(reservation, spend)
            if not reservation.held and charge == 0:
                return
            done = self._store.settle(
                reservation.name, reservation.slot, reservation.id, charge,
                reservation.ends + KEEP_AFTER_WINDOW,
            )
            if isinstance(done, Deferred):
                done.addErrback(self._failed, ADD_USAGE)
        except Exception:
            log.failure("settling a budget reservation failed")

    def _charge(self, reservation: Reservation, spend: Spend | None) -> int:
        """What ``spend`` costs in the budget's unit, counted in metrics."""
        if spend is None:
            return 0
        budget = reservation.budget
        cost = spend_cost(budget, spend, self._prices, reservation.model)
        metrics, label = self._metrics, reservation.key.label
        if metrics is not None:
            if cost is None:
                metrics.budget_unpriced.labels(label).inc()
            elif cost > 0 and budget.usd is None:
                metrics.budget_tokens.labels(label).inc(cost)
            elif cost > 0:
                metrics.budget_usd.labels(label).inc(cost / MICRO)
        return cost or 0

    def status(self, key: KeyInfo) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """A key's budget now, for ``GET /budgets``.

        Reading it drops the reservations whose time is up.

        Args:
            key: A named key with a budget.

        Returns:
            ``{"unit", "limit", "used", "reserved", "remaining", "window",
            "resets_at"}``: ``unit`` is ``tokens`` or ``usd`` (amounts in
            tokens, or in US dollars), ``window`` the window's id and
            ``resets_at`` its end (unix time). At once for the memory store,
            else a Deferred failing with
            :class:`~llmproxy.limits.StoreError` when the store does not
            answer (counted).

        Raises:
            ValueError: The key has no budget or no name.
        """
        budget = key.budget
        if budget is None or key.name is None:
            raise ValueError("status() needs a named key with a budget")
        window, ends = budget_window(budget.per, self._wall.seconds())

        def row(numbers: tuple[int, int]) -> dict[str, Any]:
            return budget_status(budget, window, ends, *numbers)

        numbers = self._store.held(key.name, budget_slot(budget, window))
        if not isinstance(numbers, Deferred):
            return row(numbers)

        def failed(failure: Failure) -> Failure:
            self._failed(failure, STATUS)
            return failure

        return numbers.addCallbacks(row, failed)
