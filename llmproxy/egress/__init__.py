"""The outbound side: how each upstream request leaves the machine.

:class:`Egress` decides per destination host whether to connect directly or
through ``proxy_url``, and sends each request with Twisted's client, over one
:class:`~twisted.web.client.HTTPConnectionPool` per way out, so a direct
connection and a tunnelled one to the same host never share a pool:

- ``direct``: :meth:`Agent.usingEndpointFactory
  <twisted.web.client.Agent.usingEndpointFactory>` with
  :class:`~llmproxy.egress._endpoints.DirectEndpoints` (``HostnameEndpoint``
  over the caching resolver, TLS by ``BrowserLikePolicyForHTTPS``);
- ``proxy``, for ``http://`` upstreams: :class:`~twisted.web.client.ProxyAgent`
  to the proxy, with ``Proxy-Authorization``;
- ``tunnel``, for ``https://`` upstreams through the proxy: an Agent over
  :class:`~llmproxy.egress._endpoints.TunnelEndpoints` (TLS inside our CONNECT
  tunnel).

Each response is a :class:`RoutedResponse` that says which way it went and
where it connected (the configured upstream's host and port when direct, the
proxy's otherwise).

A request is never sent twice behind the caller's back: Twisted's Agent
resends only a body-less idempotent request on a reused connection, and
:meth:`Egress.request` resends only a request that provably never left
(:class:`~twisted.web.client.RequestNotSent`).
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ProxyAgent,
    RequestNotSent,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from llmproxy.config import Config
from llmproxy.egress._connect import (
    ConnectTunnelEndpoint,
    TunnelError,
    TunnelTimeout,
    host_port,
)
from llmproxy.egress._endpoints import DirectEndpoints, TunnelEndpoints, tls_policy
from llmproxy.egress._noproxy import NoProxy
from llmproxy.net import NetworkSet, parse_ip
from llmproxy.resolver import CachingResolver, ResolvingReactor

__all__ = [
    "BytesProducer",
    "ConnectTunnelEndpoint",
    "Egress",
    "NoProxy",
    "RoutedResponse",
    "TunnelError",
    "TunnelTimeout",
    "Upstream",
    "close_pool",
    "tls_policy",
]

log = Logger()

#: Seconds that closing the pools may take before the daemon stops anyway.
CLOSE_TIMEOUT = 5.0

DIRECT = "direct"
PROXY = "proxy"

#: The pools, one per way out.
POOLS = ("direct", "proxy", "tunnel")


class RoutedResponse(proxyForInterface(IResponse, "response")):  # type: ignore[misc]
    """An upstream response that knows how it was reached.

    Attributes:
        response: Twisted's response.
        egress: ``direct`` or ``proxy``.
        address: ``host:port`` the connection went to: the upstream's (as
            configured) when direct, the proxy's otherwise.
    """

    def __init__(self, response: IResponse, egress: str, address: str) -> None:
        self.response = response
        self.egress = egress
        self.address = address

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), if any."""
        values = self.response.headers.getRawHeaders(name)
        return values[0] if values else None


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one piece.

    The body was read (and size-limited) by twisted.web before the request
    was routed, so it is written synchronously: Agent sends it with a
    Content-Length and never holds a second copy.
    """

    def __init__(self, body: bytes) -> None:
        """Wrap ``body``."""
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the whole body."""
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written in one piece."""

    def resumeProducing(self) -> None:
        """Nothing to resume: the body is written in one piece."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body is written in one piece."""


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


