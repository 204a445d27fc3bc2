"""Per-client token buckets on an injected clock, in a bounded table."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Protocol

__all__ = ["RateLimiter", "retry_after"]


class _Clock(Protocol):
    """Anything that tells the time, such as a reactor or a ``task.Clock``."""

    def seconds(self) -> float:
        """Return the current time in seconds."""


#: Tolerance for float drift when counting tokens (0.1 + 0.2 != 0.3).
_EPSILON = 1e-9

#: How many of the oldest buckets each :meth:`RateLimiter.take` may expire.
_PRUNE_BATCH = 8


class _Bucket:
    """One client's token count as of a moment."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        """Record the state.

        Args:
            tokens: Tokens in the bucket at ``stamp``.
            stamp: When ``tokens`` was last brought up to date.
        """
        self.tokens = tokens
        self.stamp = stamp


def retry_after(seconds: float) -> int:
    """Turn a wait into a ``Retry-After`` value.

    Args:
        seconds: The wait, as returned by :meth:`RateLimiter.take`.

    Returns:
        Whole seconds, rounded up (ignoring float noise below a nanosecond),
        and at least 1.

    Raises:
        ValueError: If ``seconds`` is not finite.
    """
    if not math.isfinite(seconds):
        raise ValueError("retry_after needs a finite number of seconds")
    return max(1, math.ceil(seconds - _EPSILON))


class RateLimiter:
    """Per-key token buckets: ``burst`` requests at once, ``rate`` per second.

    Each key starts with a full bucket of ``burst`` tokens; a request takes
    one; the bucket refills continuously at ``rate`` tokens per second up to
    ``burst``. ``rate`` may be fractional (0.5 is one request every 2 s).

    The table is bounded. A bucket that has refilled to full behaves exactly
    like no bucket, so buckets are kept in least-recently-used order and each
    :meth:`take` drops a few of the oldest once they would be full (an idle
    key is gone at most ``burst / rate`` seconds after its last request, as
    traffic arrives; amortised O(1)). The table also never holds more than
    ``max_clients`` buckets: past that, the least recently used is evicted.
    Eviction can only favour that client (it starts again with a full
    bucket); with ``max_clients`` above the number of clients active within
    ``burst / rate`` seconds it never happens.
    """

    def __init__(
        self, rate: float, burst: int, clock: _Clock, *, max_clients: int = 100_000
    ) -> None:
        """Set the limits.

        Args:
            rate: Tokens added per second, greater than 0.
            burst: Bucket size (requests allowed at once), at least 1.
            clock: The time source (``seconds()``), such as the reactor.
            max_clients: Most buckets kept at once, at least 1.

        Raises:
            ValueError: If a limit is out of range.
        """
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be a finite number greater than 0")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.rate = float(rate)
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """Return how many buckets are held (expired ones may linger)."""
        return len(self._buckets)

    def _full_at(self, bucket: _Bucket) -> float:
        """Return when ``bucket`` will have refilled to ``burst``.

        Args:
            bucket: A bucket of this limiter.

        Returns:
            A time on the clock.
        """
        return bucket.stamp + (self.burst - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Drop up to a batch of the least recently used buckets that are full.

        Buckets are in last-use order and each is full at most
        ``burst / rate`` after its last use, so the expired ones form (up to
        that slack) the front of the table: stop at the first live one.

        Args:
            now: The current time.
        """
        buckets = self._buckets
        for _ in range(_PRUNE_BATCH):
            if not buckets:
                return
            key = next(iter(buckets))
            if self._full_at(buckets[key]) > now:
                return
            del buckets[key]

    def take(self, key: str) -> float:
        """Try to take one token from ``key``'s bucket.

        Args:
            key: The client, such as its IP address or key id.

        Returns:
            0.0 when a token was taken (the request may go ahead), else the
            seconds until one token is available (refuse it; see
            :func:`retry_after`).
        """
        now = self._clock.seconds()
        self._prune(now)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            buckets[key] = bucket
            if len(buckets) > self.max_clients:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            # max(): a clock that steps back must not drain the bucket.
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0 - _EPSILON:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            return 0.0
        return (1.0 - bucket.tokens) / self.rate
