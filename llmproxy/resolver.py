"""Name resolution for the outbound side.

:class:`CachingResolver` wraps another :class:`IHostnameResolver` (in
production ``reactor.nameResolver``, which runs ``getaddrinfo`` in a thread
pool) with a TTL cache, coalesced concurrent lookups, negative caching and
serve-stale on failed refreshes.

:class:`ResolvingReactor` hands a chosen :class:`IHostnameResolver` to
everything that connects through it: ``HostnameEndpoint`` asks
``reactor.nameResolver`` only when the reactor declares
``IReactorPluggableNameResolver``, so the wrapper declares it and forwards
everything else to the real reactor.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["CachingResolver", "ResolvingReactor"]

log = Logger()

_Family = type[IPv4Address] | type[IPv6Address]
#: Bare IPs with their address class; empty means "does not resolve".
_Answer = tuple[tuple[_Family, str], ...]


@attrs.frozen
class _Entry:
    """A cached answer.

    Attributes:
        answer: The addresses; empty for a negative entry.
        expires: Until then the entry is answered without a query.
        stale_until: Until then a failed refresh may serve ``answer``.
        stale: Whether ``answer`` is being served after a failed refresh.
    """

    answer: _Answer
    expires: float
    stale_until: float
    stale: bool = False


@implementer(IHostResolution)
class _Resolution:
    """One caller's lookup; cancelling it stops delivery to that caller."""

    def __init__(
        self,
        name: str,
        receiver: IResolutionReceiver,
        port: int,
        address_types: Sequence[type] | None,
        semantics: str,
    ) -> None:
        self.name = name
        self._receiver: IResolutionReceiver | None = receiver
        self._port = port
        self._types = address_types
        self._semantics = semantics

    def cancel(self) -> None:
        """Deliver nothing more to this caller."""
        self._receiver = None

    def deliver(self, answer: _Answer) -> None:
        """Send the matching addresses, then resolutionComplete, once.

        Args:
            answer: The bare addresses.
        """
        receiver, self._receiver = self._receiver, None
        if receiver is None:
            return
        try:
            try:
                for family, ip in answer:
                    if not self._types or family in self._types:
                        receiver.addressResolved(
                            family(self._semantics, ip, self._port)
                        )
            finally:
                receiver.resolutionComplete()
        except Exception:  # noqa: BLE001 - a caller's receiver must not break others
            log.failure("resolution receiver for {name} failed", name=self.name)


@implementer(IResolutionReceiver)
class _Query:
    """Receives one answer from the wrapped resolver, at most once."""

    def __init__(
        self, clock: IReactorTime, timeout: float, done: Callable[[_Answer], None]
    ) -> None:
        self._done: Callable[[_Answer], None] | None = done
        self._addresses: list[tuple[_Family, str]] = []
        self._resolution: IHostResolution | None = None
        self._timer: IDelayedCall = clock.callLater(timeout, self._time_out)

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        """Remember the wrapped resolution so a timeout can cancel it."""
        self._resolution = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:
        """Collect an IP address; anything else is ignored."""
        if self._done is None:
            return
        if isinstance(address, IPv6Address):
            self._addresses.append((IPv6Address, address.host))
        elif isinstance(address, IPv4Address):
            self._addresses.append((IPv4Address, address.host))

    def resolutionComplete(self) -> None:
        """Finish with the addresses collected (duplicates dropped)."""
        self.finish(tuple(dict.fromkeys(self._addresses)))

    def finish(self, answer: _Answer) -> None:
        """Report ``answer`` unless an answer was already reported.

        Args:
            answer: The addresses; empty for a failure.
        """
        done, self._done = self._done, None
        if done is None:
            return
        if self._timer.active():
            self._timer.cancel()
        done(answer)

    def _time_out(self) -> None:
        if self._resolution is not None:
            try:
                self._resolution.cancel()
            except Exception:  # noqa: BLE001 - any wrapped resolver
                log.failure("cancelling a timed-out DNS query failed")
        self.finish(())


@implementer(IResolutionReceiver)
class _Collector:
    """Collects bare IP strings for :meth:`CachingResolver.resolve`."""

    def __init__(self, result: Deferred[list[str]]) -> None:
        self._result = result
        self._ips: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        """Nothing to do."""

    def addressResolved(self, address: IAddress) -> None:
        """Keep the address's IP."""
        self._ips.append(address.host)  # type: ignore[attr-defined]

    def resolutionComplete(self) -> None:
        """Fire the result."""
        self._result.callback(self._ips)


def _literal(host: str) -> _Answer | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ((IPv6Address if ip.version == 6 else IPv4Address, str(ip)),)