@attrs.frozen
class Upstream:
    """A parsed upstream base URL.

    Attributes:
        scheme: ``http`` or ``https``.
        host: The host name (IDNA) or IP literal (IPv6 without brackets).
        port: The port.
        base: ``scheme://authority/path`` as bytes, without a trailing
            slash: the request's path and query are appended to it.
        address: ``host:port``, as the access record names the destination.
    """

    scheme: str
    host: str
    port: int
    base: bytes
    address: str

    @classmethod
    def parse(cls, url: str) -> Upstream:
        """Parse a base URL from the config.

        Raises:
            ValueError: Not an http(s) URL with a host.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {url!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        if ":" not in host:
            host = host.encode("idna").decode("ascii")
        address = host_port(host, port)
        authority = address if port != default else (f"[{host}]" if ":" in host else host)
        base = f"{scheme}://{authority}{parts.path.rstrip('/')}"
        return cls(scheme=scheme, host=host, port=port, base=base.encode("ascii"),
                   address=address)


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
        parsed = URI.fromBytes(f"{scheme}://{hostport.rstrip('/')}".encode())
        authorization = None
        if at:
            user, _, password = userinfo.partition(":")
            token = f"{unquote(user)}:{unquote(password)}".encode()
            authorization = b"Basic " + base64.b64encode(token)
        return cls(
            scheme=scheme.lower(),
            host=parsed.host.decode("ascii").strip("[]"),
            port=parsed.port,
            authorization=authorization,
        )


class Egress:
    """Outbound connections for one configuration.

    Attributes:
        config: The configuration.
        reactor: The reactor (timers, connections).
        resolver: The caching resolver used to decide and to connect.
        policy: The TLS policy for upstreams.
        pools: The persistent pools by way out: ``direct``, ``proxy``
            (http through the proxy) and ``tunnel`` (https through it).
        direct_endpoints: The direct endpoint factory.
        tunnel_endpoints: The tunnel endpoint factory (with a proxy_url).
    """

    #: Parsed upstream URLs kept (the least recently used go first).
    MAX_CACHED = 1024

    def __init__(self, config: Config, reactor: Any) -> None:
        """Build the agents and their pools.

        Args:
            config: The validated configuration.
            reactor: The reactor; its ``nameResolver`` answers the DNS
                queries that the cache cannot.
        """
        self.config = config
        self.reactor = reactor
        self.resolver = CachingResolver(reactor.nameResolver, reactor, ttl=config.dns_cache_ttl)
        connecting = ResolvingReactor(reactor, self.resolver)
        self.policy = tls_policy(config.tls)
        self.pools = {name: self._pool() for name in POOLS}
        timeout = config.timeouts.connect
        self.direct_endpoints = DirectEndpoints(connecting, self.policy, timeout)
        self._direct = Agent.usingEndpointFactory(
            reactor, self.direct_endpoints, pool=self.pools["direct"]
        )
        self.no_proxy = NoProxy(config.no_proxy)
        self.direct_networks = NetworkSet(config.direct_networks)
        self._upstreams: OrderedDict[str, Upstream] = OrderedDict()
        self.proxy: _Proxy | None = None
        self.tunnel_endpoints: TunnelEndpoints | None = None
        if config.proxy_url is not None:
            self.proxy = proxy = _Proxy.parse(config.proxy_url)
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                connecting, proxy.host, proxy.port, timeout=timeout
            )
            if proxy.scheme == "https":
                creator = self.policy.creatorForNetloc(proxy.host.encode("ascii"), proxy.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self.proxy_endpoint = endpoint
            self._proxy_http = ProxyAgent(endpoint, reactor, pool=self.pools["proxy"])
            self.tunnel_endpoints = TunnelEndpoints(
                reactor, endpoint, proxy.name, proxy.authorization, self.policy, timeout
            )
            self._tunnel = Agent.usingEndpointFactory(
                reactor, self.tunnel_endpoints, pool=self.pools["tunnel"]
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

    def upstream(self, url: str) -> Upstream:
        """The parsed form of an upstream base URL (cached, bounded)."""
        upstream = self._upstreams.get(url)
        if upstream is None:
            upstream = self._upstreams[url] = Upstream.parse(url)
            if len(self._upstreams) > self.MAX_CACHED:
                self._upstreams.popitem(last=False)
        return upstream

    def request(
        self,
        method: bytes,
        url: str,
        target: bytes,
        headers: Headers,
        body: bytes = b"",
        via: str = "auto",
    ) -> Deferred[RoutedResponse]:
        """Send a request upstream, directly or through the proxy.

        Args:
            method: The HTTP method.
            url: The upstream's base URL (from the config).
            target: Path and query, appended to the base URL.
            headers: End-to-end request headers (Host and Content-Length
                are the agent's, Proxy-Authorization is added here).
            body: The request body (sent with a Content-Length if any).
            via: The route's override.

        Returns:
            Fires with the response once its head arrived, or fails with why
            not (any error on the way included). Cancelling stops the
            attempt.
        """
        upstream = self.upstream(url)
        uri = upstream.base + target
        producer = BytesProducer(body) if body else None
        if self.proxy is None or via == DIRECT:
            return self._send(DIRECT, upstream, method, uri, headers, producer)
        decided = self.decide(upstream.host, via)
        return decided.addCallback(self._send, upstream, method, uri, headers, producer)

    def _send(
        self,
        route: str,
        upstream: Upstream,
        method: bytes,
        uri: bytes,
        headers: Headers,
        producer: BytesProducer | None,
    ) -> Deferred[RoutedResponse]:
        if route == DIRECT:
            agent: Any = self._direct
            address = upstream.address
        else:
            assert self.proxy is not None
            address = self.proxy.name
            if upstream.scheme == "https":
                agent = self._tunnel
            else:
                agent = self._proxy_http
                if self.proxy.authorization is not None:
                    headers = headers.copy()
                    headers.setRawHeaders(b"proxy-authorization", [self.proxy.authorization])

        def unsent(failure: Failure) -> Any:
            # The pooled connection was found unusable before a byte of the
            # request was written: it never left, so one more try is safe.
            failure.trap(RequestNotSent)
            log.debug("request to {address} not sent on a pooled connection; "
                      "sending it on another", address=address)
            return maybeDeferred(agent.request, method, uri, headers, producer).addCallback(
                RoutedResponse, route, address
            )

        # An endpoint that cannot be made (a TLS name the IDNA rules refuse,
        # say) raises inside Agent.request: it becomes this Deferred's
        # failure, never an exception the caller would not expect.
        try:
            d = agent.request(method, uri, headers, producer)
        except Exception:
            return fail()
        return d.addCallbacks(RoutedResponse, unsent, callbackArgs=(route, address))

    def close(self) -> Deferred[None]:
        """Close every pool's idle connections (bounded in time).

        Returns:
            Fires when done.
        """
        closing = [close_pool(pool, self.reactor) for pool in self.pools.values()]
        return gatherResults(closing).addCallback(lambda _: None)
