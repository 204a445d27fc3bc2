"""The outbound agent: one ``IAgent`` that decides, per request, how to leave.

:class:`Egress` is what the proxy sends every upstream request through. Per
request it decides (as Synapse's ``ProxyAgent`` does) whether the destination
is reached directly or through ``proxy_url``, and sends the request with
Twisted's client over one :class:`~twisted.web.client.HTTPConnectionPool`
per way out, so that a direct connection and a proxied one to the same host
never share a pool:

- ``direct``: :meth:`Agent.usingEndpointFactory
  <twisted.web.client.Agent.usingEndpointFactory>` with :class:`DirectEndpoints`
  (``HostnameEndpoint`` over the caching resolver, TLS by
  ``BrowserLikePolicyForHTTPS``);
- ``proxy``, for ``http://`` upstreams: :class:`~twisted.web.client.ProxyAgent`
  to the proxy, with ``Proxy-Authorization``;
- ``tunnel``, for ``https://`` upstreams through the proxy: an Agent over
  :class:`TunnelEndpoints` (TLS inside our CONNECT tunnel).

Each response is a :class:`RoutedResponse` that says which way it went and
where it connected. :class:`Egress` is also a Twisted service: stopping it
closes the pools' idle connections.

A request is sent a second time only when it provably never left
(:class:`~twisted.web.client.RequestNotSent`), or once, counted, when a
stale pooled connection closed before answering it (see
:class:`~llmproxy.egress._way.Way`); Twisted's Agent itself resends only a
body-less idempotent request on a reused connection.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from llmproxy.config import Config
from llmproxy.egress._connect import ProxyURL, host_port
from llmproxy.egress._endpoints import DirectEndpoints, TunnelEndpoints, tls_policy, tried
from llmproxy.egress._keepalive import ConnectionWatch
from llmproxy.egress._noproxy import NoProxy
from llmproxy.egress._way import RoutedResponse, Way
from llmproxy.net import NetworkSet, parse_ip
from llmproxy.resolver import CachingResolver, ResolvingReactor

#: Seconds that closing the pools may take before the daemon stops anyway.
CLOSE_TIMEOUT = 5.0

DIRECT = "direct"
PROXY = "proxy"

#: The pools, one per way out.
POOLS = ("direct", "proxy", "tunnel")


@attrs.frozen
class _Origin:
    """Where a request goes: scheme, host and port."""

    scheme: bytes
    host: str
    port: int
    address: str


def _detached(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that can be cancelled without cancelling shared work.

    Failures reach it too: nothing on the way is swallowed.
    """
    out: Deferred[Any] = Deferred()

    def fire(result: Any) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    d.addBoth(fire)
    return out


def _origin_of(uri: bytes) -> bytes:
    """``scheme://authority`` of an absolute URI."""
    start = uri.find(b"//")
    end = uri.find(b"/", start + 2) if start >= 0 else -1
    return uri if end < 0 else uri[:end]


@implementer(IAgent)
class _Forced:
    """An ``IAgent`` sending every request one way (a route's ``via``)."""

    def __init__(self, egress: Egress, via: str) -> None:
        self._egress = egress
        self._via = via

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[RoutedResponse]:
        """Send the request the forced way (see :meth:`Egress.request`)."""
        return self._egress.request_via(self._via, method, uri, headers, bodyProducer)


