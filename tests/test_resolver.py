"""Tests for llmproxy.resolver: the caching resolver and its use for connecting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmproxy.resolver import CachingResolver, ResolvingReactor
from llmproxy.testing.resolver import FakeResolver

WAIT = 10.0


@implementer(IHostResolution)
class _FakeResolution:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        """Record the cancellation."""
        self.cancelled = True


@implementer(IHostnameResolver)
class ScriptedResolver:
    """A wrapped resolver whose answers the test delivers later.

    Attributes:
        queries: ``(name, port, addressTypes, transportSemantics)`` per query.
        pending: Receivers still waiting, by name.
        resolutions: Every resolution handed out, in order.
    """

    def __init__(self) -> None:
        """Start with no queries."""
        self.queries: list[tuple[str, int, Any, str]] = []
        self.pending: dict[str, list[IResolutionReceiver]] = {}
        self.resolutions: list[_FakeResolution] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Record the query and keep the receiver until :meth:`answer`."""
        self.queries.append((hostName, portNumber, addressTypes, transportSemantics))
        resolution = _FakeResolution(hostName)
        self.resolutions.append(resolution)
        resolutionReceiver.resolutionBegan(resolution)
        self.pending.setdefault(hostName, []).append(resolutionReceiver)
        return resolution

    def answer(self, name: str, ips: Sequence[str] = ()) -> None:
        """Deliver ``ips`` (on port 0) to everyone waiting for ``name``."""
        for receiver in self.pending.pop(name):
            for ip in ips:
                kind = IPv6Address if ":" in ip else IPv4Address
                receiver.addressResolved(kind("TCP", ip, 0))
            receiver.resolutionComplete()


@implementer(IResolutionReceiver)
class Receiver:
    """Records every call made on it.

    Attributes:
        calls: ``("began", resolution)``, ``("address", address)`` or
            ``("complete", None)`` in call order.
    """

    def __init__(self) -> None:
        """Start with no calls."""
        self.calls: list[tuple[str, Any]] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        """Record the start."""
        self.calls.append(("began", resolutionInProgress))

    def addressResolved(self, address: IAddress) -> None:
        """Record an address."""
        self.calls.append(("address", address))

    def resolutionComplete(self) -> None:
        """Record the end."""
        self.calls.append(("complete", None))

    @property
    def addresses(self) -> list[Any]:
        """The addresses received."""
        return [arg for kind, arg in self.calls if kind == "address"]

    @property
    def complete(self) -> bool:
        """Whether the resolution completed (exactly once, last)."""
        kinds = [kind for kind, _ in self.calls]
        assert kinds.count("complete") <= 1
        return kinds[-1:] == ["complete"]

    def check_began(self) -> None:
        """Assert resolutionBegan came first and exactly once."""
        kinds = [kind for kind, _ in self.calls]
        assert kinds[:1] == ["began"] and kinds.count("began") == 1
        verifyObject(IHostResolution, self.calls[0][1])


def lookup(
    resolver: CachingResolver, name: str, port: int = 0, types: Any = None
) -> Receiver:
    """Start one lookup and return its receiver."""
    receiver = Receiver()
    resolver.resolveHostName(receiver, name, port, types)
    receiver.check_began()
    return receiver


def v4(ip: str, port: int = 0) -> IPv4Address:
    """An IPv4 TCP address."""
    return IPv4Address("TCP", ip, port)


def v6(ip: str, port: int = 0) -> IPv6Address:
    """An IPv6 TCP address."""
    return IPv6Address("TCP", ip, port)


