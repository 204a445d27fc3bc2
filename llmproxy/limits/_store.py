"""Rate limits and token budgets over a store, in this process or in Redis.

:class:`Limits` is the policy: one rate-limit check and one budget check per
request, and the usage a finished response adds to its key's budget. The
store keeps the numbers: :class:`MemoryStore` in this process (answers at
once), or :class:`~llmproxy.limits.RedisStore` shared by every worker and
instance (answers with Deferreds, within ``rate_limit.store_timeout``). Both
stores are Twisted services: started, they are ready (the Redis store
connects); stopped, they are closed.
When the shared store fails, the request is let through or refused with a
503, as ``on_store_error`` says; every such failure is counted and logged at
most once per :data:`LOG_EVERY` seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import RateLimitConfig
from llmproxy.limits._keys import KeyInfo
from llmproxy.limits._rate import RateLimiter
from llmproxy.limits._redis import RedisStore

__all__ = [
    "ALLOWED",
    "OK",
    "OVER_BUDGET",
    "RATE_LIMITED",
    "STORE_DOWN",
    "Limits",
    "MemoryStore",
    "Verdict",
    "budget_window",
]

log = Logger(namespace="llmproxy.limits")

#: Seconds between two log lines about the store failing.
LOG_EVERY = 10.0

#: A :class:`Verdict`'s outcomes: let through, or refused for its rate
#: limit, its key's budget, or a failing store (``on_store_error: deny``).
OK = "ok"
RATE_LIMITED = "rate_limited"
OVER_BUDGET = "over_budget"
STORE_DOWN = "store_down"


def budget_window(per: str, now: float) -> tuple[str, float]:
    """The calendar window (UTC) that ``now`` falls in.

    Args:
        per: ``minute``, ``hour``, ``day`` or ``month``.
        now: Unix time.

    Returns:
        ``(window id, its end as unix time)``, e.g. ``("day:2026-12-03",
        1764806400.0)``.
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


class MemoryStore(Service):
    """Rate-limit buckets and budget counters kept in this process.

    Bounded: the buckets by :class:`RateLimiter`'s own limits, the budget
    counters by the configured key names and by expiry (a counter goes once
    its window has ended).

    A service only to match :class:`RedisStore`: there is nothing to
    connect to or close, so starting and stopping change nothing else.
    """

    def __init__(self, clock: Any, limiter: RateLimiter | None) -> None:
        """Keep the numbers.

        Args:
            clock: ``seconds()`` gives the time (the reactor).
            limiter: The token buckets, or None without a rate limit.
        """
        self._clock = clock
        self._limiter = limiter
        self._used: dict[tuple[str, str], tuple[int, float]] = {}

    def take(self, bucket: str, rate: float, burst: int) -> float:
        """Take a token from ``bucket``: 0.0, or the seconds until one is free."""
        return self._limiter.take(bucket) if self._limiter is not None else 0.0

    def budget_used(self, name: str, window: str) -> int:
        """Tokens counted for ``name`` in ``window``."""
        entry = self._used.get((name, window))
        return entry[0] if entry is not None else 0

    def add_usage(self, name: str, window: str, tokens: int, expires_at: float) -> None:
        """Count ``tokens`` for ``name`` in ``window`` (kept until ``expires_at``)."""
        now = self._clock.seconds()
        for key in [k for k, (_, until) in self._used.items() if until <= now]:
            del self._used[key]
        used, _ = self._used.get((name, window), (0, expires_at))
        self._used[(name, window)] = (used + tokens, expires_at)

    def carry_over(self, previous: MemoryStore) -> None:
        """Keep counting budgets where ``previous`` (a config reload) left off.

        The two share one table from now on, so requests still finishing on
        the old config add to the same counters.
        """
        self._used = previous._used


@attrs.frozen
class Verdict:
    """Whether a request may go upstream.

    Attributes:
        outcome: ``ok``, ``rate_limited``, ``over_budget`` or ``store_down``
            (the store failed and ``on_store_error`` is ``deny``).
        wait: Seconds until a retry may succeed (``Retry-After``).
    """

    outcome: str
    wait: float = 0.0


#: The verdict of a request the limits let through.
ALLOWED = Verdict(OK)


class _WallClock:
    """Unix time, for budget windows (calendar days and months in UTC)."""

    def seconds(self) -> float:
        return time.time()