@implementer(IAgent)
class Egress(Service):
    """Outbound requests for one configuration: an ``IAgent`` and a service.

    Attributes:
        config: The configuration.
        reactor: The reactor (timers, connections).
        resolver: The caching resolver used to decide and to connect.
        pools: The persistent pools by way out: ``direct``, ``proxy``
            (http through the proxy) and ``tunnel`` (https through it).
        direct_endpoints: The direct endpoint factory.
        tunnel_endpoints: The tunnel endpoint factory (with a proxy_url).
    """

    #: Origins whose parsed form is kept.
    MAX_ORIGINS = 1024

    def __init__(self, config: Config, reactor: Any) -> None:
        """Build the agents and their pools.

        Args:
            config: The validated configuration.
            reactor: The reactor; its ``nameResolver`` answers the DNS
                queries that the cache cannot.
        """
        self.setName("egress")
        self.config = config
        self.reactor = reactor
        self.resolver = CachingResolver(reactor.nameResolver, reactor, ttl=config.dns_cache_ttl)
        connecting = ResolvingReactor(reactor, self.resolver)
        policy = tls_policy(config.tls)
        self.pools = {name: self._pool() for name in POOLS}
        timeout = config.timeouts.connect
        #: Counts the connections made; closes idle ones an upstream said
        #: it would close (Keep-Alive: timeout=N).
        self.watch = ConnectionWatch(reactor, config.pool.idle_timeout)
        self.direct_endpoints = DirectEndpoints(connecting, policy, timeout, self.watch)
        self._direct = Way(
            DIRECT,
            Agent.usingEndpointFactory(reactor, self.direct_endpoints, pool=self.pools["direct"]),
            Agent.usingEndpointFactory(reactor, self.direct_endpoints, pool=self._fresh_pool()),
            self.watch,
        )
        self.no_proxy = NoProxy(config.no_proxy)
        self.direct_networks = NetworkSet(config.direct_networks)
        self._origins: dict[bytes, _Origin] = {}
        self.proxy: ProxyURL | None = None
        self.tunnel_endpoints: TunnelEndpoints | None = None
        if config.proxy_url is not None:
            self.proxy = proxy = ProxyURL.parse(config.proxy_url)
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                connecting, proxy.host, proxy.port, timeout=timeout
            )
            handshake = None
            if proxy.scheme == "https":
                creator = policy.creatorForNetloc(proxy.host.encode("ascii"), proxy.port)
                endpoint = wrapClientTLS(tried(creator, proxy.name), endpoint)
                handshake = (proxy.name, timeout)
            self.proxy_endpoint = endpoint
            watched = self.watch.wrap(endpoint, handshake)
            self._proxy_http = Way(
                PROXY,
                ProxyAgent(watched, reactor, pool=self.pools["proxy"]),
                ProxyAgent(watched, reactor, pool=self._fresh_pool()),
                self.watch,
            )
            self.tunnel_endpoints = TunnelEndpoints(
                reactor, endpoint, proxy.name, proxy.authorization, policy, timeout, self.watch
            )
            self._tunnel = Way(
                PROXY,
                Agent.usingEndpointFactory(reactor, self.tunnel_endpoints, pool=self.pools["tunnel"]),
                Agent.usingEndpointFactory(reactor, self.tunnel_endpoints, pool=self._fresh_pool()),
                self.watch,
            )

    def _fresh_pool(self) -> HTTPConnectionPool:
        """A pool that keeps nothing: a new connection for every request."""
        return HTTPConnectionPool(self.reactor, persistent=False)

    def _pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = self.config.pool.max_per_host
        pool.cachedConnectionTimeout = self.config.pool.idle_timeout
        return pool

    def decide(self, host: str, via: str = "auto") -> Deferred[str]:
        """Decide how to reach ``host``.

        Args:
            host: The upstream's host name or IP literal.
            via: The route's override: ``auto``, ``direct`` or ``proxy``.

        Returns:
            Fires with ``direct`` or ``proxy``. Without a proxy_url, always
            direct. With one: ``via`` wins; then no_proxy; then an IP
            literal, or the addresses a name resolves to, inside
            direct_networks means direct; a name that does not resolve goes
            through the proxy (the proxy may know it).
        """
        if self.proxy is None or via == DIRECT:
            return succeed(DIRECT)
        if via == PROXY:
            return succeed(PROXY)
        host = host.strip("[]")
        if self.no_proxy.matches(host):
            return succeed(DIRECT)
        ip = parse_ip(host)
        if ip is not None:
            return succeed(DIRECT if ip in self.direct_networks else PROXY)

        def by_address(addresses: list[str]) -> str:
            inside = any(a in self.direct_networks for a in addresses)
            return DIRECT if inside else PROXY

        return _detached(self.resolver.resolve(host)).addCallback(by_address)

    def _origin(self, uri: bytes) -> _Origin:
        """The parsed origin of ``uri`` (cached, bounded)."""
        key = _origin_of(uri)
        origin = self._origins.get(key)
        if origin is None:
            parsed = URI.fromBytes(key)
            host = parsed.host.decode("ascii").strip("[]")
            origin = _Origin(
                scheme=parsed.scheme, host=host, port=parsed.port,
                address=host_port(host, parsed.port),
            )
            if len(self._origins) >= self.MAX_ORIGINS:
                self._origins.clear()
            self._origins[key] = origin
        return origin

    def forced(self, via: str) -> IAgent:
        """An agent sending every request one way: a route's ``via``.

        Args:
            via: ``auto``, ``direct`` or ``proxy``.

        Returns:
            The agent (for ``auto``, this egress itself).
        """
        return self if via == "auto" else _Forced(self, via)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[RoutedResponse]:
        """Send a request upstream, directly or through the proxy.

        Args:
            method: The HTTP method.
            uri: The absolute URI (``http`` or ``https``).
            headers: End-to-end request headers (Host and Content-Length
                are the agent's; Proxy-Authorization is added here).
            bodyProducer: The request body, if any.

        Returns:
            Fires with a :class:`RoutedResponse` once the head arrived, or
            fails with why not (any error on the way included). Cancelling
            stops the attempt.
        """
        try:
            origin = self._origin(uri)
        except Exception:
            return fail()
        headers = Headers() if headers is None else headers
        if self.proxy is None:
            return self._send(DIRECT, origin, method, uri, headers, bodyProducer)
        decided = self.decide(origin.host)
        return decided.addCallback(self._send, origin, method, uri, headers, bodyProducer)

    def request_via(
        self,
        via: str,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[RoutedResponse]:
        """:meth:`request`, the way ``via`` says (``auto``: decided per host)."""
        try:
            origin = self._origin(uri)
        except Exception:
            return fail()
        headers = Headers() if headers is None else headers
        if self.proxy is None or via == DIRECT:
            return self._send(DIRECT, origin, method, uri, headers, bodyProducer)
        decided = self.decide(origin.host, via)
        return decided.addCallback(self._send, origin, method, uri, headers, bodyProducer)

    def _send(
        self,
        way: str,
        origin: _Origin,
        method: bytes,
        uri: bytes,
        headers: Headers,
        producer: IBodyProducer | None,
    ) -> Deferred[RoutedResponse]:
        if way == DIRECT:
            return self._direct.send(origin.address, method, uri, headers, producer)
        assert self.proxy is not None
        if origin.scheme == b"https":
            return self._tunnel.send(self.proxy.name, method, uri, headers, producer)
        if self.proxy.authorization is not None:
            headers = headers.copy()
            headers.setRawHeaders(b"proxy-authorization", [self.proxy.authorization])
        return self._proxy_http.send(self.proxy.name, method, uri, headers, producer)

    def stopService(self) -> Deferred[None]:
        """Close every pool's idle connections (bounded in time).

        Returns:
            Fires when done.
        """
        super().stopService()
        closing = [close_pool(pool, self.reactor) for pool in self.pools.values()]
        return gatherResults(closing).addCallback(lambda _: None)


def close_pool(pool: HTTPConnectionPool, reactor: Any) -> Deferred[None]:
    """Close a pool's idle connections, giving up after a few seconds.

    Args:
        pool: The pool to close.
        reactor: For the time limit.

    Returns:
        Fires when the connections are closed or the time is up.
    """
    d = pool.closeCachedConnections()
    d.addTimeout(CLOSE_TIMEOUT, reactor)
    d.addErrback(lambda _: None)
    return d
