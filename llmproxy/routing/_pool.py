"""Upstream pools: balancing strategies and passive health for base URLs."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

import attrs

from llmproxy.config import STRATEGIES, RouteConfig

#: The longest cooldown an upstream waits after repeated failed trials.
MAX_COOLDOWN = 300.0


class Clock(Protocol):
    """Anything that tells the time in seconds (the reactor, ``task.Clock``)."""

    def seconds(self) -> float: ...


class ZeroClock:
    """A clock stuck at 0.0, for pools and routers built without one."""

    def seconds(self) -> float:
        """Return the time.

        Returns:
            Always 0.0.
        """
        return 0.0


@attrs.define(on_setattr=attrs.setters.NO_OP)
class _Health:
    """The passive health of one base URL."""

    cooldown: float
    failures: int = 0
    outstanding: int = 0
    ejected_until: float | None = None
    ejected_at: float = 0.0
    trial: bool = False
    trial_until: float = 0.0


def _default_retries(pool: UpstreamPool) -> int:
    return len(pool.urls) - 1


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class UpstreamPool:
    """A set of interchangeable base URLs with a balancing strategy and health.

    The proxy calls :meth:`pick` for each attempt, :meth:`started` and
    :meth:`finished` around each upstream request, and :meth:`succeeded` or
    :meth:`failed` with its verdict (in either order with :meth:`finished`).
    After ``eject_after`` consecutive failures a URL is ejected for
    ``cooldown`` seconds; then exactly one trial request may go to it. A
    successful trial restores it; a failed one ejects it again for twice as
    long (at most :data:`MAX_COOLDOWN`). A trial that gets no verdict within
    one more cooldown (its client left, say) is abandoned: the next pick may
    start another.

    Attributes:
        name: The route's name for logs and metrics, such as ``/v1/`` for a
            ``target_map`` entry or ``gpt-4`` for a model route.
        urls: The base URLs, without a trailing slash.
        via: How to reach them: ``auto``, ``direct`` or ``proxy``.
        api_key: The upstream credential that replaces the client's.
        auth_header: How ``api_key`` is sent (``bearer``, ``x-api-key``,
            ``api-key``, ``none``).
        strategy: ``round_robin``, ``weighted`` or ``least_outstanding``.
        weights: Each URL's weight for ``weighted`` (None: 1 each).
        retries: Further URLs tried after a failed attempt (default: the
            pool size - 1).
        retry_on: Upstream statuses that count as a failed attempt.
        eject_after: Consecutive failures that eject a URL.
        cooldown: Seconds of the first ejection.
        stream_usage: ``budget``, ``always`` or ``never`` (``stream_usage``)
            for this route, or None for the config's.
        clock: Where time comes from (anything with ``seconds()``).
    """

    name: str
    urls: tuple[str, ...] = attrs.field(converter=tuple)
    via: str = "auto"
    api_key: str | None = attrs.field(default=None, repr=False)
    auth_header: str = "bearer"
    strategy: str = attrs.field(
        default="round_robin", validator=attrs.validators.in_(STRATEGIES)
    )
    weights: tuple[int, ...] | None = None
    retries: int = attrs.field(default=attrs.Factory(_default_retries, takes_self=True))
    retry_on: frozenset[int] = attrs.field(
        default=frozenset((429, 500, 502, 503, 504)), converter=frozenset
    )
    eject_after: int = 5
    cooldown: float = 30.0
    stream_usage: str | None = None
    clock: Clock = attrs.field(factory=ZeroClock, repr=False)
    _turn: int = attrs.field(default=0, init=False, repr=False)
    _health: dict[str, _Health] = attrs.field(init=False, repr=False)
    _weight: tuple[int, ...] = attrs.field(init=False, repr=False)
    _current: list[int] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        """Check the settings and set up one health record per URL.

        Raises:
            ValueError: For no URLs, weights that don't match the URLs, or
                impossible numbers.
        """
        if not self.urls:
            raise ValueError("an upstream pool needs at least one URL")
        if self.weights is not None and (
            len(self.weights) != len(self.urls) or any(w < 1 for w in self.weights)
        ):
            raise ValueError("weights must be one integer >= 1 per URL")
        if self.retries is None:
            self.retries = len(self.urls) - 1
        if self.retries < 0 or self.eject_after < 1 or self.cooldown < 0:
            raise ValueError("retries, eject_after and cooldown must be >= 0, >= 1, >= 0")
        self._health = {url: _Health(cooldown=self.cooldown) for url in self.urls}
        self._weight = self.weights or (1,) * len(self.urls)
        self._current = [0] * len(self.urls)

    @classmethod
    def from_route(cls, name: str, route: RouteConfig, clock: Clock) -> UpstreamPool:
        """Build the pool for a configured route.

        Args:
            name: The route's name (its path key or model).
            route: The route's configuration.
            clock: Where time comes from, such as the reactor.

        Returns:
            The pool.
        """
        return cls(
            name=name,
            urls=route.urls,
            via=route.via,
            api_key=route.api_key,
            auth_header=route.auth_header,
            strategy=route.strategy,
            weights=route.weights,
            retries=len(route.urls) - 1 if route.retries is None else route.retries,
            retry_on=route.retry_on,
            eject_after=route.eject_after,
            cooldown=route.cooldown,
            stream_usage=getattr(route, "stream_usage", None),
            clock=clock,
        )

    def pick(self, exclude: Collection[str] = ()) -> str | None:
        """Choose the base URL for the next attempt.

        Healthy URLs and ejected ones due for their trial take part in the
        strategy; picking a URL due for its trial starts that trial. When
        every URL not excluded is ejected and none is due, the one ejected
        longest ago is returned anyway (without starting a trial).

        Args:
            exclude: URLs not to use (those this request already tried).

        Returns:
            A URL from :attr:`urls`, or None when all of them are excluded.
        """
        urls, health = self.urls, self._health
        if len(urls) == 1:
            # One upstream: the strategy has nothing to choose.
            url = urls[0]
            if url in exclude:
                return None
            h = health[url]
            if h.ejected_until is not None:
                now = self.clock.seconds()
                if now >= h.ejected_until and (not h.trial or now >= h.trial_until):
                    h.trial = True
                    h.trial_until = now + h.cooldown
            return url
        now = self.clock.seconds()
        eligible = []
        last_resort: _Health | None = None
        last_url = None
        for url in urls:
            if url in exclude:
                eligible.append(False)
                continue
            h = health[url]
            if h.ejected_until is None or (
                now >= h.ejected_until and (not h.trial or now >= h.trial_until)
            ):
                eligible.append(True)
                continue
            eligible.append(False)
            if last_resort is None or h.ejected_at < last_resort.ejected_at:
                last_resort, last_url = h, url
        if not any(eligible):
            return last_url
        chosen = self._choose(eligible)
        url = urls[chosen]
        h = health[url]
        if h.ejected_until is not None:
            h.trial = True
            h.trial_until = now + h.cooldown
        return url

    def _choose(self, eligible: list[bool]) -> int:
        n = len(eligible)
        if self.strategy == "weighted":
            total, best = 0, -1
            current = self._current
            for i in range(n):
                if eligible[i]:
                    current[i] += self._weight[i]
                    total += self._weight[i]
                    if best < 0 or current[i] > current[best]:
                        best = i
            current[best] -= total
            return best
        best = -1
        least = self.strategy == "least_outstanding"
        for k in range(n):
            i = (self._turn + k) % n
            if not eligible[i]:
                continue
            if best < 0:
                best = i
                if not least:
                    break
            elif (
                self._health[self.urls[i]].outstanding
                < self._health[self.urls[best]].outstanding
            ):
                best = i
        self._turn = (best + 1) % n
        return best

    def started(self, url: str) -> None:
        """Count a request sent to ``url`` as outstanding.

        Args:
            url: A URL returned by :meth:`pick`; others are ignored.
        """
        h = self._health.get(url)
        if h is not None:
            h.outstanding += 1

    def finished(self, url: str) -> None:
        """Count a request to ``url`` as no longer outstanding.

        Args:
            url: A URL passed to :meth:`started`; others are ignored.
        """
        h = self._health.get(url)
        if h is not None:
            h.outstanding = max(0, h.outstanding - 1)

    def succeeded(self, url: str) -> None:
        """Record a successful attempt on ``url``.

        Resets its consecutive failures; a successful trial restores it with
        the base cooldown.

        Args:
            url: A URL of this pool; others are ignored.
        """
        h = self._health.get(url)
        if h is None:
            return
        h.failures = 0
        if h.trial:
            h.trial = False
            h.ejected_until = None
            h.cooldown = self.cooldown

    def failed(self, url: str) -> bool:
        """Record a failed attempt on ``url``.

        Args:
            url: A URL of this pool; others are ignored.

        Returns:
            True when this call ejected the URL: its ``eject_after``-th
            consecutive failure, or a failed trial (which doubles the
            cooldown, up to :data:`MAX_COOLDOWN`).
        """
        h = self._health.get(url)
        if h is None:
            return False
        h.failures += 1
        if h.trial:
            h.trial = False
            h.cooldown = min(h.cooldown * 2, max(MAX_COOLDOWN, self.cooldown))
        elif h.ejected_until is not None or h.failures < self.eject_after:
            return False
        now = self.clock.seconds()
        h.ejected_at = now
        h.ejected_until = now + h.cooldown
        return True

    def state(self) -> list[dict[str, Any]]:
        """Describe each URL's health, for /readyz and debugging.

        Returns:
            One dict per distinct URL, in order: ``url``, ``healthy``,
            ``ejected_until`` (clock seconds or None),
            ``consecutive_failures``, ``outstanding`` and ``cooldown``.
        """
        return [
            {
                "url": url,
                "healthy": h.ejected_until is None,
                "ejected_until": h.ejected_until,
                "consecutive_failures": h.failures,
                "outstanding": h.outstanding,
                "cooldown": h.cooldown,
            }
            for url, h in self._health.items()
        ]
