"""Small fakes for testing the limits: metrics that remember what was counted,
and builders of keys and limits on fake clocks."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.task import Clock

from llmproxy.config import BudgetConfig, KeyRateConfig, PriceConfig
from llmproxy.limits import KeyInfo, Limits, MemoryStore, Prices, RateLimiter

#: Unix time the fake clocks start at: 2026-12-03T00:00:00Z, a day's start.
START = 1796256000.0


class FakeInstrument:
    """A Prometheus instrument's ``labels(...).inc(n)``, remembered."""

    def __init__(self) -> None:
        """Count nothing yet."""
        self.counts: Counter[tuple[str, ...]] = Counter()

    def labels(self, *values: str) -> FakeInstrument._Child:
        """The child for ``values``."""
        return FakeInstrument._Child(self, values)

    class _Child:
        """One label set of the instrument."""

        def __init__(self, parent: FakeInstrument, values: tuple[str, ...]) -> None:
            self._parent = parent
            self._values = values

        def inc(self, amount: float = 1) -> None:
            """Add ``amount``."""
            self._parent.counts[self._values] += amount


class FakeMetrics:
    """What :class:`~llmproxy.limits.Limits` counts, by instrument name."""

    def __init__(self) -> None:
        """Make every instrument on first use."""
        self.instruments: dict[str, FakeInstrument] = {}

    def __getattr__(self, name: str) -> FakeInstrument:
        """The instrument ``name``."""
        if name.startswith("__"):
            raise AttributeError(name)
        return self.instruments.setdefault(name, FakeInstrument())

    def count(self, name: str, *labels: str) -> float:
        """What ``name`` counted for ``labels``."""
        instrument = self.instruments.get(name)
        return instrument.counts[labels] if instrument is not None else 0


def key(
    name: str | None = "team-a",
    tokens: int | None = None,
    usd: float | None = None,
    per: str = "day",
    reserve: int = 4096,
    models: tuple[str, ...] | None = None,
    rate: tuple[float, int] | None = None,
) -> KeyInfo:
    """A key's info with the policy given.

    Args:
        name: Its name.
        tokens: A budget in tokens, if any.
        usd: A budget in US dollars, if any.
        per: The budget's window.
        reserve: The budget's reserve.
        models: The models it may name.
        rate: Its own ``(rate, burst)``, if any.

    Returns:
        The info (id ``key-`` and the name).
    """
    budget = None
    if tokens is not None or usd is not None:
        budget = BudgetConfig(per=per, tokens=tokens, usd=usd, reserve=reserve)
    rate_limit = KeyRateConfig(rate=rate[0], burst=rate[1]) if rate else None
    return KeyInfo(f"key-{name}", name, budget, models, rate_limit)


#: Prices for tests: gpt-4o exactly, and any other gpt- model.
PRICES = {
    "gpt-4o": PriceConfig(input=2.5, output=10.0, cached_input=1.25),
    "gpt-*": PriceConfig(input=1.0, output=2.0),
}


def memory_limits(
    rate: float | None = None, burst: int = 1, hold_ttl: float = 4500.0, **kw: Any
) -> tuple[Limits, Clock, FakeMetrics]:
    """Limits over a memory store, every clock a fake one at :data:`START`.

    Args:
        rate: The global rate limit, if any.
        burst: Its burst.
        hold_ttl: Seconds a reservation lives.
        **kw: More Limits arguments.

    Returns:
        ``(limits, clock, metrics)``.
    """
    clock = Clock()
    clock.advance(START)
    limiter = RateLimiter(rate, burst, clock) if rate is not None else None
    metrics = FakeMetrics()
    limits = Limits(
        MemoryStore(clock, limiter), clock, rate, burst, metrics=metrics, wall_clock=clock,
        prices=Prices(PRICES), hold_ttl=hold_ttl, **kw,
    )
    return limits, clock, metrics
