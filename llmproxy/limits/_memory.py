"""The limit store kept in this process: token buckets and budget counters
with their reservations.

Every operation answers at once; one that holds budget checks and holds
in the same step, so nothing can slip in between (the reactor runs one
thing at a time).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service

from llmproxy.limits._rate import RateLimiter

__all__ = ["MemoryStore"]

#: Seconds between two sweeps of the budget table for ended windows.
SWEEP_EVERY = 60.0


class _Budget:
    """One budget counter in one window, and the reservations against it."""

    __slots__ = ("held", "keep_until", "total", "used")

    def __init__(self, keep_until: float) -> None:
        """Start empty.

        Args:
            keep_until: When the counter may go (its window's end and a day).
        """
        self.used = 0
        self.total = 0
        self.held: dict[str, tuple[int, float]] = {}
        self.keep_until = keep_until

    def drop_expired(self, now: float) -> None:
        """Forget reservations whose time is up (their process never settled)."""
        if not self.held:
            return
        for rid in [rid for rid, (_, until) in self.held.items() if until <= now]:
            self.total -= self.held.pop(rid)[0]

    def release(self, rid: str) -> None:
        """Let go of one reservation, if it is still held."""
        entry = self.held.pop(rid, None)
        if entry is not None:
            self.total -= entry[0]


class MemoryStore(Service):
    """Rate-limit buckets and budget counters kept in this process.

    Bounded: the buckets by :class:`RateLimiter`'s own limits (one limiter
    per distinct rate and burst: the global one and the keys' own), the
    budget counters by the configured key names and by expiry (a counter
    goes a day after its window ends, once nothing is held against it),
    the reservations by expiry.

    A service only to match :class:`~llmproxy.limits.RedisStore`: there is
    nothing to connect to or close.
    """

    def __init__(
        self, clock: Any, limiter: RateLimiter | None = None, rate_clock: Any = None
    ) -> None:
        """Keep the numbers.

        Args:
            clock: ``seconds()`` gives unix time (budget windows, their
                expiry and the reservations').
            limiter: The global token buckets, or None.
            rate_clock: What the keys' own token buckets run on (default
                ``clock``).
        """
        self._clock = clock
        self._rate_clock = rate_clock or clock
        self._limiters: dict[tuple[float, int], RateLimiter] = {}
        if limiter is not None:
            self._limiters[(limiter.rate, limiter.burst)] = limiter
        self._budgets: dict[tuple[str, str], _Budget] = {}
        self._swept_at = float("-inf")

    def take(self, bucket: str, rate: float, burst: int) -> float:
        """Take a token from ``bucket``: 0.0, or the seconds until one is free.

        Args:
            bucket: The client (address or key id).
            rate: Tokens per second of the bucket's limit.
            burst: The bucket's size.
        """
        limiter = self._limiters.get((rate, burst))
        if limiter is None:
            limiter = self._limiters[(rate, burst)] = RateLimiter(rate, burst, self._rate_clock)
        return limiter.take(bucket)

    def _sweep(self, now: float) -> None:
        """Forget the counters of ended windows (at most every SWEEP_EVERY s)."""
        if now - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = now
        for key in [k for k, b in self._budgets.items() if b.keep_until <= now and not b.held]:
            del self._budgets[key]

    def _existing(self, name: str, slot: str) -> _Budget | None:
        """The counter of ``name`` in ``slot``, expired reservations dropped."""
        now = self._clock.seconds()
        self._sweep(now)
        budget = self._budgets.get((name, slot))
        if budget is not None:
            budget.drop_expired(now)
        return budget

    def _counter(self, name: str, slot: str, keep_until: float) -> _Budget:
        """The counter of ``name`` in ``slot``, made if need be, kept at
        least until ``keep_until``."""
        budget = self._existing(name, slot)
        if budget is None:
            budget = self._budgets[(name, slot)] = _Budget(keep_until)
        budget.keep_until = max(budget.keep_until, keep_until)
        return budget

    def reserve(
        self, name: str, slot: str, rid: str, amount: int, limit: int, ttl: float,
        keep_until: float,
    ) -> tuple[bool, int, int]:
        """Hold ``amount`` of a budget if it fits.

        It fits when what is used, what is held and ``amount`` (at least 1)
        together are at most ``limit``.

        Args:
            name: The key's name.
            slot: The counter's window (see
                :func:`~llmproxy.limits.budget_slot`).
            rid: The reservation's id.
            amount: What to hold (0 holds nothing but still needs 1 left).
            limit: The budget.
            ttl: Seconds the reservation lives unless settled.
            keep_until: Unix time until which the counter is kept.

        Returns:
            ``(admitted, used, held)``: held counts ``amount`` when admitted.
        """
        budget = self._counter(name, slot, keep_until)
        if budget.used + budget.total + max(amount, 1) > limit:
            return False, budget.used, budget.total
        if amount > 0:
            budget.held[rid] = (amount, self._clock.seconds() + ttl)
            budget.total += amount
        return True, budget.used, budget.total

    def settle(
        self, name: str, slot: str, rid: str, charge: int, keep_until: float
    ) -> tuple[int, int]:
        """Let go of a reservation (if still held) and count ``charge``.

        Args:
            name: The key's name.
            slot: The counter's window.
            rid: The reservation's id.
            charge: What the request cost, in the budget's unit.
            keep_until: Unix time until which the counter is kept.

        Returns:
            ``(used, held)`` afterwards.
        """
        budget = self._counter(name, slot, keep_until)
        budget.release(rid)
        budget.used += max(0, charge)
        return budget.used, budget.total

    def held(self, name: str, slot: str) -> tuple[int, int]:
        """``(used, held)`` of a counter; ``(0, 0)`` when there is none."""
        budget = self._existing(name, slot)
        return (0, 0) if budget is None else (budget.used, budget.total)

    def budget_used(self, name: str, window: str) -> int:
        """Tokens counted for ``name`` in ``window``."""
        return self.held(name, window)[0]

    def add_usage(self, name: str, window: str, tokens: int, expires_at: float) -> None:
        """Count ``tokens`` for ``name`` in ``window`` (kept until ``expires_at``)."""
        self._counter(name, window, expires_at).used += tokens

    def carry_over(self, previous: MemoryStore) -> None:
        """Keep counting budgets where ``previous`` (a config reload) left off.

        The two share one table from now on, so requests still finishing on
        the old config add to the same counters and let go of what they
        hold there.
        """
        self._budgets = previous._budgets