def result_of(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


@pytest.fixture
def clock() -> Clock:
    """A fake clock."""
    return Clock()


@pytest.fixture
def wrapped() -> ScriptedResolver:
    """The scripted wrapped resolver."""
    return ScriptedResolver()


@pytest.fixture
def resolver(wrapped: ScriptedResolver, clock: Clock) -> CachingResolver:
    """A caching resolver over the scripted one."""
    return CachingResolver(wrapped, clock)


@pytest.fixture
def warnings() -> Iterator[list[dict]]:
    """Warn-level events logged by llmproxy.resolver."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "llmproxy.resolver" and (
            event.get("log_level") == LogLevel.warn
        ):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_provides_interface(resolver: CachingResolver) -> None:
    """CachingResolver provides IHostnameResolver and returns resolutions."""
    verifyObject(IHostnameResolver, resolver)
    resolution = resolver.resolveHostName(Receiver(), "a.test")
    verifyObject(IHostResolution, resolution)
    assert resolution.name == "a.test"


def test_hit_within_ttl(
    resolver: CachingResolver, wrapped: ScriptedResolver, clock: Clock
) -> None:
    """A second lookup within the TTL is answered without a query."""
    first = lookup(resolver, "a.test")
    assert not first.complete
    wrapped.answer("a.test", ["127.0.0.1"])
    assert first.addresses == [v4("127.0.0.1")] and first.complete
    clock.advance(299)
    second = lookup(resolver, "a.test")
    assert second.addresses == [v4("127.0.0.1")] and second.complete
    assert len(wrapped.queries) == 1
    assert (resolver.hits, resolver.misses, len(resolver)) == (1, 1, 1)


def test_refresh_after_ttl(
    resolver: CachingResolver, wrapped: ScriptedResolver, clock: Clock
) -> None:
    """After the TTL a lookup queries again and gets the new answer."""
    lookup(resolver, "a.test")
    wrapped.answer("a.test", ["127.0.0.1"])
    clock.advance(300)
    refreshed = lookup(resolver, "a.test")
    assert len(wrapped.queries) == 2 and not refreshed.complete
    wrapped.answer("a.test", ["127.0.0.2"])
    assert refreshed.addresses == [v4("127.0.0.2")]
    assert lookup(resolver, "a.test").addresses == [v4("127.0.0.2")]
    assert (resolver.hits, resolver.misses) == (1, 2)


def test_concurrent_lookups_coalesce(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """Three concurrent lookups make one query and all get the answer."""
    receivers = [lookup(resolver, "a.test", port) for port in (80, 443, 8080)]
    assert wrapped.queries == [("a.test", 0, None, "TCP")]
    wrapped.answer("a.test", ["127.0.0.1"])
    for receiver, port in zip(receivers, (80, 443, 8080), strict=True):
        assert receiver.addresses == [v4("127.0.0.1", port)] and receiver.complete
    assert resolver.misses == 3


def test_callers_port_and_address_types(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """The wrapped resolver is asked for everything; each caller gets its port and types."""
    everything = lookup(resolver, "a.test", 443)
    assert wrapped.queries == [("a.test", 0, None, "TCP")]
    wrapped.answer("a.test", ["127.0.0.1", "::1"])
    assert everything.addresses == [v4("127.0.0.1", 443), v6("::1", 443)]
    assert lookup(resolver, "a.test", 80, [IPv4Address]).addresses == [
        v4("127.0.0.1", 80)
    ]
    assert lookup(resolver, "a.test", 81, [IPv6Address]).addresses == [
        v6("::1", 81)
    ]
    udp = Receiver()
    resolver.resolveHostName(udp, "a.test", 53, [IPv4Address], "UDP")
    assert udp.addresses == [IPv4Address("UDP", "127.0.0.1", 53)]
    assert len(wrapped.queries) == 1


def test_negative_caching(
    resolver: CachingResolver, wrapped: ScriptedResolver, clock: Clock
) -> None:
    """A failure is remembered for negative_ttl, then queried again."""
    first = lookup(resolver, "down.test")
    wrapped.answer("down.test", [])
    assert first.addresses == [] and first.complete
    clock.advance(4.9)
    second = lookup(resolver, "down.test")
    assert second.addresses == [] and second.complete
    assert len(wrapped.queries) == 1
    clock.advance(0.1)
    third = lookup(resolver, "down.test")
    assert len(wrapped.queries) == 2 and not third.complete
    wrapped.answer("down.test", ["127.0.0.9"])
    assert third.addresses == [v4("127.0.0.9")]


def test_serve_stale_on_failed_refresh(
    resolver: CachingResolver,
    wrapped: ScriptedResolver,
    clock: Clock,
    warnings: list[dict],
) -> None:
    """A failed refresh serves the old answer and logs one warning."""
    lookup(resolver, "a.test")
    wrapped.answer("a.test", ["127.0.0.1"])
    clock.advance(300)
    stale = lookup(resolver, "a.test")
    wrapped.answer("a.test", [])
    assert stale.addresses == [v4("127.0.0.1")] and stale.complete
    assert len(warnings) == 1
    assert warnings[0]["name"] == "a.test" and warnings[0]["until"] == 600
    assert "DNS refresh of {name} failed" in warnings[0]["log_format"]
    # Within negative_ttl the stale answer is a hit without a query or log.
    for _ in range(3):
        assert lookup(resolver, "a.test").addresses == [v4("127.0.0.1")]
    assert len(wrapped.queries) == 2 and len(warnings) == 1
    # The retry after negative_ttl fails again: still stale, no new warning.
    clock.advance(5)
    retry = lookup(resolver, "a.test")
    assert len(wrapped.queries) == 3
    wrapped.answer("a.test", [])
    assert retry.addresses == [v4("127.0.0.1")] and len(warnings) == 1
    # A successful refresh ends the stale period.
    clock.advance(5)
    lookup(resolver, "a.test")
    wrapped.answer("a.test", ["127.0.0.2"])
    assert lookup(resolver, "a.test").addresses == [v4("127.0.0.2")]


def test_stale_window_ends_after_one_more_ttl(
    resolver: CachingResolver,
    wrapped: ScriptedResolver,
    clock: Clock,
    warnings: list[dict],
) -> None:
    """Once expiry + ttl has passed, a failed refresh is a negative answer."""
    lookup(resolver, "a.test")
    wrapped.answer("a.test", ["127.0.0.1"])
    clock.advance(300)
    lookup(resolver, "a.test")
    wrapped.answer("a.test", [])
    clock.advance(295)
    retry = lookup(resolver, "a.test")
    wrapped.answer("a.test", [])
    assert retry.addresses == [v4("127.0.0.1")]
    # The stale entry never outlives the window, even mid-retry-interval.
    clock.advance(5)
    after = lookup(resolver, "a.test")
    assert len(wrapped.queries) == 4
    wrapped.answer("a.test", [])
    assert after.addresses == [] and after.complete
    assert lookup(resolver, "a.test").addresses == []
    assert len(warnings) == 1


def test_lru_bound(wrapped: ScriptedResolver, clock: Clock) -> None:
    """With max_names=3 the least recently used name is evicted."""
    resolver = CachingResolver(wrapped, clock, max_names=3)
    for name in ("a.test", "b.test", "c.test"):
        lookup(resolver, name)
        wrapped.answer(name, ["127.0.0.1"])
    lookup(resolver, "a.test")  # a is now the most recently used
    lookup(resolver, "d.test")
    wrapped.answer("d.test", ["127.0.0.4"])
    assert len(resolver) == 3
    queries = len(wrapped.queries)
    lookup(resolver, "a.test")
    lookup(resolver, "c.test")
    assert len(wrapped.queries) == queries
    lookup(resolver, "b.test")
    assert len(wrapped.queries) == queries + 1 and wrapped.queries[-1][0] == "b.test"


def test_ip_literals_bypass(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """IP literals are answered directly, filtered, and not cached."""
    assert lookup(resolver, "127.0.0.1", 8080).addresses == [v4("127.0.0.1", 8080)]
    assert lookup(resolver, "::1", 443).addresses == [v6("::1", 443)]
    assert lookup(resolver, "::1", 443, [IPv4Address]).addresses == []
    assert wrapped.queries == [] and len(resolver) == 0


def test_resolve_returns_ip_strings(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """resolve() fires with bare IPs, or [] when the name does not resolve."""
    d = resolver.resolve("a.test")
    wrapped.answer("a.test", ["127.0.0.1", "::1"])
    assert result_of(d) == ["127.0.0.1", "::1"]
    failed = resolver.resolve("down.test")
    wrapped.answer("down.test", [])
    assert result_of(failed) == []
    assert result_of(resolver.resolve("192.0.2.1")) == ["192.0.2.1"]


def test_names_are_case_insensitive(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """Differently cased names share one cache entry and one query."""
    first = lookup(resolver, "API.Example.TEST")
    second = lookup(resolver, "api.example.test")
    assert wrapped.queries == [("api.example.test", 0, None, "TCP")]
    wrapped.answer("api.example.test", ["127.0.0.1"])
    assert first.addresses == second.addresses == [v4("127.0.0.1")]
    assert lookup(resolver, "Api.Example.Test").complete
    assert len(wrapped.queries) == 1 and len(resolver) == 1


def test_cancel_stops_delivery_to_one_receiver(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """Cancelling one resolution leaves the shared query to the others."""
    cancelled = Receiver()
    resolver.resolveHostName(cancelled, "a.test").cancel()
    kept = lookup(resolver, "a.test")
    wrapped.answer("a.test", ["127.0.0.1"])
    assert [kind for kind, _ in cancelled.calls] == ["began"]
    assert kept.addresses == [v4("127.0.0.1")] and kept.complete
    assert len(resolver) == 1


@pytest.mark.allow_logged_failures
def test_wrapped_resolver_raising_is_a_failure(clock: Clock) -> None:
    """A resolver that raises synchronously yields a completed, empty answer."""

    @implementer(IHostnameResolver)
    class Broken:
        calls = 0

        def resolveHostName(self, *args: Any, **kwargs: Any) -> IHostResolution:
            """Fail."""
            Broken.calls += 1
            raise RuntimeError("boom")

    resolver = CachingResolver(Broken(), clock)
    receiver = lookup(resolver, "a.test")
    assert receiver.addresses == [] and receiver.complete
    assert result_of(resolver.resolve("a.test")) == []
    assert Broken.calls == 1


def test_wrapped_resolver_calling_back_weirdly(
    resolver: CachingResolver, wrapped: ScriptedResolver
) -> None:
    """Non-IP addresses, repeats and calls after completion are ignored."""
    from twisted.internet.address import UNIXAddress

    receiver = lookup(resolver, "a.test")
    (inner,) = wrapped.pending.pop("a.test")
    inner.addressResolved(UNIXAddress(b"/tmp/x"))
    inner.addressResolved(v4("127.0.0.1", 99))
    inner.addressResolved(v4("127.0.0.1", 99))
    inner.resolutionComplete()
    inner.addressResolved(v4("127.0.0.2"))
    inner.resolutionComplete()
    assert receiver.addresses == [v4("127.0.0.1")] and receiver.complete


def test_unanswered_query_times_out(
    resolver: CachingResolver, wrapped: ScriptedResolver, clock: Clock
) -> None:
    """A query that never completes fails after query_timeout; late answers are ignored."""
    receiver = lookup(resolver, "slow.test")
    clock.advance(30)
    assert receiver.addresses == [] and receiver.complete
    assert wrapped.resolutions[0].cancelled
    wrapped.answer("slow.test", ["127.0.0.1"])
    assert lookup(resolver, "slow.test").addresses == []
    assert clock.getDelayedCalls() == []


def test_answered_query_leaves_no_timer(
    resolver: CachingResolver, wrapped: ScriptedResolver, clock: Clock
) -> None:
    """The query timeout is cancelled once the answer arrives."""
    lookup(resolver, "a.test")
    assert len(clock.getDelayedCalls()) == 1
    wrapped.answer("a.test", ["127.0.0.1"])
    assert clock.getDelayedCalls() == []


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("lookup"), st.sampled_from("abcdef"), st.booleans()),
            st.tuples(st.just("advance"), st.floats(0, 400), st.just(False)),
        ),
        max_size=60,
    )
)
def test_bounded_and_never_older_than_two_ttls(
    ops: list[tuple[str, Any, bool]],
) -> None:
    """Random lookups and clock advances respect max_names and ttl * 2.

    Each answer's IP encodes when it was produced, so every delivered
    address can be aged.
    """
    clock = Clock()
    wrapped = ScriptedResolver()
    resolver = CachingResolver(wrapped, clock, ttl=100, max_names=3)
    produced: dict[str, float] = {}
    for op, arg, succeed in ops:
        if op == "advance":
            clock.advance(arg)
            continue
        receiver = lookup(resolver, f"{arg}.test")
        if wrapped.pending:
            ip = f"127.0.{len(produced) // 250}.{len(produced) % 250}"
            produced[ip] = clock.seconds()
            wrapped.answer(f"{arg}.test", [ip] if succeed else [])
        assert receiver.complete
        for address in receiver.addresses:
            assert clock.seconds() - produced[address.host] < 200
        assert len(resolver) <= 3


@pytest_twisted.ensureDeferred
async def test_hostname_endpoint_connects_through_cache(reactor: Any) -> None:
    """HostnameEndpoint on a ResolvingReactor resolves through the cache."""
    accepted: Deferred[Protocol] = Deferred()

    class Server(Protocol):
        def connectionMade(self) -> None:
            """Report the accepted connection."""
            if not accepted.called:
                accepted.callback(self)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Server)
    )
    try:
        table = FakeResolver({"api.external.test": ["127.0.0.1"]})
        resolver = CachingResolver(table, Clock())
        endpoint = HostnameEndpoint(
            ResolvingReactor(reactor, resolver),
            "api.external.test",
            port.getHost().port,
        )
        client = await endpoint.connect(Factory.forProtocol(Protocol)).addTimeout(
            WAIT, reactor
        )
        try:
            server = await accepted.addTimeout(WAIT, reactor)
            assert client.transport.getPeer().host == "127.0.0.1"
            assert server.transport.getPeer().port == client.transport.getHost().port
        finally:
            client.transport.loseConnection()
        assert table.lookups == ["api.external.test"]
        assert result_of(resolver.resolve("API.external.test")) == ["127.0.0.1"]
        assert table.lookups == ["api.external.test"] and resolver.hits == 1
    finally:
        await port.stopListening()
