"""Store failures: counted every time, logged at most every few seconds.

They are counted by operation, as ``llmproxy_limit_store_errors_total``'s
``op`` label says: :data:`CHECK` (admitting a request: its rate limit and
its budget's reservation), :data:`ADD_USAGE` (settling: letting go of the
reservation and charging the cost) and :data:`STATUS` (reading a budget).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ADD_USAGE", "CHECK", "LOG_EVERY", "STATUS", "StoreFailures"]

log = Logger(namespace="llmproxy.limits")

#: Seconds between two log lines about the store failing at one operation.
LOG_EVERY = 10.0

#: The operations, as failures are counted.
CHECK = "check"
ADD_USAGE = "add_usage"
STATUS = "status"


class StoreFailures:
    """Counts store failures by operation and logs them, throttled."""

    def __init__(self, clock: Any, metrics: Any, deny: bool) -> None:
        """Set up.

        Args:
            clock: ``seconds()`` for the throttling (the reactor).
            metrics: Has ``store_errors`` (a counter by operation), or None.
            deny: Whether a failed admission refuses the request
                (``on_store_error: deny``), for the log line.
        """
        self._clock = clock
        self._metrics = metrics
        self._deny = deny
        self._logged_at: dict[str, float] = {}

    def __call__(self, failure: Failure, what: str) -> None:
        """Count and (at most every LOG_EVERY s per operation) log a failure.

        Args:
            failure: What went wrong.
            what: The operation: :data:`CHECK`, :data:`ADD_USAGE` or
                :data:`STATUS`.
        """
        if self._metrics is not None:
            self._metrics.store_errors.labels(what).inc()
        now = self._clock.seconds()
        last = self._logged_at.get(what)
        if last is not None and now - last < LOG_EVERY:
            return
        self._logged_at[what] = now
        if what == CHECK:
            consequence = (
                "requests are refused" if self._deny
                else "requests are let through, holding nothing of their budgets"
            ) + " (rate_limit.on_store_error) until it answers again"
        elif what == ADD_USAGE:
            consequence = "a request's cost was not charged to its budget"
        else:
            consequence = "a budget could not be read"
        log.warn("limit store failed ({what}): {error}; {consequence}",
                 what=what, error=describe(failure), consequence=consequence)


def describe(failure: Failure) -> str:
    """One line about a store failure, at most 300 characters."""
    value = failure.value
    inner = getattr(value, "subFailure", None)
    if inner is not None:
        value = inner.value
    return " ".join(str(value).split())[:300] or type(value).__name__
