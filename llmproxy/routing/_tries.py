"""The upstreams one request may try, in order: its route's pool, then the
pools of its fallback models."""

from __future__ import annotations

from typing import Protocol

from llmproxy.routing._pool import UpstreamPool


class _Pools(Protocol):
    def pool_for_model(self, model: str) -> UpstreamPool | None: ...


class Tries:
    """Which upstream a request tries next.

    The route's pool is tried first, each URL at most once and at most
    ``retries + 1`` of them; then, when the route names fallback models,
    each fallback's pool the same way.

    Attributes:
        pool: The pool being tried.
        tried: The URLs of :attr:`pool` tried so far.
    """

    def __init__(self, router: _Pools, pool: UpstreamPool, fallbacks: tuple[str, ...]) -> None:
        """Start with ``pool``.

        Args:
            router: Finds the fallbacks' pools.
            pool: The route's pool.
            fallbacks: Models to fall back to, in order.
        """
        self._router = router
        self.pool = pool
        self.tried: set[str] = set()
        self._fallbacks = list(fallbacks) if fallbacks else []

    def next_url(self, url: str | None = None) -> str:
        """Pick (or take) the next URL of :attr:`pool` and count it tried.

        Args:
            url: A URL to try again (after a short ``Retry-After``).

        Returns:
            The URL.
        """
        if url is None:
            url = self.pool.pick(exclude=self.tried)
        self.tried.add(url)
        return url

    def another(self) -> str | bool:
        """Whether another upstream may be tried.

        Returns:
            True when :attr:`pool` has an untried URL within its retries;
            else the next fallback model with a pool (which becomes
            :attr:`pool`); else False.
        """
        pool = self.pool
        if len(self.tried) <= pool.retries and len(self.tried) < len(pool.urls):
            return True
        while self._fallbacks:
            model = self._fallbacks.pop(0)
            fallback = self._router.pool_for_model(model)
            if fallback is not None:
                self.pool, self.tried = fallback, set()
                return model
        return False
