"""The endpoints upstream connections are made with, and the TLS policy.

Twisted's :class:`~twisted.web.client.Agent` asks its endpoint factory for an
endpoint on every request, even when a pooled connection will serve it.
Building a ``HostnameEndpoint`` (IDNA, happy-eyeballs state) or a TLS
connection creator each time is a measurable share of a request's cost, so
both factories here make an endpoint once per destination and keep it in a
bounded table (:class:`_EndpointTable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

# Twisted has no public name for "a trust root" (system store plus a CA
# file): the one private Twisted import llmproxy allows, kept here alone.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import platformTrust
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from llmproxy.config import TLSConfig
from llmproxy.egress._connect import ConnectTunnelEndpoint, host_port
from llmproxy.egress._keepalive import ConnectionWatch
from llmproxy.net import parse_ip

__all__ = ["DirectEndpoints", "TLSSetupError", "TunnelEndpoints", "tls_policy"]


class TLSSetupError(ConnectError):
    """TLS to an upstream could not even be set up (no connection tried)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args and self.args[0] else "TLS setup failed"


def tried(creator: IOpenSSLClientConnectionCreator, name: str) -> IOpenSSLClientConnectionCreator:
    """``creator``, once it made one TLS connection object (no socket).

    What can go wrong setting up TLS (a CA file OpenSSL refuses, a callback
    pyOpenSSL cannot allocate under a sandbox) then fails here, at once,
    instead of inside the reactor once TCP is up, where nothing would
    report it to the request.

    Raises:
        TLSSetupError: Naming ``name`` and what OpenSSL or pyOpenSSL said.
    """
    probe = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
    try:
        creator.clientConnectionForTLS(probe)
    except Exception as e:
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise TLSSetupError(string=f"TLS setup for {name} failed: {text}") from None
    return creator


@implementer(IOpenSSLTrustRoot)
@attrs.frozen
class _SystemTrustPlusFile:
    """The system trust store plus the CA certificates of one PEM file."""

    ca_file: str

    def _addCACertsToContext(self, context: Any) -> None:  # IOpenSSLTrustRoot's name
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


def _host(uri: URI) -> str:
    """The URI's host as text, an IPv6 literal without its brackets."""
    return uri.host.decode("ascii").strip("[]")


class _EndpointTable:
    """Endpoints by destination, the least recently used dropped past a bound."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._table: OrderedDict[tuple[Any, ...], IStreamClientEndpoint] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(
        self, key: tuple[Any, ...], make: Callable[[], IStreamClientEndpoint]
    ) -> IStreamClientEndpoint:
        """The endpoint for ``key``, made with ``make()`` the first time."""
        table = self._table
        endpoint = table.get(key)
        if endpoint is not None:
            table.move_to_end(key)
            return endpoint
        endpoint = table[key] = make()
        if len(table) > self.size:
            table.popitem(last=False)
        return endpoint


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """Direct connections: TCP to the upstream, TLS around it for https.

    Host names resolve through the reactor's name resolver (the caching
    resolver, by way of :class:`~llmproxy.resolver.ResolvingReactor`); an IP
    literal needs neither resolving nor happy eyeballs and gets a plain TCP
    endpoint.
    """

    #: Destinations whose endpoints are kept.
    MAX = 1024

    def __init__(
        self, reactor: Any, policy: BrowserLikePolicyForHTTPS, timeout: float,
        watch: ConnectionWatch | None = None,
    ) -> None:
        """Set up the factory.

        Args:
            reactor: Connects (and resolves, for HostnameEndpoint).
            policy: The TLS policy for https upstreams.
            timeout: The connect timeout in seconds.
            watch: Counts and watches the connections made, if given.
        """
        self._reactor = reactor
        self._policy = policy
        self._timeout = timeout
        self._watch = watch
        self.table = _EndpointTable(self.MAX)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for ``uri``'s scheme, host and port.

        Raises:
            SchemeNotSupported: Neither http nor https.
        """
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        return self.table.get((uri.scheme, uri.host, uri.port), lambda: self._make(uri))

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        host, port = _host(uri), uri.port
        ip = parse_ip(host)
        endpoint: IStreamClientEndpoint
        if ip is None:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        elif ip.version == 4:
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        else:
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        if uri.scheme != b"https":
            return endpoint if self._watch is None else self._watch.wrap(endpoint)
        name = host_port(host, port)
        endpoint = wrapClientTLS(tried(self._policy.creatorForNetloc(uri.host, port), name),
                                 endpoint)
        if self._watch is None:
            return endpoint
        return self._watch.wrap(endpoint, (name, self._timeout))


@implementer(IAgentEndpointFactory)
class TunnelEndpoints:
    """https upstreams through the outbound proxy: TLS inside a CONNECT tunnel.

    Twisted's ProxyAgent cannot CONNECT (it would send an https request to
    the proxy in plaintext), so an https upstream behind the proxy is reached
    with an ordinary Agent over these endpoints.
    """

    #: Destinations whose endpoints are kept.
    MAX = 1024

    def __init__(
        self,
        reactor: Any,
        proxy_endpoint: IStreamClientEndpoint,
        proxy_name: str,
        authorization: bytes | None,
        policy: BrowserLikePolicyForHTTPS,
        timeout: float,
        watch: ConnectionWatch | None = None,
    ) -> None:
        """Set up the factory.

        Args:
            reactor: For the CONNECT reply timeout.
            proxy_endpoint: Connects to the proxy.
            proxy_name: The proxy's ``host:port``, for error messages.
            authorization: The ``Proxy-Authorization`` value, if any.
            policy: The TLS policy for the upstreams.
            timeout: Seconds the proxy may take to answer CONNECT.
            watch: Counts and watches the connections made, if given.
        """
        self._reactor = reactor
        self._proxy_endpoint = proxy_endpoint
        self._proxy_name = proxy_name
        self._authorization = authorization
        self._policy = policy
        self._timeout = timeout
        self._watch = watch
        self.table = _EndpointTable(self.MAX)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """TLS to ``uri``'s host inside a tunnel through the proxy.

        Raises:
            SchemeNotSupported: Not https (plain http goes by ProxyAgent).
        """
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"tunnels carry https only, not {uri.scheme!r}")
        return self.table.get((uri.host, uri.port), lambda: self._make(uri))

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        tunnel = ConnectTunnelEndpoint(
            self._reactor, self._proxy_endpoint, self._proxy_name, _host(uri), uri.port,
            self._authorization, self._timeout,
        )
        name = host_port(_host(uri), uri.port)
        creator = tried(self._policy.creatorForNetloc(uri.host, uri.port), name)
        endpoint = wrapClientTLS(creator, tunnel)
        if self._watch is None:
            return endpoint
        return self._watch.wrap(endpoint, (name, self._timeout))
