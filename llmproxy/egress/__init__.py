"""The outbound side: how each upstream request leaves the machine.

:class:`Egress` decides per destination host whether to connect directly or
through ``proxy_url``, and sends each request with llmproxy's own HTTP/1.1
client (:mod:`llmproxy.egress._http`) over one of three kinds of pooled
connection, so a direct connection and a tunnelled one to the same host
never share a pool key:

- direct: a ``HostnameEndpoint`` that resolves through the caching
  resolver (TLS around it for https);
- proxy, ``http://`` upstream: connections to the proxy, requests in
  absolute form with ``Proxy-Authorization``;
- proxy, ``https://`` upstream: a CONNECT tunnel to host:port, TLS to the
  upstream inside it.

Each response says which way it went (``egress``) and the address it
connected to (``address``).
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet._sslverify import IOpenSSLTrustRoot  # not re-exported publicly
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from llmproxy.config import Config, TLSConfig
from llmproxy.egress._connect import (
    ConnectTunnelEndpoint,
    TunnelError,
    TunnelTimeout,
    host_port,
)
from llmproxy.egress._http import UpstreamProtocolError, UpstreamResponse
from llmproxy.egress._noproxy import NetworkSet, NoProxy, parse_ip
from llmproxy.egress._pool import ConnectionPool
from llmproxy.resolver import CachingResolver, ResolvingReactor

__all__ = [
    "ConnectTunnelEndpoint",
    "Egress",
    "NetworkSet",
    "NoProxy",
    "TunnelError",
    "TunnelTimeout",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "tls_policy",
]

log = Logger()

#: Seconds that closing the pools may take before the daemon stops anyway.
CLOSE_TIMEOUT = 5.0

DIRECT = "direct"
PROXY = "proxy"

# Methods whose requests carry no Content-Length when they have no body.
_BODYLESS = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"))


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


def _detached(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred that can be cancelled without cancelling shared work."""
    out: Deferred[Any] = Deferred()

    def fire(result: Any) -> None:
        if not out.called:
            out.callback(result)

    d.addCallback(fire)
    return out


class _Decided:
    """An attempt that waits for the direct-or-proxy decision first."""

    def __init__(
        self, send: Callable[..., Any], on_failure: Callable[[Failure], object], *args: Any
    ) -> None:
        """Remember the send.

        Args:
            send: Called as ``send(route, *args, on_failure)`` once decided.
            on_failure: Where a cancellation before then is reported.
            args: The rest of ``send``'s arguments.
        """
        self._send = send
        self._on_failure = on_failure
        self._args = args
        self._attempt: Any = None
        self._cancelled = False

    def start(self, decided: Deferred[str]) -> None:
        decided.addCallback(self._decided)

    def _decided(self, route: str) -> None:
        if not self._cancelled:
            self._attempt = self._send(route, *self._args, self._on_failure)

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._attempt is not None:
            self._attempt.cancel()
        else:
            self._on_failure(Failure(CancelledError()))