@implementer(IHostnameResolver)
class CachingResolver:
    """An IHostnameResolver that caches another one's answers.

    Answers are kept for ``ttl`` seconds, failures (no addresses) for
    ``negative_ttl``. When a refresh fails, the previous answer is served
    for up to one more ``ttl``. Concurrent lookups of a name share one
    query. Names are case-insensitive; IP literals are answered directly.
    The wrapped resolver is always asked for every address type on port 0;
    each caller gets its own port and address types.

    Attributes:
        hits: Lookups answered from the cache without a query.
        misses: Lookups that needed a query (their own or a shared one).
    """

    def __init__(
        self,
        resolver: IHostnameResolver,
        clock: IReactorTime,
        *,
        ttl: float = 300.0,
        negative_ttl: float = 5.0,
        max_names: int = 4096,
        query_timeout: float = 30.0,
    ) -> None:
        """Wrap a resolver.

        Args:
            resolver: The resolver to ask, e.g. ``reactor.nameResolver``.
            clock: The time source for expiry and query timeouts.
            ttl: Seconds an answer is fresh.
            negative_ttl: Seconds a failure is remembered.
            max_names: Most names cached; least recently used go first.
            query_timeout: Seconds before an unanswered query counts as
                a failure.

        Raises:
            ValueError: A limit is out of range.
        """
        if max_names < 1 or ttl <= 0 or negative_ttl < 0 or query_timeout <= 0:
            raise ValueError(
                "need max_names >= 1, ttl > 0, negative_ttl >= 0, query_timeout > 0"
            )
        self._resolver = resolver
        self._clock = clock
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max_names = max_names
        self._query_timeout = query_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, list[_Resolution]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """The number of names cached."""
        return len(self._entries)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Resolve ``hostName``, from the cache when possible.

        Args:
            resolutionReceiver: Gets resolutionBegan first, then the
                addresses, then resolutionComplete (unless cancelled).
            hostName: The name or IP literal.
            portNumber: The port of every address delivered.
            addressTypes: Address classes wanted; None or empty means all.
            transportSemantics: ``"TCP"`` or ``"UDP"``.

        Returns:
            The resolution; cancelling it stops delivery to this receiver.
        """
        resolution = _Resolution(
            hostName, resolutionReceiver, portNumber, addressTypes, transportSemantics
        )
        resolutionReceiver.resolutionBegan(resolution)
        literal = _literal(hostName)
        if literal is not None:
            resolution.deliver(literal)
            return resolution
        name = hostName.lower()
        entry = self._entries.get(name)
        if entry is not None and self._clock.seconds() < entry.expires:
            self.hits += 1
            self._entries.move_to_end(name)
            resolution.deliver(entry.answer)
            return resolution
        self.misses += 1
        waiting = self._pending.get(name)
        if waiting is not None:
            waiting.append(resolution)
        else:
            self._pending[name] = [resolution]
            self._query(name)
        return resolution

    def resolve(self, host: str) -> Deferred[list[str]]:
        """Resolve ``host`` to bare IP strings.

        Args:
            host: The name or IP literal.

        Returns:
            A Deferred firing with the IPs, ``[]`` when the name does not
            resolve. It never errbacks unless the caller cancels it.
        """
        resolution: IHostResolution | None = None

        def cancel(d: Deferred[list[str]]) -> None:
            if resolution is not None:
                resolution.cancel()

        result: Deferred[list[str]] = Deferred(cancel)
        resolution = self.resolveHostName(_Collector(result), host)
        return result

    def _query(self, name: str) -> None:
        query = _Query(
            self._clock,
            self._query_timeout,
            lambda answer: self._answered(name, answer),
        )
        try:
            self._resolver.resolveHostName(query, name, 0, None, "TCP")
        except Exception:  # noqa: BLE001 - any wrapped resolver
            log.failure("the wrapped resolver failed on {name}", name=name)
            query.finish(())

    def _answered(self, name: str, answer: _Answer) -> None:
        now = self._clock.seconds()
        old = self._entries.get(name)
        if answer:
            entry = _Entry(answer, now + self._ttl, now + 2 * self._ttl)
        elif old is not None and old.answer and now < old.stale_until:
            entry = attrs.evolve(
                old, expires=min(now + self._negative_ttl, old.stale_until), stale=True
            )
            if not old.stale:
                log.warn(  # noqa: G010 - twisted.logger's name
                    "DNS refresh of {name} failed; serving the stale answer until {until}",
                    name=name,
                    until=old.stale_until,
                )
        else:
            entry = _Entry((), now + self._negative_ttl, now + self._negative_ttl)
        self._entries[name] = entry
        self._entries.move_to_end(name)
        while len(self._entries) > self._max_names:
            self._entries.popitem(last=False)
        for resolution in self._pending.pop(name, []):
            resolution.deliver(entry.answer)


class ResolvingReactor:
    """A reactor that resolves host names with a resolver of our choice.

    Attributes:
        nameResolver: The resolver HostnameEndpoint uses.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        """Wrap a reactor.

        Args:
            reactor: The real reactor; every other call goes to it.
            resolver: The resolver to use for host names.
        """
        self._reactor = reactor
        self.nameResolver = resolver
        directlyProvides(self, providedBy(reactor), IReactorPluggableNameResolver)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """Replace the resolver.

        Args:
            resolver: The new resolver.

        Returns:
            The previous resolver.
        """
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