class Limits:
    """The rate limit and the budgets, checked against one store.

    Attributes:
        store: The store (:class:`MemoryStore` or a Redis store).
        shared: Whether the store is shared (Redis): its answers come later.
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
    ) -> None:
        """Set up the policy.

        Args:
            store: Where the numbers are kept.
            clock: ``seconds()`` for log throttling (the reactor).
            rate: Requests per second per client, or None for no rate limit.
            burst: The bucket size.
            on_store_error: ``allow`` or ``deny``.
            metrics: Where store failures and budgets are counted, if
                anywhere.
            wall_clock: ``seconds()`` giving unix time, for budget windows
                (default ``clock``).
        """
        self.store = store
        self.shared = not isinstance(store, MemoryStore)
        self._clock = clock
        self._wall = wall_clock or clock
        self._rate = rate
        self._burst = burst
        self._deny = on_store_error == "deny"
        self.metrics = metrics
        self._logged_at: float | None = None

    @classmethod
    def from_config(
        cls,
        rate_limit: RateLimitConfig | None,
        budgets: bool,
        clock: Any,
        metrics: Any = None,
    ) -> Limits | None:
        """The limits a config asks for, over the store it names.

        Args:
            rate_limit: The ``rate_limit`` section, if any.
            budgets: Whether any client key has a budget.
            clock: The reactor (token buckets; a Redis store connects with
                it).
            metrics: Where store failures and budgets are counted.

        Returns:
            The limits, or None when there is neither a rate limit nor a
            budget.
        """
        if rate_limit is None and not budgets:
            return None
        rate = rate_limit.rate if rate_limit is not None else None
        burst = rate_limit.burst if rate_limit is not None else 1
        store: MemoryStore | RedisStore
        if rate_limit is not None and rate_limit.store is not None:
            store = RedisStore(rate_limit.store, clock, rate_limit.store_timeout)
        else:
            limiter = RateLimiter(rate, burst, clock) if rate is not None else None
            store = MemoryStore(_WallClock(), limiter)
        on_error = rate_limit.on_store_error if rate_limit is not None else "allow"
        return cls(store, clock, rate, burst, on_store_error=on_error, metrics=metrics,
                   wall_clock=_WallClock())

    def carry_over(self, previous: Limits) -> None:
        """Keep counting where ``previous`` (the limits before a reload) left
        off, when both keep their numbers in this process."""
        if isinstance(self.store, MemoryStore) and isinstance(previous.store, MemoryStore):
            self.store.carry_over(previous.store)

    def check(self, bucket: str | None, key: KeyInfo | None) -> Verdict | Deferred[Verdict]:
        """Take the client's token and check its key's budget.

        Args:
            bucket: The client's rate-limit bucket, or None for no rate
                limit.
            key: The client's key, if it has a budget.

        Returns:
            The verdict, at once for the memory store, else a Deferred that
            never fails.
        """
        limited = bucket is not None and self._rate is not None
        budget = key.budget if key is not None else None
        if not limited and budget is None:
            return ALLOWED
        window, ends = budget_window(budget.per, self._wall.seconds()) if budget else ("", 0.0)
        if not self.shared:
            wait = self.store.take(bucket, self._rate, self._burst) if limited else 0.0
            if wait > 0:
                return Verdict(RATE_LIMITED, wait)
            if budget is not None and self.store.budget_used(key.name, window) >= budget.tokens:
                return self._over_budget(key, ends)
            return ALLOWED
        asked: list[Deferred[Any]] = []
        if limited:
            asked.append(self.store.take(bucket, self._rate, self._burst))
        if budget is not None:
            asked.append(self.store.budget_used(key.name, window))

        def decide(answers: list[Any]) -> Verdict:
            if limited:
                wait = answers.pop(0)
                if wait > 0:
                    return Verdict(RATE_LIMITED, wait)
            if budget is not None and answers[0] >= budget.tokens:
                return self._over_budget(key, ends)
            return ALLOWED

        d = gatherResults(asked, consumeErrors=True).addCallback(decide)
        return d.addErrback(self._store_failed, "check")

    def _over_budget(self, key: KeyInfo, ends: float) -> Verdict:
        if self.metrics is not None:
            self.metrics.budget_refused.labels(key.name).inc()
        return Verdict(OVER_BUDGET, max(1.0, ends - self._wall.seconds()))

    def record_usage(self, key: KeyInfo | None, tokens: int | None) -> None:
        """Add a finished response's tokens to its key's budget.

        Args:
            key: The client's key (nothing is counted without a budget).
            tokens: Prompt plus completion tokens the upstream reported, or
                None when the answer had no usage (counted in a metric).
        """
        if key is None or key.budget is None:
            return
        metrics = self.metrics
        if tokens is None:
            if metrics is not None:
                metrics.budget_usage_missing.labels(key.name).inc()
            return
        if tokens <= 0:
            return
        if metrics is not None:
            metrics.budget_tokens.labels(key.name).inc(tokens)
        window, ends = budget_window(key.budget.per, self._wall.seconds())
        # Kept a day past the window's end, so that /budgets can still
        # show it around the turn of the window.
        done = self.store.add_usage(key.name, window, tokens, ends + 86400)
        if isinstance(done, Deferred):
            done.addErrback(self._store_failed, "add_usage")

    def _store_failed(self, failure: Failure, what: str) -> Verdict:
        """Count and (at most every LOG_EVERY s) log a store failure."""
        if self.metrics is not None:
            self.metrics.store_errors.labels(what).inc()
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warn(
                "limit store failed ({what}): {error}; requests are {action} "
                "(rate_limit.on_store_error) until it answers again",
                what=what, error=_describe(failure),
                action="refused" if self._deny else "let through",
            )
        return Verdict(STORE_DOWN, 1.0) if self._deny else ALLOWED

    def close(self) -> Deferred[None] | None:
        """Stop the store's service (a reload retired this policy, or the
        daemon stops).

        Returns:
            What the store's ``stopService`` returns: a Deferred firing once
            it is closed (Redis), or None.
        """
        return self.store.stopService()


def _describe(failure: Failure) -> str:
    """One line about a store failure (gatherResults wraps the first one)."""
    value = failure.value
    inner = getattr(value, "subFailure", None)
    if inner is not None:
        value = inner.value
    return " ".join(str(value).split()) or type(value).__name__
