"""The outbound side: how each upstream request leaves the machine.

:class:`Egress` decides per destination host whether to connect directly or
through ``proxy_url`` and owns one persistent connection pool per route, so a
direct connection and a tunnelled one to the same host never share a pool
key:

- direct: an :class:`~twisted.web.client.Agent` whose ``HostnameEndpoint``
  resolves through the caching resolver;
- proxy, ``http://`` upstream: :class:`~twisted.web.client.ProxyAgent`
  (absolute-form request target, connections pooled per proxy);
- proxy, ``https://`` upstream: a CONNECT tunnel to host:port, TLS to the
  upstream inside it (connections pooled per upstream host:port).

Each response comes back as a :class:`RoutedResponse` that says which way it
went and the address it connected to.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported publicly
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.web.client import (
    URI,
    Agent,
    SchemeNotSupported,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ProxyAgent,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from llmproxy.config import Config, TLSConfig
from llmproxy.egress._connect import (
    ConnectTunnelEndpoint,
    TunnelError,
    TunnelTimeout,
    host_port,
)
from llmproxy.egress._noproxy import NetworkSet, NoProxy, parse_ip
from llmproxy.resolver import CachingResolver, ResolvingReactor

__all__ = [
    "ConnectTunnelEndpoint",
    "Egress",
    "NetworkSet",
    "NoProxy",
    "RoutedResponse",
    "TunnelError",
    "TunnelTimeout",
    "close_pool",
    "tls_policy",
]

log = Logger()

#: Seconds that closing the pools may take before the daemon stops anyway.
CLOSE_TIMEOUT = 5.0

DIRECT = "direct"
PROXY = "proxy"


class RoutedResponse(proxyForInterface(IResponse, "_response")):  # type: ignore[misc]
    """An upstream response that knows how it was reached.

    Attributes:
        egress: ``direct`` or ``proxy``.
        address: ``host:port`` of the peer the connection went to (the
            upstream when direct, the proxy otherwise), if known.
    """

    def __init__(self, response: IResponse, egress: str, address: str | None) -> None:
        self._response = response
        self.egress = egress
        self.address = address


@implementer(IOpenSSLTrustRoot)
@attrs.frozen
class _SystemTrustPlusFile:
    """The system trust store plus the CA certificates of one PEM file."""

    ca_file: str

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self.ca_file)


def tls_policy(tls: TLSConfig) -> BrowserLikePolicyForHTTPS:
    """The TLS policy for upstreams: verify certificates and host names.

    Args:
        tls: The ``tls`` config section.

    Returns:
        A policy trusting the system store, plus ``tls.ca_file`` if set.
    """
    root = _SystemTrustPlusFile(tls.ca_file) if tls.ca_file else platformTrust()
    return BrowserLikePolicyForHTTPS(trustRoot=root)


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


def _format_address(address: Any) -> str | None:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return None
    return host_port(host, port)


def _peer_of(response: IResponse) -> str | None:
    """The connected peer of a fresh Twisted response, if it can be seen."""
    transport = getattr(getattr(response, "_transport", None), "_producer", None)
    try:
        return _format_address(transport.getPeer()) if transport is not None else None
    except Exception:  # a transport without a peer: nothing to report
        return None


def _detached(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that can be cancelled without cancelling shared work."""
    out: Deferred[Any] = Deferred()

    def fire(result: Any) -> None:
        if not out.called:
            out.callback(result)

    d.addCallback(fire)
    return out


@attrs.frozen
class _Proxy:
    """The parsed ``proxy_url``."""

    scheme: str
    host: str
    port: int
    authorization: bytes | None

    @property
    def name(self) -> str:
        return host_port(self.host, self.port)

    @classmethod
    def parse(cls, url: str) -> _Proxy:
        scheme, _, rest = url.partition("://")
        userinfo, at, hostport = rest.rpartition("@")
        parsed = URI.fromBytes(f"{scheme}://{hostport.rstrip('/')}".encode("utf-8"))
        authorization = None
        if at:
            user, _, password = userinfo.partition(":")
            token = f"{unquote(user)}:{unquote(password)}".encode("utf-8")
            authorization = b"Basic " + base64.b64encode(token)
        return cls(
            scheme=scheme.lower(),
            host=parsed.host.decode("ascii").strip("[]"),
            port=parsed.port,
            authorization=authorization,
        )


@implementer(IAgentEndpointFactory)
class _DirectEndpointFactory:
    """Direct endpoints (TLS for https), made once per destination.

    Twisted's Agent asks for an endpoint on every request, even when a
    pooled connection will serve it; building a HostnameEndpoint (with its
    IDNA encoding) each time is a measurable part of a request's cost. The
    endpoints are kept in a bounded LRU table.
    """

    MAX = 1024

    def __init__(self, reactor: Any, policy: BrowserLikePolicyForHTTPS, timeout: float) -> None:
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._cache: OrderedDict[tuple[bytes, bytes, int], IStreamClientEndpoint] = OrderedDict()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is not None:
            self._cache.move_to_end(key)
            return endpoint
        host = uri.host.decode("ascii").strip("[]")
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        self._cache[key] = endpoint
        if len(self._cache) > self.MAX:
            self._cache.popitem(last=False)
        return endpoint


