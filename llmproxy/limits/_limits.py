"""The policy: may this request go upstream, and what did it cost.

:class:`Limits` admits a request (its key's models, its rate limit, then
its key's budget, holding what it may cost) and settles it when it ends
(letting go of the hold, charging what it cost). The numbers are kept in a
store: :class:`~llmproxy.limits.MemoryStore` in this process (answers at
once), or :class:`~llmproxy.limits.RedisStore` shared by every worker and
instance (answers with Deferreds, each call within
``rate_limit.store_timeout``). When the shared store fails, a request is
let through (without a hold) or refused with :data:`STORE_DOWN`, as
``on_store_error`` says; every failure is counted, and logged at most once
per operation every 10 seconds.
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from llmproxy.config import BudgetConfig, Config, TimeoutsConfig
from llmproxy.limits._budget import (
    ALLOWED,
    MODEL_NOT_ALLOWED,
    NO_PRICE,
    OVER_BUDGET,
    RATE_LIMITED,
    STORE_DOWN,
    Admission,
    Ask,
    Reservation,
    Spend,
    Verdict,
    ask_cost,
    budget_limit,
    budget_slot,
    budget_window,
)
from llmproxy.limits._failures import CHECK, StoreFailures
from llmproxy.limits._keys import KeyInfo
from llmproxy.limits._ledger import KEEP_AFTER_WINDOW, Ledger
from llmproxy.limits._memory import MemoryStore
from llmproxy.limits._prices import Prices
from llmproxy.limits._rate import RateLimiter
from llmproxy.limits._redis import RedisStore

__all__ = ["HOLD_MARGIN", "Limits"]

#: Seconds a reservation outlives ``timeouts.response_header``: a request
#: still running after both lets go of its hold (it is still charged when it
#: ends), and one whose process died is forgotten.
HOLD_MARGIN = 3600.0


class _WallClock:
    """Unix time, for budget windows (calendar days and months in UTC)."""

    def seconds(self) -> float:
        return time.time()


class Limits:
    """The keys' models, the rate limits and the budgets, over one store.

    Attributes:
        store: The store (:class:`MemoryStore` or :class:`RedisStore`).
        shared: Whether the store is shared (Redis): its answers come later.
        prices: What models cost, for budgets in US dollars.
        hold_ttl: Seconds a reservation lives unless settled.
        metrics: Where refusals, charges and store failures are counted.
        ledger: Settles reservations and reads budgets.
    """

    def __init__(
        self,
        store: Any,
        clock: Any,
        rate: float | None,
        burst: int,
        on_store_error: str = "allow",
        metrics: Any = None,
        wall_clock: Any = None,
        prices: Prices | None = None,
        hold_ttl: float = TimeoutsConfig().response_header + HOLD_MARGIN,
    ) -> None:
        """Set up the policy.

        Args:
            store: Where the numbers are kept.
            clock: ``seconds()`` for log throttling (the reactor).
            rate: Requests per second per client, or None for no global
                rate limit.
            burst: The global bucket size.
            on_store_error: ``allow`` or ``deny``.
            metrics: Where refusals, charges and store failures are
                counted, if anywhere.
            wall_clock: ``seconds()`` giving unix time, for budget windows
                (default ``clock``).
            prices: What models cost (default: no prices).
            hold_ttl: Seconds a reservation lives unless settled.
        """
        self.store = store
        self.shared = not isinstance(store, MemoryStore)
        self._clock = clock
        self._wall = wall_clock or clock
        self._rate = rate
        self._burst = burst
        self._deny = on_store_error == "deny"
        self.metrics = metrics
        self.prices = prices if prices is not None else Prices({})
        self.hold_ttl = hold_ttl
        self._store_failed = StoreFailures(clock, metrics, self._deny)
        self.ledger = Ledger(store, self.prices, self._wall, metrics, self._store_failed)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(6) + "-"

    @classmethod
    def from_config(
        cls, config: Config, clock: Any, metrics: Any = None, wall_clock: Any = None
    ) -> Limits | None:
        """The limits a config asks for, over the store it names.

        Args:
            config: The validated configuration.
            clock: The reactor (token buckets; a Redis store connects with
                it).
            metrics: Where refusals, charges and store failures are counted.
            wall_clock: Unix time for budget windows (default: the system's).

        Returns:
            The limits, or None when there is nothing to check: no rate
            limit, and no key with a budget, a rate limit or models.
        """
        rate_limit = config.rate_limit
        keys = () if config.auth is None else (*config.auth.keys, *config.auth.file_keys)
        policies = any(
            k.budget is not None or k.rate_limit is not None or k.models is not None
            for k in keys
        )
        if rate_limit is None and not policies:
            return None
        rate = rate_limit.rate if rate_limit is not None else None
        burst = rate_limit.burst if rate_limit is not None else 1
        wall = wall_clock or _WallClock()
        store: MemoryStore | RedisStore
        if rate_limit is not None and rate_limit.store is not None:
            store = RedisStore(rate_limit.store, clock, rate_limit.store_timeout)
        else:
            limiter = RateLimiter(rate, burst, clock) if rate is not None else None
            store = MemoryStore(wall, limiter, rate_clock=clock)
        on_error = rate_limit.on_store_error if rate_limit is not None else "allow"
        return cls(
            store, clock, rate, burst, on_store_error=on_error, metrics=metrics,
            wall_clock=wall, prices=Prices.from_config(config.prices),
            hold_ttl=config.timeouts.response_header + HOLD_MARGIN,
        )

    def carry_over(self, previous: Limits) -> None:
        """Keep counting where ``previous`` (the limits before a reload) left
        off, when both keep their numbers in this process."""
        if isinstance(self.store, MemoryStore) and isinstance(previous.store, MemoryStore):
            self.store.carry_over(previous.store)

    # -- admitting ------------------------------------------------------------

    def admit(
        self, bucket: str | None, key: KeyInfo | None, ask: Ask | None = None
    ) -> Admission | Deferred[Admission]:
        """Decide whether a request may go upstream, holding what it may cost.

        In order: the key's ``models`` (:data:`MODEL_NOT_ALLOWED`; checked
        only with an ask, since a request without one names no model); for a
        budget in dollars, the ask's model's price (:data:`NO_PRICE`); the
        key's own rate limit on the key's id, else the global one on
        ``bucket`` (:data:`RATE_LIMITED`); the key's budget
        (:data:`OVER_BUDGET`): refused when what is used, what is held for
        requests in flight and this ask's cost (at least 1, at most the
        whole budget) would go over it. Admitted, the cost is held until
        :meth:`settle`.

        Args:
            bucket: The client's global rate-limit bucket, or None for none.
            key: The client's key, if any.
            ask: What the request may cost; None when unknown (it holds
                nothing, and is admitted while the budget is not spent).

        Returns:
            The admission: at once for the memory store, else a Deferred
            that never fails. It has a reservation when admitted and the
            key has a budget (one held in the store unless the store
            failed or nothing was asked).
        """
        if key is not None and ask is not None and not key.allows(ask.model):
            self._count_refused(key, MODEL_NOT_ALLOWED)
            return Admission(Verdict(MODEL_NOT_ALLOWED))
        reservation = None
        if key is not None and key.budget is not None and key.name is not None:
            reservation = self._reservation(key, key.name, key.budget, ask)
            if reservation is None:
                self._count_refused(key, NO_PRICE)
                return Admission(Verdict(NO_PRICE))
        if key is not None and key.rate_limit is not None:
            rate: tuple[str, float, int] | None = (
                key.id, key.rate_limit.rate, key.rate_limit.burst
            )
        elif bucket is not None and self._rate is not None:
            rate = (bucket, self._rate, self._burst)
        else:
            rate = None
        if rate is None and reservation is None:
            return Admission(ALLOWED)
        if not self.shared:
            return self._admit_now(rate, reservation)
        return self._admit_later(rate, reservation)

    def _reservation(
        self, key: KeyInfo, name: str, budget: BudgetConfig, ask: Ask | None
    ) -> Reservation | None:
        """What to hold for ``ask`` against the budget of ``key`` (named
        ``name``); None when the ask's model has no price and the budget is
        in dollars."""
        amount = ask_cost(budget, ask, self.prices)
        if amount is None:
            return None
        window, ends = budget_window(budget.per, self._wall.seconds())
        return Reservation(
            key=key, name=name, budget=budget, slot=budget_slot(budget, window), ends=ends,
            amount=amount, id=f"{self._id_prefix}{next(self._ids)}",
            model=ask.model if ask else None,
        )

    def _reserve(self, reservation: Reservation) -> Any:
        """Ask the store to hold ``reservation``."""
        keep_until = max(reservation.ends + KEEP_AFTER_WINDOW,
                         self._wall.seconds() + self.hold_ttl)
        return self.store.reserve(
            reservation.name, reservation.slot, reservation.id, reservation.amount,
            budget_limit(reservation.budget), self.hold_ttl, keep_until,
        )

    def _admit_now(
        self, rate: tuple[str, float, int] | None, reservation: Reservation | None
    ) -> Admission:
        """:meth:`admit` over the memory store."""
        if rate is not None:
            wait = self.store.take(*rate)
            if wait > 0:
                return Admission(Verdict(RATE_LIMITED, wait))
        if reservation is None:
            return Admission(ALLOWED)
        return self._reserved(reservation, self._reserve(reservation))

    def _admit_later(
        self, rate: tuple[str, float, int] | None, reservation: Reservation | None
    ) -> Deferred[Admission]:
        """:meth:`admit` over a shared store: one call for the rate limit,
        then one for the budget."""

        def budget(wait: float) -> Any:
            if wait > 0:
                return Admission(Verdict(RATE_LIMITED, wait))
            if reservation is None:
                return Admission(ALLOWED)
            return self._reserve(reservation).addCallback(
                lambda answer: self._reserved(reservation, answer)
            )

        def failed(failure: Failure) -> Admission:
            self._store_failed(failure, CHECK)
            if self._deny:
                return Admission(Verdict(STORE_DOWN, 1.0))
            return Admission(ALLOWED, reservation)

        first: Deferred[float] = self.store.take(*rate) if rate is not None else succeed(0.0)
        return first.addCallback(budget).addErrback(failed)

    def _reserved(self, reservation: Reservation, answer: tuple[bool, int, int]) -> Admission:
        """The admission for the store's answer to a reservation."""
        admitted = answer[0]
        if not admitted:
            key = reservation.key
            if self.metrics is not None:
                self.metrics.budget_refused.labels(key.label).inc()
            wait = max(1.0, reservation.ends - self._wall.seconds())
            return Admission(Verdict(OVER_BUDGET, wait))
        reservation.held = reservation.amount > 0
        return Admission(ALLOWED, reservation)

    def _count_refused(self, key: KeyInfo, reason: str) -> None:
        """Count a request refused for its key's policy (not its budget)."""
        if self.metrics is not None:
            self.metrics.key_refused.labels(key.label, reason).inc()

    # -- settling and reading -----------------------------------------------

    def settle(self, reservation: Reservation | None, spend: Spend | None) -> None:
        """A request is over: let go of its hold and charge what it cost.

        Only the first call for a reservation does anything. Never raises
        and never waits: a shared store's failure is counted and logged.

        Args:
            reservation: The admission's reservation (None: nothing to do).
            spend: What the upstream said it cost; None charges nothing.
        """
        self.ledger.settle(reservation, spend)

    def status(self, key: KeyInfo) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """A key's budget now, for ``GET /budgets`` (see :meth:`Ledger.status`).

        Args:
            key: A named key with a budget.

        Returns:
            ``{"unit", "limit", "used", "reserved", "remaining", "window",
            "resets_at"}``, at once for the memory store, else a Deferred
            (failing with :class:`StoreError` when the store does not
            answer).

        Raises:
            ValueError: The key has no budget or no name.
        """
        return self.ledger.status(key)

    def close(self) -> Deferred[None] | None:
        """Stop the store's service (a reload retired this policy, or the
        daemon stops).

        Returns:
            What the store's ``stopService`` returns: a Deferred firing once
            it is closed (Redis), or None.
        """
        return self.store.stopService()