@attrs.frozen
class Upstream:
    """A parsed upstream base URL.

    Attributes:
        scheme: ``http`` or ``https``.
        host: The host name or IP literal (IPv6 without brackets).
        port: The port.
        prefix: The URL's path, without a trailing slash (``b""`` for none).
        authority: The Host header: host, and the port unless the default.
        origin: ``scheme://authority``, for absolute-form targets.
    """

    scheme: str
    host: str
    port: int
    prefix: bytes
    authority: bytes
    origin: bytes

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
        authority = host_port(host, port) if port != default else (
            f"[{host}]" if ":" in host else host
        )
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            prefix=parts.path.rstrip("/").encode("utf-8"),
            authority=authority.encode("ascii"),
            origin=f"{scheme}://{authority}".encode("ascii"),
        )


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
        pool: The persistent connections, keyed by how they reach where.
    """

    #: Parsed upstream URLs and endpoints kept (the oldest go first).
    MAX_CACHED = 1024

    def __init__(self, config: Config, reactor: Any) -> None:
        """Build the pool and the proxy endpoint.

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
        self._connecting = ResolvingReactor(reactor, self.resolver)
        self.policy = tls_policy(config.tls)
        self.pool = ConnectionPool(reactor, config.pool.max_per_host, config.pool.idle_timeout)
        self.no_proxy = NoProxy(config.no_proxy)
        self.direct_networks = NetworkSet(config.direct_networks)
        self._upstreams: OrderedDict[str, Upstream] = OrderedDict()
        self._endpoints: OrderedDict[tuple[str, str, str, int], IStreamClientEndpoint] = (
            OrderedDict()
        )
        self.proxy: _Proxy | None = None
        if config.proxy_url is not None:
            self.proxy = _Proxy.parse(config.proxy_url)
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                self._connecting, self.proxy.host, self.proxy.port,
                timeout=config.timeouts.connect,
            )
            if self.proxy.scheme == "https":
                creator = self.policy.creatorForNetloc(
                    self.proxy.host.encode("ascii"), self.proxy.port
                )
                endpoint = wrapClientTLS(creator, endpoint)
            self.proxy_endpoint = endpoint

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
        """The parsed form of an upstream base URL (cached)."""
        upstream = self._upstreams.get(url)
        if upstream is None:
            upstream = self._upstreams[url] = Upstream.parse(url)
            if len(self._upstreams) > self.MAX_CACHED:
                self._upstreams.popitem(last=False)
        return upstream

    def endpoint(self, route: str, upstream: Upstream) -> IStreamClientEndpoint:
        """The endpoint for new connections to ``upstream`` via ``route``.

        Direct: TCP (TLS for https) to the upstream. Proxy: TLS inside a
        CONNECT tunnel for https, the proxy itself for http. Endpoints are
        made once per destination, in a bounded table.
        """
        if route == PROXY and upstream.scheme == "http":
            return self.proxy_endpoint
        key = (route, upstream.scheme, upstream.host, upstream.port)
        endpoint = self._endpoints.get(key)
        if endpoint is not None:
            return endpoint
        timeout = self.config.timeouts.connect
        ip = parse_ip(upstream.host) if route == DIRECT else None
        if ip is not None:
            # An IP literal needs no resolving nor happy eyeballs: a plain
            # TCP endpoint connects in a fraction of HostnameEndpoint's time.
            tcp = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
            endpoint = tcp(self.reactor, upstream.host, upstream.port, timeout=timeout)
        elif route == DIRECT:
            endpoint = HostnameEndpoint(
                self._connecting, upstream.host, upstream.port, timeout=timeout
            )
        else:
            endpoint = ConnectTunnelEndpoint(
                self.reactor, self.proxy_endpoint, self.proxy.name, upstream.host,
                upstream.port, self.proxy.authorization, timeout,
            )
        if upstream.scheme == "https":
            # Upstream.parse made the host ASCII (IDNA) already.
            creator = self.policy.creatorForNetloc(upstream.host.encode("ascii"), upstream.port)
            endpoint = wrapClientTLS(creator, endpoint)
        self._endpoints[key] = endpoint
        if len(self._endpoints) > self.MAX_CACHED:
            self._endpoints.popitem(last=False)
        return endpoint

    def request(
        self,
        method: bytes,
        url: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        via: str = "auto",
    ) -> Deferred[UpstreamResponse]:
        """Send a request upstream, directly or through the proxy.

        Args:
            method: The HTTP method.
            url: The upstream's base URL (from the config).
            target: Path and query, appended to the base URL's path.
            headers: End-to-end request headers as ``(name, value)``; Host,
                Content-Length and Proxy-Authorization are added here.
            body: The request body.
            via: The route's override.

        Returns:
            Fires with the response once its head arrived. Cancelling stops
            the attempt.
        """
        d: Deferred[UpstreamResponse] = Deferred(lambda _: pending.cancel())
        pending = self.send(method, url, target, headers, body, via, d.callback, d.errback)
        return d

    def send(
        self,
        method: bytes,
        url: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        via: str,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: Callable[[Failure], object],
    ) -> Any:
        """:meth:`request` without a Deferred (the proxy's hot path).

        Args:
            method: As for :meth:`request`.
            url: As for :meth:`request`.
            target: As for :meth:`request`.
            headers: As for :meth:`request`.
            body: As for :meth:`request`.
            via: As for :meth:`request`.
            on_response: Called with the response once its head arrived.
            on_failure: Called with the failure instead (once either way).

        Returns:
            Something whose ``cancel()`` stops the attempt; ``on_failure``
            then gets a CancelledError unless it ended already.
        """
        upstream = self.upstream(url)
        if self.proxy is None or via == DIRECT:
            return self._send(DIRECT, upstream, method, target, headers, body,
                              on_response, on_failure)
        pending = _Decided(self._send, on_failure, upstream, method, target, headers, body,
                           on_response)
        pending.start(self.decide(upstream.host, via))
        return pending

    def _send(
        self, route: str, upstream: Upstream, method: bytes, target: bytes,
        headers: list[tuple[bytes, bytes]], body: bytes,
        on_response: Callable[[UpstreamResponse], object],
        on_failure: Callable[[Failure], object],
    ) -> Any:
        path = upstream.prefix + target
        parts = [method, b" "]
        if route == PROXY and upstream.scheme == "http":
            key: tuple[str, ...] = (PROXY,)
            parts += [upstream.origin, path, b" HTTP/1.1\r\nHost: ", upstream.authority, b"\r\n"]
            if self.proxy.authorization is not None:
                parts += [b"Proxy-Authorization: ", self.proxy.authorization, b"\r\n"]
        else:
            key = (route, upstream.scheme, upstream.host, upstream.port)
            parts += [path, b" HTTP/1.1\r\nHost: ", upstream.authority, b"\r\n"]
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        if body or method not in _BODYLESS:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        parts += [b"\r\n", body]
        return self.pool.send(
            key, self.endpoint(route, upstream), b"".join(parts), method == b"HEAD",
            route, self.proxy.name if route == PROXY else None, on_response, on_failure,
        )

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections (bounded in time).

        Returns:
            Fires when done.
        """
        d = self.pool.close()
        d.addTimeout(CLOSE_TIMEOUT, self.reactor)
        d.addBoth(lambda _: None)
        return d
