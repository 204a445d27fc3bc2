"""A request's attempts: which upstream is next, and what each failure counts.

:class:`Retries` follows one request's tries: the route's pool, then its
fallback models' pools (:class:`~llmproxy.routing.Tries` decides which URL
and whether another is left), how many attempts went out (the client's
``X-LLMProxy-Upstream-Attempts``), the one short ``Retry-After`` it may wait
out, and what each failure counts in the pool's health and the metrics.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IResponse

from llmproxy.metrics import Metrics
from llmproxy.proxy._attempt import Attempt
from llmproxy.proxy._targets import upstream_retry_after
from llmproxy.routing import Router, Route, Tries, UpstreamPool

log = Logger(namespace="llmproxy.proxy")


class Retries:
    """The attempts of one request.

    Attributes:
        attempts: Attempts sent so far, a stale connection's resend counted.
        waited: Whether a ``Retry-After`` was waited out already.
        model: The model the body names for the upstream (changed by a
            fallback), or None.
    """

    def __init__(
        self, router: Router, route: Route, rid: str, record: dict[str, Any],
        metrics: Metrics | None,
    ) -> None:
        """Start with the route's pool.

        Args:
            router: Finds the fallbacks' pools.
            route: The request's route.
            rid: The request id, for the log.
            record: The access record (its route, model and fallback).
            metrics: Where retries, fallbacks and ejections are counted.
        """
        self._tries = Tries(router, route.pool, route.fallbacks)
        self._rid = rid
        self._record = record
        self._metrics = metrics
        self.attempts = 0
        self.waited = False
        self.model: str | None = None

    @property
    def pool(self) -> UpstreamPool:
        """The pool being tried."""
        return self._tries.pool

    def next_url(self, url: str | None = None) -> str:
        """The URL of the next attempt (``url`` itself for a Retry-After)."""
        self.attempts += 1
        url = self._tries.next_url(url)
        self._record["upstream"] = url
        return url

    def another(self, attempt: Attempt, reason: str) -> bool:
        """Whether another upstream may be tried after ``attempt`` failed.

        When the route's pool is used up and a fallback model is left, its
        pool is tried next and :attr:`model` names it.
        """
        another = self._tries.another()
        if not another:
            return False
        if isinstance(another, str):
            log.info(
                "request {request_id}: every upstream of {model} failed; falling back "
                "to {fallback}",
                request_id=self._rid, model=self._record.get("model"), fallback=another,
            )
            self.model = self._record["model"] = another
            self._record["fallback"] = True
            if self._metrics is not None:
                self._metrics.fallbacks.labels(another).inc()
        log.info(
            "request {request_id}: attempt {attempt} to {upstream} failed ({reason}); "
            "trying another upstream",
            request_id=self._rid, attempt=self.attempts, upstream=attempt.url, reason=reason,
        )
        if self._metrics is not None:
            self._metrics.retries.labels(self._record["route"] or "none").inc()
        return True

    def wait_for(self, response: IResponse, longest: float, url: str) -> float | None:
        """Seconds to wait before asking ``url`` again, as its ``Retry-After``
        says: once per request, and only up to ``longest``; else None."""
        wait = upstream_retry_after(response)
        if wait is None or wait > longest or self.waited:
            return None
        self.waited = True
        log.info("request {request_id}: {upstream} asked to retry in {wait} s",
                 request_id=self._rid, upstream=url, wait=wait)
        return wait

    def failed(self, attempt: Attempt) -> None:
        """Tell the pool ``attempt``'s upstream failed (counting an ejection)."""
        if attempt.failed() and self._metrics is not None:
            self._metrics.ejections.labels(attempt.url).inc()

    def stale_resend(self, attempt: Attempt) -> None:
        """The agent sent the request again after a stale pooled connection:
        one more attempt for the client to see."""
        self.attempts += 1
        if self._metrics is not None:
            self._metrics.stale_retries.labels(attempt.url).inc()