@implementer(IAgentEndpointFactory)
class _TunnelEndpointFactory:
    """Endpoints for https upstreams: TLS inside a CONNECT tunnel."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        egress = self._egress
        host = uri.host.decode("ascii").strip("[]")
        tunnel = ConnectTunnelEndpoint(
            egress.reactor,
            egress.proxy_endpoint,
            egress.proxy.name,
            host,
            uri.port,
            egress.proxy.authorization,
            egress.config.timeouts.connect,
        )
        return wrapClientTLS(egress.policy.creatorForNetloc(uri.host, uri.port), tunnel)


class Egress:
    """Outbound connections for one configuration.

    Attributes:
        config: The configuration.
        reactor: The reactor (timers, connections).
        resolver: The caching resolver used to decide and to connect.
        policy: The TLS policy for upstreams.
        pools: The persistent pools: ``direct``, ``proxy`` (http through the
            proxy) and ``tunnel`` (https through the proxy).
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        """Build the agents and pools.

        Args:
            config: The validated configuration.
            reactor: The reactor; its ``nameResolver`` answers the DNS
                queries that the cache cannot.
        """
        self.config = config
        self.reactor = reactor
        self.resolver = CachingResolver(
            reactor.nameResolver, reactor, ttl=config.dns_cache_ttl
        )
        connecting = ResolvingReactor(reactor, self.resolver)
        self.policy = tls_policy(config.tls)
        self.pools = {name: self._pool() for name in ("direct", "proxy", "tunnel")}
        timeout = config.timeouts.connect
        self._direct = Agent.usingEndpointFactory(
            reactor,
            _DirectEndpointFactory(connecting, self.policy, timeout),
            pool=self.pools["direct"],
        )
        self.no_proxy = NoProxy(config.no_proxy)
        self.direct_networks = NetworkSet(config.direct_networks)
        self.proxy: _Proxy | None = None
        if config.proxy_url is not None:
            self.proxy = _Proxy.parse(config.proxy_url)
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                connecting, self.proxy.host, self.proxy.port, timeout=timeout
            )
            if self.proxy.scheme == "https":
                creator = self.policy.creatorForNetloc(
                    self.proxy.host.encode("ascii"), self.proxy.port
                )
                endpoint = wrapClientTLS(creator, endpoint)
            self.proxy_endpoint = endpoint
            self._proxy_http = ProxyAgent(endpoint, reactor, pool=self.pools["proxy"])
            self._tunnel = Agent.usingEndpointFactory(
                reactor, _TunnelEndpointFactory(self), pool=self.pools["tunnel"]
            )

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

    def agent(self, via: str = "auto") -> IAgent:
        """An agent that sends requests the way ``via`` says.

        Args:
            via: ``auto``, ``direct`` or ``proxy``.

        Returns:
            An IAgent whose responses are :class:`RoutedResponse`.
        """
        return _EgressAgent(self, via)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
        via: str = "auto",
    ) -> Deferred[RoutedResponse]:
        """Send a request upstream, directly or through the proxy.

        Args:
            method: The HTTP method.
            uri: The absolute upstream URL.
            headers: Request headers (Host is added by the agent).
            bodyProducer: The body, if any.
            via: The route's override.

        Returns:
            Fires with the response once its headers arrived. Cancelling
            stops the attempt.
        """
        parsed = URI.fromBytes(uri)
        decided = self.decide(parsed.host.decode("ascii"), via)

        def send(route: str) -> Deferred[RoutedResponse]:
            if route == DIRECT:
                d = self._direct.request(method, uri, headers, bodyProducer)
            elif parsed.scheme == b"https":
                d = self._tunnel.request(method, uri, headers, bodyProducer)
            else:
                with_auth = headers.copy() if headers is not None else Headers()
                if self.proxy.authorization is not None:
                    with_auth.setRawHeaders(
                        b"proxy-authorization", [self.proxy.authorization]
                    )
                d = self._proxy_http.request(method, uri, with_auth, bodyProducer)

            def routed(response: IResponse) -> RoutedResponse:
                address = _peer_of(response)
                if address is None and route == PROXY:
                    address = self.proxy.name
                return RoutedResponse(response, route, address)

            return d.addCallback(routed)

        return decided.addCallback(send)

    def close(self) -> Deferred[None]:
        """Close every pool's idle connections (bounded in time).

        Returns:
            Fires when done.
        """
        closing = [close_pool(pool, self.reactor) for pool in self.pools.values()]
        return gatherResults(closing).addCallback(lambda _: None)


@implementer(IAgent)
class _EgressAgent:
    """:class:`Egress` as an IAgent with a fixed ``via``."""

    def __init__(self, egress: Egress, via: str) -> None:
        self._egress = egress
        self._via = via

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return self._egress.request(method, uri, headers, bodyProducer, self._via)
